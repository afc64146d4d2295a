"""Building blocks shared by the temporal transformer and the depformer: RMSNorm, RoPE, embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ZERO_TOKEN = -1  # a token id that embeds to exactly zero and carries no loss


class RMSNorm(nn.Module):
    """RMS normalisation computed in fp32 whatever the activation dtype (released name: `alpha`)."""

    def __init__(self, dim: int, eps: float = 1e-8, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.alpha = nn.Parameter(torch.ones(1, 1, dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        inv = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True).add_(self.eps))
        # alpha (bf16 or fp32) times an fp32 tensor promotes exactly to fp32: no separate cast of alpha.
        return (x32 * (self.alpha.view(-1) * inv)).to(x.dtype)


class Embedding(nn.Embedding):
    """Embedding table whose id `ZERO_TOKEN` (-1) gives a zero vector (used for missing tokens)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (...,) -> (..., dim)
        y = F.embedding(tokens.clamp(min=0), self.weight)
        return y * (tokens != ZERO_TOKEN).unsqueeze(-1).to(y.dtype)


def rope_rotation(positions: torch.Tensor, head_dim: int, max_period: float) -> torch.Tensor:
    """RoPE as unit complex numbers: positions (B, T) int -> (B, 1, T, head_dim/2) complex64, one per
    interleaved pair (x[2i], x[2i+1]) with angle position * max_period^(-2i/head_dim)."""
    half = head_dim // 2
    idx = torch.arange(half, device=positions.device, dtype=torch.float32)
    freqs = torch.exp(idx * (-math.log(max_period) * 2 / head_dim))
    angles = positions.to(torch.float32).unsqueeze(-1) * freqs  # (B, T, half)
    return torch.polar(torch.ones_like(angles), angles).unsqueeze(1)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs of x (..., D) by `rotation` (broadcastable to (..., D/2) complex64), in
    fp32, back to x's dtype: one cast, one complex product, one cast."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


def silu_gate(h: torch.Tensor) -> torch.Tensor:
    """Gated activation of a fused (gate, value) projection: the first half is the gate."""
    gate, value = h.chunk(2, dim=-1)
    return F.silu(gate) * value
