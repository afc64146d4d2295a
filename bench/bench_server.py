"""`personaplex serve` under load: N simulated callers streaming real-time Opus over loopback.

    .venv/bin/python bench/bench_server.py [--clients 1 2 4 8] [--seconds 20] [--frame-ms 20] [--checkpoint DIR]

For each N, a fresh server (`personaplex serve --demo` unless --checkpoint, bound to 127.0.0.1 on a free port)
runs in a subprocess; N callers connect, stream a speech-like signal as Ogg/Opus paced in real time (20 ms
frames like the released web client, or 80 ms) and read everything the server sends, for --seconds; then
the server's /metrics give the tick time (p50/p90/p99 over the run), overruns and frames stepped with
missing caller audio. The server is stopped after each N; every run ends by itself.

A tick steps every conversation once (80 ms of audio); the server keeps up with N callers while the p99
tick stays within 80 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import aiohttp
import numpy as np
import sphn

from personaplex.audio import voiced_signal as speech_like

RATE = 24_000
TICK_MS = 80.0


@dataclass
class CallerResult:
    handshake_s: float = 0.0
    audio_messages: int = 0
    text_messages: int = 0
    errors: int = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int, conversations: int) -> subprocess.Popen:
    source = ["--checkpoint", args.checkpoint] if args.checkpoint else ["--demo"]
    command = [sys.executable, "-m", "personaplex.cli", "serve", *source, "--host", "127.0.0.1", "--port",
               str(port), "--max-conversations", str(conversations), "--device", args.device]
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
            await asyncio.sleep(0.5)
    raise RuntimeError(f"the server did not answer within {timeout:.0f} s")


async def caller(http, base: str, index: int, seconds: float, frame_ms: int) -> CallerResult:
    result = CallerResult()
    url = base.replace("http", "ws", 1) + f"/api/chat?voice_prompt=DEMO_LOW.pt&seed={index}&text_prompt=Hello"
    signal_pcm = speech_like(seconds + 1.0, seed=index)
    chunk = RATE * frame_ms // 1000
    started = time.perf_counter()
    async with http.ws_connect(url) as ws:
        first = await ws.receive(timeout=60)
        if first.type != aiohttp.WSMsgType.BINARY or first.data != b"\x00":
            result.errors += 1
            return result
        result.handshake_s = time.perf_counter() - started

        async def send() -> None:
            writer = sphn.OpusStreamWriter(RATE)
            t0 = time.perf_counter()
            for i in range(int(seconds * RATE) // chunk):
                pages = writer.append_pcm(signal_pcm[i * chunk:(i + 1) * chunk])
                if pages:
                    await ws.send_bytes(b"\x01" + pages)
                await asyncio.sleep(max(0.0, t0 + (i + 1) * chunk / RATE - time.perf_counter()))

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


def parse_metrics(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


async def run_level(args, clients: int) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = start_server(args, port, clients)
    try:
        await wait_ready(base, process)
        async with aiohttp.ClientSession() as http:
            results = await asyncio.wait_for(
                asyncio.gather(*(caller(http, base, i, args.seconds, args.frame_ms) for i in range(clients))),
                timeout=args.seconds + 120)
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
    return {
        "clients": clients,
        "ticks": int(ticks),
        "p50_ms": 1e3 * metrics['personaplex_tick_seconds{quantile="0.5"}'],
        "p90_ms": 1e3 * metrics['personaplex_tick_seconds{quantile="0.9"}'],
        "p99_ms": 1e3 * metrics['personaplex_tick_seconds{quantile="0.99"}'],
        "overruns": int(metrics["personaplex_tick_overruns_total"]),
        "missing": int(metrics["personaplex_frames_missing_total"]),
        "stepped": int(sum(r.audio_messages for r in results)),
        "missing_pct": 100 * metrics["personaplex_frames_missing_total"] / max(1, ticks * clients),
        "dropped_in": int(metrics['personaplex_frames_dropped_total{direction="in"}']),
        "dropped_out": int(metrics['personaplex_frames_dropped_total{direction="out"}']),
        "received_per_s": sum(r.audio_messages for r in results) / clients / args.seconds,
        "handshake_s": max(r.handshake_s for r in results),
        "errors": sum(r.errors for r in results),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seconds", type=float, default=20.0, help="streaming time per level (default 20)")
    parser.add_argument("--frame-ms", type=int, choices=[20, 40, 80], default=20, help="client Opus frame size")
    parser.add_argument("--checkpoint", default=None, help="default: the --demo checkpoint")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--torch-threads", type=int, default=0, help="server's torch threads (default: torch's)")
    args = parser.parse_args()
    if args.seconds <= 0 or args.seconds > 300 or max(args.clients) > 256 or min(args.clients) < 1:
        parser.error("keep it bounded: 0 < --seconds <= 300 and 1 <= clients <= 256")
    print(f"{args.seconds:.0f} s per level, {args.frame_ms} ms Opus frames, "
          f"{'demo checkpoint' if not args.checkpoint else args.checkpoint} on {args.device}, {os.cpu_count()} CPUs")
    print(f"{'N':>3} {'ticks':>6} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'overrun':>7} {'missing':>12} "
          f"{'drop in/out':>11} {'frames/s':>8} {'join s':>6} {'err':>3}")
    best = 0
    for clients in args.clients:
        r = await run_level(args, clients)
        print(f"{r['clients']:>3} {r['ticks']:>6} {r['p50_ms']:>7.1f} {r['p90_ms']:>7.1f} {r['p99_ms']:>7.1f} "
              f"{r['overruns']:>7} {r['missing']:>5} ({r['missing_pct']:>4.1f}%) "
              f"{r['dropped_in']:>5}/{r['dropped_out']:<5} {r['received_per_s']:>8.2f} {r['handshake_s']:>6.2f} "
              f"{r['errors']:>3}", flush=True)
        if r["p99_ms"] <= TICK_MS and not r["errors"]:
            best = max(best, clients)
    print(f"largest N with p99 tick <= {TICK_MS:.0f} ms: {best if best else 'none'} "
          f"(real time needs 12.5 frames/s per caller)")


if __name__ == "__main__":
    asyncio.run(main())
