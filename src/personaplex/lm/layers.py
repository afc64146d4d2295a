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
        inv = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (x32 * (self.alpha.float().view(-1) * inv)).to(x.dtype)


class Embedding(nn.Embedding):
    """Embedding table whose id `ZERO_TOKEN` (-1) gives a zero vector (used for missing tokens)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (...,) -> (..., dim)
        y = F.embedding(tokens.clamp(min=0), self.weight)
        return y * (tokens != ZERO_TOKEN).unsqueeze(-1).to(y.dtype)


def rope_angles(positions: torch.Tensor, head_dim: int, max_period: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for interleaved RoPE. positions: (B, T) int -> two (B, 1, T, head_dim/2) fp32 tensors."""
    half = head_dim // 2
    idx = torch.arange(half, device=positions.device, dtype=torch.float32)
    freqs = torch.exp(idx * (-math.log(max_period) * 2 / head_dim))
    angles = positions.to(torch.float32).unsqueeze(-1) * freqs  # (B, T, half)
    return torch.cos(angles).unsqueeze(1), torch.sin(angles).unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x: (B, H, T, D), in fp32, back to x's dtype."""
    B, H, T, D = x.shape
    pairs = x.float().view(B, H, T, D // 2, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1)
    return out.view(B, H, T, D).to(x.dtype)


def silu_gate(h: torch.Tensor) -> torch.Tensor:
    """Gated activation of a fused (gate, value) projection: the first half is the gate."""
    gate, value = h.chunk(2, dim=-1)
    return F.silu(gate) * value
