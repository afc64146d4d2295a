"""The judge client against a loopback OpenAI-compatible server (aiohttp on 127.0.0.1): cache, retries, parsing."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from personaplex.eval.judge import (Judge, JudgeConfig, JudgeError, judge_parsed, parse_fdb_rating,
                                    parse_json_object, parse_labeled_score, request_key)


class JudgeServer:
    """POST /v1/chat/completions answered by `reply(messages, request) -> str | int` (an int: that HTTP status)."""

    def __init__(self, reply):
        self.reply = reply
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self._ready = threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "judge test server did not start"
        return self

    def __exit__(self, *exc):
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _serve(self):
        from aiohttp import web

        async def handle(request):
            body = await request.json()
            self.requests.append(body)
            self.headers.append(dict(request.headers))
            answer = self.reply(body["messages"], body)
            if isinstance(answer, int):
                return web.json_response({"error": {"message": "test error"}}, status=answer)
            return web.json_response({"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]})

        async def main():
            self._stop = asyncio.Event()
            app = web.Application()
            app.router.add_post("/v1/chat/completions", handle)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()

        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(main())


def make_judge(server, tmp_path, **kw) -> Judge:
    return Judge(JudgeConfig(url=server.url, cache_dir=tmp_path / "cache", api_key="sk-test", backoff=0.0, **kw))


def test_cache_makes_a_rerun_send_nothing(tmp_path):
    with JudgeServer(lambda m, r: f"echo {m[-1]['content']}") as server:
        judge = make_judge(server, tmp_path)
        assert judge.judge("one", system="sys") == "echo one"
        assert judge.judge("two") == "echo two"
        assert judge.sent == 2 and len(server.requests) == 2
        body = server.requests[0]
        assert body["model"] == "gpt-4-turbo" and body["seed"] == 0 and "temperature" not in body
        assert body["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "one"}]
        assert server.headers[0]["Authorization"] == "Bearer sk-test"
        again = make_judge(server, tmp_path)  # a fresh process: only the disk cache is shared
        assert again.judge("one", system="sys") == "echo one" and again.judge("two") == "echo two"
        assert again.sent == 0 and again.cache_hits == 2 and len(server.requests) == 2
        # another model or temperature is another question
        other = make_judge(server, tmp_path, temperature=0.0)
        other.judge("one", system="sys")
        assert len(server.requests) == 3 and server.requests[-1]["temperature"] == 0.0
    offline = Judge(JudgeConfig(url="cache", cache_dir=tmp_path / "cache"))
    assert offline.judge("two") == "echo two"
    with pytest.raises(JudgeError, match="not in the judge cache"):
        offline.judge("three")


def test_transport_errors_are_retried_and_client_errors_are_not(tmp_path):
    statuses = [503, 429]
    with JudgeServer(lambda m, r: statuses.pop(0) if statuses else "fine") as server:
        judge = make_judge(server, tmp_path)
        assert judge.judge("q") == "fine"
        assert judge.sent == 3 and len(server.requests) == 3
    with JudgeServer(lambda m, r: 401) as server:
        judge = make_judge(server, tmp_path / "401", retries=5)
        with pytest.raises(JudgeError, match="HTTP 401.*OPENAI_API_KEY"):
            judge.judge("q")
        assert len(server.requests) == 1
    with JudgeServer(lambda m, r: 500) as server:
        judge = make_judge(server, tmp_path / "500", retries=2)
        with pytest.raises(JudgeError, match="HTTP 500"):
            judge.judge("never")
        assert len(server.requests) == 3
    dead = Judge(JudgeConfig(url="http://127.0.0.1:9/v1", retries=1, backoff=0.0, timeout=2))
    with pytest.raises(JudgeError, match="unreachable after 2 tries"):
        dead.judge("q")


def test_unparseable_answer_is_asked_again_and_replayed_from_cache(tmp_path):
    answers = ["I refuse to rate.", "Analysis: fine.\nI would rate the AI's response as 4."]
    with JudgeServer(lambda m, r: answers.pop(0)) as server:
        judge = make_judge(server, tmp_path)
        messages = [{"role": "user", "content": "rate"}]
        parsed, replies = judge_parsed(judge, messages, parse_fdb_rating, tries=3)
        assert parsed == {"analysis": "fine.", "rating": 4} and len(replies) == 2 and judge.sent == 2
        again = make_judge(server, tmp_path)
        assert judge_parsed(again, messages, parse_fdb_rating, tries=3)[0]["rating"] == 4
        assert again.sent == 0
    with JudgeServer(lambda m, r: "no rating here") as server:
        judge = make_judge(server, tmp_path / "b")
        parsed, replies = judge_parsed(judge, [{"role": "user", "content": "x"}], parse_fdb_rating, tries=3)
        assert parsed is None and len(replies) == 3 and len(server.requests) == 3


def test_config_errors_and_keys(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(JudgeError, match="set OPENAI_API_KEY"):
        Judge(JudgeConfig())
    with pytest.raises(JudgeError, match="not an http"):
        JudgeConfig(url="ftp://x").validate()
    with pytest.raises(JudgeError, match="needs a cache folder"):
        JudgeConfig(url="cache").validate()
    assert JudgeConfig(url="http://h/v1/").endpoint == "http://h/v1/chat/completions"
    assert JudgeConfig(url="http://h/v1/chat/completions").endpoint == "http://h/v1/chat/completions"
    a = request_key({"model": "m", "messages": [1]})
    assert a == request_key({"messages": [1], "model": "m"}) != request_key({"model": "m", "messages": [1]}, 1)


def test_parse_helpers():
    # FDB's rule: the last match, applied to reply + "\n", DOTALL analysis
    reply = ("Analysis: first.\nI would rate the AI's response as 2.\nAnalysis: second\nline.\n"
             "I would rate the AI's response as 5")
    assert parse_fdb_rating(reply) == {"analysis": "second\nline.", "rating": 5}
    assert parse_fdb_rating("I would rate the AI's response as 4.") is None  # no "Analysis:"
    assert parse_fdb_rating("Analysis: x. I would rate the AI's response as 4.") is None  # needs the newline
    assert parse_labeled_score("Naturalness: 3\nTask adherence: 4.5", "task adherence") == 4.5
    assert parse_labeled_score("Task adherence: 9", "task adherence") is None
    assert parse_json_object('Sure:\n```json\n{"a": {"b": 1}, "c": "}"}\n```') == {"a": {"b": 1}, "c": "}"}
    assert parse_json_object("nothing") is None
    assert json.dumps(parse_json_object('{"x": [1, 2]}')) == '{"x": [1, 2]}'
