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
_DEP_ATTN = re.compile(r"^depformer\.layers\.(\d+)\.self_attn\.(in_proj_weight|out_proj\.weight|"
                       r"in_projs\.(\d+)\.weight|out_projs\.(\d+)\.weight)$")
_DEP_GATING = re.compile(r"^depformer\.layers\.(\d+)\.gating\.(\d+)\.linear_(in|out)\.weight$")


def lm_from_released(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released (or newer Moshi) LM names -> this project's names. Unknown keys pass through unchanged, so
    that loading reports them as unexpected."""
    out: dict[str, torch.Tensor] = {}
    per_step: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    for key, value in state.items():
        if m := _TEMPORAL_ATTN.match(key):
            kind = "in_proj" if m.group(2).startswith("in_proj") else "out_proj"
            out[f"transformer.layers.{m.group(1)}.self_attn.{kind}.weight"] = value
        elif m := _DEP_ATTN.match(key):
            layer, name = m.group(1), m.group(2)
            if name == "in_proj_weight":
                out[f"depformer.layers.{layer}.in_proj_weight"] = value
            elif name == "out_proj.weight":
                out[f"depformer.layers.{layer}.out_proj_weight"] = value
            elif m.group(3) is not None:
                per_step[f"depformer.layers.{layer}.in_proj_weight"][int(m.group(3))] = value
            else:
                per_step[f"depformer.layers.{layer}.out_proj_weight"][int(m.group(4))] = value
        elif m := _DEP_GATING.match(key):
            per_step[f"depformer.layers.{m.group(1)}.ffn_{m.group(3)}"][int(m.group(2))] = value
        else:
            out[key] = value
    for key, steps in per_step.items():
        ordered = [steps[i] for i in sorted(steps)]
        if sorted(steps) != list(range(len(steps))):
            raise ValueError(f"checkpoint has a gap in the per-step tensors of {key}: steps {sorted(steps)}")
        # Attention weights concatenate along dim 0; FFN weights stack into (steps, out, in).
        out[key] = torch.cat(ordered, 0) if key.endswith("_weight") else torch.stack(ordered, 0)
    return out


def lm_to_released(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This project's LM names -> the released file's names (475 tensors for PersonaPlex-7B)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if m := re.match(r"^transformer\.layers\.(\d+)\.self_attn\.(in|out)_proj\.weight$", key):
            name = "in_proj_weight" if m.group(2) == "in" else "out_proj.weight"
            out[f"transformer.layers.{m.group(1)}.self_attn.{name}"] = value
        elif m := re.match(r"^depformer\.layers\.(\d+)\.(in|out)_proj_weight$", key):
            name = "in_proj_weight" if m.group(2) == "in" else "out_proj.weight"
            out[f"depformer.layers.{m.group(1)}.self_attn.{name}"] = value
        elif m := re.match(r"^depformer\.layers\.(\d+)\.ffn_(in|out)$", key):
            for step, weight in enumerate(value.unbind(0)):  # clone: safetensors refuses shared storage
                out[f"depformer.layers.{m.group(1)}.gating.{step}.linear_{m.group(2)}.weight"] = weight.clone()
        else:
            out[key] = value
    return out
