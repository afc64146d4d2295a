"""The training entry point: `TrainConfig` (a dataclass whose fields are also the command-line flags of
`personaplex train`) and `train(config)`.

One optimiser step = `batch_size` sequences (prompt + conversation chunk), split over the processes and
`grad_accum` micro-batches; the loss is normalised over the whole step (loss.py), so a step computes the
same thing on 1 process or N. AdamW, linear warmup then cosine decay to `min_lr_ratio` of the peak,
gradient clipping by global norm. Every `save_every` steps the whole run state is checkpointed (trainable
weights, optimizer, step, data position, RNG); a run restarted on the same `run_dir` resumes from the
latest checkpoint and continues the same loss curve.

Precision: "fp32" everywhere on CPU; "bf16" (the default on GPUs) computes in bf16 while the trained
parameters stay fp32 (autocast on one process, FSDP2 mixed precision on several); a LoRA run keeps its
frozen base weights in bf16.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from .data import DatasetError, PreparedDataset
from .loss import STATS, LossConfig, denominators, loss_parts, metrics, step_loss, target_weights
from .parallel import (Dist, all_reduce_sum, barrier, checkpoint_activations, checkpoint_dir, close_distributed,
                       init_distributed, latest_checkpoint, load_run_state, parallelize, prune_checkpoints,
                       save_run_state)
from .sample import ItemOrder, chunk_items, build_sample, collate

log = logging.getLogger("personaplex.train")
RUN_CONFIG = "train_config.json"
DEFAULT_SEQ_FRAMES = 2048
# Settings that shape the trained weights: a resumed run must keep them.
STRUCTURAL = ("checkpoint", "config", "mode", "lora_rank", "lora_alpha", "lora_targets")


def _help(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class TrainConfig:
    # data and model
    data: str = _help("prepared dataset folder (output of `personaplex train-prepare`)", default="")
    run_dir: str = _help("where checkpoints, logs and the run configuration go (resumed when present)", default="")
    checkpoint: str = _help("base checkpoint: local directory or hub repo id", default="nvidia/personaplex-7b-v1")
    config: str | None = _help("model preset or config.json (default: the checkpoint's)", default=None)
    demo: bool = _help("train the tiny random --demo checkpoint (tries the whole path)", default=False)
    eval_data: str | None = _help("prepared dataset for evaluation", default=None)
    eval_fraction: float = _help("hold out this fraction of conversations (by id) when no --eval-data", default=0.0)
    # what is trained
    mode: str = _help("lora (adapters on a frozen base) or full (every weight)", default="lora")
    lora_rank: int = _help("LoRA rank", default=16)
    lora_alpha: float = _help("LoRA alpha (the update is scaled by alpha / rank)", default=32.0)
    lora_dropout: float = _help("dropout on the LoRA input", default=0.0)
    lora_targets: str = _help("attention, temporal, all, or comma-separated module name globs", default="temporal")
    # loss
    text_pad_weight: float = _help("loss weight of PAD text tokens", default=0.3)
    epad_weight: float | None = _help("loss weight of EPAD text tokens (default: --text-pad-weight)", default=None)
    semantic_weight: float = _help("loss weight of the semantic codebook", default=1.0)
    acoustic_weight: float = _help("loss weight of the acoustic codebooks", default=0.02)
    predict_user: bool = _help("also train the user's codebooks (dep_q=16 models)", default=False)
    # optimisation
    steps: int = _help("optimiser steps", default=1000)
    batch_size: int = _help("sequences per step, over all processes and accumulation steps", default=8)
    grad_accum: int = _help("micro-batches per step and process", default=1)
    seq_frames: int | None = _help("frames per sequence: prompt + conversation chunk, at most the model context "
                                   f"(default: {DEFAULT_SEQ_FRAMES} or the model context if smaller)", default=None)
    lr: float | None = _help("peak learning rate (default 1e-4 for LoRA, 1e-5 for full)", default=None)
    min_lr_ratio: float = _help("final learning rate as a fraction of the peak (cosine)", default=0.1)
    warmup_steps: int = _help("linear warmup steps", default=100)
    weight_decay: float = _help("AdamW weight decay (matrices only; not embeddings or norms)", default=0.1)
    beta1: float = _help("AdamW beta1", default=0.9)
    beta2: float = _help("AdamW beta2", default=0.95)
    grad_clip: float = _help("clip the global gradient norm to this (0: no clipping)", default=1.0)
    precision: str = _help("auto (bf16 on GPU, fp32 on CPU), bf16 or fp32", default="auto")
    gradient_checkpointing: bool = _help("recompute temporal blocks in the backward pass", default=False)
    device: str | None = _help("cuda or cpu (default: cuda when available; torchrun: cuda:LOCAL_RANK)", default=None)
    seed: int = _help("seed of the data order and of the adapters' initialisation", default=0)
    # evaluation, checkpoints, logs
    eval_every: int = _help("evaluate every N steps (0: only at the end)", default=200)
    eval_batches: int = _help("evaluation micro-batches per process (0: the whole eval set)", default=0)
    save_every: int = _help("checkpoint every N steps (and at the end)", default=500)
    keep_checkpoints: int = _help("keep the newest N checkpoints (0: all)", default=2)
    resume: bool = _help("resume from the run directory's latest checkpoint", default=True)
    log_every: int = _help("log a line every N steps", default=10)
    log_jsonl: str | None = _help("JSONL log file (default: RUN_DIR/log.jsonl)", default=None)
    tensorboard: bool = _help("also log to RUN_DIR/tensorboard (needs the tensorboard package)", default=False)
    progress: bool = _help("progress bar", default=True)

    def validate(self) -> "TrainConfig":
        if not self.data or not self.run_dir:
            raise UsageError("--data and --run-dir are required")
        if self.mode not in ("lora", "full"):
            raise UsageError(f"--mode must be lora or full, got {self.mode!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise UsageError(f"--precision must be auto, bf16 or fp32, got {self.precision!r}")
        for name in ("steps", "batch_size", "grad_accum", "seq_frames"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0 <= self.eval_fraction < 1:
            raise UsageError("--eval-fraction must be in [0, 1)")
        return self

    def frames_per_sequence(self, context: int) -> int:
        """--seq-frames, checked against the model context; by default the longest that fits."""
        if self.seq_frames is None:
            if context < DEFAULT_SEQ_FRAMES:
                log.info("sequences of %d frames (the model context; --seq-frames sets fewer)", context)
            return min(DEFAULT_SEQ_FRAMES, context)
        if self.seq_frames > context:
            raise UsageError(f"--seq-frames {self.seq_frames} exceeds the model context ({context} frames): "
                             f"use at most {context}, or leave it out")
        return self.seq_frames

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (1e-4 if self.mode == "lora" else 1e-5)

    def loss_config(self) -> LossConfig:
        return LossConfig(self.text_pad_weight, self.epad_weight, self.semantic_weight, self.acoustic_weight,
                          self.predict_user)

    def lora_config(self):
        from .lora import LoRAConfig

        return LoRAConfig(self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of step `step` (0-based): linear warmup, then cosine down to min_lr_ratio * peak."""
    peak = cfg.peak_lr
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return peak * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# -- model and optimiser --------------------------------------------------------------------------------------
def base_files(cfg: TrainConfig, need: tuple[str, ...] = ("lm", "tokenizer")):
    """The base checkpoint's files (the demo checkpoint with `demo`)."""
    from ..hub import resolve_checkpoint

    return resolve_checkpoint(cfg.checkpoint, need=need, demo=cfg.demo)


def build_model(cfg: TrainConfig, device: torch.device, bf16: bool, need: tuple[str, ...] = ("lm", "tokenizer")):
    """The base LM on `device`, training mode, with LoRA swapped in for a LoRA run (seeded: every process
    builds the same adapters)."""
    from ..checkpoint import load_lm
    from .lora import apply_lora

    files = base_files(cfg, need)
    config = cfg.config if cfg.config is not None else (Path(files.config) if files.config else None)
    frozen_bf16 = bf16 and cfg.mode == "lora"
    lm = load_lm(files.lm, config=config, device=device, dtype=torch.bfloat16 if frozen_bf16 else torch.float32)
    lm.train()
    torch.manual_seed(cfg.seed)
    if cfg.mode == "lora":
        apply_lora(lm, cfg.lora_config())
    else:
        lm.requires_grad_(True)
    return lm, files


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_table = any(part.endswith("emb") for part in name.split("."))  # emb.k, text_emb, depformer_emb.k
        (decay if p.ndim >= 2 and not is_table else plain).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.peak_lr, betas=(cfg.beta1, cfg.beta2))


def train_step(model, optimizer, batches, config, loss_cfg: LossConfig, d: Dist, autocast, grad_clip: float):
    """Forward/backward over this process's micro-batches, one optimiser step. Returns (summed stats of all
    processes, gradient norm before clipping)."""
    weights = [target_weights(b, config, loss_cfg) for b in batches]
    totals = all_reduce_sum(denominators(weights), d)
    stats = None
    for i, (batch, (text_w, audio_w)) in enumerate(zip(batches, weights)):
        if d.sharded:
            model.set_requires_gradient_sync(i == len(batches) - 1)  # reduce-scatter once per step
        with autocast():
            out = model(batch.codes, prefix_embeddings=batch.prefix)
        parts = loss_parts(out, batch, text_w, audio_w, config)
        # FSDP averages gradients over processes; scaling by the world size makes them the step's gradient.
        step_loss(parts, totals, scale=float(d.world)).backward()
        stats = parts.stats if stats is None else stats + parts.stats
    all_reduce_sum(stats, d)
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stats, float(norm)


@torch.no_grad()
def evaluate(model, dataset, items, config, cfg: TrainConfig, d: Dist, autocast, micro: int) -> dict[str, float]:
    """Loss over the evaluation sequences, split over processes (every process runs as many batches,
    filling with uncounted samples, so that sharded forwards stay in step)."""
    model.eval()
    per_rank = -(-len(items) // d.world)
    batches = -(-per_rank // micro)
    if cfg.eval_batches > 0:
        batches = min(batches, cfg.eval_batches)
    stats = torch.zeros(len(STATS), dtype=torch.float64, device=_device(model))
    loss_cfg = cfg.loss_config()
    for b in range(batches):
        positions = [d.rank + d.world * (b * micro + k) for k in range(micro)]
        samples = [build_sample(dataset, items[p if p < len(items) else 0], config) for p in positions]
        batch = collate(samples, [p < len(items) for p in positions]).to(_device(model))
        with autocast():
            out = model(batch.codes, prefix_embeddings=batch.prefix)
        stats += loss_parts(out, batch, *target_weights(batch, config, loss_cfg), config).stats
    all_reduce_sum(stats, d)
    model.train()
    return metrics(stats)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _split(dataset: PreparedDataset, fraction: float) -> tuple[list[str], list[str]]:
    """Stable held-out split by a hash of each conversation id."""
    train, held = [], []
    for rec in dataset.records:
        h = int(hashlib.sha1(rec.id.encode()).hexdigest()[:12], 16) / 16**12
        (held if h < fraction else train).append(rec.id)
    return train, held


class RunLog:
    """Progress bar, log lines, JSONL records and (optionally) TensorBoard, on the main process only."""

    def __init__(self, cfg: TrainConfig, d: Dist, start_step: int) -> None:
        self.cfg, self.on = cfg, d.is_main
        self.history: list[dict[str, Any]] = []
        self.jsonl = self.bar = self.tb = None
        if not self.on:
            return
        from tqdm import tqdm

        path = Path(cfg.log_jsonl) if cfg.log_jsonl else Path(cfg.run_dir) / "log.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(path, "a", encoding="utf-8")
        self.bar = tqdm(total=cfg.steps, initial=start_step, unit="step", desc="train", disable=not cfg.progress)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(cfg.run_dir) / "tensorboard"))
            except ImportError:
                log.warning("--tensorboard: the tensorboard package is not installed; logging to JSONL only")

    def record(self, kind: str, step: int, values: dict[str, float]) -> None:
        entry = {"kind": kind, "step": step, **{k: (round(v, 6) if isinstance(v, float) else v)
                                               for k, v in values.items()}}
        self.history.append({"kind": kind, "step": step, **values})
        if not self.on:
            return
        self.jsonl.write(json.dumps(entry) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
        if kind == "train":
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{values['tokens_per_s']:.0f}")
            if step % self.cfg.log_every == 0 or step == self.cfg.steps:
                log.info("step %d/%d loss %.4f (text %.4f semantic %.4f acoustic %.4f) lr %.2e grad %.3f "
                         "%.0f tok/s", step, self.cfg.steps, values["loss"], values["text"], values["semantic"],
                         values["acoustic"], values["lr"], values["grad_norm"], values["tokens_per_s"])
        else:
            log.info("eval at step %d: loss %.4f (text %.4f semantic %.4f acoustic %.4f)", step, values["loss"],
                     values["text"], values["semantic"], values["acoustic"])

    def redirect_logging(self):
        """While the progress bar shows, log lines are written through tqdm (above the bar, not into it)."""
        if self.bar is None or self.bar.disable:
            return contextlib.nullcontext()
        from tqdm.contrib.logging import logging_redirect_tqdm

        return logging_redirect_tqdm()

    def close(self) -> None:
        if self.on:
            self.bar.close()
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


def _prepare_run_dir(cfg: TrainConfig, d: Dist) -> Path | None:
    """Create the run directory, check a resumed run's settings; returns the checkpoint to resume from."""
    run_dir = Path(cfg.run_dir)
    saved = run_dir / RUN_CONFIG
    latest = latest_checkpoint(run_dir)
    if latest is not None and not cfg.resume:
        raise UsageError(f"{run_dir} already holds checkpoints; resume (default) or pick another --run-dir")
    if latest is not None and saved.is_file():
        before = json.loads(saved.read_text())
        changed = [k for k in STRUCTURAL if before.get(k) != getattr(cfg, k)]
        if changed:
            raise UsageError(f"{run_dir} was trained with other {', '.join(changed)}; keep them to resume, or "
                             "start a new --run-dir")
    if d.is_main:
        if not run_dir.is_dir():
            run_dir.mkdir(parents=True)
            log.info("created %s", run_dir)
        partial = saved.with_name(saved.name + ".partial")  # atomic: other ranks may be reading it
        partial.write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
        partial.replace(saved)
    barrier(d)  # no rank goes on while the run directory is being set up
    return latest


def train(cfg: TrainConfig) -> list[dict[str, Any]]:
    """Run (or resume) a training run; returns the logged records (train steps and evaluations)."""
    from ..checkpoint import resolve_device

    cfg.validate()
    dataset = PreparedDataset(cfg.data)  # a missing or unprepared --data is said before anything loads
    eval_set = PreparedDataset(cfg.eval_data) if cfg.eval_data else None
    want = resolve_device(cfg.device)
    d = init_distributed(want.type)
    try:
        return _train(cfg, d, want, dataset, eval_set)
    finally:
        close_distributed(d)


def _train(cfg: TrainConfig, d: Dist, device: torch.device, dataset: PreparedDataset,
           eval_set: PreparedDataset | None) -> list[dict[str, Any]]:
    from .prepare import file_sha256

    if device.type == "cuda" and d.sharded:
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    resume_from = _prepare_run_dir(cfg, d)
    lm, files = build_model(cfg, device, bf16)
    config = lm.config
    seq_frames = cfg.frames_per_sequence(config.context)
    dataset.check_model(config, file_sha256(Path(files.tokenizer)))
    if eval_set is None and cfg.eval_fraction > 0:
        train_ids, held = _split(dataset, cfg.eval_fraction)
        eval_set = dataset.subset(held) if held else None
        dataset = dataset.subset(train_ids)
    if len(dataset) == 0:
        raise DatasetError(f"{cfg.data}: no training conversation left")
    items = chunk_items(dataset, seq_frames)
    eval_items = chunk_items(eval_set, seq_frames) if eval_set is not None else []
    micro, rest = divmod(cfg.batch_size, d.world * cfg.grad_accum)
    if rest or micro == 0:
        raise UsageError(f"--batch-size {cfg.batch_size} must be a multiple of processes x --grad-accum "
                         f"({d.world} x {cfg.grad_accum})")
    if cfg.gradient_checkpointing:
        checkpoint_activations(lm)
    if d.sharded:
        parallelize(lm, d, bf16)
    optimizer = build_optimizer(lm, cfg)
    step, position = 0, 0
    if resume_from is not None:
        state = load_run_state(resume_from, lm, optimizer, d)
        step, position = state["step"], state["position"]
        if d.is_main:
            log.info("resumed %s at step %d", resume_from, step)
    else:
        torch.manual_seed(cfg.seed + d.rank)  # per-process randomness (LoRA dropout)
    order = ItemOrder(len(items), cfg.seed)
    use_autocast = bf16 and not d.sharded
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_autocast else contextlib.nullcontext
    trainable = sum(p.numel() for p in lm.parameters() if p.requires_grad)  # DTensor numel is the global one
    if d.is_main:
        log.info("training %s: %d sequences (%d conversations), %.2fM trainable parameters, %d process(es), "
                 "micro-batch %d x %d accumulation, %s", cfg.mode, len(items), len(dataset), trainable / 1e6,
                 d.world, micro, cfg.grad_accum, "bf16" if bf16 else "fp32")
    run_log = RunLog(cfg, d, step)
    loss_cfg = cfg.loss_config()
    try:
        with run_log.redirect_logging():  # log lines go above the progress bar, not into it
            while step < cfg.steps:
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                ids = order.take(position, cfg.batch_size)
                batches = []
                for a in range(cfg.grad_accum):
                    j = a * d.world + d.rank
                    chunk = ids[j * micro:(j + 1) * micro]
                    batches.append(collate([build_sample(dataset, items[i], config) for i in chunk]).to(device))
                started = time.perf_counter()
                stats, grad_norm = train_step(lm, optimizer, batches, config, loss_cfg, d, autocast, cfg.grad_clip)
                seconds = time.perf_counter() - started
                step, position = step + 1, position + cfg.batch_size
                values = metrics(stats)
                values.update(lr=lr, grad_norm=grad_norm, seconds=seconds,
                              tokens_per_s=values["frames"] * config.num_streams / max(seconds, 1e-9),
                              epoch=position / len(items))
                run_log.record("train", step, values)
                if eval_items and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                    run_log.record("eval", step, evaluate(lm, eval_set, eval_items, config, cfg, d, autocast, micro))
                if step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0):
                    trainer = {"step": step, "position": position, "items": len(items),
                               "config": dataclasses.asdict(cfg)}
                    save_run_state(checkpoint_dir(Path(cfg.run_dir), step), lm, optimizer, trainer, d)
                    prune_checkpoints(Path(cfg.run_dir), cfg.keep_checkpoints, d)
    finally:
        run_log.close()
    return run_log.history
