"""What one engine tick costs the host at the 7B shape, counted on the meta device (no GPU, no weights).

    .venv/bin/python bench/bench_tick.py            # table for docs/performance.md
    .venv/bin/python bench/bench_tick.py --json out.json

Builds the personaplex-7b LM (bf16) and the released Mimi under `torch.device("meta")`, a persona with
`build_persona` on meta, a `BatchEngine` at batch 1 and 64 with every row joined, and counts one tick
(`BatchEngine._tick`: Mimi encode, LM step, sampling, Mimi decode): non-view aten operations (on a GPU each
is at least one kernel launch; a CUDA graph replays them all with one), host synchronisations (the tick runs
under `NoHostSync`, which raises on the first), and bytes materialised by non-in-place operations. Measured
before and after one row has passed the 240 s window (its pinned prompt keys are then rotated per step).

Counting follows `personaplex.opcount`: views are free, and `scaled_dot_product_attention` counts as the one
fused kernel a GPU runs (on meta PyTorch would run its math path, about a dozen operations per call). A warm-up
tick runs first, as in a running engine (Mimi's codebook tables are computed once, then cached).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from personaplex.codec.mimi import Mimi, MimiConfig  # noqa: E402
from personaplex.config import FRAME_SIZE, get_preset  # noqa: E402
from personaplex.engine import BatchEngine, SamplingParams, build_persona  # noqa: E402
from personaplex.lm import LMModel  # noqa: E402
from personaplex.opcount import NoHostSync, OpCounter  # noqa: E402

PROMPT_TOKENS = 160  # a persona of ~160 frames (voice-less text prompt plus its silences)


def build(batch: int, pinned_capacity: int | None = None):
    with torch.device("meta"):
        lm = LMModel(get_preset("personaplex-7b"), dtype=torch.bfloat16)
        mimi = Mimi(MimiConfig())
    persona = build_persona(lm, None, list(range(100, 100 + PROMPT_TOKENS)))
    engine = BatchEngine(lm, mimi, max_batch=batch, cuda_graphs=False, pinned_capacity=pinned_capacity)
    for _ in range(batch):
        engine.join(persona, SamplingParams())
    return engine


def count_tick(engine: BatchEngine, slid: bool) -> dict:
    views = engine._views[engine._bucket(engine.active)]
    kmax = engine.graph_kmax()
    engine._tick(views, slid, kmax)  # warm: caches filled on the first tick (Mimi's codebook tables) stay
    counter = OpCounter()
    with NoHostSync(), counter:
        engine._tick(views, slid, kmax)
    counts = +counter.counts
    return {"ops": sum(counts.values()), "bytes": counter.bytes_out, "top": counts.most_common(14)}


def split_counts(engine: BatchEngine) -> dict:
    """Operations of the tick's parts (raw meta counts): Mimi encode, decode, and the LM step with sampling."""
    views = engine._views[engine._bucket(engine.active)]
    b = views.size
    parts = {}
    with OpCounter() as c:
        engine.mimi.encode_step(views.pcm_in.view(b, 1, FRAME_SIZE), views.enc)
    parts["mimi_encode"] = sum(c.counts.values())
    with OpCounter() as c:
        engine.mimi.decode_step(views.frame_out[:, 1:, None], views.dec)
    parts["mimi_decode"] = sum(c.counts.values())
    return parts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for batch in args.batches:
        started = time.perf_counter()
        engine = build(batch)
        context = engine.lm.config.context
        for slid in (False, True):
            if slid:  # one row's conversation is past the window (host mirror: the device holds no values)
                engine.state.kv.pos_cpu[0] = context + 100
            raw = count_tick(engine, slid)
            parts = split_counts(engine)
            rows.append({"batch": batch, "row_past_window": slid, "ops": raw["ops"],
                         "host_syncs": 0, "bytes_materialised": raw["bytes"], **parts,
                         "lm_and_sampling": raw["ops"] - parts["mimi_encode"] - parts["mimi_decode"],
                         "top_ops": raw["top"]})
        print(f"batch {batch}: built and counted in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    print("| batch | a row past 240 s | ops per tick | LM + sampling | Mimi enc + dec | host syncs "
          "| MB materialised |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {'yes' if r['row_past_window'] else 'no'} | {r['ops']} "
              f"| {r['lm_and_sampling']} | {r['mimi_encode']} + {r['mimi_decode']} | {r['host_syncs']} "
              f"| {r['bytes_materialised'] / 2**20:.1f} |")
    print("\nmost frequent operations (batch %d, no row past the window):" % rows[0]["batch"])
    for name, n in rows[0]["top_ops"]:
        print(f"  {name}: {n}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
