"""`personaplex eval latency`: real-time calls over loopback websockets.

A scripted stand-in server that answers a known time after the caller stops and stops a known time after the
caller talks over it checks the measurement itself; then the command runs against `personaplex serve` on the
demo checkpoint (random weights: its figures measure the pipeline, not a model). Each call lasts a few
seconds of real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import numpy as np
import pytest
import sphn
from aiohttp import WSMsgType, web

from personaplex.cli import main
from personaplex.eval.latency import (LatencyConfig, response_latency, run_calls, speech_runs, stop_latency,
                                      voiced_frames)

RATE = 24_000
ANSWER_AFTER = 0.5  # the stand-in agent starts this long after the caller's last loud frame reached it
STOP_AFTER = 0.3  # and stops this long after the caller's first loud frame over its speech reached it


def tone(seconds: float, hz: float = 200.0, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


async def scripted_agent(request: web.Request) -> web.WebSocketResponse:
    """The /api/chat protocol with a rule-based agent: 20 ms Opus frames in real time, a tone while it talks."""
    mode = request.query.get("text_prompt", "")
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    if mode == "refuse":
        await ws.send_bytes(b"\x05this server is full: try again later")
        await ws.close()
        return ws
    await ws.send_bytes(b"\x00")
    reader, writer = sphn.OpusStreamReader(RATE), sphn.OpusStreamWriter(RATE)
    state = {"talking_user": False, "last_loud": 0.0, "answer_at": None, "talk_end": None, "stop_at": None}
    clock = time.perf_counter

    def agent_talks(t: float) -> bool:
        if state["answer_at"] is None or t < state["answer_at"] or t >= state["talk_end"]:
            return False
        return state["stop_at"] is None or t < state["stop_at"]

    async def speak():
        start, n, voice = clock(), 0, tone(10.0, 330.0)
        while not ws.closed:
            t = clock()
            frame = voice[(n * 480) % len(voice):][:480] if agent_talks(t) else np.zeros(480, np.float32)
            if len(frame) < 480:
                frame = np.zeros(480, np.float32)
            pages = writer.append_pcm(frame)
            if pages:
                await ws.send_bytes(b"\x01" + pages)
            n += 1
            await asyncio.sleep(max(0.0, start + n * 0.02 - clock()))

    speaker = asyncio.create_task(speak())
    pending = np.zeros(0, np.float32)
    try:
        async for msg in ws:
            if msg.type != WSMsgType.BINARY or msg.data[:1] != b"\x01":
                continue
            now = clock()
            pending = np.concatenate([pending, reader.append_bytes(msg.data[1:])])
            while len(pending) >= 480:
                frame, pending = pending[:480], pending[480:]
                loud = 10 * np.log10(np.mean(frame.astype(np.float64) ** 2) + 1e-12) > -35
                if loud:
                    if not state["talking_user"]:
                        state["talking_user"] = True
                        if agent_talks(now) and state["stop_at"] is None:
                            state["stop_at"] = now + STOP_AFTER
                    state["last_loud"] = now
                elif state["talking_user"] and now - state["last_loud"] > 0.2:
                    state["talking_user"] = False
                    if mode != "mute" and not agent_talks(now):
                        state.update(answer_at=state["last_loud"] + ANSWER_AFTER, stop_at=None)
                        state["talk_end"] = state["answer_at"] + 3.0
    finally:
        speaker.cancel()
    return ws


@contextlib.asynccontextmanager
async def stand_in_server():
    app = web.Application()
    app.router.add_get("/api/chat", scripted_agent)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield f"ws://127.0.0.1:{port}/api/chat"
    finally:
        await runner.cleanup()


def quick(url: str, **kw) -> LatencyConfig:
    kw.setdefault("turns", 1)
    return LatencyConfig(url=url, lead_seconds=0.3, barge_after=0.5, max_wait=1.5, connect_timeout=20, **kw)


LINES = [tone(0.6), tone(0.5, 250.0)]


def test_measures_what_the_stand_in_agent_does():
    async def go():
        async with stand_in_server() as url:
            return await asyncio.gather(
                run_calls(quick(url, calls=2, concurrency=2, text_prompt="normal"), LINES, [tone(0.5, 400.0)]),
                run_calls(quick(url, calls=1, text_prompt="mute"), LINES, [tone(0.5)]))

    normal, mute = asyncio.run(go())
    response, stop = normal["response_latency"], normal["stop_latency"]
    assert normal["counts"]["answered"] == 2 and response["count"] == 2, normal["counts"]
    # the caller's chunk leaves <= 20 ms after its last sample; Opus frames and the event loops add a little
    assert ANSWER_AFTER - 0.05 <= response["p50"] <= response["max"] <= ANSWER_AFTER + 0.15, response
    assert normal["counts"]["barge_in_stopped"] == 2 and stop["count"] == 2, normal["counts"]
    assert STOP_AFTER - 0.06 <= stop["p50"] <= stop["max"] <= STOP_AFTER + 0.15, stop
    call = normal["calls"][0]
    assert call["error"] is None and call["handshake_s"] < 5
    assert abs(call["received_s"] - call["sent_s"]) < 0.5  # the agent's stream keeps pace with the caller's
    assert mute["counts"]["no_response"] == 1 and mute["response_latency"]["count"] == 0
    assert "auth_token" not in normal["settings"]


def test_runs_and_timing_rules():
    voiced = np.zeros(50, bool)
    voiced[2:4] = True  # 40 ms: a click, dropped at min_speech 3 frames
    voiced[10:20] = True
    voiced[22:30] = True  # a 40 ms gap is bridged at min_silence 5 frames
    voiced[40:50] = True
    assert speech_runs(voiced, 3, 5) == [(10, 29), (40, 49)]
    runs = [(1.0, 2.0), (3.0, 4.0)]
    assert response_latency(runs, 0.5, 5.0) == {"status": "answered", "latency": 0.5}
    assert response_latency(runs, 1.5, 5.0) == {"status": "overlap"}
    assert response_latency(runs, 4.5, 5.0) == {"status": "no_response"}
    assert stop_latency(runs, 3.2, 10.0, 5.0) == {"status": "stopped", "latency": 0.8}
    assert stop_latency(runs, 3.2, 4.0, 5.0) == {"status": "did_not_stop"}  # still talking when the call ended
    assert stop_latency(runs, 2.5, 10.0, 5.0) == {"status": "not_talking"}
    pcm = np.concatenate([np.zeros(4800, np.float32), tone(0.2)])
    assert voiced_frames(pcm, "energy", -40.0).tolist() == [False] * 10 + [True] * 10


def test_errors_are_one_line(capsys, tmp_path):
    async def refused():
        async with stand_in_server() as url:
            return await run_calls(quick(url, calls=1, text_prompt="refuse"), LINES, [tone(0.5)])

    result = asyncio.run(refused())
    assert result["counts"]["failed_calls"] == 1 and "this server is full" in result["calls"][0]["error"]
    assert main(["eval", "latency", "--url", "http://127.0.0.1:1/api/chat"]) == 2
    assert "must be a websocket URL" in capsys.readouterr().err
    (tmp_path / "lines.json").write_text('{"turns": []}')
    assert main(["eval", "latency", "--url", "ws://127.0.0.1:1/api/chat", "--lines", str(tmp_path / "lines.json")]) == 2
    assert "non-empty texts" in capsys.readouterr().err
    assert main(["eval", "latency", "--url", "ws://127.0.0.1:1/api/chat", "--calls", "1", "--tts", "tones",
                 "--connect-timeout", "5"]) == 2
    err = capsys.readouterr().err
    assert "every call failed" in err and "connection failed" in err and len(err.strip().splitlines()) == 1


def test_against_the_demo_server(checkpoint, tmp_path, capsys, one_thread):
    from personaplex.engine import Personas
    from test_server import serving

    personas = Personas(checkpoint.lm, checkpoint.mimi, checkpoint.tokenizer, checkpoint.files.voices_dir)
    out = tmp_path / "latency.json"
    lines = tmp_path / "lines.json"
    lines.write_text(json.dumps({"turns": ["Hi there, Sam."], "interruptions": ["Wait."]}))

    async def go():
        async with serving(checkpoint, personas, max_conversations=2, default_voice="DEMO_LOW") as (_, url, _http):
            args = ["eval", "latency", "--url", url.replace("http://", "ws://") + "/api/chat", "--calls", "2",
                    "--concurrency", "2", "--turns", "1", "--max-wait", "1.0", "--barge-after", "0.3",
                    "--lead-seconds", "0.3", "--tts", "tones", "--lines", str(lines), "--voice-prompt", "DEMO_HIGH",
                    "--out", str(out)]
            return await asyncio.to_thread(main, args)

    assert asyncio.run(go()) == 0
    result = json.loads(out.read_text())
    counts = result["counts"]
    assert counts["calls"] == 2 and counts["failed_calls"] == 0 and counts["turns"] == 2
    # random weights: whatever the "agent" does, every turn is classified and every figure is a real number
    assert counts["answered"] + counts["overlap"] + counts["no_response"] == 2
    for call in result["calls"]:
        # how much comes back in time depends on the CPU keeping up with 80 ms ticks; some must
        assert call["handshake_s"] > 0 and call["received_s"] > 0 and call["sent_s"] > 1.0
        for turn in call["turns"]:
            assert turn["response"]["status"] in ("answered", "overlap", "no_response")
            if "latency" in turn["response"]:
                assert 0 < turn["response"]["latency"] <= 1.0
    assert result["handshake"]["count"] == 2 and 0 < result["received_ratio"]["mean"] <= 1.2
    assert "response latency" in capsys.readouterr().out


def test_silero_frames_follow_the_speech():
    pytest.importorskip("silero_vad", reason="silero VAD is part of the eval extra")
    from personaplex.audio import resample
    from personaplex.train.synth import EspeakTTS, TTSError

    try:
        utt = EspeakTTS().synthesize("Thank you for calling, how can I help?", "en-us+f3")
    except TTSError as exc:
        pytest.skip(f"espeak-ng is not available: {exc}")
    speech = resample(utt.pcm, utt.sample_rate, RATE)
    pcm = np.concatenate([np.zeros(RATE, np.float32), speech, np.zeros(RATE, np.float32)])
    voiced = voiced_frames(pcm, "silero", -40.0)
    first, last = np.flatnonzero(voiced)[[0, -1]]
    # speech from 1.0 s to 1.0 s + its length, in 20 ms frames (silero pads segments by 30 ms)
    assert abs(first * 0.02 - 1.0) < 0.15 and abs((last + 1) * 0.02 - (1.0 + len(speech) / RATE)) < 0.25
    assert not voiced[:40].any() and not voiced[-40:].any()
