"""The depth transformer: within one frame, predicts the audio codebooks one after another.

Every step k (codebook) has its own attention and FFN weights ("weights per step"); the norms are shared.
Each step's projections are their own `StepLinear` modules (`self_attn.in_projs.{k}`, `self_attn.out_projs.{k}`,
`gating.{k}.linear_in`, `gating.{k}.linear_out`), so that whole-module tools (int8 quantisation, offload) treat
them like any linear layer; the released files concatenate the attention steps along dim 0, which
`adapter.py` splits and joins. There is no positional embedding; attention is causal over the steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import RMSNorm, silu_gate


@dataclass
class DepformerCache:
    """Keys/values of the steps already run in the current frame: (L, B, H, S, Dh) each."""

    keys: torch.Tensor
    values: torch.Tensor


class StepLinear(nn.Linear):
    """One step's bias-free projection. A type of its own: LoRA targets plain `nn.Linear` layers only, and
    the per-step weights stay frozen there as they always were."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)


class StepAttention(nn.Module):
    """Per-step attention projections: in_projs[k] (3·D, D) rows q, k, v; out_projs[k] (D, D)."""

    def __init__(self, dim: int, steps: int, device=None, dtype=None):
        super().__init__()
        self.in_projs = nn.ModuleList(StepLinear(dim, 3 * dim, device, dtype) for _ in range(steps))
        self.out_projs = nn.ModuleList(StepLinear(dim, dim, device, dtype) for _ in range(steps))


class StepFFN(nn.Module):
    """One step's gated FFN: linear_in (2·hidden, D), the gate first; linear_out (D, hidden)."""

    def __init__(self, dim: int, hidden: int, device=None, dtype=None):
        super().__init__()
        self.linear_in = StepLinear(dim, 2 * hidden, device, dtype)
        self.linear_out = StepLinear(hidden, dim, device, dtype)


def _per_step(linears, x: torch.Tensor) -> torch.Tensor:
    """Step k's projection applied to x[:, k]: (N, K, in) -> (N, K, out)."""
    return torch.stack([linears[k](x[:, k]) for k in range(x.shape[1])], dim=1)


class DepformerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int, steps: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.dim, self.num_heads, self.steps = dim, num_heads, steps
        self.head_dim = dim // num_heads
        self.norm1 = RMSNorm(dim, eps, device=device, dtype=dtype)
        self.norm2 = RMSNorm(dim, eps, device=device, dtype=dtype)
        self.self_attn = StepAttention(dim, steps, device=device, dtype=dtype)
        self.gating = nn.ModuleList(StepFFN(dim, hidden, device=device, dtype=dtype) for _ in range(steps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """All K steps at once, x: (N, K, D) where N = batch * frames."""
        N, K, D = x.shape
        h = self.norm1(x)
        qkv = _per_step(self.self_attn.in_projs, h)  # (N, K, 3·D)
        q, k, v = qkv.view(N, K, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (N, H, K, Dh)
        att = att.transpose(1, 2).reshape(N, K, D)
        x = x + _per_step(self.self_attn.out_projs, att)
        h = self.norm2(x)
        h = silu_gate(_per_step([f.linear_in for f in self.gating], h))
        return x + _per_step([f.linear_out for f in self.gating], h)

    def step(self, x: torch.Tensor, k: int, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Step k alone, x: (B, D); keys/values (B, H, S, Dh) receive this step's entries at index k."""
        B, D = x.shape
        h = self.norm1(x)
        q, kk, v = self.self_attn.in_projs[k](h).view(B, 3, self.num_heads, 1, self.head_dim).unbind(1)
        keys[:, :, k:k + 1] = kk
        values[:, :, k:k + 1] = v
        att = F.scaled_dot_product_attention(q, keys[:, :, :k + 1], values[:, :, :k + 1])  # (B, H, 1, Dh)
        x = x + self.self_attn.out_projs[k](att.reshape(B, D))
        ffn = self.gating[k]
        h = silu_gate(ffn.linear_in(self.norm2(x)))
        return x + ffn.linear_out(h)


class Depformer(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_layers: int, hidden: int, steps: int, eps: float,
                 device=None, dtype=None):
        super().__init__()
        self.steps = steps
        self.layers = nn.ModuleList(
            DepformerBlock(dim, num_heads, hidden, steps, eps, device=device, dtype=dtype) for _ in range(num_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, K, D) -> (N, K, D)
        for layer in self.layers:
            x = layer(x)
        return x

    def init_cache(self, batch_size: int, device=None, dtype=None) -> DepformerCache:
        first = self.layers[0]
        shape = (len(self.layers), batch_size, first.num_heads, self.steps, first.head_dim)
        return DepformerCache(torch.zeros(shape, device=device, dtype=dtype),
                              torch.zeros(shape, device=device, dtype=dtype))

    def step(self, x: torch.Tensor, k: int, cache: DepformerCache) -> torch.Tensor:  # (B, D) -> (B, D)
        for i, layer in enumerate(self.layers):
            x = layer.step(x, k, cache.keys[i], cache.values[i])
        return x
