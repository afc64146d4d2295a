"""Time one incremental LM step (temporal transformer + text head + depformer chain, greedy) against the
reference `moshi` LMGen in the same run, on the same random weights.

    .venv/bin/python bench/bench_lm.py                 # tiny preset and a 7B-width slice, CPU
    .venv/bin/python bench/bench_lm.py --preset personaplex-7b --device cuda --dtype bfloat16 --batch 1 32

The 7B-width slice keeps the real widths (4096 temporal, 1024 depformer, 32000/2048 vocabularies) with
fewer layers, which is what a 2-core CPU with 24 GiB can hold; per-layer cost scales linearly.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from personaplex.adapter import lm_to_released
from personaplex.config import get_preset
from personaplex.lm import LMModel, step_frame


def _time(fn, warmup: int, iters: int, sync) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def bench(cfg, batch: int, device: str, dtype: torch.dtype, warmup: int, iters: int, with_ref: bool) -> dict:
    torch.manual_seed(0)
    with torch.device("meta"):
        ours = LMModel(cfg, dtype=dtype)
    ours = ours.to_empty(device=device)
    ours.init_weights()
    ours.eval()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    state = ours.init_state(batch)
    column = torch.tensor(ours.initial_token_ids, device=device).expand(batch, -1).contiguous()
    agent = cfg.audio_codebooks

    def ours_step():
        step_frame(ours, state, column, num_codebooks=agent)

    def ours_step_all():
        step_frame(ours, state, column)

    result = {"ours_ms": _time(ours_step, warmup, iters, sync), "ours_all_dep_ms": _time(ours_step_all, warmup, iters, sync)}
    if with_ref:
        from moshi.models import lm as moshi_lm

        ref = moshi_lm.LMModel(device="meta", dtype=dtype, **cfg.to_moshi_dict())
        ref = ref.to_empty(device=device)
        ref.load_state_dict(lm_to_released(ours.state_dict()), strict=True)  # legacy names: its load hook maps them
        ref.eval()
        gen = moshi_lm.LMGen(ref, use_sampling=False)
        user = torch.zeros(batch, cfg.n_q - cfg.dep_q, 1, dtype=torch.long, device=device)
        with gen.streaming(batch):
            result["ref_ms"] = _time(lambda: gen.step(user), warmup, iters, sync)
    del ours, state
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="*", default=["tiny", "7b-slice"])
    parser.add_argument("--batch", type=int, nargs="*", default=[1])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--layers", type=int, default=2, help="temporal layers of the 7b-slice preset")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--no-ref", action="store_true")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'preset':<16}{'batch':>6}{'ours ms':>10}{'ours all-dep ms':>17}{'ref ms':>10}{'ref/ours':>10}")
    for name in args.preset:
        if name == "7b-slice":
            cfg = dataclasses.replace(get_preset("personaplex-7b"), num_layers=args.layers)
        else:
            cfg = get_preset(name)
        for batch in args.batch:
            r = bench(cfg, batch, args.device, dtype, args.warmup, args.iters, not args.no_ref)
            ref = r.get("ref_ms")
            ratio = f"{ref / r['ours_all_dep_ms']:.2f}x" if ref else "-"
            ref_s = f"{ref:.2f}" if ref else "-"
            print(f"{name:<16}{batch:>6}{r['ours_ms']:>10.2f}{r['ours_all_dep_ms']:>17.2f}{ref_s:>10}{ratio:>10}")


if __name__ == "__main__":
    main()
