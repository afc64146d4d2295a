"""Per-connection bounds and the model loop's robustness, against real aiohttp clients on loopback.

The Ogg checks (server/ogg.py) are tested on their own first; then hostile callers (200 MB of unterminated Ogg,
floods of empty packets), a failing join, draining and shutdown, each against a server of the demo checkpoint,
and the `bench/bench_server.py --stub-engine` path with a few callers for a few seconds.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import sphn

from conftest import speech_like
from personaplex.server import ogg
from personaplex.server.loop import ConversationStartError, ModelLoop, Slot
from personaplex.server.ogg import MAX_PACKET_BYTES, MAX_PAGE_BYTES, OggFilter, build_page, packet_samples
from test_server import Client, chat_url, expect_error, personas, serving, wait_for  # noqa: F401 (fixture)

RATE = 24_000
ROOT = Path(__file__).resolve().parents[1]


def opus_pages(seconds: float, seed: int = 0) -> list[bytes]:
    writer = sphn.OpusStreamWriter(RATE)
    pcm = speech_like(seconds, seed=seed)
    return [bytes(p) for p in (writer.append_pcm(pcm[i:i + 1920]) for i in range(0, len(pcm) - 1919, 1920)) if p]


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


UNTERMINATED = build_page([b"\x00" * (255 * 255)], lacing=[255] * 255, sequence=1)  # one packet that never ends


# -- the Ogg checks ---------------------------------------------------------------------------------------------
def test_ogg_filter_passes_a_real_stream_unchanged_in_sound():
    pages = opus_pages(2.0)
    first = pages[0][:27 + pages[0][26] + sum(pages[0][27:27 + pages[0][26]])]  # sphn's OpusHead page
    assert ogg.ogg_crc(first[:22] + b"\0\0\0\0" + first[26:]) == int.from_bytes(first[22:26], "little")
    direct = sphn.OpusStreamReader(RATE).append_bytes(b"".join(pages))
    for chunk in (None, 7):  # page by page, and in 7-byte pieces that split pages anywhere
        f = OggFilter()
        data = b"".join(pages)
        pieces = pages if chunk is None else [data[i:i + chunk] for i in range(0, len(data), chunk)]
        results = [f.feed(p, 0.0) for p in pieces]
        clean = b"".join(r.pages for r in results)
        assert sum(r.headers for r in results) == 2 and not any(r.malformed for r in results)
        assert sum(r.samples for r in results) == len(direct)
        assert np.array_equal(sphn.OpusStreamReader(RATE).append_bytes(clean), direct)


def test_ogg_filter_drops_empty_absurd_and_garbage_and_stays_bounded():
    audio = opus_pages(0.5)[2:]
    f = OggFilter()
    empties = b"".join(build_page([b""], sequence=i) for i in range(1000))
    r = f.feed(empties, 0.0)
    assert r.empty == 1000 and r.packets == 0 and r.pages == b""
    r = f.feed(b"garbage" * 10 + audio[0] + build_page([b"\xff"], sequence=3), 0.0)  # code 3, no count byte
    assert r.malformed == 1 and r.packets >= 1 and r.absurd == 1
    bad_crc = bytearray(audio[1])
    bad_crc[30] ^= 0xFF
    assert f.feed(bytes(bad_crc), 0.0).malformed == 1
    # a packet that never terminates: never more than one page and one packet held, reset after 64 KiB
    f = OggFilter()
    for i in range(8):
        r = f.feed(UNTERMINATED, 0.0)
        assert f.held_bytes <= MAX_PAGE_BYTES + MAX_PACKET_BYTES and r.packets == 0
    assert r.starved or f.feed(UNTERMINATED, 0.0).starved
    assert packet_samples(b"") == 0 and packet_samples(bytes([0xFC])) == 480  # CELT 20 ms, one frame
    assert packet_samples(bytes([0xFB, 6])) == 2880 and packet_samples(bytes([0xFB, 7])) == 0  # 6 x 20 ms max


def test_ogg_filter_keeps_decoded_audio_within_real_time():
    page = opus_pages(0.5)[3]
    samples = OggFilter().feed(page, 0.0).samples  # 80 ms (sphn's pages)
    f = OggFilter(burst_seconds=1.0)
    accepted = sum(f.feed(page, 0.0).samples for _ in range(100))  # 8 s of audio at one instant
    assert RATE - samples <= accepted <= RATE and f.feed(page, 0.0).over_budget >= 1
    assert f.feed(page, 1.0).samples == samples  # a second later there is room again


def test_model_loop_commands_fail_alone():
    """A command whose handler raises (here: a leave whose engine cannot be rebuilt) fails its own caller;
    the joins behind it in the same batch of commands still run."""
    class Engine:
        def __init__(self):
            self.conversations_ = []

        @property
        def conversations(self):
            return list(self.conversations_)

        def join(self, persona, params=None):
            from personaplex.engine import Conversation

            conv = Conversation(len(self.conversations_) + 100, 0, params, 0)
            self.conversations_.append(conv)
            return conv

        def leave(self, conv):
            raise RuntimeError("injected: leave failed")

        def clear(self):
            raise RuntimeError("injected: clear failed")

    class Personas:
        class cache:
            misses = 0

        def cached(self, voice, text):
            return True

        def get(self, voice, text):
            return object()

    import concurrent.futures

    calls = {"n": 0}

    def factory():
        calls["n"] += 1
        if calls["n"] > 1:
            raise MemoryError("injected: no memory for a new engine")
        return Engine()

    class FakeLoop:
        def call_soon_threadsafe(self, fn, *args):
            fn(*args)

    loop = ModelLoop(factory, Personas())
    loop._loop = FakeLoop()
    loop.engine = factory()
    failures = []
    first = Slot(None, "", None, deliver=lambda *a: None, input=None, failed=failures.append, name="#1")
    joined = concurrent.futures.Future()
    loop._commands.put(("join", first, joined))
    loop._drain_commands()
    assert joined.result() is first.conversation
    later = [Slot(None, "", None, deliver=lambda *a: None, input=None, name=f"#{i}") for i in (2, 3)]
    futures = [concurrent.futures.Future() for _ in later]
    loop._commands.put(("leave", first, None))  # leave -> clear -> rebuild: all three raise
    for slot, future in zip(later, futures):
        loop._commands.put(("join", slot, future))
    loop._drain_commands()
    assert failures and "please reconnect" in failures[0]
    for future in futures:  # not stranded: each got an answer (the engine is gone: a clear refusal)
        assert future.done()
        with pytest.raises(ConversationStartError, match="could not start this conversation"):
            future.result()
    assert not loop._deferred and loop._commands.empty()


# -- hostile callers against a real server -----------------------------------------------------------------------
def test_unterminated_ogg_costs_bounded_memory_joined_and_queued(checkpoint, personas):
    total = 200 * 2**20

    async def flood(ws) -> int:
        sent = 0
        message = b"\x01" + UNTERMINATED
        while sent < total:
            await ws.send_bytes(message)
            sent += len(UNTERMINATED)
        return sent

    async def main():
        async with serving(checkpoint, personas, max_conversations=1, queue=1) as (server, base, http):
            joined = Client(await http.ws_connect(chat_url(base, voice_prompt="DEMO_LOW")))
            await joined.handshake()
            queued = await http.ws_connect(chat_url(base, voice_prompt="DEMO_LOW"))
            msg = await queued.receive(timeout=10)
            assert json.loads(msg.data[1:])["status"] == "queued"
            before = rss_bytes()
            started = time.perf_counter()
            reading = asyncio.create_task(joined.receive_until(lambda: False, timeout=120))
            await asyncio.gather(flood(joined.ws), flood(queued))
            elapsed = time.perf_counter() - started
            counters = server.audio_counters
            await wait_for(lambda: counters["reader_resets"] >= total // ogg.STARVE_BYTES // 2
                           and counters["not_joined"] >= total // len(UNTERMINATED))  # all of it arrived
            grown = rss_bytes() - before
            reading.cancel()
            assert any("no audio in the last 64 KiB" in e for e in joined.errors), joined.errors
            await queued.close()
            await joined.ws.close()
            return grown, elapsed

    grown, elapsed = asyncio.run(main())
    assert grown < 50 * 2**20, f"server grew by {grown / 2**20:.0f} MB while 400 MB were sent in {elapsed:.1f} s"


def test_an_empty_packet_flood_does_not_delay_another_callers_handshake(checkpoint, personas):
    empties = [b"".join(build_page([b""], sequence=i + 1000 * m) for i in range(1000)) for m in range(30)]

    async def main():
        async with serving(checkpoint, personas, max_conversations=2) as (server, base, http):
            attacker = Client(await http.ws_connect(chat_url(base, voice_prompt="DEMO_LOW")))
            await attacker.handshake()
            one_by_one = [build_page([b""], sequence=i) for i in range(3000)]

            async def flood():
                for message in empties:
                    await attacker.ws.send_bytes(b"\x01" + message)
                for page in one_by_one:
                    await attacker.ws.send_bytes(b"\x01" + page)

            flooding = asyncio.create_task(flood())
            await asyncio.sleep(0.05)
            started = time.perf_counter()
            async with http.ws_connect(chat_url(base, voice_prompt="DEMO_LOW")) as ws:
                await Client(ws).handshake()
                waited = time.perf_counter() - started
            await flooding
            await wait_for(lambda: server.audio_counters["empty"] >= 33_000)
            await attacker.ws.close()
            return waited

    assert asyncio.run(main()) < 1.0


def test_a_failing_join_does_not_strand_the_next_caller(checkpoint, personas):
    async def main():
        async with serving(checkpoint, personas, max_conversations=2) as (server, base, http):
            engine = server.model_loop.engine
            real_join, failed = engine.join, []

            def join(persona, params=None):
                if not failed:
                    failed.append(True)
                    raise RuntimeError("injected: out of memory")
                return real_join(persona, params)

            engine.join = join

            async def call():  # two callers at once: their joins reach the model thread together
                ws = await http.ws_connect(chat_url(base, voice_prompt="DEMO_LOW"))
                client = Client(ws)
                msg = await ws.receive(timeout=10)
                if msg.data[0] == 0x05:
                    await ws.close()
                    return msg.data[1:].decode()
                assert msg.data == b"\x00"
                await client.stream(frames=3)
                assert len(client.audio) >= 3 and not client.errors
                await ws.close()
                return "served"

            outcomes = await asyncio.gather(call(), call())
            await wait_for(lambda: server.admission.active == 0)
            return outcomes

    outcomes = asyncio.run(main())
    assert outcomes.count("served") == 1, outcomes
    error = next(o for o in outcomes if o != "served")
    assert "could not start this conversation" in error and "try again later" in error


def test_draining_refuses_new_calls_and_ends_current_ones_cleanly(checkpoint, personas):
    async def main():
        async with serving(checkpoint, personas, max_conversations=1, queue=1) as (server, base, http):
            async with http.get(base + "/healthz") as response:
                assert response.status == 200 and (await response.json())["status"] == "ok"
            current = Client(await http.ws_connect(chat_url(base, voice_prompt="DEMO_LOW")))
            await current.handshake()
            async with http.get(base + "/healthz") as response:
                assert response.status == 200 and (await response.json())["status"] == "busy"
            queued = Client(await http.ws_connect(chat_url(base, voice_prompt="DEMO_LOW")))
            await wait_for(lambda: len(server.admission.waiting) == 1)
            async with http.get(base + "/healthz") as response:
                assert response.status == 503 and (await response.json())["status"] == "full"
            started = time.perf_counter()
            drain = asyncio.create_task(server.drain(1.5))
            await queued.receive_until(lambda: queued.errors, timeout=5)
            assert "draining" in queued.errors[0]
            assert "draining" in await expect_error(http, chat_url(base, voice_prompt="DEMO_LOW"))
            async with http.get(base + "/healthz") as response:
                assert response.status == 503 and (await response.json())["status"] == "draining"
            await current.stream(frames=6)  # the call in progress goes on while draining
            assert len(current.audio) >= 6 and not current.errors
            await drain
            drained = time.perf_counter() - started
            assert 1.4 < drained < 3.0
            await server.close_sessions()  # what the app's shutdown does once the drain time is over
            await current.receive_until(lambda: current.errors, timeout=5)
            assert current.errors == ["the server is shutting down"]
            closing = await current.ws.receive(timeout=5)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
            await wait_for(lambda: server.admission.active == 0 and server.model_loop.active == 0)

    asyncio.run(main())


def test_shutdown_closes_sessions_concurrently(checkpoint, personas):
    """Peers that never answer the close handshake cost ~2 s each to close: all at once, not one by one."""
    from test_server import _raw_websocket

    async def main():
        async with serving(checkpoint, personas, max_conversations=6) as (server, base, http):
            port = int(base.rsplit(":", 1)[1])
            sockets = [await _raw_websocket(port, "/api/chat?voice_prompt=DEMO_LOW") for _ in range(6)]
            await wait_for(lambda: server.model_loop.active == 6, timeout=30)
            started = time.perf_counter()
            await server.close_sessions()
            elapsed = time.perf_counter() - started
            for _, writer in sockets:
                writer.transport.abort()
            return elapsed

    elapsed = asyncio.run(main())
    assert elapsed < 4.0, f"closing 6 silent peers took {elapsed:.1f} s"


# -- the stub-engine benchmark path ---------------------------------------------------------------------------
def test_bench_server_stub_engine_runs_a_few_callers():
    spec = importlib.util.spec_from_file_location("bench_server", ROOT / "bench" / "bench_server.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_server"] = bench  # dataclasses look their module up
    try:
        spec.loader.exec_module(bench)
    finally:
        sys.modules.pop("bench_server", None)

    class Args:
        stub_engine, codec_workers, seconds, torch_threads = True, 1, 2.0, 1

    pages, _ = bench.encode_pages(4.0)
    result = asyncio.run(bench.run_level(Args(), 3, pages))
    assert result["errors"] == 0 and result["ticks"] >= 12
    assert result["received_per_s"] > 6  # the echo came back, frame after frame, to every caller
    assert result["server_cpu_pct"] > 0


def test_codec_worker_decodes_in_order_and_bounds_what_waits():
    """One call's pages decode in a worker exactly as sphn does in-process; at most MAX_PENDING_SAMPLES of
    audio (and MAX_PENDING_BYTES of Ogg) wait for it, the rest is dropped and counted."""
    from personaplex.server.opus import MAX_PENDING_SAMPLES, CodecPool

    pages = opus_pages(4.0)

    async def main():
        pool = CodecPool(1)
        await pool.start()
        got: list[np.ndarray] = []
        stream = pool.open(got.append, lambda text, fatal=False: None)
        f = OggFilter(burst_seconds=10.0)
        accepted = 0
        for page in pages:  # 4 s at once: more than may wait
            r = f.feed(page, 0.0)
            if r.pages and stream.decode(r.pages, r.samples):
                accepted += r.samples
            assert stream.pending_samples <= MAX_PENDING_SAMPLES
        await wait_for(lambda: not stream.pending)
        encoded = await stream.encode(np.zeros(1920, np.float32))
        stream.close()
        await pool.close()
        return accepted, got, pool.dropped_decodes, encoded

    accepted, got, dropped, encoded = asyncio.run(main())
    assert MAX_PENDING_SAMPLES - 2000 <= accepted <= MAX_PENDING_SAMPLES and dropped > 0
    direct = sphn.OpusStreamReader(RATE).append_bytes(b"".join(pages))
    assert np.array_equal(np.concatenate(got), direct[:accepted])
    assert encoded.startswith(b"OggS")
