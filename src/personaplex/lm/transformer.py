"""The temporal transformer: causal self-attention over frames with RoPE, a sliding window of `context`
frames and a preallocated ring KV cache kept outside the module (`KVCache`).

Two paths: `forward(x, cache)` runs a chunk of T frames (training, prompt prefill), and `step(x, cache)` runs
exactly one frame per conversation with fixed shapes, in place and without reading anything back to the host,
so that a whole engine tick can be captured once as a CUDA graph and replayed.

Pinned prompt. A conversation may pin its first `pinned` positions (the persona prompt): they are never
overwritten, the rest of the ring (capacity - pinned slots) holds the latest frames, and once the window has
slid past the prompt the prompt is attended to as if it sat right before the oldest frame kept: the model then
sees exactly what a fresh run of [prompt, last context - pinned frames] would give, and never a distance it was
not trained on. RoPE only sees relative distances, so that means scoring the prompt keys with the query
rotated as if it stood at min(q, context - 1), i.e. rotated back by shift = max(0, q - (context - 1)). Rather
than scoring the whole ring twice, the difference is an additive score bias on the pinned slots only:
(q' - q) . k_j / sqrt(Dh) for pinned key j, where q' is the query rotated back by `shift`. It goes into the
attention mask, so one attention call serves every row and reads the ring once (plus the few pinned slots for
the bias). A row that has not slid has shift 0: q' is q bit for bit, its bias is exactly 0 and its attention
is unchanged, so nothing about one conversation depends on whether another one has passed the window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import RMSNorm, apply_rope, rope_rotation, silu_gate

DEFAULT_PINNED_CAPACITY = 512  # prompt frames a row can pin (41 s: a released voice plus ~350 text tokens)
# (a bound on the slots the pinned-prompt bias reads each step once a row has slid, not on memory)


@dataclass
class KVCache:
    """Per-conversation attention state of the temporal transformer, batch-first, fixed-shape.

    keys/values: (L, B, H, C, Dh) ring buffers of capacity C = context; `slot_pos` (B, C) holds the absolute
    position stored in each slot (-1: empty); `pos` (B,) is the next position of each conversation;
    `pinned` (B,) the number of leading positions kept for good (0: a plain sliding window), at most
    `pinned_capacity`. `pos_cpu` and `pinned_cpu` mirror `pos` and `pinned` on the host, so per-step decisions
    (has any row slid?) never wait for the GPU. Every operation below writes into these tensors: their storage
    never changes.
    """

    keys: torch.Tensor
    values: torch.Tensor
    slot_pos: torch.Tensor
    pos: torch.Tensor
    pinned: torch.Tensor
    pos_cpu: torch.Tensor
    pinned_cpu: torch.Tensor
    pinned_capacity: int = DEFAULT_PINNED_CAPACITY

    @classmethod
    def empty(cls, num_layers: int, batch_size: int, num_heads: int, capacity: int, head_dim: int,
              device=None, dtype=None, pinned_capacity: int | None = None) -> "KVCache":
        if pinned_capacity is None:
            pinned_capacity = min(capacity // 2, DEFAULT_PINNED_CAPACITY)
        shape = (num_layers, batch_size, num_heads, capacity, head_dim)
        return cls(
            keys=torch.zeros(shape, device=device, dtype=dtype),
            values=torch.zeros(shape, device=device, dtype=dtype),
            slot_pos=torch.full((batch_size, capacity), -1, device=device, dtype=torch.long),
            pos=torch.zeros(batch_size, device=device, dtype=torch.long),
            pinned=torch.zeros(batch_size, device=device, dtype=torch.long),
            pos_cpu=torch.zeros(batch_size, dtype=torch.long, device="cpu"),
            pinned_cpu=torch.zeros(batch_size, dtype=torch.long, device="cpu"),
            pinned_capacity=min(pinned_capacity, capacity // 2),
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
            mask = torch.ones_like(self.pos_cpu, dtype=torch.bool)
        self.slot_pos.masked_fill_(mask.to(self.slot_pos.device).view(-1, 1), -1)
        for t in (self.pos, self.pinned, self.pos_cpu, self.pinned_cpu):
            t.masked_fill_(mask.to(t.device), 0)

    def reset_row(self, row: int) -> None:
        self.slot_pos[row] = -1
        for t in (self.pos, self.pinned, self.pos_cpu, self.pinned_cpu):
            t[row] = 0

    def rows(self, start: int, stop: int) -> "KVCache":
        """A view of conversations start..stop-1 (writes go to this cache)."""
        return KVCache(self.keys[:, start:stop], self.values[:, start:stop], self.slot_pos[start:stop],
                       self.pos[start:stop], self.pinned[start:stop], self.pos_cpu[start:stop],
                       self.pinned_cpu[start:stop], self.pinned_capacity)

    def snapshot(self) -> "KVCache":
        return KVCache(*(t.clone() for t in self._tensors()), self.pinned_capacity)

    def restore(self, other: "KVCache") -> None:
        for mine, theirs in zip(self._tensors(), other._tensors()):
            mine.copy_(theirs)

    def copy_row(self, dst: int, src: "KVCache", src_row: int) -> None:
        """Overwrite conversation `dst` with conversation `src_row` of `src` (same capacities)."""
        for layered, (mine, theirs) in zip(self._layered(), zip(self._tensors(), src._tensors())):
            if layered:
                mine[:, dst] = theirs[:, src_row]
            else:
                mine[dst] = theirs[src_row]

    def load_prefix_(self, row: int, keys: torch.Tensor, values: torch.Tensor, pin: bool) -> None:
        """Make conversation `row` hold positions 0..N-1 from (L, H, N, Dh) keys/values (a cached prompt)."""
        n = keys.shape[2]
        if n > self.capacity // 2:
            raise ValueError(f"a prompt of {n} frames does not fit a context of {self.capacity} (max {self.capacity // 2})")
        if pin and n > self.pinned_capacity:
            raise ValueError(f"a prompt of {n} frames cannot be pinned: this cache pins at most "
                             f"{self.pinned_capacity} frames")
        self.keys[:, row, :, :n] = keys
        self.values[:, row, :, :n] = values
        self.slot_pos[row] = -1
        self.slot_pos[row, :n] = torch.arange(n, device=self.slot_pos.device)
        self.pos[row] = self.pos_cpu[row] = n
        self.pinned[row] = self.pinned_cpu[row] = n if pin else 0

    def advance(self, steps: int) -> None:
        self.pos.add_(steps)
        self.pos_cpu.add_(steps)

    def any_slid(self, context: int) -> bool:
        """Whether a pinned row's next step has its query past the window (host mirrors only)."""
        return bool(((self.pinned_cpu > 0) & (self.pos_cpu >= context)).any())

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.keys, self.values, self.slot_pos, self.pos, self.pinned, self.pos_cpu, self.pinned_cpu)

    @staticmethod
    def _layered() -> tuple[bool, ...]:
        return (True, True, False, False, False, False, False)


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
    """What every layer's attention needs for one chunk, computed once: rotations and masks."""

    positions: torch.Tensor  # (B, T)
    rope: torch.Tensor  # (B, 1, T, Dh/2) complex
    mask: torch.Tensor | None  # (B, 1, T, S) bool; None: plain causal


@dataclass
class StepPlan:
    """What every layer needs for one single-frame step, computed once per step on the device."""

    rope: torch.Tensor  # (B, 1, 1, 1, Dh/2) complex: rotation of this step's query and key
    write_index: torch.Tensor  # (B, H, 1, Dh) int64: the ring slot each row writes (expanded view)
    mask: torch.Tensor  # (B, 1, 1, C) additive float mask in the activation dtype
    prompt_delta: torch.Tensor | None  # (B, 1, 1, Dh/2) complex: (R(min(q, C-1)) - R(q)) / sqrt(Dh)
    prompt_slots: torch.Tensor | None  # (B, 1, 1, P) float: 1 on slots < P holding a pinned key, else 0
    head_mask: torch.Tensor | None  # (B, H, 1, C): per-head mask the layers fill with their bias


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
        qkv = self.in_proj(x).view(B, T, 3, self.num_heads, self.head_dim)
        q, k = apply_rope(qkv[:, :, :2], plan.rope.transpose(1, 2)[:, :, None]).permute(2, 0, 3, 1, 4)
        v = qkv[:, :, 2].transpose(1, 2)  # (B, H, T, Dh)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, is_causal=plan.mask is None)
        else:
            # A chunk may overwrite slots its own first queries still need: attend to old + new first.
            keys = torch.cat([cache.keys[layer], k], dim=2)
            values = torch.cat([cache.values[layer], v], dim=2)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=plan.mask)
            _write_ring(cache.keys[layer], cache.values[layer], k, v, plan.positions, cache)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, -1))

    def step(self, x: torch.Tensor, plan: StepPlan, cache: KVCache, layer: int) -> torch.Tensor:
        """One frame per row: x (B, D) -> (B, D). Writes this frame's key/value into the ring first (the slot
        overwritten holds exactly the position that left the window)."""
        B, D = x.shape
        qkv = F.linear(x, self.in_proj.weight).view(B, 3, self.num_heads, 1, self.head_dim)
        pairs = torch.view_as_complex(qkv[:, :2].float().unflatten(-1, (-1, 2)))  # (B, 2, H, 1, Dh/2)
        qk = torch.view_as_real(pairs * plan.rope).flatten(-2).to(x.dtype)  # q and k in one rotation
        keys, values = cache.keys[layer], cache.values[layer]  # (B, H, C, Dh)
        keys.scatter_(2, plan.write_index, qk[:, 1])
        values.scatter_(2, plan.write_index, qkv[:, 2])
        mask = plan.mask
        if plan.prompt_delta is not None:  # pinned keys scored by the query rotated back (module docstring)
            P = cache.pinned_capacity
            # (q' - q) / sqrt(Dh) from the unrounded pairs: exactly 0 for a row that has not slid
            dq = torch.view_as_real(pairs[:, 0] * plan.prompt_delta).flatten(-2).to(x.dtype)  # (B, H, 1, Dh)
            bias = torch.matmul(dq, keys[:, :, :P].transpose(-1, -2))  # (B, H, 1, P)
            mask = plan.head_mask
            torch.addcmul(plan.mask[..., :P], bias, plan.prompt_slots, out=mask[..., :P])
        out = F.scaled_dot_product_attention(qk[:, 0], keys, values, attn_mask=mask)  # (B, H, 1, Dh)
        return F.linear(out.view(B, D), self.out_proj.weight)


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

    def step(self, x: torch.Tensor, plan: StepPlan, cache: KVCache, layer: int) -> torch.Tensor:  # (B, D)
        x = x + self.self_attn.step(self.norm1(x), plan, cache, layer)
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

    def init_cache(self, batch_size: int, device=None, dtype=None, pinned_capacity: int | None = None) -> KVCache:
        return KVCache.empty(len(self.layers), batch_size, self.num_heads, self.context, self.head_dim,
                             device=device, dtype=dtype, pinned_capacity=pinned_capacity)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        if cache is not None and x.shape[1] == 1:
            return self.step(x[:, 0], cache)[:, None]
        plan = self.plan(x.shape[0], x.shape[1], x.device, cache)
        for i, layer in enumerate(self.layers):
            x = layer(x, plan, cache, i)
        if cache is not None:
            cache.slot_pos.copy_(_slot_positions_after(cache, plan.positions))
            cache.advance(x.shape[1])
        return x

    def step(self, x: torch.Tensor, cache: KVCache, active: torch.Tensor | None = None,
             slid: bool | None = None) -> torch.Tensor:
        """One frame for every row: x (B, D) -> (B, D), fixed shapes, in place, no host synchronisation.

        active: optional (B,) bool on the device: rows where it is false (batch padding) keep their position,
        and then the host mirror `cache.pos_cpu` is the caller's to advance (a CUDA graph replays device work
        only). slid: run the pinned-prompt rotation (default: whether any row needs it, from the host
        mirrors); running it where no row needs it changes nothing."""
        plan = self.step_plan(cache, x.dtype, cache.any_slid(self.context) if slid is None else slid)
        for i, layer in enumerate(self.layers):
            x = layer.step(x, plan, cache, i)
        if active is None:
            cache.advance(1)
        else:
            cache.pos.add_(active)
        return x

    def step_plan(self, cache: KVCache, dtype: torch.dtype, slid: bool) -> StepPlan:
        """Rotations, ring slot and mask of this step, shared by every layer; updates `cache.slot_pos`."""
        pos, pinned, C = cache.pos, cache.pinned, cache.capacity
        positions = pos[:, None]  # (B, 1)
        rope = rope_rotation(positions, self.head_dim, self.max_period)  # (B, 1, 1, Dh/2)
        slot = _slots(positions, pinned, C)  # (B, 1)
        cache.slot_pos.scatter_(1, slot, positions)
        key_pos = cache.slot_pos  # (B, C), after this step's write
        delta = positions - key_pos
        pinned_ = pinned[:, None]
        window = torch.where(pinned_ > 0, self.context - pinned_, self.context)
        keep = (key_pos >= 0) & (delta >= 0) & ((key_pos < pinned_) | (delta < window))
        mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))
        B = pos.shape[0]
        write_index = slot.view(B, 1, 1, 1).expand(B, self.num_heads, 1, self.head_dim)
        mask = mask[:, None, None]  # (B, 1, 1, C)
        prompt_delta = prompt_slots = head_mask = None
        if slid:
            # Past the window, pinned keys are scored as if the query stood at context - 1 (module docstring).
            clamped = rope_rotation(positions.clamp(max=self.context - 1), self.head_dim, self.max_period)
            prompt_delta = (clamped - rope) * self.head_dim ** -0.5  # (B, 1, 1, Dh/2)
            P = cache.pinned_capacity
            prompt_slots = (torch.arange(P, device=pos.device) < pinned_).to(dtype).view(B, 1, 1, P)
            head_mask = mask.expand(B, self.num_heads, 1, C).clone()  # slots >= P keep the shared mask
        return StepPlan(rope.view(B, 1, 1, 1, -1), write_index, mask, prompt_delta, prompt_slots, head_mask)

    def plan(self, B: int, T: int, device, cache: KVCache | None) -> AttentionPlan:
        steps = torch.arange(T, device=device)
        positions = steps.expand(B, T) if cache is None else cache.pos[:, None] + steps  # (B, T)
        rope = rope_rotation(positions, self.head_dim, self.max_period)
        if cache is None:
            if T <= self.context:
                return AttentionPlan(positions, rope, None)
            delta = positions[:, :, None] - positions[:, None, :]
            return AttentionPlan(positions, rope, ((delta >= 0) & (delta < self.context))[:, None])
        if cache.any_slid(self.context - T + 1):
            raise ValueError("pinned prompts support one frame per step once the window has slid")
        key_pos = torch.cat([cache.slot_pos, positions], dim=1)  # (B, S): the ring, then the chunk
        pinned = cache.pinned.view(-1, 1, 1)
        delta = positions[:, :, None] - key_pos[:, None, :]  # (B, T, S)
        window = torch.where(pinned > 0, self.context - pinned, self.context)
        mask = ((key_pos[:, None, :] >= 0) & (delta >= 0) & ((key_pos[:, None, :] < pinned) | (delta < window)))
        return AttentionPlan(positions, rope, mask[:, None])
