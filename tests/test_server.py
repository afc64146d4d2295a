"""`personaplex serve` against real aiohttp websocket clients on loopback (tiny checkpoint, CPU).

Each test runs its own server on an ephemeral 127.0.0.1 port inside `asyncio.run`. Conversations stream
Opus in real time, so each lasts one or two seconds; the whole file takes well under a minute on 2 cores.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import struct
import threading
import time
from urllib.parse import urlencode

import aiohttp
import numpy as np
import pytest
import sphn
import torch
from aiohttp import web

from conftest import speech_like
from personaplex.config import FRAME_SIZE, TEXT_EPAD, TEXT_PAD
from personaplex.engine import BatchEngine, Personas
from personaplex.server import ProtocolError, ServerSettings, build_server, make_runner, parse_query
from personaplex.server.app import Outbox, resolve_voice
from personaplex.server.loop import InputBuffer

PROMPT = "You are a casual friend."
RATE = 24_000


@pytest.fixture(scope="module")
def personas(checkpoint):
    """Shared by every server of this file, so each persona is built once."""
    return Personas(checkpoint.lm, checkpoint.mimi, checkpoint.tokenizer, checkpoint.files.voices_dir)


@contextlib.asynccontextmanager
async def serving(checkpoint, personas, on_frame=None, **settings):
    settings.setdefault("default_text_prompt", PROMPT)
    server = build_server(checkpoint, ServerSettings(**settings), personas=personas, on_frame=on_frame)
    runner = make_runner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as http:
            yield server, f"http://127.0.0.1:{port}", http
    finally:
        await runner.cleanup()


def chat_url(base: str, **query) -> str:
    return f"{base.replace('http', 'ws', 1)}/api/chat?{urlencode(query)}"


class Client:
    """A websocket caller: sends a test signal as Ogg/Opus in real time (20 ms frames), collects replies."""

    def __init__(self, ws, signal: np.ndarray | None = None):
        self.ws = ws
        self.signal = signal if signal is not None else speech_like(3.0)
        self.writer = sphn.OpusStreamWriter(RATE)
        self.sent_pages: list[bytes] = []
        self.audio: list[bytes] = []
        self.texts: list[str] = []
        self.errors: list[str] = []
        self.metadata: list[dict] = []

    async def handshake(self, timeout: float = 30.0) -> None:
        while True:
            msg = await self.ws.receive(timeout=timeout)
            assert msg.type == aiohttp.WSMsgType.BINARY, f"expected the handshake, got {msg}"
            if msg.data[0] == 0x04:
                self.metadata.append(json.loads(msg.data[1:]))
                continue
            assert msg.data == b"\x00", msg.data[:80]
            return

    async def stream(self, frames: int, chunk: int = 480) -> None:
        """Send `frames` 80 ms frames of the signal paced in real time, reading replies meanwhile."""
        sender = asyncio.create_task(self._send(frames * FRAME_SIZE, chunk))
        try:
            await self.receive_until(lambda: sender.done() and len(self.audio) >= frames, timeout=frames * 0.08 + 10)
        finally:
            sender.cancel()

    async def _send(self, samples: int, chunk: int) -> None:
        start = time.perf_counter()
        for i, offset in enumerate(range(0, samples, chunk)):
            pages = self.writer.append_pcm(self.signal[offset:offset + chunk])
            if pages:
                self.sent_pages.append(pages)
                await self.ws.send_bytes(b"\x01" + pages)
            await asyncio.sleep(max(0.0, start + (i + 1) * chunk / RATE - time.perf_counter()))

    async def receive_until(self, done, timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        while not done():
            msg = await self.ws.receive(timeout=max(0.01, deadline - time.perf_counter()))
            if msg.type != aiohttp.WSMsgType.BINARY:
                return
            self.collect(msg.data)

    def collect(self, data: bytes) -> None:
        kind, payload = data[0], data[1:]
        if kind == 0x01:
            self.audio.append(payload)
        elif kind == 0x02:
            self.texts.append(payload.decode())
        elif kind == 0x05:
            self.errors.append(payload.decode())
        elif kind == 0x04:
            self.metadata.append(json.loads(payload))

    def decoded_audio(self) -> np.ndarray:
        reader = sphn.OpusStreamReader(RATE)
        return np.concatenate([reader.append_bytes(page) for page in self.audio])


async def expect_error(http, url: str) -> str:
    """Connect, expect one 0x05 message and then the close; returns the error text."""
    async with http.ws_connect(url) as ws:
        msg = await ws.receive(timeout=30)
        assert msg.type == aiohttp.WSMsgType.BINARY and msg.data[0] == 0x05, msg
        closing = await ws.receive(timeout=10)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
        return msg.data[1:].decode()


async def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.perf_counter() + timeout
    while not predicate():
        assert time.perf_counter() < deadline, "timed out"
        await asyncio.sleep(0.02)


def _strip_zeros(x: np.ndarray) -> np.ndarray:
    return x[x != 0]


# -- tests ---------------------------------------------------------------------------------------------------
def test_query_validation():
    ok = parse_query({"text_prompt": "hi", "voice_prompt": "NATF0.pt", "text_temperature": "0.5", "seed": "7",
                      "audio_topk": "100", "pad_mult": "0", "repetition_penalty": "1.0"})
    assert (ok.voice, ok.text_prompt, ok.params.seed, ok.params.text_temperature, ok.params.audio_topk) == \
        ("NATF0.pt", "hi", 7, 0.5, 100)
    assert parse_query({"seed": "-1"}).params.seed is None
    for bad in ({"text_temperature": "nan"}, {"text_temperature": "-1"}, {"audio_temperature": "inf"},
                {"text_topk": "0"}, {"audio_topk": "1.5"}, {"seed": "-2"}, {"seed": "1" * 40}, {"text_topk": "x"},
                {"text_prompt": "x" * 4001}):
        with pytest.raises(ProtocolError):
            parse_query(bad)


def test_input_buffer_bounds_and_pads():
    buffer = InputBuffer(2 * FRAME_SIZE)
    buffer.push(np.ones(3 * FRAME_SIZE, np.float32))
    assert len(buffer) == 2 * FRAME_SIZE and buffer.dropped_samples == FRAME_SIZE
    frame, complete = buffer.take_frame()
    assert complete and frame.shape == (FRAME_SIZE,)
    buffer.take_frame()
    buffer.push(np.ones(100, np.float32))
    frame, complete = buffer.take_frame()
    assert not complete and frame[:100].sum() == 100 and frame[100:].sum() == 0


def test_input_backlog_after_a_stall_is_trimmed():
    """A burst after a network stall must not add its length to the caller's latency for good."""
    buffer = InputBuffer(25 * FRAME_SIZE)
    buffer.push(np.ones(10 * FRAME_SIZE, np.float32))  # 800 ms arriving at once
    for tick in range(InputBuffer.BACKLOG_TICKS + 2):
        buffer.push(np.ones(FRAME_SIZE, np.float32))  # then real time again
        buffer.take_frame()
    assert len(buffer) <= InputBuffer.BACKLOG_SAMPLES and buffer.dropped_samples > 0
    steady = InputBuffer(25 * FRAME_SIZE)
    for tick in range(3 * InputBuffer.BACKLOG_TICKS):  # a caller one frame ahead is never trimmed
        steady.push(np.ones(FRAME_SIZE if tick else 2 * FRAME_SIZE, np.float32))
        steady.take_frame()
    assert steady.dropped_samples == 0


def test_outbox_drops_audio_of_a_slow_reader_but_keeps_text():
    async def main():
        outbox = Outbox(max_frames=3)
        for i in range(10):
            outbox.put_frame(np.zeros(FRAME_SIZE, np.float32), f"w{i}")
        return outbox

    outbox = asyncio.run(main())
    assert outbox.dropped == 7 and outbox.frames == 3
    assert sum(item[0] is not None for item in outbox.items) == 3
    assert [item[1] for item in outbox.items] == [f"w{i}" for i in range(10)]


def test_conversation_audio_and_text_both_ways(checkpoint, personas):
    fed: list[np.ndarray] = []
    tokens: list[int] = []

    slots = []

    def on_frame(slot, index, user, result):
        fed.append(user.copy())
        tokens.append(result.text_token)
        slots[:] = [slot]

    async def main():
        async with serving(checkpoint, personas, on_frame=on_frame) as (server, base, http):
            async with http.ws_connect(chat_url(base, voice_prompt="DEMO_LOW.pt", text_prompt=PROMPT)) as ws:
                client = Client(ws)
                await client.handshake()
                assert server.model_loop.active == 1  # the handshake comes after joining the batch
                started = time.perf_counter()
                await client.stream(frames=20)
                elapsed = time.perf_counter() - started
            await wait_for(lambda: server.model_loop.active == 0)
        return client, elapsed

    client, elapsed = asyncio.run(main())
    dropped_in = slots[0].input.dropped_samples
    assert elapsed > 20 * 0.08 * 0.8  # real-time pacing, not as fast as possible
    assert client.audio[0].startswith(b"OggS")
    pcm = client.decoded_audio()
    assert len(pcm) == len(client.audio) * FRAME_SIZE  # one 80 ms Opus frame per page
    assert np.abs(pcm).max() > 0
    # the model heard exactly what we sent (missing audio padded with silence, nothing reordered or lost)
    reader = sphn.OpusStreamReader(RATE)
    sent = _strip_zeros(np.concatenate([reader.append_bytes(p) for p in client.sent_pages]))
    heard = _strip_zeros(np.concatenate(fed))
    assert len(heard) > 0.5 * len(sent)
    if not dropped_in:
        assert np.array_equal(heard, sent[: len(heard)])
    else:  # a loaded machine made the input buffer drop a backlog (counted): exact up to there
        first = np.flatnonzero(heard != sent[: len(heard)])[0]
        assert first >= FRAME_SIZE and np.array_equal(heard[:first], sent[:first])
    # one text message per text token that is not PAD/EPAD, in order
    expected = [checkpoint.tokenizer.piece(t) for t in tokens if t not in (TEXT_PAD, TEXT_EPAD)]
    expected = [p for p in expected if p]
    assert client.texts and client.texts == expected[: len(client.texts)]
    assert not client.errors


def test_concurrent_conversations_equal_solo_runs(checkpoint, personas):
    specs = [dict(voice_prompt="DEMO_LOW", text_prompt=PROMPT, seed=11),
             dict(voice_prompt="DEMO_HIGH", text_prompt="You like trains.", seed=12, text_temperature=0.9,
                  audio_topk=50),
             dict(voice_prompt="DEMO_LOW.pt", text_prompt="", seed=13)]
    record: dict[int, list] = {}

    def on_frame(slot, index, user, result):
        record.setdefault(slot.params.seed, []).append((user.copy(), result.text_token, result.audio_codes.clone()))

    async def caller(http, base, spec, delay, frames):
        await asyncio.sleep(delay)
        async with http.ws_connect(chat_url(base, **spec)) as ws:
            client = Client(ws, speech_like(2.0, seed=spec["seed"]))
            await client.handshake()
            await client.stream(frames=frames)
        return client

    async def main():
        async with serving(checkpoint, personas, on_frame=on_frame, max_conversations=3) as (server, base, http):
            clients = await asyncio.gather(*(caller(http, base, spec, 0.3 * i, 14 - 3 * i)
                                             for i, spec in enumerate(specs)))
            await wait_for(lambda: server.model_loop.active == 0)
            assert server.model_loop.stats.ticks > 0
        return clients

    clients = asyncio.run(main())
    lm, mimi = checkpoint.lm, checkpoint.mimi
    for spec, client in zip(specs, clients):
        frames = record[spec["seed"]]
        query = parse_query({k: str(v) for k, v in spec.items()})
        engine = BatchEngine(lm, mimi, max_batch=1)
        conv = engine.join(personas.get(resolve_voice(personas, query.voice), query.text_prompt), query.params)
        with torch.no_grad():
            solo = [engine.step(torch.from_numpy(user)[None])[0] for user, _, _ in frames]
        engine.leave(conv)
        assert [t for _, t, _ in frames] == [r.text_token for r in solo]
        assert all(torch.equal(codes, r.audio_codes) for (_, _, codes), r in zip(frames, solo))
        assert not client.errors


def test_hostile_requests_are_refused_and_the_server_keeps_serving(checkpoint, personas):
    async def main():
        async with serving(checkpoint, personas, max_prompt_chars=8000) as (server, base, http):
            for voice in ("../../etc/passwd", "/etc/passwd", "NATF0/../x", "..", "DEMO_LOW/../DEMO_LOW"):
                text = await expect_error(http, chat_url(base, voice_prompt=voice))
                assert "available: DEMO_HIGH, DEMO_LOW" in text, text
            text = await expect_error(http, chat_url(base, voice_prompt="NOPE"))
            assert "not found" in text and "DEMO_LOW" in text
            assert "at most 8000" in await expect_error(http, chat_url(base, text_prompt="é" * 8001))
            for bad in ({"text_temperature": "hot"}, {"audio_topk": "-3"}, {"seed": "nan"},
                        {"text_temperature": "1e999"}):
                text = await expect_error(http, chat_url(base, voice_prompt="DEMO_LOW", **bad))
                assert next(iter(bad)) in text
            # within the character limit but longer than the tiny model's context: the engine refuses it
            words = "hello " * checkpoint.lm.config.context  # at least one token each: beyond half the context
            text = await expect_error(http, chat_url(base, voice_prompt="DEMO_LOW", text_prompt=words))
            assert "prompt" in text and "context" in text
            await wait_for(lambda: server.admission.active == 0 and server.model_loop.active == 0)
            # garbage on a live conversation: answered with 0x05, the conversation goes on
            async with http.ws_connect(chat_url(base, voice_prompt="DEMO_HIGH")) as ws:
                client = Client(ws)
                await client.handshake()
                for junk in (b"\x01not ogg at all", b"\xff\x00\x01", b"", b"\x03\x09", b"\x06", b"\x02hi",
                             b"\x01OggS" + os.urandom(200)):
                    await ws.send_bytes(junk)
                await ws.send_str("hello")
                await client.stream(frames=8)
                assert len(client.audio) >= 8
                assert any("unknown message kind" in e for e in client.errors)
                assert any("Ogg/Opus" in e for e in client.errors)
                assert any("text messages" in e for e in client.errors)
            await wait_for(lambda: server.model_loop.active == 0)
            assert server.counters["bad_messages"] >= 5
            async with http.get(base + "/healthz") as response:
                assert response.status == 200 and (await response.json())["active"] == 0

    asyncio.run(main())


async def _raw_websocket(port: int, path: str):
    """A bare websocket upgrade over TCP (so the test can vanish without a close frame)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    await reader.readuntil(b"\r\n\r\n")
    return reader, writer


def _masked_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    length = len(payload)
    header = struct.pack("!BB", 0x82, 0x80 | length) if length < 126 else struct.pack("!BBH", 0x82, 0xFE, length)
    return header + mask + body


def test_abrupt_disconnect_frees_the_row(checkpoint, personas):
    async def main():
        async with serving(checkpoint, personas, max_conversations=1) as (server, base, http):
            port = int(base.rsplit(":", 1)[1])
            reader, writer = await _raw_websocket(port, "/api/chat?voice_prompt=DEMO_LOW")
            assert await asyncio.wait_for(reader.readexactly(3), 30) == b"\x82\x01\x00"  # the handshake
            pages = sphn.OpusStreamWriter(RATE).append_pcm(speech_like(0.08))
            writer.write(_masked_frame(b"\x01" + pages))
            await asyncio.sleep(0.3)
            assert server.model_loop.active == 1
            writer.transport.abort()  # no close frame, connection reset
            await wait_for(lambda: server.model_loop.active == 0 and server.admission.active == 0)
            # a caller that vanishes while its persona is being built (a slow build, to be sure to catch it)
            building = threading.Event()
            real = server.model_loop.personas

            class SlowPersonas:
                cache = real.cache

                def get(self, voice, text):
                    building.set()
                    time.sleep(0.5)
                    return real.get(voice, text)

            server.model_loop.personas = SlowPersonas()
            reader, writer = await _raw_websocket(port, "/api/chat?voice_prompt=DEMO_HIGH")
            await wait_for(building.is_set)
            writer.transport.abort()
            await wait_for(lambda: server.admission.active == 0)
            await asyncio.sleep(0.6)  # the build finishes; the caller is gone, so it never joins the batch
            assert server.model_loop.active == 0
            server.model_loop.personas = real
            async with http.ws_connect(chat_url(base, voice_prompt="DEMO_LOW")) as ws:
                client = Client(ws)
                await client.handshake()
                await client.stream(frames=4)
                assert len(client.audio) >= 4

    asyncio.run(main())


def test_server_full_and_queue(checkpoint, personas):
    async def main():
        async with serving(checkpoint, personas, max_conversations=1) as (server, base, http):
            async with http.ws_connect(chat_url(base, voice_prompt="DEMO_LOW")) as first:
                await Client(first).handshake()
                text = await expect_error(http, chat_url(base, voice_prompt="DEMO_LOW"))
                assert text == "server full: 1 conversations in progress, try again later"
        async with serving(checkpoint, personas, max_conversations=1, queue=1) as (server, base, http):
            first = await http.ws_connect(chat_url(base, voice_prompt="DEMO_LOW"))
            await Client(first).handshake()
            # a queued caller that gives up is removed from the queue
            quitter = await http.ws_connect(chat_url(base, voice_prompt="DEMO_LOW"))
            msg = await quitter.receive(timeout=10)
            assert msg.data[0] == 0x04 and json.loads(msg.data[1:])["queue_position"] == 1
            await quitter.close()
            await wait_for(lambda: not server.admission.waiting)
            second = Client(await http.ws_connect(chat_url(base, voice_prompt="DEMO_HIGH")))
            waiting = asyncio.create_task(second.handshake())
            await wait_for(lambda: len(server.admission.waiting) == 1)
            assert "server full" in await expect_error(http, chat_url(base, voice_prompt="DEMO_LOW"))  # queue full
            assert not waiting.done()
            await first.close()
            await asyncio.wait_for(waiting, 30)  # admitted once the first caller left
            assert second.metadata == [{"status": "queued", "queue_position": 1, "queue_length": 1},
                                       {"status": "preparing", "queue_position": 0, "queue_length": 0}]
            await second.stream(frames=3)
            await second.ws.close()
            await wait_for(lambda: server.admission.active == 0 and server.model_loop.active == 0)

    asyncio.run(main())


def test_a_failing_model_step_ends_its_conversations_only(checkpoint, personas):
    async def main():
        async with serving(checkpoint, personas) as (server, base, http):
            async with http.ws_connect(chat_url(base, voice_prompt="DEMO_LOW")) as ws:
                client = Client(ws)
                await client.handshake()
                engine = server.model_loop.engine
                step = engine.step
                engine.step = lambda user: (_ for _ in ()).throw(RuntimeError("injected failure"))
                await client.receive_until(lambda: client.errors, timeout=10)
                engine.step = step
                assert "please reconnect" in client.errors[0]
            await wait_for(lambda: server.admission.active == 0 and server.model_loop.active == 0)
            assert server.model_loop.stats.step_errors == 1
            async with http.ws_connect(chat_url(base, voice_prompt="DEMO_LOW")) as ws:
                client = Client(ws)
                await client.handshake()
                await client.stream(frames=3)
                assert len(client.audio) >= 3 and not client.errors

    asyncio.run(main())


def test_health_metrics_info_voices_and_pages(checkpoint, personas):
    async def main():
        async with serving(checkpoint, personas, max_conversations=2) as (server, base, http):
            async with http.ws_connect(chat_url(base, voice_prompt="DEMO_LOW")) as ws:
                client = Client(ws)
                await client.handshake()
                await client.stream(frames=3)
                burst = sphn.OpusStreamWriter(RATE)  # 2.4 s at once: beyond the 1 s input buffer
                for page in (burst.append_pcm(speech_like(0.08, seed=i)) for i in range(30)):
                    await ws.send_bytes(b"\x01" + page)
                await wait_for(lambda: server.model_loop.stats.frames_dropped_in > 0)
                async with http.get(base + "/healthz") as response:
                    health = await response.json()
                assert response.status == 200 and health["status"] == "ok" and health["active"] == 1
            async with http.get(base + "/metrics") as response:
                metrics = await response.text()
            async with http.get(base + "/api/info") as response:
                info = await response.json()
            async with http.get(base + "/api/voices") as response:
                voices = await response.json()
            async with http.get(base + "/") as response:
                assert response.status == 200 and "html" in response.headers["Content-Type"]
            for path in ("/static/../../etc/passwd", "/static/%2e%2e/%2e%2e/etc/passwd", "/..%2f..%2fetc/passwd",
                         "/nope.js"):
                async with http.get(base + path) as response:
                    assert response.status == 404, path
        return metrics, info, voices

    metrics, info, voices = asyncio.run(main())
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
              if line and not line.startswith("#")}
    assert values["personaplex_ticks_total"] >= 3
    assert values['personaplex_tick_seconds{quantile="0.99"}'] > 0
    for name in ("personaplex_active_conversations", "personaplex_queued_callers", "personaplex_tick_overruns_total",
                 "personaplex_frames_missing_total", 'personaplex_frames_dropped_total{direction="in"}',
                 "personaplex_persona_cache_hits_total", "personaplex_persona_cache_misses_total"):
        assert name in values, name
    assert info["max_conversations"] == 2 and info["frame_rate"] == 12.5 and info["model"]["dim"] == 64
    assert info["sampling_defaults"]["text_topk"] == 25
    assert voices == {"voices": ["DEMO_HIGH", "DEMO_LOW"], "default": "DEMO_LOW"}


def test_serve_command_defaults_and_flag_errors():
    from personaplex.cli import build_parser
    from personaplex.server.cli import ssl_context

    args = build_parser().parse_args(["serve", "--demo"])
    assert (args.host, args.port, args.queue, args.max_conversations, args.max_prompt_chars) == \
        ("127.0.0.1", 8998, 0, None, 4000)
    assert ssl_context(None, None) is None
    with pytest.raises(ValueError, match="go together"):
        ssl_context("cert.pem", None)


def test_new_personas_are_built_one_per_tick(checkpoint):
    """A persona's prompt delays everyone's next frame: callers arriving together get theirs built on
    successive ticks, and all are served."""
    fresh = Personas(checkpoint.lm, checkpoint.mimi, checkpoint.tokenizer, checkpoint.files.voices_dir)
    ticks_at_build: list[int] = []

    async def main():
        async with serving(checkpoint, fresh, max_conversations=3) as (server, base, http):
            original = fresh.get

            def counting_get(voice, text):
                if not fresh.cached(voice, text):
                    ticks_at_build.append(server.model_loop.stats.ticks)
                return original(voice, text)

            fresh.get = counting_get

            async def caller(i):
                url = chat_url(base, voice_prompt="DEMO_HIGH", text_prompt=f"You are caller number {i}.", seed=i)
                async with http.ws_connect(url) as ws:
                    client = Client(ws, speech_like(1.0, seed=i))
                    await client.handshake()
                    await client.stream(frames=4)
                return client

            return await asyncio.gather(caller(0), caller(1), caller(2))

    clients = asyncio.run(main())
    assert len(ticks_at_build) == 3 and len(set(ticks_at_build)) == 3, ticks_at_build
    assert all(not c.errors and len(c.audio) >= 4 for c in clients)


def test_a_caller_who_sends_no_audio_is_closed_after_the_idle_timeout(checkpoint, personas):
    async def main():
        async with serving(checkpoint, personas, idle_timeout_seconds=0.4) as (server, base, http):
            async with http.ws_connect(chat_url(base, voice_prompt="DEMO_LOW", text_prompt=PROMPT)) as ws:
                client = Client(ws)
                await client.handshake()
                await client.receive_until(lambda: client.errors, timeout=15)  # sends nothing at all
            await wait_for(lambda: server.model_loop.active == 0)
            return client

    client = asyncio.run(main())
    assert client.errors and "no audio received" in client.errors[0]
