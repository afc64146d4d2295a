"""LoRA: low-rank adapters swapped in, from outside the model, for chosen linear layers of a frozen model.

`apply_lora(model, LoRAConfig(...))` freezes every parameter and replaces each targeted `nn.Linear` by a
`LoRALinear` that keeps the original (frozen) `weight` under the same name and adds two small trainable
matrices: y = x Wᵀ + (α / r) · x Aᵀ Bᵀ, with A (r, in) Kaiming-initialised and B (out, r) zero, so training
starts from the base model exactly. `merge_lora` folds the adapters back into plain `nn.Linear` weights
(W + (α / r) B A), leaving a model with the released tensor names; `save_lora_file` / `apply_lora_file`
keep the adapters alone in a small safetensors file.

Targets are glob patterns over module names (`transformer.layers.*.self_attn.in_proj`) or a preset:
"attention" (temporal attention projections), "temporal" (attention + gated FFN, the default) or "all"
(every linear layer: temporal transformer, text head, depformer input projections and heads). The
depformer's per-step attention and FFN weights are stacked tensors, not linear layers, and stay frozen.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PersonaplexError

_ATTENTION = ("transformer.layers.*.self_attn.in_proj", "transformer.layers.*.self_attn.out_proj")
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": _ATTENTION,
    "temporal": _ATTENTION + ("transformer.layers.*.gating.linear_in", "transformer.layers.*.gating.linear_out"),
    "all": ("*",),
}
LORA_FORMAT = "personaplex-lora"


class LoRAError(PersonaplexError):
    """A LoRA configuration or file does not fit the model."""


@dataclass
class LoRAConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGET_PRESETS["temporal"]

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = parse_targets(self.targets)
        self.targets = tuple(self.targets)
        if self.rank < 1:
            raise LoRAError(f"LoRA rank must be at least 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise LoRAError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}


def parse_targets(spec: str) -> tuple[str, ...]:
    """A preset name or comma-separated glob patterns."""
    spec = spec.strip()
    if spec in TARGET_PRESETS:
        return TARGET_PRESETS[spec]
    patterns = tuple(p.strip() for p in spec.split(",") if p.strip())
    if not patterns:
        raise LoRAError(f"no LoRA targets in {spec!r}; use {', '.join(TARGET_PRESETS)} or glob patterns")
    return patterns


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (see the module docstring)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if base.bias is not None:
            raise LoRAError("LoRA here wraps bias-free linear layers (the PersonaPlex / Moshi LM has no biases)")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.rank, self.scale = rank, alpha / rank
        device = base.weight.device
        # Adapters stay fp32 (master weights) whatever the frozen weight's dtype.
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=torch.float32))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=torch.float32))
        if device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        low = F.linear(F.linear(self.dropout(x), self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))
        return y + low * self.scale

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        delta = (self.lora_b.float() @ self.lora_a.float()) * self.scale
        return (self.weight.float() + delta).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale:g}"


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze `model` and swap LoRA into the targeted linear layers; returns their names."""
    model.requires_grad_(False)
    names = [name for name, m in model.named_modules()
             if type(m) is nn.Linear and any(fnmatchcase(name, p) for p in config.targets)]
    if not names:
        examples = [n for n, m in model.named_modules() if type(m) is nn.Linear][:3]
        raise LoRAError(f"LoRA targets {list(config.targets)} match no linear layer; names look like "
                        f"{', '.join(examples)}")
    for name in names:
        _set_child(model, name, LoRALinear(model.get_submodule(name), config.rank, config.alpha, config.dropout))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and put plain `nn.Linear` layers back (in place)."""
    for name, m in lora_modules(model).items():
        linear = nn.Linear(m.in_features, m.out_features, bias=False, device="meta")
        linear.weight = nn.Parameter(m.merged_weight(), requires_grad=False)
        _set_child(model, name, linear)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors (`<layer>.lora_a`, `<layer>.lora_b`), gathered whole on CPU."""
    out = {}
    for name, m in lora_modules(model).items():
        for leaf in ("lora_a", "lora_b"):
            t = getattr(m, leaf).detach()
            t = t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2 shards are DTensors
            out[f"{name}.{leaf}"] = t.float().cpu().contiguous()
    return out


def save_lora_file(path: str | Path, model: nn.Module, config: LoRAConfig, base: str = "") -> Path:
    """Write the adapters alone (safetensors, fp32) with their configuration in the header."""
    from ..checkpoint import write_safetensors

    meta = {"format": LORA_FORMAT, "lora": json.dumps(config.to_dict()), "base": base}
    return write_safetensors(lora_state_dict(model), path, meta)


def load_lora_file(path: str | Path) -> tuple[LoRAConfig, dict[str, torch.Tensor], str]:
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise LoRAError(f"{path}: not a readable safetensors file ({exc})") from exc
    if meta.get("format") != LORA_FORMAT:
        raise LoRAError(f"{path}: not a LoRA file written by `personaplex train-export --lora-only`")
    return LoRAConfig(**json.loads(meta["lora"])), tensors, meta.get("base", "")


@torch.no_grad()
def apply_lora_file(model: nn.Module, path: str | Path) -> nn.Module:
    """Merge a LoRA file into a base model loaded with `load_lm` (in place)."""
    config, tensors, _ = load_lora_file(path)
    names = apply_lora(model, config)
    expected = {f"{n}.{leaf}" for n in names for leaf in ("lora_a", "lora_b")}
    if set(tensors) != expected:
        missing = sorted(expected - set(tensors))[:1] or sorted(set(tensors) - expected)[:1]
        raise LoRAError(f"{path} does not fit this model (first mismatch: {missing[0]})")
    modules = lora_modules(model)
    for key, value in tensors.items():
        layer, leaf = key.rsplit(".", 1)
        param = getattr(modules[layer], leaf)
        if param.shape != value.shape:
            raise LoRAError(f"{path}: {key} has shape {list(value.shape)}, the model needs {list(param.shape)}")
        param.copy_(value)
    return merge_lora(model)
