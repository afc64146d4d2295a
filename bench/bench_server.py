"""`personaplex serve` under load: N simulated callers streaming real-time Opus over loopback.

    .venv/bin/python bench/bench_server.py [--clients 1 2 4 8] [--seconds 20] [--checkpoint DIR]
    .venv/bin/python bench/bench_server.py --stub-engine --clients 16 32 48 64 [--codec-workers 1]

For each N, a fresh server runs in a subprocess bound to 127.0.0.1 on a free port: `personaplex serve --demo`
(or --checkpoint), or with --stub-engine the same server with the model replaced by an instant stand-in
(`StubEngine`: every step returns the callers' own audio, no model at all; the output says "STUB ENGINE, no
model"), which measures what the server's I/O path (websockets, Ogg checks, Opus decode and encode in the
codec workers, the model loop's bookkeeping) carries by itself. N callers connect and replay audio encoded
once before the run (20 ms Opus pages like the released web client when PyAV is installed, else sphn's
pages), paced in real time, and count what they receive, for --seconds; the server's /metrics then give the
tick time (p50/p90/p99), overruns, missing and dropped frames, and /proc the CPU time of the server and its
codec workers. Every run ends by itself.

A caller is served in real time when the p99 tick stays within 80 ms, no frame is dropped either way, no
audio is refused, and it receives its 12.5 frames/s.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np

RATE = 24_000
TICK_MS = 80.0
FRAME = 1920
STUB_LABEL = "STUB ENGINE, no model"


# -- the stand-in model (server side) -------------------------------------------------------------------------
@dataclass
class StubConversation:
    id: int
    row: int = -1
    active: bool = True


@dataclass
class StubFrame:
    pcm: "object"  # (1920,) float32 CPU tensor
    text_token: int
    audio_codes: "object"


class StubEngine:
    """BatchEngine-compatible and instant: `step` returns each caller's own audio (an echo) and, every 8th
    frame, a text token. For measuring the server around the model, never for serving anyone."""

    _ids = itertools.count(1)

    def __init__(self, max_batch: int) -> None:
        import torch

        self.torch = torch
        self.max_batch = max_batch
        self._conversations: list[StubConversation] = []
        self._codes = torch.zeros(8, dtype=torch.long)
        self._frames = 0

    @property
    def conversations(self) -> list[StubConversation]:
        return list(self._conversations)

    @property
    def active(self) -> int:
        return len(self._conversations)

    def join(self, persona, params=None) -> StubConversation:
        if len(self._conversations) >= self.max_batch:
            from personaplex.engine import EngineFullError

            raise EngineFullError(f"all {self.max_batch} conversation slots are in use")
        conv = StubConversation(next(self._ids), row=len(self._conversations))
        self._conversations.append(conv)
        return conv

    def leave(self, conv) -> None:
        if conv in self._conversations:
            self._conversations.remove(conv)
            conv.active = False

    def clear(self) -> None:
        self._conversations.clear()

    def step(self, user):  # user (n, 1920) float32
        assert user.shape == (len(self._conversations), FRAME), user.shape
        self._frames += 1
        token = 100 if self._frames % 8 == 0 else 3  # 3 is PAD in the released vocabulary
        return [StubFrame(user[i].clone(), token, self._codes) for i in range(user.shape[0])]


class StubPersonas:
    """Personas for the stub: one voice, nothing to build."""

    class _Cache:
        hits = misses = 0

    cache = _Cache()
    allow_paths = False

    def available_voices(self) -> list[str]:
        return ["STUB"]

    def voice_path(self, name: str):
        from personaplex.errors import VoiceNotFoundError

        if name != "STUB":
            raise VoiceNotFoundError(f"voice {name!r} not found; available: STUB")
        return Path("STUB")

    def cached(self, voice, text_prompt) -> bool:
        return True

    def get(self, voice, text_prompt):
        return None


class StubTokenizer:
    def piece(self, token: int) -> str:
        return "▁stub"


def stub_server(conversations: int, codec_workers: int, queue: int = 0):
    """A ChatServer whose model is a StubEngine (its model loop starts with the app)."""
    from personaplex.server import ChatServer, ModelLoop, ServerSettings

    settings = ServerSettings(max_conversations=conversations, queue=queue, default_voice="STUB",
                              default_text_prompt="", codec_workers=codec_workers, idle_timeout_seconds=None)
    personas = StubPersonas()
    loop = ModelLoop(lambda: StubEngine(conversations), personas)
    return ChatServer(loop, personas, StubTokenizer(), settings, model_info={"stub": STUB_LABEL})


async def serve_stub(port: int, conversations: int, codec_workers: int) -> None:
    from aiohttp import web

    from personaplex.server import make_runner

    server = stub_server(conversations, codec_workers)
    runner = make_runner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    print(f"{STUB_LABEL}: serving on 127.0.0.1:{port}, codec workers {server.codec.pids()}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


# -- callers (client side) ------------------------------------------------------------------------------------
def encode_pages(seconds: float) -> tuple[list[bytes], str]:
    """A speech-like signal as Ogg/Opus pages, encoded once: 20 ms pages with PyAV (libopus), else sphn's."""
    from personaplex.audio import voiced_signal

    pcm = voiced_signal(seconds, 0, RATE).astype(np.float32)
    try:
        import av
    except ImportError:
        import sphn

        writer = sphn.OpusStreamWriter(RATE)
        pages = [bytes(writer.append_pcm(pcm[i:i + 480])) for i in range(0, len(pcm) - 480, 480)]
        return pages, "sphn pages, one per 20 ms of input (80 ms of audio every 4th)"
    buffer = io.BytesIO()
    out = av.open(buffer, "w", format="ogg", options={"page_duration": "20000"})
    stream = out.add_stream("libopus", rate=RATE, layout="mono", options={"frame_duration": "20"})
    frame = av.AudioFrame.from_ndarray(pcm[None], format="flt", layout="mono")
    frame.sample_rate, frame.pts = RATE, 0
    for packet in itertools.chain(stream.encode(frame), stream.encode(None)):
        out.mux(packet)
    out.close()
    data, pages, i = buffer.getvalue(), [], 0
    while i < len(data):
        size = 27 + data[i + 26] + sum(data[i + 27:i + 27 + data[i + 26]])
        pages.append(data[i:i + size])
        i += size
    return pages, "20 ms Opus pages (PyAV/libopus), like the released web client"


@dataclass
class CallerResult:
    handshake_s: float = 0.0
    audio_messages: int = 0
    text_messages: int = 0
    errors: int = 0


async def caller(http, base: str, index: int, seconds: float, pages: list[bytes], query: str) -> CallerResult:
    result = CallerResult()
    started = time.perf_counter()
    async with http.ws_connect(base.replace("http", "ws", 1) + f"/api/chat?seed={index}&{query}") as ws:
        first = await ws.receive(timeout=60)
        if first.type != aiohttp.WSMsgType.BINARY or first.data != b"\x00":
            result.errors += 1
            return result
        result.handshake_s = time.perf_counter() - started

        async def send() -> None:
            t0 = time.perf_counter()
            for i, page in enumerate(itertools.cycle(pages[2:])):  # the two header pages once, below
                await ws.send_bytes(b"\x01" + page)
                await asyncio.sleep(max(0.0, t0 + (i + 1) * 0.02 - time.perf_counter()))

        for page in pages[:2]:
            await ws.send_bytes(b"\x01" + page)
        sender = asyncio.create_task(send())
        stop_at = time.perf_counter() + seconds
        while time.perf_counter() < stop_at:
            try:
                msg = await ws.receive(timeout=max(0.05, stop_at - time.perf_counter()))
            except asyncio.TimeoutError:
                break
            if msg.type != aiohttp.WSMsgType.BINARY:
                break
            kind = msg.data[0]
            result.audio_messages += kind == 0x01
            result.text_messages += kind == 0x02
            result.errors += kind == 0x05
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int, conversations: int) -> subprocess.Popen:
    if args.stub_engine:
        command = [sys.executable, __file__, "--serve-stub", str(port), "--clients", str(conversations),
                   "--codec-workers", str(args.codec_workers)]
    else:
        source = ["--checkpoint", args.checkpoint] if args.checkpoint else ["--demo"]
        command = [sys.executable, "-m", "personaplex.cli", "serve", *source, "--host", "127.0.0.1", "--port",
                   str(port), "--max-conversations", str(conversations), "--device", args.device,
                   "--codec-workers", str(args.codec_workers)]
    env = dict(os.environ)
    if args.torch_threads:
        env["OMP_NUM_THREADS"] = str(args.torch_threads)  # torch's intra-op threads in the server
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)


async def wait_ready(base: str, process: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.perf_counter() + timeout
    async with aiohttp.ClientSession() as http:
        while time.perf_counter() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited: {process.stderr.read()[-2000:]}")
            try:
                async with http.get(base + "/healthz", timeout=aiohttp.ClientTimeout(total=2)) as response:
                    if response.status == 200:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.3)
    raise RuntimeError(f"the server did not answer within {timeout:.0f} s")


def process_tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its children (the codec workers), from /proc."""
    total, ticks = 0.0, os.sysconf("SC_CLK_TCK")
    pids, seen = [pid], set()
    while pids:
        p = pids.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
            for task in Path(f"/proc/{p}/task").iterdir():
                pids += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError, IndexError):
            continue
    return total


def parse_metrics(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


async def run_level(args, clients: int, pages: list[bytes]) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = start_server(args, port, clients)
    query = "voice_prompt=STUB" if args.stub_engine else "voice_prompt=DEMO_LOW.pt&text_prompt=Hello"
    try:
        await wait_ready(base, process)
        async with aiohttp.ClientSession() as http:
            cpu0, own0, wall0 = process_tree_cpu(process.pid), time.process_time(), time.perf_counter()
            results = await asyncio.wait_for(
                asyncio.gather(*(caller(http, base, i, args.seconds, pages, query) for i in range(clients))),
                timeout=args.seconds + 120)
            cpu1, own1, wall1 = process_tree_cpu(process.pid), time.process_time(), time.perf_counter()
            async with http.get(base + "/metrics") as response:
                metrics = parse_metrics(await response.text())
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # the server's own process group, started above
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    ticks = metrics["personaplex_ticks_total"]
    reasons = {k.split('"')[1]: int(v) for k, v in metrics.items() if v and (
        k.startswith("personaplex_audio_ignored_total") and 'reason="not_joined"' not in k
        or k.startswith("personaplex_codec_dropped_total"))}
    refused = sum(reasons.values())
    wall = wall1 - wall0
    return {
        "clients": clients, "ticks": int(ticks),
        "p50_ms": 1e3 * metrics['personaplex_tick_seconds{quantile="0.5"}'],
        "p90_ms": 1e3 * metrics['personaplex_tick_seconds{quantile="0.9"}'],
        "p99_ms": 1e3 * metrics['personaplex_tick_seconds{quantile="0.99"}'],
        "overruns": int(metrics["personaplex_tick_overruns_total"]),
        "missing_pct": 100 * metrics["personaplex_frames_missing_total"] / max(1, ticks * clients),
        "dropped_in": int(metrics['personaplex_frames_dropped_total{direction="in"}']),
        "dropped_out": int(metrics['personaplex_frames_dropped_total{direction="out"}']),
        "refused": int(refused), "refused_by": reasons,
        "received_per_s": min(r.audio_messages for r in results) / args.seconds,
        "handshake_s": max(r.handshake_s for r in results),
        "errors": sum(r.errors for r in results),
        "server_cpu_pct": 100 * (cpu1 - cpu0) / wall, "client_cpu_pct": 100 * (own1 - own0) / wall,
        "per_caller_pct": 100 * (cpu1 - cpu0) / wall / clients,
    }


def real_time(r: dict) -> bool:
    return (r["p99_ms"] <= TICK_MS and not r["errors"] and not r["dropped_in"] and not r["dropped_out"]
            and not r["refused"] and r["received_per_s"] >= 12.5 * 0.97)


async def bench(args) -> list[dict]:
    pages, how = encode_pages(10.0)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    model = STUB_LABEL if args.stub_engine else (args.checkpoint or "demo checkpoint") + f" on {args.device}"
    print(f"{model}; {args.seconds:g} s per level; {how}; codec workers {args.codec_workers}; "
          f"{os.cpu_count()} x {cpu}")
    print(f"{'N':>3} {'ticks':>5} {'p50 ms':>6} {'p90 ms':>6} {'p99 ms':>6} {'overrun':>7} {'miss %':>6} "
          f"{'drop in/out':>11} {'refused':>7} {'min fr/s':>8} {'join s':>6} {'err':>3} {'server CPU':>10} "
          f"{'per caller':>10} {'client CPU':>10}")
    rows = []
    for clients in args.clients:
        r = await run_level(args, clients, pages)
        rows.append(r)
        print(f"{r['clients']:>3} {r['ticks']:>5} {r['p50_ms']:>6.1f} {r['p90_ms']:>6.1f} {r['p99_ms']:>6.1f} "
              f"{r['overruns']:>7} {r['missing_pct']:>6.1f} {r['dropped_in']:>5}/{r['dropped_out']:<5} "
              f"{r['refused']:>7} {r['received_per_s']:>8.2f} {r['handshake_s']:>6.2f} {r['errors']:>3} "
              f"{r['server_cpu_pct']:>9.0f}% {r['per_caller_pct']:>9.2f}% {r['client_cpu_pct']:>9.0f}%"
              + (f"  refused: {r['refused_by']}" if r["refused"] else "") + f"  (load {os.getloadavg()[0]:.1f})",
              flush=True)
    best = max((r["clients"] for r in rows if real_time(r)), default=0)
    print(f"largest N served in real time (p99 tick <= {TICK_MS:.0f} ms, nothing dropped or refused, "
          f">= 97% of 12.5 frames/s each): {best if best else 'none'}" + (f"  [{STUB_LABEL}]" if args.stub_engine
                                                                           else ""))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seconds", type=float, default=20.0, help="streaming time per level (default 20)")
    parser.add_argument("--stub-engine", action="store_true", help=f"replace the model by an instant echo "
                                                                   f"({STUB_LABEL})")
    parser.add_argument("--codec-workers", type=int, default=1, help="the server's Opus worker processes")
    parser.add_argument("--checkpoint", default=None, help="default: the --demo checkpoint")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--torch-threads", type=int, default=0, help="server's torch threads (default: torch's)")
    parser.add_argument("--serve-stub", type=int, default=None, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_stub is not None:  # the server process of a --stub-engine run
        asyncio.run(serve_stub(args.serve_stub, args.clients[0], args.codec_workers))
        return
    if args.seconds <= 0 or args.seconds > 300 or max(args.clients) > 256 or min(args.clients) < 1:
        parser.error("keep it bounded: 0 < --seconds <= 300 and 1 <= clients <= 256")
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
