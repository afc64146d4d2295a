"""Mimi's causal transformer (one on each side of the quantizer), with an explicit ring KV cache.

Pre-norm layers: x += attn_scale * Attn(LayerNorm(x)); x += ffn_scale * W_down GELU(W_up LayerNorm(x)).
No biases in the projections, RoPE on interleaved pairs (x[2i], x[2i+1]), attention limited to the last
`context` positions.

Streaming keeps a ring buffer of `context` slots per layer (`KVCache`) and, shared by all layers, the
absolute position held in each slot (`TransformerState.slot_positions`, `EMPTY_SLOT` when empty), all updated
in place. The attention mask (an additive float mask) and the rotary angles are computed once per step for
all layers; q and k are rotated together as one complex product. As in the reference,
a step's new keys are written before attending, so with several tokens per step the earliest queries of the
step can lose their oldest keys once the ring has wrapped (e.g. Mimi's first query of a frame sees 249
instead of 250 past positions after 10 s). Whole-signal mode (`forward`) attends over the full window.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from .conv import linear_rows
from .state import FRESH, StreamState, allocating

# The position recorded for an empty slot: so far in the past that the window test rejects it.
EMPTY_SLOT = -(2**62)


@dataclasses.dataclass
class KVCache(StreamState):
    kv: torch.Tensor  # (B, 2, H, context, head_dim): keys, values; slot = position % context


@dataclasses.dataclass
class TransformerState(StreamState):
    position: torch.Tensor  # (B,) int64: tokens seen so far
    slot_positions: torch.Tensor = dataclasses.field(
        metadata={FRESH: EMPTY_SLOT}
    )  # (B, context) int64: position in each slot, EMPTY_SLOT = empty
    layers: list[KVCache] = dataclasses.field(default_factory=list)


def rotate_pairs_(x: torch.Tensor, rotation: torch.Tensor) -> None:
    """Rotate the interleaved pairs (x[2i], x[2i+1]) of x (..., D) by `rotation` (complex64, broadcast to
    (..., D/2)), in place and in fp32: one complex product (two more ops to convert for other dtypes)."""
    if x.dtype == torch.float32:
        torch.view_as_complex(x.unflatten(-1, (-1, 2))).mul_(rotation)
    else:
        pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
        x.copy_(torch.view_as_real(pairs * rotation).flatten(-2))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, device=None, dtype=None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj = nn.Linear(dim, 3 * dim, bias=False, device=device, dtype=dtype)  # rows: q, k, v
        self.out_proj = nn.Linear(dim, dim, bias=False, device=device, dtype=dtype)

    def qkv(self, rows: torch.Tensor, rotation: torch.Tensor, batch: int) -> torch.Tensor:
        """rows (B*T, dim) -> (B, T, 3, H, head_dim): q, k (rotated), v; rotation (B or 1, T, 1, 1, D/2)."""
        qkv = linear_rows(rows, self.in_proj.weight).contiguous()  # (B*T, 3*dim)
        qkv = qkv.unflatten(0, (batch, -1)).unflatten(-1, (3, self.num_heads, -1))  # (B, T, 3, H, head_dim)
        rotate_pairs_(qkv[:, :, :2], rotation)  # q and k at once
        return qkv

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        """attn (B, H, T, head_dim) -> rows (B*T, dim)."""
        B, H, T, D = attn.shape
        rows = attn.transpose(1, 2).reshape(B * T, H * D)
        return linear_rows(rows, self.out_proj.weight)


class TransformerLayer(nn.Module):
    def __init__(
        self, dim: int, num_heads: int, dim_feedforward: int, layer_scale: float, eps: float, device=None, dtype=None
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.attn_norm = nn.LayerNorm(dim, eps=eps, **factory)
        self.attn = Attention(dim, num_heads, **factory)
        self.attn_scale = nn.Parameter(torch.full((dim,), layer_scale, **factory))
        self.ffn_norm = nn.LayerNorm(dim, eps=eps, **factory)
        self.ffn_up = nn.Linear(dim, dim_feedforward, bias=False, **factory)
        self.ffn_down = nn.Linear(dim_feedforward, dim, bias=False, **factory)
        self.ffn_scale = nn.Parameter(torch.full((dim,), layer_scale, **factory))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(linear_rows(self.ffn_norm(x), self.ffn_up.weight))
        return torch.addcmul(x, self.ffn_scale, linear_rows(h, self.ffn_down.weight))

    def attend(self, rows: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The residual update of the attention branch: rows + attn_scale * out_proj(attn)."""
        return torch.addcmul(rows, self.attn_scale, self.attn.output(attn))


class MimiTransformer(nn.Module):
    """Causal transformer over (B, T, dim) rows of latent frames."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_layers: int,
        dim_feedforward: int,
        context: int,
        layer_scale: float,
        max_period: float,
        eps: float = 1e-5,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0 or (dim // num_heads) % 2 != 0:
            raise ValueError(f"dim {dim} must split into {num_heads} heads of even size")
        self.dim, self.num_heads, self.context, self.max_period = dim, num_heads, context, max_period
        self.head_dim = dim // num_heads
        self.layers = nn.ModuleList(
            TransformerLayer(dim, num_heads, dim_feedforward, layer_scale, eps, device, dtype)
            for _ in range(num_layers)
        )
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def _rotation(self, positions: torch.Tensor) -> torch.Tensor:
        """positions (B, T) int64 -> complex64 rotations (B, T, 1, 1, head_dim/2): exp(i * position * freq)."""
        inv_freq = self._inv_freq.get(positions.device)
        if inv_freq is None:
            with allocating():
                half = torch.arange(self.head_dim // 2, device=positions.device, dtype=torch.float32)
                inv_freq = torch.exp(half * (-math.log(self.max_period) * 2 / self.head_dim))
                one = torch.ones((), device=positions.device)
            self._inv_freq[positions.device] = inv_freq = torch.stack([inv_freq, one.expand_as(inv_freq)])
        angles = positions[:, :, None, None, None] * inv_freq[0]  # int64 * fp32 -> fp32
        return torch.polar(inv_freq[1], angles)

    def init_state(self, batch_size: int) -> TransformerState:
        p = self.layers[0].attn_scale
        shape = (batch_size, 2, self.num_heads, self.context, self.head_dim)
        with allocating():
            return TransformerState(
                position=torch.zeros(batch_size, dtype=torch.long, device=p.device),
                slot_positions=torch.full((batch_size, self.context), EMPTY_SLOT, dtype=torch.long, device=p.device),
                layers=[KVCache(torch.zeros(shape, device=p.device, dtype=p.dtype)) for _ in self.layers],
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Whole sequence from position 0: x (B, T, dim) -> (B, T, dim)."""
        B, T, _ = x.shape
        pos = torch.arange(T, device=x.device)
        rotation = self._rotation(pos[None])
        delta = pos[:, None] - pos[None, :]
        mask = (delta >= 0) & (delta < self.context)  # (T, T): query, key
        rows = x.reshape(B * T, self.dim)
        for layer in self.layers:
            q, k, v = layer.attn.qkv(layer.attn_norm(rows), rotation, B).transpose(1, 3).unbind(2)  # (B, H, T, D)
            rows = layer.attend(rows, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
            rows = layer.feed_forward(rows)
        return rows.reshape(B, T, self.dim)

    def step(self, x: torch.Tensor, state: TransformerState) -> torch.Tensor:
        """Continue each row's stream with T new tokens: x (B, T, dim) -> (B, T, dim); updates `state` in place."""
        B, T, _ = x.shape
        if T > self.context:  # the ring can take at most `context` new entries at once
            return torch.cat([self.step(x[:, i : i + self.context], state) for i in range(0, T, self.context)], 1)
        q_pos = state.position[:, None] + torch.arange(T, device=x.device)  # (B, T)
        slots = q_pos % self.context
        state.slot_positions.scatter_(1, slots, q_pos)
        # Key in the window of a query: 0 <= q_pos - key_pos < context, i.e. floor((q - k) / context) == 0
        # (an empty slot is EMPTY_SLOT, far outside). Additive mask: log(1) = 0 or log(0) = -inf.
        delta = q_pos[:, :, None] - state.slot_positions[:, None, :]  # (B, T, context)
        in_window = delta.div(self.context, rounding_mode="floor") == 0
        mask = in_window.to(x.dtype).log()[:, None]  # (B, 1, T, context)
        rotation = self._rotation(q_pos)
        index = slots.view(B, 1, 1, T, 1).expand(B, 2, self.num_heads, T, self.head_dim)
        rows = x.reshape(B * T, self.dim)
        for layer, cache in zip(self.layers, state.layers):
            qkv = layer.attn.qkv(layer.attn_norm(rows), rotation, B).permute(0, 2, 3, 1, 4)  # (B, 3, H, T, D)
            cache.kv.scatter_(3, index, qkv[:, 1:])  # keys and values in one write
            attn = F.scaled_dot_product_attention(qkv[:, 0], cache.kv[:, 0], cache.kv[:, 1], attn_mask=mask)
            rows = layer.attend(rows, attn)
            rows = layer.feed_forward(rows)
        state.position.add_(T)
        return rows.reshape(B, T, self.dim)
