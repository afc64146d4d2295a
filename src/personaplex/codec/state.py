"""Per-stream state objects for Mimi's streaming inference.

Modules hold weights only; everything a stream remembers between frames (conv left context, transposed-conv
overlap, KV caches, positions) lives in dataclasses derived from `StreamState`. Every tensor field is
batch-first (dim 0 = one conversation), which makes the batch operations generic:

- `reset(mask)`: rows where `mask` is True go back to the fresh state, the others are untouched;
- `snapshot()` / `restore(snapshot)`: deep copy, e.g. to cache the state after a voice prompt;
- `index_select(idx)` / `StreamState.cat(states)`: take rows out of a batch or merge batches, so a server can
  add and remove conversations.

A field's fresh value is given by its metadata (`field(metadata={FRESH: -1})`), 0 by default. Fields may be tensors,
nested states, or lists of either. Mutating operations replace tensors rather than writing into them, so a
state produced under `torch.inference_mode()` can still be reset or restored outside it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

S = TypeVar("S", bound="StreamState")


FRESH = "fresh"  # dataclass field metadata: the value a tensor is reset to (0 when absent)


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


@dataclasses.dataclass
class StreamState:
    """Base class of batch-first streaming states (see the module docstring)."""

    def _fields(self):
        for f in dataclasses.fields(self):
            yield f.name, getattr(self, f.name), f.metadata.get(FRESH, 0)

    @property
    def batch_size(self) -> int:
        found: list[int] = []

        def first_tensor(t: torch.Tensor) -> None:
            found.append(t.shape[0])

        def first_state(s: StreamState) -> None:
            found.append(s.batch_size)

        for _, value, _ in self._fields():
            _map(value, first_tensor, first_state)
            if found:
                return found[0]
        raise ValueError(f"{type(self).__name__} holds no tensors")

    def reset(self, mask: torch.Tensor) -> None:
        """Return the rows where `mask` (bool, shape (B,)) is True to the fresh state, in place."""
        if mask.dtype != torch.bool or mask.dim() != 1 or mask.shape[0] != self.batch_size:
            raise ValueError(
                f"reset expects a bool mask of shape ({self.batch_size},), got {tuple(mask.shape)} {mask.dtype}"
            )
        for name, value, fresh in self._fields():

            def reset_tensor(t: torch.Tensor, fresh=fresh) -> torch.Tensor:
                m = mask.to(t.device).view(-1, *([1] * (t.dim() - 1)))
                return torch.where(m, torch.full((), fresh, dtype=t.dtype, device=t.device), t)

            def reset_state(s: StreamState) -> StreamState:
                s.reset(mask)
                return s

            setattr(self, name, _map(value, reset_tensor, reset_state))

    def snapshot(self: S) -> S:
        """A deep copy of this state."""
        return self._replace_all(lambda t: t.clone(), lambda s: s.snapshot())

    def restore(self: S, snapshot: S) -> None:
        """Make this state equal to `snapshot` (which stays usable for further restores)."""
        if type(snapshot) is not type(self):
            raise TypeError(f"cannot restore a {type(self).__name__} from a {type(snapshot).__name__}")
        for f in dataclasses.fields(self):
            setattr(self, f.name, _map(getattr(snapshot, f.name), lambda t: t.clone(), lambda s: s.snapshot()))

    def index_select(self: S, index: torch.Tensor | Sequence[int]) -> S:
        """A new state made of the given rows (in that order)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        return self._replace_all(lambda t: t.index_select(0, idx.to(t.device)), lambda s: s.index_select(idx))

    @classmethod
    def cat(cls: type[S], states: Sequence[S]) -> S:
        """Concatenate states along the batch dimension."""
        if not states:
            raise ValueError("cat needs at least one state")
        for s in states:
            if type(s) is not type(states[0]):
                raise TypeError(f"cannot concatenate {type(states[0]).__name__} with {type(s).__name__}")
        values = {f.name: _cat_values([getattr(s, f.name) for s in states]) for f in dataclasses.fields(states[0])}
        return type(states[0])(**values)

    def _replace_all(self: S, on_tensor, on_state) -> S:
        values = {f.name: _map(getattr(self, f.name), on_tensor, on_state) for f in dataclasses.fields(self)}
        return type(self)(**values)
