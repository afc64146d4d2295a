"""Streaming Mimi speed: encode + decode of one 80 ms frame, ours vs the reference (`moshi`), same run.

Real Mimi shape, random weights, batch 1 by default. Prints the median ms per frame of each and the ratio,
and the non-view aten operations of one streaming encode + decode at this batch (counted on the meta device,
`personaplex.opcount`; on a GPU each is a kernel launch).

    .venv/bin/python bench/bench_mimi.py [--frames 50] [--warmup 10] [--threads N] [--batch 1] [--no-reference]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from personaplex.codec import Mimi, MimiConfig, mimi_from_released


def _test_signal(batch: int, samples: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / 24_000
    tone = 0.3 * torch.sin(2 * torch.pi * 220 * t)
    return (tone + 0.05 * torch.randn(batch, 1, samples, generator=g)).float()


def _time_frames(step, pcm: torch.Tensor, frame: int, warmup: int, frames: int) -> list[float]:
    times = []
    n_avail = pcm.shape[-1] // frame
    for i in range(warmup + frames):
        chunk = pcm[..., (i % n_avail) * frame : (i % n_avail + 1) * frame]
        t0 = time.perf_counter()
        step(chunk)
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=50, help="timed frames (after warm-up)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--no-reference", action="store_true", help="time only this package's Mimi")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    ref = None
    if not args.no_reference:
        from moshi.models import loaders

        ref = loaders.get_mimi(None, device="cpu")
        with torch.no_grad():  # random codebooks so that codes vary (the reference initialises them to 0)
            buffers = dict(ref.named_buffers())
            for name, buf in buffers.items():
                if name.endswith("embedding_sum"):
                    usage = buffers[name.replace("embedding_sum", "cluster_usage")]
                    usage.copy_(torch.rand_like(usage) + 0.5)
                    buf.copy_(torch.randn_like(buf) * 0.01 * usage[:, None])
        ours = Mimi(MimiConfig()).eval()
        ours.load_state_dict(mimi_from_released(ref.state_dict()))
    else:
        ours = Mimi(MimiConfig()).eval()

    frame = ours.frame_size
    pcm = _test_signal(args.batch, frame * 25)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, "
        f"{args.frames} frames after {args.warmup} warm-up"
    )

    stream = ours.stream(args.batch)

    def ours_step(chunk: torch.Tensor) -> None:
        stream.decode(stream.encode(chunk))

    ours_ms = _time_frames(ours_step, pcm, frame, args.warmup, args.frames)
    ours_med = statistics.median(ours_ms)
    print(f"ours      : {ours_med:7.2f} ms/frame (median; min {min(ours_ms):.2f}, max {max(ours_ms):.2f})")

    if ref is not None:

        def ref_step(chunk: torch.Tensor) -> None:
            ref.decode(ref.encode(chunk))

        with torch.no_grad(), ref.streaming(args.batch):
            ref_ms = _time_frames(ref_step, pcm, frame, args.warmup, args.frames)
        ref_med = statistics.median(ref_ms)
        print(f"reference : {ref_med:7.2f} ms/frame (median; min {min(ref_ms):.2f}, max {max(ref_ms):.2f})")
        print(f"speed-up  : {ref_med / ours_med:.2f}x (reference / ours); real time = {1000 / ours.frame_rate:.0f} ms")
    print(f"ops/tick  : {_ops_per_tick(args.batch)} non-view aten ops per encode + decode (meta device)")


def _ops_per_tick(batch: int) -> int:
    from personaplex.opcount import count_ops

    with torch.device("meta"):
        stream = Mimi(MimiConfig()).eval().stream(batch)
    pcm = torch.empty(batch, 1, stream.mimi.frame_size, device="meta")
    stream.decode(stream.encode(pcm))  # builds the cached tables
    return sum(count_ops(lambda: stream.decode(stream.encode(pcm))).values())


if __name__ == "__main__":
    main()
