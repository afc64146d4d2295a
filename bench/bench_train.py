"""Training throughput: tokens/s (frames/s x 17 streams) of full optimiser steps (forward, loss, backward,
clipping, AdamW) on random token sequences, for LoRA and full fine-tuning.

    .venv/bin/python bench/bench_train.py                              # tiny preset on CPU, both modes
    .venv/bin/python bench/bench_train.py --preset personaplex-7b --device cuda --precision bf16 \
        --batch 1 --seq-frames 2048 --modes lora --gradient-checkpointing

Each sequence is a 60-frame prompt (no loss) followed by conversation frames, as in training; the step is
`personaplex.train.loop.train_step`, the one `personaplex train` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch

from personaplex.config import get_preset
from personaplex.lm import LMModel
from personaplex.train.loop import TrainConfig, build_optimizer, train_step
from personaplex.train.lora import apply_lora
from personaplex.train.parallel import Dist, checkpoint_activations
from personaplex.train.sample import Batch


def random_batch(config, batch: int, frames: int, prompt: int, device) -> Batch:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, config.card, (batch, config.num_streams, frames), generator=g)
    codes[:, 0] = torch.randint(0, config.text_card, (batch, frames), generator=g)
    return Batch(codes, torch.full((batch,), frames), torch.full((batch,), prompt), torch.ones(batch, dtype=torch.bool)
                 ).to(device)


def bench(args, mode: str) -> dict:
    torch.manual_seed(0)
    config = get_preset(args.preset)
    device = torch.device(args.device)
    bf16 = args.precision == "bf16"
    dtype = torch.bfloat16 if bf16 and mode == "lora" else torch.float32
    with torch.device("meta"):
        lm = LMModel(config, dtype=dtype)
    lm = lm.to_empty(device=device)
    lm.init_weights()
    lm.train()
    cfg = TrainConfig(data="-", run_dir="-", mode=mode, lora_rank=args.lora_rank, lora_targets=args.lora_targets)
    if mode == "lora":
        apply_lora(lm, cfg.lora_config())
    else:
        lm.requires_grad_(True)
    if args.gradient_checkpointing:
        checkpoint_activations(lm)
    optimizer = build_optimizer(lm, cfg)
    batch = random_batch(config, args.batch, args.seq_frames, min(60, args.seq_frames // 2), device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        train_step(lm, optimizer, [batch], config, cfg.loss_config(), Dist(), autocast, 1.0)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    frames = args.batch * args.seq_frames
    trainable = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    return {"mode": mode, "step_ms": step * 1e3, "frames_per_s": frames / step,
            "tokens_per_s": frames * config.num_streams / step, "trainable": trainable,
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-frames", type=int, default=200)
    parser.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-targets", default="temporal")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("command:", " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]))
    print(f"preset {args.preset}, {args.device}, {args.precision}, batch {args.batch} x {args.seq_frames} frames, "
          f"{torch.get_num_threads()} CPU thread(s), torch {torch.__version__}")
    print(f"{'mode':<6} {'trainable':>12} {'step ms':>10} {'frames/s':>10} {'tokens/s':>10} {'peak GB':>8}")
    for mode in args.modes:
        r = bench(args, mode)
        print(f"{r['mode']:<6} {r['trainable']:>12,} {r['step_ms']:>10.1f} {r['frames_per_s']:>10.0f} "
              f"{r['tokens_per_s']:>10.0f} {r['peak_gb']:>8.2f}")


if __name__ == "__main__":
    main()
