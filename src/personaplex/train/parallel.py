"""Distribution, applied from outside the model: torchrun process groups, FSDP2 sharding, and the sharded
checkpoint of a training run.

    torchrun --nproc-per-node 8 -m personaplex.cli train ...                       # one node
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
             -m personaplex.cli train ...                                          # two nodes

`checkpoint_activations` wraps each temporal block in `torch.utils.checkpoint` (recomputed in the
backward pass); `parallelize` shards each temporal transformer block, the depformer and then the root
(embeddings, heads) with `torch.distributed.fsdp.fully_shard` (FSDP2); with bf16 the parameters stay fp32 (sharded master
weights) and are gathered in bf16, gradients are reduced in fp32. NCCL on GPUs, gloo on CPUs.

A run checkpoint (`checkpoints/step-NNNNNNN/`) holds the trainable weights (the adapters only, for LoRA)
and the optimizer state through `torch.distributed.checkpoint` (each rank writes its shard; loading
reshards, so a run may resume on another number of processes), `trainer.json` (step, data position,
configuration; written last, so its presence marks a complete checkpoint) and one RNG file per rank.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

CHECKPOINTS = "checkpoints"
_WRAPPED = "_checkpoint_wrapped_module."  # the prefix torch's checkpoint_wrapper adds to module names
TRAINER_STATE = "trainer.json"


@dataclass
class Dist:
    """This process's place in the job (world 1: a plain single-process run)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    mesh: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world > 1


def init_distributed(device_type: str) -> Dist:
    """Join the torchrun job described by the environment (RANK, WORLD_SIZE, ...), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    rank, local_rank = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    return Dist(rank, dist.get_world_size(), local_rank, init_device_mesh(device_type, (dist.get_world_size(),)))


def close_distributed(d: Dist) -> None:
    if d.sharded and dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: nn.Module, d: Dist, bf16: bool, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 over the mesh of `d`: one unit per temporal block, one for the depformer, then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
          else MixedPrecisionPolicy())
    kw = {"mesh": d.mesh, "mp_policy": mp, "reshard_after_forward": reshard_after_forward}
    for block in model.transformer.layers:
        fully_shard(block, **kw)
    fully_shard(model.depformer, **kw)
    fully_shard(model, **kw)
    return model


def checkpoint_activations(model: nn.Module) -> nn.Module:
    """Recompute each temporal block in the backward pass instead of keeping its activations (applied from
    outside, like FSDP: the model has no flag for it). State-dict names are unchanged; `named_parameters`
    gains the wrapper's prefix, which `parameter_name` removes."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)

    blocks = {id(block) for block in model.transformer.layers}
    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: id(m) in blocks)
    return model


def parameter_name(name: str) -> str:
    """A parameter's name as the state dict spells it (without the activation-checkpointing wrapper)."""
    return name.replace(_WRAPPED, "")


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum over ranks, in place."""
    if d.sharded:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(d: Dist) -> None:
    if d.sharded:
        dist.barrier()


# -- run checkpoints ------------------------------------------------------------------------------------------
def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:07d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run (one whose trainer.json was written)."""
    root = Path(run_dir) / CHECKPOINTS
    done = sorted(p for p in root.glob("step-*") if (p / TRAINER_STATE).is_file()) if root.is_dir() else []
    return done[-1] if done else None


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns when it runs in one process; that is what a one-process run means to do."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Frozen weights (a LoRA run's base model) come from the base checkpoint, never from a run checkpoint.
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def save_run_state(path: Path, model: nn.Module, optimizer, trainer: dict, d: Dist) -> Path:
    """Write a complete run checkpoint at `path` (every rank calls this)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = Path(path)
    if d.is_main and path.exists():
        shutil.rmtree(path)  # a partial checkpoint of an interrupted save
    barrier(d)
    model_state, optim_state = get_state_dict(model, optimizer, options=_options())
    with _single_process_quiet():
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path))
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, path / f"rng-{d.rank}.pt")
    barrier(d)
    if d.is_main:
        tmp = path / (TRAINER_STATE + ".partial")
        tmp.write_text(json.dumps(trainer, indent=1) + "\n")
        tmp.replace(path / TRAINER_STATE)
    barrier(d)
    return path


def load_model_state(path: Path, model: nn.Module, optimizer=None) -> None:
    """Load the trainable weights (and the optimizer state, when given) of a run checkpoint in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    options = _options()
    state = {"model": get_model_state_dict(model, options=options)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer, options=options)
    expected = set(state["model"])
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path))
    result = set_model_state_dict(model, state["model"], options=options)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"], options=options)
    trainable = {parameter_name(n) for n, p in model.named_parameters() if p.requires_grad}
    missing = (set(result.missing_keys) & trainable) | (trainable - expected)
    if missing or result.unexpected_keys:
        raise RuntimeError(f"{path}: checkpoint does not fit the model (missing {sorted(missing)[:3]}, "
                           f"unexpected {sorted(result.unexpected_keys)[:3]})")


def load_run_state(path: Path, model: nn.Module, optimizer, d: Dist) -> dict:
    """Restore model, optimizer and this rank's RNG from a run checkpoint; returns trainer.json."""
    path = Path(path)
    load_model_state(path, model, optimizer)
    rng_file = path / f"rng-{d.rank}.pt"
    if rng_file.is_file():  # a run resumed on more processes than it was saved with: new ranks keep their seed
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate(_as_tuple(rng["python"]))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((path / TRAINER_STATE).read_text())


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def prune_checkpoints(run_dir: Path, keep: int, d: Dist) -> None:
    """Keep the newest `keep` complete checkpoints (0: keep all)."""
    if not d.is_main or keep <= 0:
        return
    root = Path(run_dir) / CHECKPOINTS
    done = sorted(p for p in root.glob("step-*") if (p / TRAINER_STATE).is_file())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
