"""One-shot GPU check, unattended, in under 8 minutes: what a tick of the real 7B shape costs on this GPU.

    python bench/device_check.py --out /tmp/device-check      # JSON + a markdown table for docs/performance.md

Steps (each prints progress; a step that would run past the time budget is skipped and says so):
1. CUDA graphs replay exactly what the eager tick computes (tiny model, 2 conversations, 24 frames).
2. The personaplex-7b preset with random bf16 weights (drawn on the GPU) and the released Mimi shape with
   random weights; a persona from a ~160-token text prompt (prefill time = time to first audio without cache).
3. One engine of 64 rows (fewer if they do not fit: then the largest that does): for 1, 8, 32 and 64
   conversations, tick time p50 / p99 over `--ticks` ticks (Mimi encode + LM + sampling + Mimi decode, the
   host's copy in and read back included) with CUDA graphs and eagerly.
4. Memory per conversation (the engine's allocation / its rows), time to first audio with a cached persona
   (join + first tick), and the largest measured batch whose p99 stays under 80 ms (real time).
Nothing is downloaded; weights are random, so only speed and memory mean anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from personaplex.codec.mimi import Mimi, MimiConfig  # noqa: E402
from personaplex.config import FRAME_SIZE, get_preset  # noqa: E402
from personaplex.engine import BatchEngine, SamplingParams, build_persona  # noqa: E402
from personaplex.lm import LMModel  # noqa: E402

BATCHES = (1, 8, 32, 64)
BUDGET_S = 450.0  # stop starting new work past this (the whole check stays under 8 minutes)
START = time.perf_counter()


def say(text: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f} s] {text}", flush=True)


def left() -> float:
    return BUDGET_S - (time.perf_counter() - START)


@torch.no_grad()
def random_fill_(module: torch.nn.Module, seed: int = 0) -> None:
    """Random weights drawn on the device (std 1/sqrt(fan_in); norms at 1): seconds, not minutes."""
    g = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    for name, p in module.named_parameters():
        if name.endswith("alpha"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=g)


def frames(n: int, batch: int, device) -> torch.Tensor:
    t = torch.arange(n * FRAME_SIZE, dtype=torch.float32) / 24_000
    wave = 0.1 * torch.sin(2 * math.pi * 220 * t) * (1 + torch.sin(2 * math.pi * 3 * t))
    return wave.view(n, 1, FRAME_SIZE).expand(n, batch, FRAME_SIZE).contiguous()


def check_graphs_equal_eager(device) -> dict:
    cfg = dataclasses.replace(get_preset("tiny"), context=64)
    with torch.device(device):
        lm, mimi = LMModel(cfg).eval(), Mimi(MimiConfig()).eval()
    random_fill_(lm)
    persona = build_persona(lm, None, list(range(10, 20)))
    user = frames(24, 2, device)
    outs = []
    for graphs in (True, False):
        engine = BatchEngine(lm, mimi, max_batch=2, cuda_graphs=graphs)
        for seed in (1, 2):
            engine.join(persona, SamplingParams(seed=seed))
        outs.append([[(r.text_token, r.audio_codes.tolist(), r.pcm) for r in engine.step(user[t])] for t in range(24)])
    tokens_equal = all(a[0] == b[0] and a[1] == b[1] for fa, fb in zip(*outs) for a, b in zip(fa, fb))
    pcm_diff = max(float((a[2] - b[2]).abs().max()) for fa, fb in zip(*outs) for a, b in zip(fa, fb))
    return {"tokens_equal": tokens_equal, "pcm_max_abs_diff": pcm_diff}


def timed_ticks(engine: BatchEngine, n: int, ticks: int, user: torch.Tensor) -> dict:
    for t in range(5):  # warm up (allocator, first replays)
        engine.step(user[t % user.shape[0], :n])
    times = []
    for t in range(ticks):
        torch.cuda.synchronize()
        started = time.perf_counter()
        engine.step(user[t % user.shape[0], :n])  # ends with the read back: a sync
        times.append(time.perf_counter() - started)
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))] * 1000  # noqa: E731
    return {"p50_ms": round(pick(0.5), 2), "p99_ms": round(pick(0.99), 2), "max_ms": round(times[-1] * 1000, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("device-check"))
    parser.add_argument("--ticks", type=int, default=100)
    parser.add_argument("--max-batch", type=int, default=64)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("device_check: no CUDA device here; run it on a GPU host", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
                    "ticks": args.ticks, "skipped": []}
    say(f"GPU {result['gpu']}, torch {torch.__version__}")

    say("1/4 CUDA graphs against eager (tiny model)")
    result["graphs_vs_eager"] = check_graphs_equal_eager(device)
    say(f"    {result['graphs_vs_eager']}")

    say("2/4 building personaplex-7b (random bf16 weights) and Mimi")
    started = time.perf_counter()
    with torch.device(device):
        lm = LMModel(get_preset("personaplex-7b"), dtype=torch.bfloat16).eval()
        mimi = Mimi(MimiConfig()).eval()
    random_fill_(lm)
    torch.cuda.synchronize()
    result["build_s"] = round(time.perf_counter() - started, 1)
    result["weights_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    started = time.perf_counter()
    persona = build_persona(lm, None, list(range(100, 260)))
    torch.cuda.synchronize()
    result["persona_frames"] = persona.length
    result["prefill_ms"] = round((time.perf_counter() - started) * 1000, 1)
    say(f"    built in {result['build_s']} s, weights {result['weights_gib']} GiB, prefill of {persona.length} "
        f"frames {result['prefill_ms']} ms")

    say(f"3/4 engine of {args.max_batch} rows with CUDA graphs")
    engine, rows = None, args.max_batch
    base = torch.cuda.memory_allocated()
    while engine is None:
        try:
            started = time.perf_counter()
            engine = BatchEngine(lm, mimi, max_batch=rows)
            result["capture_s"] = round(time.perf_counter() - started, 1)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows = rows * 3 // 4
            say(f"    out of memory; trying {rows} rows")
            if rows < 1:
                raise
    result["engine_rows"] = rows
    result["memory_per_conversation_gib"] = round((torch.cuda.memory_allocated() - base) / rows / 2**30, 3)
    say(f"    {rows} rows, graphs captured in {result['capture_s']} s, "
        f"{result['memory_per_conversation_gib']} GiB per conversation")
    user = frames(16, rows, "cpu")
    measured = []
    for batch in [b for b in BATCHES if b <= rows] + ([rows] if rows not in BATCHES else []):
        if left() < 60:
            result["skipped"].append(f"batch {batch}: time budget")
            say(f"    batch {batch}: skipped (time budget)")
            continue
        while engine.active < batch:
            if engine.active == 0:  # time to first audio with a cached persona: join + first tick
                torch.cuda.synchronize()
                started = time.perf_counter()
                engine.join(persona, SamplingParams(seed=0))
                engine.step(user[0, :1])
                result["first_audio_cached_ms"] = round((time.perf_counter() - started) * 1000, 1)
            else:
                engine.join(persona, SamplingParams(seed=engine.active))
        row = {"batch": batch, "graphs": timed_ticks(engine, batch, args.ticks, user)}
        graphs, engine.graphs = engine.graphs, None
        row["eager"] = timed_ticks(engine, batch, max(20, args.ticks // 4), user)
        engine.graphs = graphs
        measured.append(row)
        say(f"    batch {batch}: graphs p50 {row['graphs']['p50_ms']} ms p99 {row['graphs']['p99_ms']} ms; "
            f"eager p50 {row['eager']['p50_ms']} ms p99 {row['eager']['p99_ms']} ms")
    result["ticks_by_batch"] = measured
    real_time = [r["batch"] for r in measured if r["graphs"]["p99_ms"] < 80.0]
    result["largest_real_time_batch_measured"] = max(real_time) if real_time else 0
    result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)

    say("4/4 writing results")
    (args.out / "device_check.json").write_text(json.dumps(result, indent=2))
    lines = [f"GPU: {result['gpu']}, torch {result['torch']}; personaplex-7b with random bf16 weights; "
             f"{result['engine_rows']} rows; {args.ticks} ticks per figure.", "",
             "| conversations | tick p50 (graphs) | tick p99 (graphs) | tick p50 (eager) | tick p99 (eager) |",
             "|---|---|---|---|---|"]
    for r in measured:
        g, e = r["graphs"], r["eager"]
        lines.append(f"| {r['batch']} | {g['p50_ms']} ms | {g['p99_ms']} ms | {e['p50_ms']} ms | {e['p99_ms']} ms |")
    lines += ["", f"- memory per conversation: {result['memory_per_conversation_gib']} GiB; weights "
              f"{result['weights_gib']} GiB; peak {result['peak_memory_gib']} GiB",
              f"- time to first audio, cached persona: {result.get('first_audio_cached_ms')} ms; prefill of a "
              f"{result['persona_frames']}-frame persona: {result['prefill_ms']} ms",
              f"- largest measured batch with p99 < 80 ms: {result['largest_real_time_batch_measured']}",
              f"- CUDA graphs vs eager (tiny model): {result['graphs_vs_eager']}"]
    (args.out / "device_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
