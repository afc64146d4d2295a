"""An LLM judge over any OpenAI-compatible chat-completions endpoint, with an on-disk response cache.

Every answer is stored under the hash of its request (model, seed, temperature, messages, attempt), so a re-run
of an evaluation sends nothing and costs nothing. Transport errors (no connection, timeouts, HTTP 429 and 5xx)
are retried with backoff; other HTTP errors are the caller's to fix and raise `JudgeError` at once.

`--judge-url cache` answers from the cache only (offline runs and CI): a prompt that is not cached is an error.
Standard library only (urllib), so the judge needs no extra.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import EvalError

log = logging.getLogger("personaplex.eval.judge")

DEFAULT_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4-turbo"  # what Full-Duplex-Bench's user-interruption judge uses
CACHE_ONLY = "cache"
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class JudgeError(EvalError):
    """The judge endpoint refused a request, or an answer is missing from a cache-only judge."""


@dataclass
class JudgeConfig:
    url: str = DEFAULT_URL  # base URL (".../v1") or the full ".../chat/completions"; "cache": cache only
    model: str = DEFAULT_MODEL
    seed: int | None = 0  # FDB passes seed=0
    temperature: float | None = None  # None: not sent, the endpoint's default (what FDB does)
    api_key: str | None = field(default=None, repr=False)  # default: $OPENAI_API_KEY
    cache_dir: Path | None = None  # None: no cache
    retries: int = 4  # transport retries per request (so up to retries + 1 sends)
    timeout: float = 120.0
    backoff: float = 1.0  # seconds before the first retry, doubled each time
    max_tokens: int | None = None

    def validate(self) -> "JudgeConfig":
        if self.retries < 0 or self.timeout <= 0 or self.backoff < 0:
            raise JudgeError("judge retries must be >= 0, timeout > 0 and backoff >= 0")
        if self.url != CACHE_ONLY and not re.match(r"^https?://", self.url):
            raise JudgeError(f"--judge-url {self.url!r} is not an http(s) URL (or 'cache' for cached answers only)")
        if self.url == CACHE_ONLY and self.cache_dir is None:
            raise JudgeError("--judge-url cache needs a cache folder (--judge-cache DIR)")
        return self

    @property
    def endpoint(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/chat/completions") else url + "/chat/completions"


def add_judge_arguments(parser: argparse.ArgumentParser, default_model: str = DEFAULT_MODEL,
                        default_temperature: float | None = None) -> None:
    """The judge flags shared by every evaluation that uses one."""
    group = parser.add_argument_group("judge (OpenAI-compatible chat completions; key from $OPENAI_API_KEY)")
    group.add_argument("--judge-url", default=DEFAULT_URL,
                       help=f"endpoint base URL (default {DEFAULT_URL}); 'cache': answer from --judge-cache only")
    group.add_argument("--judge-model", default=default_model, help=f"judge model (default {default_model})")
    group.add_argument("--judge-seed", type=int, default=0, help="seed sent with each request (default 0)")
    group.add_argument("--judge-temperature", type=float, default=default_temperature,
                       help="sampling temperature (default: " +
                            ("not sent, the endpoint's default" if default_temperature is None
                             else str(default_temperature)) + ")")
    group.add_argument("--judge-cache", default=None,
                       help="folder of cached answers (default: OUT/judge_cache); a re-run sends nothing")
    group.add_argument("--judge-retries", type=int, default=4, help="retries on transport errors (default 4)")
    group.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per request (default 120)")


def config_from_args(args: argparse.Namespace, default_cache: Path | None = None) -> JudgeConfig:
    cache = Path(args.judge_cache) if args.judge_cache else default_cache
    return JudgeConfig(url=args.judge_url, model=args.judge_model, seed=args.judge_seed,
                       temperature=args.judge_temperature, cache_dir=cache, retries=args.judge_retries,
                       timeout=args.judge_timeout).validate()


class Judge:
    """`judge(prompt, system=...) -> str`; `complete(messages) -> str`. Counts what it actually sent."""

    def __init__(self, config: JudgeConfig, sleep: Callable[[float], None] = time.sleep) -> None:
        self.config = config.validate()
        self.sent = 0  # requests that reached the network (including retried ones)
        self.cache_hits = 0
        self._sleep = sleep
        key = config.api_key if config.api_key is not None else os.environ.get("OPENAI_API_KEY")
        if config.url != CACHE_ONLY and not key and "api.openai.com" in config.url:
            raise JudgeError("no API key for the judge: set OPENAI_API_KEY (or point --judge-url at another "
                             "OpenAI-compatible endpoint, or use --judge-url cache)")
        self._key = key

    def judge(self, prompt: str, system: str | None = None, attempt: int = 0) -> str:
        messages = ([{"role": "system", "content": system}] if system is not None else [])
        messages.append({"role": "user", "content": prompt})
        return self.complete(messages, attempt)

    def complete(self, messages: list[dict], attempt: int = 0) -> str:
        """The assistant's reply. `attempt` > 0 asks again for the same messages (a separate cache entry)."""
        request = self._request(messages)
        key = request_key(request, attempt)
        cached = self._cache_read(key)
        if cached is not None:
            self.cache_hits += 1
            return cached
        if self.config.url == CACHE_ONLY:
            raise JudgeError(f"answer {key[:12]} is not in the judge cache {self.config.cache_dir}; run once "
                             "against a real --judge-url first")
        reply = self._send(request)
        self._cache_write(key, request, attempt, reply)
        return reply

    def _request(self, messages: list[dict]) -> dict:
        request: dict = {"model": self.config.model, "messages": messages}
        if self.config.seed is not None:
            request["seed"] = self.config.seed
        if self.config.temperature is not None:
            request["temperature"] = self.config.temperature
        if self.config.max_tokens is not None:
            request["max_tokens"] = self.config.max_tokens
        return request

    def _send(self, request: dict) -> str:
        body = json.dumps(request).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        delay = self.config.backoff
        for attempt in range(self.config.retries + 1):
            last = attempt == self.config.retries
            self.sent += 1
            try:
                req = urllib.request.Request(self.config.endpoint, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.config.timeout) as resp:
                    payload = json.loads(resp.read().decode("utf-8"))
                return _reply_text(payload, self.config.endpoint)
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:300].decode("utf-8", "replace")
                if exc.code not in RETRY_STATUS or last:
                    hint = " (check OPENAI_API_KEY)" if exc.code in (401, 403) else ""
                    raise JudgeError(f"judge {self.config.endpoint} answered HTTP {exc.code}{hint}: "
                                     f"{detail.strip()}") from None
                log.warning("judge HTTP %d, retrying in %.1f s", exc.code, delay)
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as exc:
                if last:
                    raise JudgeError(f"judge {self.config.endpoint} unreachable after "
                                     f"{self.config.retries + 1} tries: {exc}") from None
                log.warning("judge transport error (%s), retrying in %.1f s", exc, delay)
            self._sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def _cache_path(self, key: str) -> Path | None:
        return self.config.cache_dir / key[:2] / f"{key}.json" if self.config.cache_dir else None

    def _cache_read(self, key: str) -> str | None:
        path = self._cache_path(key)
        if path is None or not path.is_file():
            return None
        try:
            return json.loads(path.read_text())["reply"]
        except (OSError, ValueError, KeyError):
            log.warning("ignoring a damaged judge cache entry %s", path)
            return None

    def _cache_write(self, key: str, request: dict, attempt: int, reply: str) -> None:
        path = self._cache_path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"request": request, "attempt": attempt, "reply": reply}, ensure_ascii=False))
        tmp.replace(path)  # atomic: an interrupted run never leaves half an entry


def request_key(request: dict, attempt: int = 0) -> str:
    """sha256 of the request (the prompt and every setting that changes the answer)."""
    keyed = dict(request, attempt=attempt) if attempt else request
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _reply_text(payload: dict, endpoint: str) -> str:
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise JudgeError(f"judge {endpoint} returned no choices[0].message.content: "
                         f"{json.dumps(payload)[:200]}") from None
    return content if isinstance(content, str) else ""


# ---- parse helpers -------------------------------------------------------------------------------------------

FDB_RATING = re.compile(r"Analysis:\s*(.*?)\nI would rate the AI's response as (\d+)", re.DOTALL)


def parse_fdb_rating(reply: str) -> dict | None:
    """Full-Duplex-Bench's parse rule: the last "Analysis: ...\\nI would rate the AI's response as N" in
    reply + "\\n"; {"analysis", "rating"} or None when the reply does not match."""
    found = None
    for match in FDB_RATING.finditer(reply + "\n"):
        found = {"analysis": match.group(1).strip(), "rating": int(match.group(2).strip())}
    return found


def parse_labeled_score(reply: str, label: str, low: float = 0, high: float = 5) -> float | None:
    """The last number after `label` (e.g. "Task adherence: 4"), if it lies in [low, high]; else None."""
    pattern = re.compile(re.escape(label) + r"\W{0,5}\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
    values = [float(m.group(1)) for m in pattern.finditer(reply)]
    if not values or not low <= values[-1] <= high:
        return None
    return values[-1]


def parse_json_object(reply: str) -> dict | None:
    """The first {...} JSON object in a reply (models often wrap it in prose or a code fence); None if none."""
    decoder = json.JSONDecoder()
    start = reply.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(reply, start)
        except ValueError:
            start = reply.find("{", start + 1)
            continue
        return value if isinstance(value, dict) else None
    return None


def judge_parsed(judge: Judge, messages: list[dict], parse: Callable[[str], object | None],
                 tries: int = 3) -> tuple[object | None, list[str]]:
    """Ask until `parse(reply)` is not None, at most `tries` times (each try its own cache entry, so a re-run
    replays the same sequence for free). Returns (parsed or None, every reply)."""
    replies: list[str] = []
    for attempt in range(max(1, tries)):
        reply = judge.complete(messages, attempt)
        replies.append(reply)
        parsed = parse(reply)
        if parsed is not None:
            return parsed, replies
    return None, replies
