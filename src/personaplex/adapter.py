"""The one place where checkpoint tensor names are mapped between the released files and our modules.

Released LM files use the legacy attention names (`self_attn.in_proj_weight`, Q/K/V fused along dim 0, and
`self_attn.out_proj.weight`); the depformer's per-step attention weights are concatenated along dim 0 and its
per-step FFNs are separate modules `gating.{k}`. Newer Moshi code writes `self_attn.in_projs.{k}.weight` /
`out_projs.{k}.weight`; both spellings load. Saving always writes the released (legacy) names so that a
file we save loads in the released code.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Mapping

import torch

from .codec.keys import mimi_from_released, mimi_to_released

__all__ = ["lm_from_released", "lm_to_released", "mimi_from_released", "mimi_to_released"]

_TEMPORAL_ATTN = re.compile(r"^transformer\.layers\.(\d+)\.self_attn\.(in_proj_weight|in_projs\.0\.weight|"
                            r"out_proj\.weight|out_projs\.0\.weight)$")
_DEP_LEGACY = re.compile(r"^depformer\.layers\.(\d+)\.self_attn\.(in_proj_weight|out_proj\.weight)$")
_DEP_STEPS = re.compile(r"^depformer\.layers\.(\d+)\.self_attn\.(in|out)_projs\.(\d+)\.weight$")


def lm_from_released(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released (or newer Moshi) LM names -> this project's names. Unknown keys pass through unchanged, so
    that loading reports them as unexpected. Every released tensor maps on its own (no tensor needs another
    one), so a loader may call this one tensor at a time."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if m := _TEMPORAL_ATTN.match(key):
            kind = "in_proj" if m.group(2).startswith("in_proj") else "out_proj"
            out[f"transformer.layers.{m.group(1)}.self_attn.{kind}.weight"] = value
        elif m := _DEP_LEGACY.match(key):
            # Steps concatenated along dim 0: (S·3·D, D) or (S·D, D); each step's block is square in D.
            kind, dim = ("in", 3 * value.shape[1]) if m.group(2) == "in_proj_weight" else ("out", value.shape[1])
            if value.ndim != 2 or value.shape[0] % dim:
                raise ValueError(f"{key} has shape {list(value.shape)}: not a whole number of steps of {dim} rows")
            for step, weight in enumerate(value.split(dim, 0)):
                out[f"depformer.layers.{m.group(1)}.self_attn.{kind}_projs.{step}.weight"] = weight
        else:
            out[key] = value  # the newer spelling `self_attn.in_projs.{k}.weight` and `gating.{k}` are ours
    return out


def lm_to_released(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This project's LM names -> the released file's names (475 tensors for PersonaPlex-7B)."""
    out: dict[str, torch.Tensor] = {}
    per_step: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    for key, value in state.items():
        if m := re.match(r"^transformer\.layers\.(\d+)\.self_attn\.(in|out)_proj\.weight$", key):
            name = "in_proj_weight" if m.group(2) == "in" else "out_proj.weight"
            out[f"transformer.layers.{m.group(1)}.self_attn.{name}"] = value
        elif m := _DEP_STEPS.match(key):
            name = "in_proj_weight" if m.group(2) == "in" else "out_proj.weight"
            per_step[f"depformer.layers.{m.group(1)}.self_attn.{name}"][int(m.group(3))] = value
        else:
            out[key] = value
    for key, steps in per_step.items():
        if sorted(steps) != list(range(len(steps))):
            raise ValueError(f"a gap in the per-step tensors of {key}: steps {sorted(steps)}")
        out[key] = torch.cat([steps[i] for i in range(len(steps))], 0)
    return out
