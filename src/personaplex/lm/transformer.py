"""The temporal transformer: causal self-attention over frames with RoPE, a sliding window of `context`
frames and a preallocated ring KV cache kept outside the module (`KVCache`).

Pinned prompt. A conversation may pin its first `pinned` positions (the persona prompt): they are never
overwritten, the rest of the ring (capacity - pinned slots) holds the latest frames, and once the window
has slid past the prompt the prompt is attended to as if it sat right before the oldest frame kept. RoPE
only sees relative distances, so that is done by rotating the query for the prompt keys at position
min(q, context - 1) instead of q: the model then sees exactly what a fresh run of [prompt, last
context - pinned frames] would give, and never a distance it was not trained on. Before the window slides,
pinned and plain rings compute the same thing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import RMSNorm, apply_rope, rope_angles, silu_gate


@dataclass
class KVCache:
    """Per-conversation attention state of the temporal transformer, batch-first.

    keys/values: (L, B, H, C, Dh) ring buffers of capacity C = context; `slot_pos` (B, C) holds the absolute
    position stored in each slot (-1: empty); `pos` (B,) is the next position of each conversation;
    `pinned` (B,) the number of leading positions kept for good (0: a plain sliding window). `pos_cpu` and
    `pinned_cpu` mirror them on the host so that per-step decisions never wait for the GPU.
    """

    keys: torch.Tensor
    values: torch.Tensor
    slot_pos: torch.Tensor
    pos: torch.Tensor
    pinned: torch.Tensor
    pos_cpu: torch.Tensor
    pinned_cpu: torch.Tensor

    @classmethod
    def empty(cls, num_layers: int, batch_size: int, num_heads: int, capacity: int, head_dim: int,
              device=None, dtype=None) -> "KVCache":
        shape = (num_layers, batch_size, num_heads, capacity, head_dim)
        return cls(
            keys=torch.zeros(shape, device=device, dtype=dtype),
            values=torch.zeros(shape, device=device, dtype=dtype),
            slot_pos=torch.full((batch_size, capacity), -1, device=device, dtype=torch.long),
            pos=torch.zeros(batch_size, device=device, dtype=torch.long),
            pinned=torch.zeros(batch_size, device=device, dtype=torch.long),
            pos_cpu=torch.zeros(batch_size, dtype=torch.long),
            pinned_cpu=torch.zeros(batch_size, dtype=torch.long),
        )

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    @property
    def capacity(self) -> int:
        return self.slot_pos.shape[1]

    def reset(self, mask: torch.Tensor | None = None) -> None:
        """Forget the history of the conversations where `mask` (B,) is true (all when None)."""
        if mask is None:
            mask = torch.ones_like(self.pos, dtype=torch.bool)
        self.slot_pos.masked_fill_(mask.view(-1, 1), -1)
        for t in (self.pos, self.pinned, self.pos_cpu, self.pinned_cpu):
            t.masked_fill_(mask.to(t.device), 0)

    def rows(self, start: int, stop: int) -> "KVCache":
        """A view of conversations start..stop-1 (writes go to this cache)."""
        return KVCache(self.keys[:, start:stop], self.values[:, start:stop],
                       *(t[start:stop] for t in self._tensors()[2:]))

    def snapshot(self) -> "KVCache":
        return KVCache(*(t.clone() for t in self._tensors()))

    def restore(self, other: "KVCache") -> None:
        for mine, theirs in zip(self._tensors(), other._tensors()):
            mine.copy_(theirs)

    def copy_row_(self, dst: int, src: "KVCache", src_row: int = 0) -> None:
        """Overwrite conversation `dst` with conversation `src_row` of `src` (same capacity)."""
        self.keys[:, dst] = src.keys[:, src_row]
        self.values[:, dst] = src.values[:, src_row]
        for mine, theirs in zip(self._tensors()[2:], src._tensors()[2:]):
            mine[dst] = theirs[src_row]

    def load_prefix_(self, row: int, keys: torch.Tensor, values: torch.Tensor, pin: bool) -> None:
        """Make conversation `row` hold positions 0..N-1 from (L, H, N, Dh) keys/values (a cached prompt)."""
        n = keys.shape[2]
        if n > self.capacity // 2:
            raise ValueError(f"a prompt of {n} frames does not fit a context of {self.capacity} (max {self.capacity // 2})")
        self.keys[:, row, :, :n] = keys
        self.values[:, row, :, :n] = values
        self.slot_pos[row] = -1
        self.slot_pos[row, :n] = torch.arange(n, device=self.slot_pos.device)
        self.pos[row] = self.pos_cpu[row] = n
        self.pinned[row] = self.pinned_cpu[row] = n if pin else 0

    def advance(self, steps: int) -> None:
        self.pos.add_(steps)
        self.pos_cpu.add_(steps)

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.keys, self.values, self.slot_pos, self.pos, self.pinned, self.pos_cpu, self.pinned_cpu)


def _slots(positions: torch.Tensor, pinned: torch.Tensor, capacity: int) -> torch.Tensor:
    """Ring slot of each position (B, T): pinned positions keep their slot, the others cycle after them."""
    pinned = pinned.view(-1, 1)
    return torch.where(positions < pinned, positions, pinned + (positions - pinned) % (capacity - pinned))


def _trim(positions: torch.Tensor, cache: KVCache) -> slice:
    """The part of a written chunk that survives in the ring (a chunk longer than the ring keeps its tail)."""
    T = positions.shape[1]
    if T == 1 or T <= cache.capacity - int(cache.pinned_cpu.max()):
        return slice(None)
    if bool(cache.pinned_cpu.any()):
        raise ValueError("a chunk longer than the unpinned part of the ring cannot be written at once")
    return slice(T - cache.capacity, None)


def _write_ring(keys, values, k, v, positions, cache: KVCache) -> None:
    """Scatter new (B, H, T, Dh) keys/values into their ring slots."""
    keep = _trim(positions, cache)
    k, v, positions = k[:, :, keep], v[:, :, keep], positions[:, keep]
    B, H, T, D = k.shape
    index = _slots(positions, cache.pinned, cache.capacity).view(B, 1, T, 1).expand(B, H, T, D)
    keys.scatter_(2, index, k)
    values.scatter_(2, index, v)


def _slot_positions_after(cache: KVCache, positions: torch.Tensor) -> torch.Tensor:
    """slot_pos as it will be once `positions` (B, T) are written (without modifying the cache)."""
    positions = positions[:, _trim(positions, cache)]
    return cache.slot_pos.scatter(1, _slots(positions, cache.pinned, cache.capacity), positions)


@dataclass
class AttentionPlan:
    """What every layer's attention needs for one call, computed once: rotations and masks."""

    positions: torch.Tensor  # (B, T)
    rope: tuple[torch.Tensor, torch.Tensor]
    mask: torch.Tensor | None  # (B, 1, T, S) bool; None: plain causal
    prompt_rope: tuple[torch.Tensor, torch.Tensor] | None = None  # query rotation for pinned keys
    prompt_keys: torch.Tensor | None = None  # (B, 1, 1, S) bool: which keys are pinned


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, context: int, max_period: float, device=None, dtype=None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.context = context
        self.max_period = max_period
        self.in_proj = nn.Linear(dim, 3 * dim, bias=False, device=device, dtype=dtype)  # rows: q, k, v
        self.out_proj = nn.Linear(dim, dim, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, plan: AttentionPlan, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q_raw, k, v = self.in_proj(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        cos, sin = plan.rope
        q, k = apply_rope(q_raw, cos, sin), apply_rope(k, cos, sin)  # (B, H, T, Dh)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, is_causal=plan.mask is None)
        else:
            keys, values = cache.keys[layer], cache.values[layer]  # (B, H, C, Dh)
            if T == 1:
                # Write first: the slot overwritten holds exactly the position that left the window.
                _write_ring(keys, values, k, v, plan.positions, cache)
            else:
                # A chunk may overwrite slots its own first queries still need: attend to old + new first.
                keys, values = torch.cat([keys, k], dim=2), torch.cat([values, v], dim=2)
            if plan.prompt_rope is None:
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=plan.mask)
            else:
                q_prompt = apply_rope(q_raw, *plan.prompt_rope)
                out = _attend_two_rotations(q, q_prompt, keys, values, plan.mask, plan.prompt_keys)
            if T > 1:
                _write_ring(cache.keys[layer], cache.values[layer], k, v, plan.positions, cache)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, -1))


def _attend_two_rotations(q, q_prompt, keys, values, mask, prompt_keys):
    """Attention where pinned keys are scored with a differently rotated query (see module docstring)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    keys_t = keys.float().transpose(-1, -2)  # scores in fp32, as the fused kernels accumulate them
    scores = torch.where(prompt_keys, torch.matmul(q_prompt.float(), keys_t), torch.matmul(q.float(), keys_t))
    scores = (scores * scale).masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(values.dtype), values)


class GatedFFN(nn.Module):
    def __init__(self, dim: int, hidden: int, device=None, dtype=None):
        super().__init__()
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False, device=device, dtype=dtype)
        self.linear_out = nn.Linear(hidden, dim, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_out(silu_gate(self.linear_in(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int, context: int, max_period: float, eps: float,
                 device=None, dtype=None):
        super().__init__()
        self.norm1 = RMSNorm(dim, eps, device=device, dtype=dtype)
        self.self_attn = Attention(dim, num_heads, context, max_period, device=device, dtype=dtype)
        self.norm2 = RMSNorm(dim, eps, device=device, dtype=dtype)
        self.gating = GatedFFN(dim, hidden, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, plan: AttentionPlan, cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x), plan, cache, layer)
        return x + self.gating(self.norm2(x))


class Transformer(nn.Module):
    """Stack of pre-norm blocks. `forward(x, cache)`: x (B, T, D); with a cache, frames continue each
    conversation from `cache.pos` and the cache advances by T; without one, positions start at 0."""

    def __init__(self, dim: int, num_heads: int, num_layers: int, hidden: int, context: int,
                 max_period: float, eps: float, device=None, dtype=None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.context = context
        self.max_period = max_period
        self.layers = nn.ModuleList(
            Block(dim, num_heads, hidden, context, max_period, eps, device=device, dtype=dtype)
            for _ in range(num_layers)
        )

    def init_cache(self, batch_size: int, device=None, dtype=None) -> KVCache:
        return KVCache.empty(len(self.layers), batch_size, self.num_heads, self.context, self.head_dim,
                             device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        plan = self.plan(x.shape[0], x.shape[1], x.device, cache)
        for i, layer in enumerate(self.layers):
            x = layer(x, plan, cache, i)
        if cache is not None:
            cache.slot_pos.copy_(_slot_positions_after(cache, plan.positions))
            cache.advance(x.shape[1])
        return x

    def plan(self, B: int, T: int, device, cache: KVCache | None) -> AttentionPlan:
        steps = torch.arange(T, device=device)
        positions = steps.expand(B, T) if cache is None else cache.pos[:, None] + steps  # (B, T)
        rope = rope_angles(positions, self.head_dim, self.max_period)
        if cache is None:
            if T <= self.context:
                return AttentionPlan(positions, rope, None)
            delta = positions[:, :, None] - positions[:, None, :]
            return AttentionPlan(positions, rope, ((delta >= 0) & (delta < self.context))[:, None])
        key_pos = (_slot_positions_after(cache, positions) if T == 1
                   else torch.cat([cache.slot_pos, positions], dim=1))  # (B, S)
        pinned = cache.pinned.view(-1, 1, 1)
        delta = positions[:, :, None] - key_pos[:, None, :]  # (B, T, S)
        is_prompt = key_pos[:, None, :] < pinned
        window = torch.where(pinned > 0, self.context - pinned, self.context)
        mask = ((key_pos[:, None, :] >= 0) & (delta >= 0) & (is_prompt | (delta < window)))[:, None]
        plan = AttentionPlan(positions, rope, mask)
        # Past the window, pinned prompt keys are scored by a query rotated at context - 1 (module docstring).
        slid = (cache.pinned_cpu > 0) & (cache.pos_cpu + T - 1 >= self.context)  # host mirrors: no GPU sync
        if bool(slid.any()):
            if T != 1:
                raise ValueError("pinned prompts support one frame per step once the window has slid")
            prompt_pos = torch.where(cache.pinned.view(-1, 1) > 0, positions.clamp(max=self.context - 1), positions)
            plan.prompt_rope = rope_angles(prompt_pos, self.head_dim, self.max_period)
            plan.prompt_keys = is_prompt[:, None]
        return plan
