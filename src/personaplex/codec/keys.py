"""The one place where Mimi's released checkpoint names meet this package's module names.

Released (= `moshi.models.loaders.get_mimi(None).state_dict()`, 318 tensors) -> ours:

    encoder.model.0.conv.conv.*                         encoder.input_conv.*
    encoder.model.{r}.block.{1,3}.conv.conv.*           encoder.stages.{s}.residuals.{j}.conv{1,2}.*
    encoder.model.{d}.conv.conv.*                       encoder.stages.{s}.downsample.*
    encoder.model.{last}.conv.conv.*                    encoder.output_conv.*
    decoder.model.{u}.convtr.convtr.*                   decoder.stages.{s}.upsample.*  (weight permuted, below)
    {en,de}coder_transformer.transformer.layers.{n}.    {en,de}coder_transformer.layers.{n}.
        self_attn.in_projs.0.weight | in_proj_weight        attn.in_proj.weight
        self_attn.out_projs.0.weight | out_proj.weight      attn.out_proj.weight
        norm1.* / norm2.*                                   attn_norm.* / ffn_norm.*
        linear1.weight / linear2.weight                     ffn_up.weight / ffn_down.weight
        layer_scale_1.scale / layer_scale_2.scale           attn_scale / ffn_scale
    quantizer.rvq_first / rvq_rest                      quantizer.semantic / acoustic
        input_proj.weight / output_proj.weight (O, I, 1)    input_proj.weight / output_proj.weight (O, I)
        vq.layers.{i}._codebook.{_initialized, cluster_usage, embedding_sum}
                                                            codebooks.{i}.{initialized, cluster_usage, embedding_sum}
    downsample.conv.conv.conv.weight                    downsample.weight
    upsample.convtr.convtr.convtr.weight                upsample.weight

The SEANet indices follow the reference's nn.Sequential (an ELU module sits before every conv but the
first); they are recovered from the keys, so any number of residual layers works. The decoder's transposed
conv weights are stored (C_out, kernel, C_in) here versus torch's (C_in, C_out, kernel). Loading also
accepts the legacy names the reference accepts (`in_proj_weight`, `out_proj.weight`, and the old codebook
buffer names `inited`, `cluster_size`, `embed_avg`, `embed_sum`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

_LAYER_RELEASED_TO_OURS = {
    "self_attn.in_projs.0.weight": "attn.in_proj.weight",
    "self_attn.in_proj_weight": "attn.in_proj.weight",
    "self_attn.out_projs.0.weight": "attn.out_proj.weight",
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "norm1.weight": "attn_norm.weight",
    "norm1.bias": "attn_norm.bias",
    "norm2.weight": "ffn_norm.weight",
    "norm2.bias": "ffn_norm.bias",
    "linear1.weight": "ffn_up.weight",
    "linear2.weight": "ffn_down.weight",
    "layer_scale_1.scale": "attn_scale",
    "layer_scale_2.scale": "ffn_scale",
}
_LAYER_OURS_TO_RELEASED = {
    "attn.in_proj.weight": "self_attn.in_projs.0.weight",
    "attn.out_proj.weight": "self_attn.out_projs.0.weight",
    **{ours: rel for rel, ours in _LAYER_RELEASED_TO_OURS.items() if "proj" not in rel},
}
_LEGACY_ATTENTION = {
    "self_attn.in_projs.0.weight": "self_attn.in_proj_weight",
    "self_attn.out_projs.0.weight": "self_attn.out_proj.weight",
}
_CODEBOOK_RELEASED_TO_OURS = {
    "_initialized": "initialized",
    "inited": "initialized",
    "cluster_usage": "cluster_usage",
    "cluster_size": "cluster_usage",
    "embedding_sum": "embedding_sum",
    "embed_avg": "embedding_sum",
    "embed_sum": "embedding_sum",
}
_CODEBOOK_OURS_TO_RELEASED = {
    "initialized": "_initialized",
    "cluster_usage": "cluster_usage",
    "embedding_sum": "embedding_sum",
}
_HALVES = {"rvq_first": "semantic", "rvq_rest": "acoustic"}

_SEANET_RE = re.compile(
    r"(encoder|decoder)\.model\.(\d+)\.(block\.(\d+)\.conv\.conv|conv\.conv|convtr\.convtr)\.(weight|bias)$"
)
_LAYER_RE = re.compile(r"(encoder|decoder)_transformer\.transformer\.layers\.(\d+)\.(.+)$")
_QUANT_RE = re.compile(
    r"quantizer\.(rvq_first|rvq_rest)\.(?:(input_proj|output_proj)\.weight|vq\.layers\.(\d+)\._codebook\.(\w+))$"
)
_RESIDUAL_CONV = {"1": "conv1", "3": "conv2"}


def _seanet_names(side: str, indices: dict[int, str]) -> dict[int, str]:
    """Map the Sequential indices of one SEANet to our module paths. `indices`: index -> conv|block|convtr."""
    order = sorted(indices)
    convs = [i for i in order if indices[i] == "conv"]
    names = {convs[0]: "input_conv", convs[-1]: "output_conv"}
    if side == "encoder":  # stage s = residual units, then the strided conv
        boundaries, role, offset = convs[1:-1], "downsample", 0
    else:  # stage s = transposed conv, then residual units
        boundaries, role, offset = [i for i in order if indices[i] == "convtr"], "upsample", -1
    for s, i in enumerate(boundaries):
        names[i] = f"stages.{s}.{role}"
    count: dict[int, int] = {}
    for i in order:
        if indices[i] == "block":
            s = sum(b < i for b in boundaries) + offset
            j = count[s] = count.get(s, -1) + 1
            names[i] = f"stages.{s}.residuals.{j}"
    return names


def mimi_from_released(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released Mimi checkpoint names/layouts -> this package's `Mimi.state_dict()`."""
    seanet_roles: dict[str, dict[int, str]] = {"encoder": {}, "decoder": {}}
    for key in state_dict:
        m = _SEANET_RE.match(key)
        if m:
            role = "block" if m.group(4) else ("convtr" if m.group(3).startswith("convtr") else "conv")
            seanet_roles[m.group(1)][int(m.group(2))] = role
    seanet_names = {side: _seanet_names(side, roles) for side, roles in seanet_roles.items() if roles}

    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        new_key: str | None = None
        if m := _SEANET_RE.match(key):
            side, index, kind, sub, param = m.groups()
            new_key = f"{side}.{seanet_names[side][int(index)]}"
            if sub is not None:
                if sub not in _RESIDUAL_CONV:
                    unknown.append(key)
                    continue
                new_key += "." + _RESIDUAL_CONV[sub]
            new_key += "." + param
            if kind.startswith("convtr") and param == "weight":
                value = value.permute(1, 2, 0).contiguous()  # (C_in, C_out, K) -> (C_out, K, C_in)
        elif m := _LAYER_RE.match(key):
            side, n, rest = m.groups()
            if rest in _LAYER_RELEASED_TO_OURS:
                new_key = f"{side}_transformer.layers.{n}.{_LAYER_RELEASED_TO_OURS[rest]}"
        elif m := _QUANT_RE.match(key):
            half, proj, i, buf = m.groups()
            prefix = f"quantizer.{_HALVES[half]}"
            if proj is not None:
                new_key, value = f"{prefix}.{proj}.weight", value.squeeze(-1)
            elif buf in _CODEBOOK_RELEASED_TO_OURS:
                new_key = f"{prefix}.codebooks.{i}.{_CODEBOOK_RELEASED_TO_OURS[buf]}"
        elif key == "downsample.conv.conv.conv.weight":
            new_key = "downsample.weight"
        elif key == "upsample.convtr.convtr.convtr.weight":
            new_key = "upsample.weight"
        if new_key is None:
            unknown.append(key)
            continue
        if new_key in out:
            raise ValueError(f"checkpoint has two names for {new_key!r} (legacy and current?), one is {key!r}")
        out[new_key] = value
    if unknown:
        raise KeyError(f"not a Mimi checkpoint key: {', '.join(unknown[:5])}" + (" ..." if len(unknown) > 5 else ""))
    return out


_OURS_SEANET_RE = re.compile(
    r"(encoder|decoder)\."
    r"(input_conv|output_conv|stages\.(\d+)\.(downsample|upsample|residuals\.(\d+)\.(conv1|conv2)))"
    r"\.(weight|bias)$"
)
_OURS_LAYER_RE = re.compile(r"(encoder|decoder)_transformer\.layers\.(\d+)\.(.+)$")
_OURS_QUANT_RE = re.compile(
    r"quantizer\.(semantic|acoustic)\.(?:(input_proj|output_proj)\.weight|codebooks\.(\d+)\.(\w+))$"
)


def mimi_to_released(
    state_dict: Mapping[str, torch.Tensor], legacy_attention_names: bool = False
) -> dict[str, torch.Tensor]:
    """This package's `Mimi.state_dict()` -> the released names/layouts (the reference loads the result).

    `legacy_attention_names` writes `self_attn.in_proj_weight` / `self_attn.out_proj.weight` instead of
    `self_attn.in_projs.0.weight` / `self_attn.out_projs.0.weight` (the reference reads both).
    """
    # Sequential layout of the reference: per stage n_res residual blocks + ELU + conv (+ ELU before convtr).
    stages = {"encoder": set(), "decoder": set()}
    residuals: set[int] = set()
    for key in state_dict:
        if m := _OURS_SEANET_RE.match(key):
            if m.group(3) is not None:
                stages[m.group(1)].add(int(m.group(3)))
            if m.group(5) is not None:
                residuals.add(int(m.group(5)))
    per_stage = len(residuals) + 2
    halves = {v: k for k, v in _HALVES.items()}

    def seanet_index(side: str, name: str, stage: str | None, role: str, unit: str | None) -> int:
        if name == "input_conv":
            return 0
        if name == "output_conv":  # after the last stage and an ELU
            return 2 + len(stages[side]) * per_stage
        base = 1 + int(stage) * per_stage  # type: ignore[arg-type]
        if side == "encoder":  # residual units, ELU, strided conv
            return base + (len(residuals) + 1 if role == "downsample" else int(unit))  # type: ignore[arg-type]
        return base + (1 if role == "upsample" else 2 + int(unit))  # ELU, transposed conv, residual units

    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new_key: str | None = None
        if m := _OURS_SEANET_RE.match(key):
            side, name, stage, role, unit, conv, param = m.groups()
            index = seanet_index(side, name, stage, role, unit)
            if conv is not None:
                new_key = f"{side}.model.{index}.block.{1 if conv == 'conv1' else 3}.conv.conv.{param}"
            elif role == "upsample":
                new_key = f"{side}.model.{index}.convtr.convtr.{param}"
                if param == "weight":
                    value = value.permute(2, 0, 1).contiguous()  # (C_out, K, C_in) -> (C_in, C_out, K)
            else:
                new_key = f"{side}.model.{index}.conv.conv.{param}"
        elif m := _OURS_LAYER_RE.match(key):
            side, n, rest = m.groups()
            if rest in _LAYER_OURS_TO_RELEASED:
                released = _LAYER_OURS_TO_RELEASED[rest]
                if legacy_attention_names:
                    released = _LEGACY_ATTENTION.get(released, released)
                new_key = f"{side}_transformer.transformer.layers.{n}.{released}"
        elif m := _OURS_QUANT_RE.match(key):
            half, proj, i, buf = m.groups()
            prefix = f"quantizer.{halves[half]}"
            if proj is not None:
                new_key, value = f"{prefix}.{proj}.weight", value.unsqueeze(-1)
            elif buf in _CODEBOOK_OURS_TO_RELEASED:
                new_key = f"{prefix}.vq.layers.{i}._codebook.{_CODEBOOK_OURS_TO_RELEASED[buf]}"
        elif key == "downsample.weight":
            new_key = "downsample.conv.conv.conv.weight"
        elif key == "upsample.weight":
            new_key = "upsample.convtr.convtr.convtr.weight"
        if new_key is None:
            raise KeyError(f"not a Mimi parameter: {key!r}")
        out[new_key] = value
    return out
