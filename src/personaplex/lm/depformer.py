"""The depth transformer: within one frame, predicts the audio codebooks one after another.

Every step k (codebook) has its own attention and FFN weights ("weights per step"); the norms are shared.
Weights are stacked per step: attention in_proj (S·3·D, D) and out_proj (S·D, D) exactly as in the released
files (steps concatenated along dim 0); FFN weights (S, 2·hidden, D) and (S, D, hidden). There is no
positional embedding; attention is causal over the steps of the frame.
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


class DepformerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int, steps: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.dim, self.num_heads, self.steps = dim, num_heads, steps
        self.head_dim = dim // num_heads
        self.norm1 = RMSNorm(dim, eps, device=device, dtype=dtype)
        self.norm2 = RMSNorm(dim, eps, device=device, dtype=dtype)
        self.in_proj_weight = nn.Parameter(torch.empty(steps * 3 * dim, dim, device=device, dtype=dtype))
        self.out_proj_weight = nn.Parameter(torch.empty(steps * dim, dim, device=device, dtype=dtype))
        self.ffn_in = nn.Parameter(torch.empty(steps, 2 * hidden, dim, device=device, dtype=dtype))
        self.ffn_out = nn.Parameter(torch.empty(steps, dim, hidden, device=device, dtype=dtype))

    def _w_qkv(self) -> torch.Tensor:
        return self.in_proj_weight.view(self.steps, 3 * self.dim, self.dim)

    def _w_out(self) -> torch.Tensor:
        return self.out_proj_weight.view(self.steps, self.dim, self.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """All K steps at once, x: (N, K, D) where N = batch * frames."""
        N, K, D = x.shape
        h = self.norm1(x)
        qkv = torch.einsum("nkd,ked->nke", h, self._w_qkv()[:K])
        q, k, v = qkv.view(N, K, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (N, H, K, Dh)
        att = att.transpose(1, 2).reshape(N, K, D)
        x = x + torch.einsum("nke,kde->nkd", att, self._w_out()[:K])
        h = self.norm2(x)
        h = silu_gate(torch.einsum("nkd,khd->nkh", h, self.ffn_in[:K]))
        return x + torch.einsum("nkh,kdh->nkd", h, self.ffn_out[:K])

    def step(self, x: torch.Tensor, k: int, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Step k alone, x: (B, D); keys/values (B, H, S, Dh) receive this step's entries at index k."""
        B, D = x.shape
        h = self.norm1(x)
        q, kk, v = F.linear(h, self._w_qkv()[k]).view(B, 3, self.num_heads, 1, self.head_dim).unbind(1)
        keys[:, :, k:k + 1] = kk
        values[:, :, k:k + 1] = v
        att = F.scaled_dot_product_attention(q, keys[:, :, :k + 1], values[:, :, :k + 1])  # (B, H, 1, Dh)
        x = x + F.linear(att.reshape(B, D), self._w_out()[k])
        h = silu_gate(F.linear(self.norm2(x), self.ffn_in[k]))
        return x + F.linear(h, self.ffn_out[k])


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
