"""`personaplex eval latency`: real-time calls against a running server, timed from the caller's side.

    personaplex eval latency --url ws://127.0.0.1:8998/api/chat --calls 8 --concurrency 4 --out latency.json

Each call speaks the released `/api/chat` protocol (Ogg/Opus at 24 kHz both ways, persona in the query string)
and plays a scripted caller in real time, 20 ms of audio at a time: a lead-in of silence, then `--turns`
turns. A turn is one caller utterance (espeak-ng, or `--tts tones`), then silence while the agent answers;
once the agent has talked for `--barge-after` seconds the caller interrupts it with a short utterance, then
waits (silence) for the agent to stop before the next turn. Two figures come out of every turn:

- **response latency**: from the moment the caller's last speech sample was sent to the arrival of the first
  agent audio frame of its answer (the first voiced run of at least `--min-speech` seconds). A turn where the
  agent was already talking when the caller finished (overlap, backchannel) is counted, not timed.
- **stop latency**: from the first sample of the interruption to the arrival of the agent's last voiced frame
  before a silence of at least `--min-silence` seconds. An agent that goes on for `--max-wait` seconds is
  counted as not stopping.

Times are wall-clock times on this machine of audio sent and audio received (network, the server's input
buffer, the model, Opus framing; not a client's jitter buffer). Voiced frames are found after the call, on
the received audio, by an energy gate (`--vad energy`: 20 ms frames above `--threshold-db` dBFS) or silero VAD
(`--vad silero`); the caller's own turn-taking decisions use the energy gate live. On a demo checkpoint the
model's weights are random: its "speech" is noise, so the figures measure the pipeline, not a model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from ..config import SAMPLE_RATE
from . import EvalError

log = logging.getLogger("personaplex.eval.latency")

CHUNK = 480  # 20 ms: what the caller sends per websocket message, and the VAD frame
CHUNK_SECONDS = CHUNK / SAMPLE_RATE
VADS = ("energy", "silero")
UTTERANCES = (
    "Hi, I am calling about my internet bill from last month.",
    "Can you tell me why the price went up?",
    "Okay. And can I change my plan to a cheaper one?",
    "What would the new monthly price be?",
    "Great, please go ahead and do that.",
)
INTERRUPTIONS = ("Sorry, wait a second.", "Hold on, one question.", "Excuse me, sorry.")
DEFAULT_PROMPT = "You work for CityNet, an internet provider, and your name is Sam. Help the caller with billing."


@dataclass
class LatencyConfig:
    url: str
    calls: int = 4
    concurrency: int = 2
    turns: int = 3
    text_prompt: str = DEFAULT_PROMPT
    voice_prompt: str | None = None
    seed: int = 0  # call i uses seed + i
    lead_seconds: float = 1.0
    max_wait: float = 5.0  # longest wait for an answer, and for an interrupted agent to stop
    barge_in: bool = True
    barge_after: float = 1.0
    min_speech: float = 0.12
    min_silence: float = 0.4
    threshold_db: float = -40.0
    vad: str = "energy"
    connect_timeout: float = 60.0
    tts: str = "espeak"
    user_voice: str | None = "en-us+m3"
    turn_lines: tuple[str, ...] = UTTERANCES
    interruption_lines: tuple[str, ...] = INTERRUPTIONS
    auth_token: str | None = field(default=None, repr=False)  # the server's access token, if it has one

    def validate(self) -> "LatencyConfig":
        parts = urlsplit(self.url)
        if parts.scheme not in ("ws", "wss") or not parts.netloc:
            raise EvalError(f"--url {self.url!r} must be a websocket URL such as ws://127.0.0.1:8998/api/chat")
        if self.calls < 1 or self.concurrency < 1 or self.turns < 1:
            raise EvalError("--calls, --concurrency and --turns must be at least 1")
        if min(self.max_wait, self.barge_after, self.min_speech, self.min_silence, self.connect_timeout) <= 0 \
                or self.lead_seconds < 0:
            raise EvalError("--max-wait, --barge-after, --min-speech, --min-silence and --connect-timeout must be "
                            "positive, --lead-seconds non-negative")
        if self.vad not in VADS:
            raise EvalError(f"--vad must be one of {', '.join(VADS)}")
        return self


def call_url(config: LatencyConfig, index: int) -> str:
    """The chat URL with the persona and seed of call `index` added to whatever query it already has."""
    parts = urlsplit(config.url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    query.setdefault("text_prompt", config.text_prompt)
    if config.voice_prompt:
        query.setdefault("voice_prompt", config.voice_prompt)
    query["seed"] = str(config.seed + index)
    return urlunsplit(parts._replace(query=urlencode(query)))


# -- the caller's audio -----------------------------------------------------------------------------------------
def read_lines(path: str | Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`--lines FILE`: {"turns": [...], "interruptions": [...]}, the caller's texts (interruptions optional)."""
    try:
        raw = json.loads(Path(path).read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise EvalError(f"--lines {path}: cannot read it as JSON ({exc})") from None
    ok = lambda v: isinstance(v, list) and v and all(isinstance(t, str) and t.strip() for t in v)  # noqa: E731
    if not isinstance(raw, dict) or not ok(raw.get("turns")) or not ok(raw.get("interruptions", INTERRUPTIONS)):
        raise EvalError(f'--lines {path}: expected {{"turns": ["...", ...], "interruptions": ["...", ...]}} '
                        "with non-empty texts")
    return tuple(raw["turns"]), tuple(raw.get("interruptions", INTERRUPTIONS))


def caller_lines(tts_spec: str, voice: str | None, turns: tuple[str, ...] = UTTERANCES,
                 interruptions: tuple[str, ...] = INTERRUPTIONS) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(turn utterances, interruptions) as 24 kHz mono audio with peak 0.5."""
    from ..audio import resample
    from ..train.synth import load_tts

    tts = load_tts(tts_spec)

    def say(text: str) -> np.ndarray:
        utt = tts.synthesize(text, voice)
        pcm = resample(np.asarray(utt.pcm, np.float32), utt.sample_rate, SAMPLE_RATE)
        peak = float(np.abs(pcm).max()) if len(pcm) else 0.0
        return (pcm * (0.5 / peak) if peak > 0 else pcm).astype(np.float32)

    return [say(t) for t in turns], [say(t) for t in interruptions]


# -- what was received ------------------------------------------------------------------------------------------
class AgentAudio:
    """Decoded agent audio with the arrival time of every 20 ms frame, and the live energy gate."""

    def __init__(self, threshold_db: float) -> None:
        self.threshold_db = threshold_db
        self.chunks: list[np.ndarray] = []
        self.frame_arrivals: list[float] = []
        self.frame_voiced: list[bool] = []
        self._pending = np.zeros(0, np.float32)

    def add(self, pcm: np.ndarray, arrival: float) -> None:
        if pcm.size == 0:
            return
        self.chunks.append(pcm)
        data = np.concatenate([self._pending, pcm]) if self._pending.size else pcm
        n = len(data) // CHUNK
        for i in range(n):
            frame = data[i * CHUNK:(i + 1) * CHUNK]
            self.frame_arrivals.append(arrival)
            self.frame_voiced.append(frame_db(frame) > self.threshold_db)
        self._pending = data[n * CHUNK:]

    @property
    def pcm(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.float32)

    def voiced_since(self, t: float, min_frames: int) -> bool:
        """A run of `min_frames` voiced frames, all arrived after `t`."""
        run = 0
        for arrival, voiced in zip(reversed(self.frame_arrivals), reversed(self.frame_voiced)):
            if arrival <= t:
                break
            run = run + 1 if voiced else 0
            if run >= min_frames:
                return True
        return False

    def voiced_within(self, now: float, seconds: float) -> bool:
        for arrival, voiced in zip(reversed(self.frame_arrivals), reversed(self.frame_voiced)):
            if arrival < now - seconds:
                return False
            if voiced:
                return True
        return False


def frame_db(frame: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(np.square(frame, dtype=np.float64)) + 1e-12))


def voiced_frames(pcm: np.ndarray, method: str, threshold_db: float) -> np.ndarray:
    """Per 20 ms frame of `pcm` (24 kHz): voiced or not, by the energy gate or silero VAD."""
    n = len(pcm) // CHUNK
    if method == "energy":
        frames = pcm[: n * CHUNK].reshape(n, CHUNK).astype(np.float64)
        return 10 * np.log10(np.mean(frames ** 2, axis=1) + 1e-12) > threshold_db
    from .vad import speech_seconds

    voiced = np.zeros(n, dtype=bool)
    for start, end in speech_seconds(pcm, SAMPLE_RATE):
        voiced[int(start / CHUNK_SECONDS):int(np.ceil(end / CHUNK_SECONDS))] = True
    return voiced


def speech_runs(voiced: np.ndarray, min_speech_frames: int, min_silence_frames: int) -> list[tuple[int, int]]:
    """[(first, last)] frame indices of speech: gaps shorter than `min_silence_frames` are bridged, then runs
    shorter than `min_speech_frames` dropped."""
    runs: list[list[int]] = []
    for i in np.flatnonzero(voiced):
        if runs and i - runs[-1][1] - 1 < min_silence_frames:
            runs[-1][1] = int(i)
        else:
            runs.append([int(i), int(i)])
    return [(a, b) for a, b in runs if b - a + 1 >= min_speech_frames]


# -- one call ---------------------------------------------------------------------------------------------------
@dataclass
class Turn:
    user_end: float  # when the last speech sample of the caller's turn was sent (seconds from the call start)
    barge_start: float | None = None  # when the interruption's first sample was sent
    response: dict = field(default_factory=dict)
    barge_in: dict = field(default_factory=dict)


@dataclass
class CallResult:
    index: int
    seed: int
    handshake_s: float | None = None
    error: str | None = None
    turns: list[Turn] = field(default_factory=list)
    sent_s: float = 0.0
    received_s: float = 0.0
    text: str = ""
    last_arrival: float = 0.0


class Call:
    """One scripted caller: sends in real time, receives meanwhile, then measures."""

    def __init__(self, config: LatencyConfig, index: int, lines: list[np.ndarray], interruptions: list[np.ndarray]):
        import sphn

        self.config, self.index = config, index
        self.lines, self.interruptions = lines, interruptions
        self.result = CallResult(index, config.seed + index)
        self.agent = AgentAudio(config.threshold_db)
        self.writer = sphn.OpusStreamWriter(SAMPLE_RATE)
        self.reader = sphn.OpusStreamReader(SAMPLE_RATE)
        self.texts: list[str] = []
        self.sent = 0  # samples
        self.t0 = 0.0
        self.ws = None
        self.closed = False

    def now(self) -> float:
        return time.perf_counter() - self.t0

    async def run(self, http) -> CallResult:
        import aiohttp

        url = call_url(self.config, self.index)
        started = time.perf_counter()
        try:
            headers = {"Authorization": f"Bearer {self.config.auth_token}"} if self.config.auth_token else None
            async with http.ws_connect(url, max_msg_size=1 << 22, heartbeat=None, headers=headers) as ws:
                self.ws = ws
                await self._handshake()
                self.result.handshake_s = time.perf_counter() - started
                self.t0 = time.perf_counter()
                receiver = asyncio.create_task(self._receive())
                try:
                    await self._script()
                    await self._send_silence_for(0.3)  # the last frames in flight
                finally:
                    receiver.cancel()
                    await asyncio.gather(receiver, return_exceptions=True)
        except aiohttp.WSServerHandshakeError as exc:
            self.result.error = f"the server refused the websocket ({exc.status} {exc.message}); is {url} a " \
                                "personaplex /api/chat endpoint?"
        except aiohttp.ClientConnectionError as exc:
            if self.result.error is None:
                self.result.error = f"connection failed: {exc or type(exc).__name__}"
        except asyncio.TimeoutError:
            if self.result.error is None:
                self.result.error = f"no handshake within {self.config.connect_timeout:.0f} s"
        except CallEnded as exc:
            self.result.error = self.result.error or str(exc)
        self.measure()
        return self.result

    async def _handshake(self) -> None:
        import aiohttp

        deadline = time.perf_counter() + self.config.connect_timeout
        while True:
            msg = await self.ws.receive(timeout=max(0.01, deadline - time.perf_counter()))
            if msg.type != aiohttp.WSMsgType.BINARY or not msg.data:
                raise CallEnded(f"the server closed the call before its handshake ({msg.type.name})")
            kind, payload = msg.data[0], msg.data[1:]
            if kind == 0x00:
                return
            if kind == 0x05:
                self.result.error = f"server error: {payload.decode('utf-8', 'replace')}"
                raise CallEnded(self.result.error)
            # 0x04 metadata (queue position) and anything else: keep waiting

    async def _receive(self) -> None:
        import aiohttp

        while True:
            msg = await self.ws.receive()
            arrival = self.now()
            if msg.type != aiohttp.WSMsgType.BINARY or not msg.data:
                self.closed = True
                return
            kind, payload = msg.data[0], msg.data[1:]
            if kind == 0x01:
                self.agent.add(self.reader.append_bytes(payload), arrival)
                self.result.last_arrival = arrival
            elif kind == 0x02:
                self.texts.append(payload.decode("utf-8", "replace"))
            elif kind == 0x05:
                self.result.error = f"server error: {payload.decode('utf-8', 'replace')}"
                self.closed = True
                return

    # -- the caller's script ------------------------------------------------------------------------------------
    async def _send(self, pcm: np.ndarray) -> None:
        """Send `pcm` in 20 ms chunks like a microphone: sample k is "spoken" at k / 24000 s on the call's
        clock, and its chunk leaves once the chunk's last sample has been spoken."""
        for offset in range(0, len(pcm), CHUNK):
            if self.closed:
                raise CallEnded(self.result.error or "the server closed the call")
            chunk = np.zeros(CHUNK, np.float32)
            piece = pcm[offset:offset + CHUNK]
            chunk[: len(piece)] = piece
            await asyncio.sleep(max(0.0, (self.sent + CHUNK) / SAMPLE_RATE - self.now()))
            pages = self.writer.append_pcm(chunk)
            if pages:
                await self.ws.send_bytes(b"\x01" + pages)
            self.sent += CHUNK

    async def _send_silence_for(self, seconds: float) -> None:
        await self._send(np.zeros(int(seconds * SAMPLE_RATE), np.float32))

    async def _silence_until(self, done, seconds: float) -> bool:
        """Silence until `done()` or for `seconds`; whether `done()` came true."""
        end = self.now() + seconds
        while self.now() < end:
            if done():
                return True
            await self._send(np.zeros(CHUNK, np.float32))
        return done()

    async def _script(self) -> None:
        c = self.config
        min_frames = max(1, round(c.min_speech / CHUNK_SECONDS))
        await self._send_silence_for(c.lead_seconds)
        for i in range(c.turns):
            line = self.lines[(self.index + i) % len(self.lines)]
            turn = Turn(user_end=(self.sent + _voiced_span(line)[1]) / SAMPLE_RATE)
            await self._send(line)
            self.result.turns.append(turn)
            answered = await self._silence_until(lambda: self.agent.voiced_since(turn.user_end, min_frames),
                                                 c.max_wait)
            if answered and c.barge_in:
                await self._silence_until(lambda: False, c.barge_after)
                if self.agent.voiced_within(self.now(), 0.2):
                    interruption = self.interruptions[(self.index + i) % len(self.interruptions)]
                    turn.barge_start = (self.sent + _voiced_span(interruption)[0]) / SAMPLE_RATE
                    await self._send(interruption)
            await self._silence_until(lambda: not self.agent.voiced_within(self.now(), c.min_silence), c.max_wait)
            await self._send_silence_for(0.2)

    # -- the figures --------------------------------------------------------------------------------------------
    def measure(self) -> None:
        c, r = self.config, self.result
        r.sent_s = self.sent / SAMPLE_RATE
        pcm = self.agent.pcm
        r.received_s = len(pcm) / SAMPLE_RATE
        r.text = "".join(self.texts)
        arrivals = np.asarray(self.agent.frame_arrivals[: len(pcm) // CHUNK])
        if not r.turns or arrivals.size == 0:
            return
        voiced = voiced_frames(pcm[: arrivals.size * CHUNK], c.vad, c.threshold_db)
        runs = [(arrivals[a], arrivals[b]) for a, b in speech_runs(
            voiced, max(1, round(c.min_speech / CHUNK_SECONDS)), max(1, round(c.min_silence / CHUNK_SECONDS)))]
        end_of_audio = float(arrivals[-1])
        for turn in r.turns:
            turn.response = response_latency(runs, turn.user_end, c.max_wait)
            if turn.barge_start is not None:
                turn.barge_in = stop_latency(runs, turn.barge_start, end_of_audio, c.max_wait)


def _voiced_span(pcm: np.ndarray) -> tuple[int, int]:
    """[first, last + 1) samples of an utterance above 1 % of its peak (the TTS's leading and trailing silence
    is not speech)."""
    loud = np.flatnonzero(np.abs(pcm) > 0.01 * max(float(np.abs(pcm).max(initial=0.0)), 1e-9))
    return (int(loud[0]), int(loud[-1]) + 1) if loud.size else (0, len(pcm))


class CallEnded(Exception):
    """The server ended the call (error message or close)."""


def response_latency(runs: list[tuple[float, float]], user_end: float, max_wait: float) -> dict:
    """From the end of the caller's turn to the onset of the agent's next speech run (arrival times)."""
    for onset, offset in runs:
        if onset <= user_end <= offset:
            return {"status": "overlap"}  # the agent was talking when the caller finished
        if user_end < onset <= user_end + max_wait:
            return {"status": "answered", "latency": round(onset - user_end, 4)}
    return {"status": "no_response"}


def stop_latency(runs: list[tuple[float, float]], barge_start: float, end_of_audio: float, max_wait: float) -> dict:
    """From the start of the interruption to the end of the agent's speech run it interrupted."""
    for onset, offset in runs:
        if onset <= barge_start <= offset:
            if offset >= end_of_audio - 1e-9 or offset - barge_start > max_wait:
                return {"status": "did_not_stop"}
            return {"status": "stopped", "latency": round(offset - barge_start, 4)}
    return {"status": "not_talking"}  # the agent had stopped before the interruption reached it


# -- many calls -------------------------------------------------------------------------------------------------
def stats(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "mean": None, "p50": None, "p90": None, "p95": None, "max": None}
    v = np.asarray(values, dtype=np.float64)
    return {"count": int(v.size), "mean": round(float(v.mean()), 4), "p50": round(float(np.percentile(v, 50)), 4),
            "p90": round(float(np.percentile(v, 90)), 4), "p95": round(float(np.percentile(v, 95)), 4),
            "max": round(float(v.max()), 4)}


def summarize(config: LatencyConfig, calls: list[CallResult]) -> dict:
    turns = [t for call in calls for t in call.turns]
    response = [t.response["latency"] for t in turns if "latency" in t.response]
    stop = [t.barge_in["latency"] for t in turns if "latency" in t.barge_in]
    counts = {"calls": len(calls), "failed_calls": sum(c.error is not None for c in calls), "turns": len(turns)}
    for status in ("answered", "overlap", "no_response"):
        counts[status] = sum(t.response.get("status") == status for t in turns)
    for status in ("stopped", "did_not_stop", "not_talking"):
        counts[f"barge_in_{status}"] = sum(t.barge_in.get("status") == status for t in turns)
    settings = asdict(config)
    settings.pop("auth_token")  # never written to a results file
    return {"url": config.url, "settings": settings, "response_latency": stats(response), "stop_latency": stats(stop),
            "handshake": stats([c.handshake_s for c in calls if c.handshake_s is not None]),
            # agent audio received per second of call: below 1 the server fell behind real time (or dropped audio)
            "received_ratio": stats([c.received_s / c.sent_s for c in calls if c.sent_s > 0]), "counts": counts,
            "calls": [asdict(c) for c in calls]}


async def run_calls(config: LatencyConfig, lines=None, interruptions=None) -> dict:
    import aiohttp

    config.validate()
    if lines is None:
        lines, interruptions = caller_lines(config.tts, config.user_voice, config.turn_lines,
                                            config.interruption_lines)
    gate = asyncio.Semaphore(config.concurrency)

    async def one(index: int, http) -> CallResult:
        async with gate:
            return await Call(config, index, lines, interruptions).run(http)

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        calls = await asyncio.gather(*(one(i, http) for i in range(config.calls)))
    return summarize(config, list(calls))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = LatencyConfig(url="")
    parser.add_argument("--url", required=True, help="the server's chat endpoint, e.g. ws://127.0.0.1:8998/api/chat")
    parser.add_argument("--calls", type=int, default=d.calls, help=f"calls in all (default {d.calls})")
    parser.add_argument("--concurrency", type=int, default=d.concurrency,
                        help=f"calls at the same time (default {d.concurrency})")
    parser.add_argument("--turns", type=int, default=d.turns, help=f"caller turns per call (default {d.turns})")
    parser.add_argument("--text-prompt", default=d.text_prompt, help="the persona's text prompt")
    parser.add_argument("--voice-prompt", default=None, help="a voice name the server knows (default: its own)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of call 0; call i uses seed + i")
    parser.add_argument("--no-barge-in", action="store_true", help="never interrupt the agent (no stop latency)")
    parser.add_argument("--barge-after", type=float, default=d.barge_after,
                        help=f"seconds of agent speech before the caller interrupts (default {d.barge_after})")
    parser.add_argument("--max-wait", type=float, default=d.max_wait,
                        help=f"seconds to wait for an answer or for the agent to stop (default {d.max_wait})")
    parser.add_argument("--lead-seconds", type=float, default=d.lead_seconds, help="silence before the first turn")
    parser.add_argument("--vad", choices=VADS, default=d.vad, help="voiced frames of the agent's audio")
    parser.add_argument("--threshold-db", type=float, default=d.threshold_db,
                        help=f"energy gate in dBFS per 20 ms frame (default {d.threshold_db})")
    parser.add_argument("--min-speech", type=float, default=d.min_speech, help="shortest agent speech run, s")
    parser.add_argument("--min-silence", type=float, default=d.min_silence,
                        help="silence that ends an agent speech run, s")
    parser.add_argument("--connect-timeout", type=float, default=d.connect_timeout,
                        help="seconds to wait for the connection and the handshake (persona build, queue)")
    parser.add_argument("--tts", default=d.tts, help="caller voice: espeak (default), tones, or package.module:Class")
    parser.add_argument("--user-voice", default=d.user_voice, help="the TTS voice of the caller")
    parser.add_argument("--lines", default=None,
                        help='JSON {"turns": [...], "interruptions": [...]}: the caller\'s texts (default: a '
                             "billing call)")
    parser.add_argument("--auth-token", default=None,
                        help="the server's access token (sent as a Bearer token; default $PERSONAPLEX_AUTH_TOKEN)")
    parser.add_argument("--out", default=None, help="results JSON")


def run(args: argparse.Namespace) -> int:
    turns, interruptions = read_lines(args.lines) if args.lines else (UTTERANCES, INTERRUPTIONS)
    config = LatencyConfig(
        url=args.url, calls=args.calls, concurrency=args.concurrency, turns=args.turns, text_prompt=args.text_prompt,
        voice_prompt=args.voice_prompt, seed=args.seed, lead_seconds=args.lead_seconds, max_wait=args.max_wait,
        barge_in=not args.no_barge_in, barge_after=args.barge_after, min_speech=args.min_speech,
        min_silence=args.min_silence, threshold_db=args.threshold_db, vad=args.vad,
        connect_timeout=args.connect_timeout, tts=args.tts, user_voice=args.user_voice,
        turn_lines=turns, interruption_lines=interruptions,
        auth_token=args.auth_token or os.environ.get("PERSONAPLEX_AUTH_TOKEN")).validate()
    result = asyncio.run(run_calls(config))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    counts = result["counts"]
    if counts["failed_calls"] == counts["calls"]:
        first = next(c["error"] for c in result["calls"] if c["error"])
        raise EvalError(f"every call failed; the first: {first}")
    print(format_summary(result) + (f"\nwrote {args.out}" if args.out else ""))
    return 0


def format_summary(result: dict) -> str:
    def line(name: str, s: dict) -> str:
        if not s["count"]:
            return f"{name}: no measurement"
        return (f"{name}: p50 {s['p50'] * 1000:.0f} ms, p90 {s['p90'] * 1000:.0f} ms, mean {s['mean'] * 1000:.0f} ms, "
                f"max {s['max'] * 1000:.0f} ms over {s['count']}")

    c = result["counts"]
    return "\n".join([
        line("response latency", result["response_latency"]), line("stop latency", result["stop_latency"]),
        f"turns {c['turns']}: {c['answered']} answered, {c['overlap']} overlapped, {c['no_response']} unanswered; "
        f"barge-ins: {c['barge_in_stopped']} stopped, {c['barge_in_did_not_stop']} did not stop; "
        f"calls {c['calls']}, failed {c['failed_calls']}"
        + (f"; agent audio received {result['received_ratio']['mean']:.0%} of the calls' length"
           if result["received_ratio"]["count"] else "")])
