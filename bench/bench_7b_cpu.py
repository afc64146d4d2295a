"""The real PersonaPlex-7B shape end to end on a CPU, with int8 weights: load, persona prefill, a conversation.

    .venv/bin/python bench/bench_7b_cpu.py [--dir DIR] [--quantize int8] [--seconds 5] [--out result.json]

A benchmark, not a test (pytest does not collect bench/). The first run writes the `personaplex-7b` preset
with RANDOM weights as a released-layout checkpoint (16.7 GB of bf16, written tensor by tensor: the model is
never held in memory) under ~/.cache/personaplex/bench-7b, with the demo checkpoint's Mimi (random weights),
tokenizer and voices beside it; later runs reuse it. Then, in this process: `load_checkpoint(...,
quantize="int8")` (load time, peak RSS), a persona from a voice recording and a text prompt (Mimi encode +
one batched prefill), and a `--seconds` offline conversation through `BatchEngine` (time per 80 ms frame:
Mimi encode, temporal transformer, depformer for the 8 agent codebooks, Mimi decode). The weights are
random, so what it says is noise; the time and memory are the real model's. Results: docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

BENCH_MARKER = "BENCH_RANDOM_WEIGHTS.txt"
PROMPT = ("You work for SwiftPlex Appliances, which sells and repairs home appliances, and your name is Ana. "
          "Help customers book repairs, check order status and answer warranty questions.")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def build_checkpoint(directory: Path, preset: str = "personaplex-7b", seed: int = 0) -> Path:
    """The 7B preset with random weights in the released layout (once; ~16.7 GB)."""
    from personaplex.checkpoint import write_random_lm
    from personaplex.demo import demo_checkpoint_dir
    from personaplex.hub import MIMI_FILE, TEXT_TOKENIZER_FILE, VOICES_DIR

    if (directory / BENCH_MARKER).is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"writing the {preset} preset with random weights to {directory} (once) ...", flush=True)
    write_random_lm(directory, preset, seed=seed)
    demo = demo_checkpoint_dir()
    shutil.copyfile(demo / MIMI_FILE, directory / MIMI_FILE)
    shutil.copyfile(demo / TEXT_TOKENIZER_FILE, directory / TEXT_TOKENIZER_FILE)
    shutil.copytree(demo / VOICES_DIR, directory / VOICES_DIR, dirs_exist_ok=True)
    (directory / BENCH_MARKER).write_text(f"{preset} preset with RANDOM weights, written by "
                                          "bench/bench_7b_cpu.py; Mimi, tokenizer and voices of the demo.\n")
    print(f"  written in {time.perf_counter() - start:.0f} s", flush=True)
    return directory


def main() -> None:
    from personaplex.audio import voiced_signal
    from personaplex.checkpoint import load_checkpoint
    from personaplex.config import FRAME_SIZE
    from personaplex.engine import BatchEngine, Personas, SamplingParams
    from personaplex.quantize import memory_summary, weights_info

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "personaplex" / "bench-7b")
    parser.add_argument("--preset", default="personaplex-7b", help="model preset (tiny: a quick smoke run)")
    parser.add_argument("--quantize", default="int8", choices=["none", "int8"])
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="activation (and KV) dtype (default: float32 on CPU)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the conversation")
    parser.add_argument("--voice", default="DEMO_HIGH")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    directory = build_checkpoint(args.dir, args.preset)
    rss0 = _status("VmRSS:")
    start = time.perf_counter()
    ckpt = load_checkpoint(directory, device="cpu", quantize=args.quantize,
                           dtype=getattr(torch, args.dtype) if args.dtype else None)
    load_s = time.perf_counter() - start
    load_peak = _status("VmHWM:")
    info = weights_info(ckpt.lm)
    print(f"loaded in {load_s:.1f} s: {memory_summary(ckpt.lm)}; peak RSS {_gib(load_peak)} "
          f"(before the load {_gib(rss0)})", flush=True)

    personas = Personas(ckpt.lm, ckpt.mimi, ckpt.tokenizer, ckpt.files.voices_dir)
    engine = BatchEngine(ckpt.lm, ckpt.mimi, max_batch=1)
    start = time.perf_counter()
    persona = personas.get(args.voice, PROMPT)
    prefill_s = time.perf_counter() - start
    print(f"persona: {persona.length} prompt frames (voice {args.voice} + text prompt) in {prefill_s:.1f} s",
          flush=True)

    frames = max(1, round(args.seconds * 12.5))
    user = torch.from_numpy(voiced_signal(frames * FRAME_SIZE / 24_000, 0)).view(frames, FRAME_SIZE)
    conv = engine.join(persona, SamplingParams(seed=1))
    times = []
    for i in range(frames):
        t0 = time.perf_counter()
        engine.step(user[i:i + 1])
        times.append(time.perf_counter() - t0)
        if i % 10 == 0:
            print(f"  frame {i + 1}/{frames}: {times[-1]:.2f} s", flush=True)
    engine.leave(conv)
    peak = _status("VmHWM:")
    result = {
        "cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "quantize": args.quantize, "precision": info["precision"], "weight_bytes": info["weight_bytes"],
        "load_s": round(load_s, 1), "load_peak_rss_bytes": load_peak, "rss_before_load_bytes": rss0,
        "prompt_frames": persona.length, "prefill_s": round(prefill_s, 2),
        "frames": frames, "frame_s_median": round(statistics.median(times), 3),
        "frame_s_mean": round(statistics.fmean(times), 3), "frame_s_min": round(min(times), 3),
        "frame_s_max": round(max(times), 3), "peak_rss_bytes": peak,
    }
    print(json.dumps(result, indent=2))
    print(f"{frames} frames: median {result['frame_s_median']:.2f} s per 80 ms frame "
          f"({0.08 / result['frame_s_median']:.3f}x real time); peak RSS {_gib(peak)}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
