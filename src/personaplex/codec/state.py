"""Per-stream state objects for Mimi's streaming inference.

Modules hold weights only; everything a stream remembers between frames (conv left context, transposed-conv
overlap, KV caches, positions) lives in dataclasses derived from `StreamState`. Every tensor field is
batch-first (dim 0 = one conversation), which makes the row operations generic over the fields (tensors,
nested states, lists of either):

- in place, so that every state tensor keeps its storage (a CUDA graph captured over a step stays valid):
  `reset(mask)` / `reset_row(row)` return rows to the fresh state; `copy_row(dst, src, src_row)` and
  `load_row(row, src, src_row=0)` copy one row of another state of the same structure (another batch, or a
  batch-1 snapshot) into a row; `restore(snapshot)` copies a whole state of the same shape;
- new states: `snapshot()` (a deep copy, e.g. of the state after a voice prompt), `index_select(idx)` and
  `StreamState.cat(states)` (take rows out of a batch or merge batches).

The streaming steps (`Mimi.encode_step` / `decode_step`) also write into the state tensors in place. A
field's fresh value is given by its metadata (`field(metadata={FRESH: -1})`), 0 by default.

Inference mode: states are always allocated as normal tensors (`torch.inference_mode(False)` around every
allocation here and in the modules' `init_state`), even when created inside `torch.inference_mode()`. In-place
updates of normal tensors are allowed both inside and outside inference mode, so a state can be stepped,
reset and restored anywhere. (An inference tensor could not be updated in place outside inference mode.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch

S = TypeVar("S", bound="StreamState")


FRESH = "fresh"  # dataclass field metadata: the value a tensor is reset to (0 when absent)


def allocating() -> torch.inference_mode:
    """Context for allocating state tensors: never inference tensors (see the module docstring)."""
    return torch.inference_mode(False)


def _map(value: Any, on_tensor: Callable[[torch.Tensor], Any], on_state: Callable[[StreamState], Any]) -> Any:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return on_tensor(value)
    if isinstance(value, StreamState):
        return on_state(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_map(v, on_tensor, on_state) for v in value)
    raise TypeError(f"unsupported state field type {type(value).__name__}")


def _cat_values(values: Sequence[Any]) -> Any:
    first = values[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat(list(values), dim=0)
    if isinstance(first, StreamState):
        return type(first).cat(list(values))
    if isinstance(first, (list, tuple)):
        if any(len(v) != len(first) for v in values):
            raise ValueError("cannot concatenate states of different structure")
        return type(first)(_cat_values([v[i] for v in values]) for i in range(len(first)))
    raise TypeError(f"unsupported state field type {type(first).__name__}")


def _pairs(a: Any, b: Any, where: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The tensors of two values of the same structure, side by side (ValueError if the structures differ)."""
    if a is None or b is None:
        if a is not b:
            raise ValueError(f"states differ in structure at {where}")
        return
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape[1:] != b.shape[1:]:
            got = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
            raise ValueError(f"states differ in structure at {where}: {tuple(a.shape)} vs {got}")
        yield a, b
    elif isinstance(a, StreamState):
        if type(b) is not type(a):
            raise ValueError(f"states differ in structure at {where}: {type(a).__name__} vs {type(b).__name__}")
        for f in dataclasses.fields(a):
            yield from _pairs(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            raise ValueError(f"states differ in structure at {where}")
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _pairs(x, y, f"{where}[{i}]")
    else:
        raise TypeError(f"unsupported state field type {type(a).__name__}")


@dataclasses.dataclass
class StreamState:
    """Base class of batch-first streaming states (see the module docstring)."""

    def _fields(self):
        for f in dataclasses.fields(self):
            yield f.name, getattr(self, f.name), f.metadata.get(FRESH, 0)

    def tensors(self) -> Iterator[tuple[torch.Tensor, Any]]:
        """Every tensor of the state (nested ones included) with its fresh value, in a fixed order."""
        for _, value, fresh in self._fields():
            yield from _tensors(value, fresh)

    @property
    def batch_size(self) -> int:
        for t, _ in self.tensors():
            return t.shape[0]
        raise ValueError(f"{type(self).__name__} holds no tensors")

    # ---- in place -------------------------------------------------------------------------------------------
    def reset(self, mask: torch.Tensor) -> None:
        """Return the rows where `mask` (bool, shape (B,)) is True to the fresh state, in place."""
        if mask.dtype != torch.bool or mask.dim() != 1 or mask.shape[0] != self.batch_size:
            raise ValueError(
                f"reset expects a bool mask of shape ({self.batch_size},), got {tuple(mask.shape)} {mask.dtype}"
            )
        on_device: dict[torch.device, torch.Tensor] = {}
        for t, fresh in self.tensors():
            m = on_device.get(t.device)
            if m is None:
                m = on_device[t.device] = mask.to(t.device)
            t.masked_fill_(m.view(-1, *([1] * (t.dim() - 1))), fresh)

    def reset_row(self, row: int) -> None:
        """Return row `row` to the fresh state, in place."""
        self._check_row(row, "row")
        for t, fresh in self.tensors():
            t[row].fill_(fresh)

    def copy_row(self, dst: int, src: StreamState, src_row: int) -> None:
        """Make row `dst` equal to row `src_row` of `src` (this state or another of the same structure)."""
        self._check_row(dst, "dst")
        src._check_row(src_row, "src_row")
        pairs = list(_pairs(self, src, type(self).__name__))
        for mine, theirs in pairs:
            mine[dst].copy_(theirs[src_row])

    def load_row(self, row: int, src: StreamState, src_row: int = 0) -> None:
        """Copy row `src_row` (default 0) of `src`, e.g. a batch-1 snapshot, into row `row`, in place."""
        self.copy_row(row, src, src_row)

    def restore(self, snapshot: StreamState) -> None:
        """Make this state equal to `snapshot` (same structure and batch size), in place; the snapshot stays
        usable for further restores. To put a batch-1 snapshot into one row of a batch, use `load_row`."""
        if type(snapshot) is not type(self):
            raise TypeError(f"cannot restore a {type(self).__name__} from a {type(snapshot).__name__}")
        if snapshot.batch_size != self.batch_size:
            raise ValueError(
                f"cannot restore a state of {self.batch_size} rows from one of {snapshot.batch_size}; "
                f"use load_row(row, snapshot) to copy single rows"
            )
        for mine, theirs in list(_pairs(self, snapshot, type(self).__name__)):
            mine.copy_(theirs)

    # ---- new states -----------------------------------------------------------------------------------------
    def snapshot(self: S) -> S:
        """A deep copy of this state."""
        with allocating():
            return self._replace_all(lambda t: t.clone(), lambda s: s.snapshot())

    def index_select(self: S, index: torch.Tensor | Sequence[int]) -> S:
        """A new state made of the given rows (in that order)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        with allocating():
            return self._replace_all(lambda t: t.index_select(0, idx.to(t.device)), lambda s: s.index_select(idx))

    @classmethod
    def cat(cls: type[S], states: Sequence[S]) -> S:
        """Concatenate states along the batch dimension."""
        if not states:
            raise ValueError("cat needs at least one state")
        for s in states:
            if type(s) is not type(states[0]):
                raise TypeError(f"cannot concatenate {type(states[0]).__name__} with {type(s).__name__}")
        with allocating():
            values = {f.name: _cat_values([getattr(s, f.name) for s in states]) for f in dataclasses.fields(states[0])}
        return type(states[0])(**values)

    def _replace_all(self: S, on_tensor, on_state) -> S:
        values = {f.name: _map(getattr(self, f.name), on_tensor, on_state) for f in dataclasses.fields(self)}
        return type(self)(**values)

    def _check_row(self, row: int, name: str) -> None:
        if not isinstance(row, int) or isinstance(row, bool) or not 0 <= row < self.batch_size:
            raise IndexError(f"{name} must be an int in [0, {self.batch_size}), got {row!r}")


def _tensors(value: Any, fresh: Any) -> Iterator[tuple[torch.Tensor, Any]]:
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        yield value, fresh
    elif isinstance(value, StreamState):
        yield from value.tensors()
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v, fresh)
    else:
        raise TypeError(f"unsupported state field type {type(value).__name__}")
