"""Counting what a step costs the host: aten operations, and host synchronisations.

On a GPU every non-view aten operation of an eager step is (at least) one kernel launch, so the number of
operations a step issues is its launch overhead; a host synchronisation (`.item()`, `bool(tensor)`, a copy to
the CPU) stalls the host until the device has caught up, and cannot be captured in a CUDA graph. Both are
visible at the dispatcher, so they can be counted on the CPU or on the meta device (a model built under
`torch.device("meta")` runs every operation without allocating or computing anything):

    counts = count_ops(lambda: mimi.encode_step(pcm, state))   # Counter: "aten.mm" -> 12, ...
    sum(counts.values())                                       # non-view operations of one step

    with NoHostSync():                                         # raises HostSyncError on the first sync
        mimi.decode_step(codes, state)

A "view" here is an operation that only re-describes an existing tensor's memory and launches nothing:
`VIEW_OPS` (view, reshape, select, slice, expand, transpose, permute, t, unsqueeze, squeeze, split, unbind,
alias, detach, _unsafe_view, as_strided, view_as_complex, view_as_real, _reshape_alias, unfold, diagonal).
Every other operation is counted, in-place ones included.
Composite operations (`matmul`, `linear`, `to`, `contiguous`, `layer_norm`, ...) are counted as the operations
they run (`mm`, `_to_copy`, `clone`, `native_layer_norm`; nothing for a `to` or `contiguous` that has nothing
to do), so a count is the same with or without `torch.inference_mode()`. `WHOLE_FUNCTIONS`
(`F.scaled_dot_product_attention`) count as the one fused kernel a GPU runs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# Operations that create a view of existing memory and issue no kernel (names of aten overload packets).
VIEW_OPS = frozenset(
    {
        "view",
        "reshape",
        "select",
        "slice",
        "expand",
        "transpose",
        "permute",
        "t",
        "unsqueeze",
        "squeeze",
        "split",
        "split_with_sizes",
        "unbind",
        "alias",
        "detach",
        "_unsafe_view",
        "as_strided",
        "view_as_complex",
        "view_as_real",
        "_reshape_alias",
        "unfold",
        "diagonal",
    }
)

# Functions counted as one operation: attention is one fused kernel on a GPU (flash / memory-efficient
# attention), while on the CPU and meta devices it decomposes into its reference math (matmuls, softmax).
WHOLE_FUNCTIONS = {torch.nn.functional.scaled_dot_product_attention: "aten.scaled_dot_product_attention"}

# Operations whose result the host must wait for (a device-to-host read of a value).
SYNC_OPS = frozenset({"_local_scalar_dense", "item", "equal", "is_nonzero"})

# Operations whose output shape depends on tensor values (the host must read a count back).
DYNAMIC_SHAPE_OPS = frozenset(
    {"nonzero", "nonzero_static_dynamic", "masked_select", "_unique", "_unique2", "unique_consecutive",
     "unique_dim", "argwhere"}
)


def _decompose(mode: TorchDispatchMode, func: Any, args: tuple, kwargs: dict) -> Any:
    """Run a CompositeImplicitAutograd op (`matmul`, `to`, `layer_norm`, ...) as the ops it is made of, with
    `mode` seeing those, or return NotImplemented. Outside `inference_mode` the autograd layer decomposes them
    before any dispatch mode runs; inside it they reach the mode whole. Decomposing here makes the counts (and
    the sync checks) the same in both, and counts what really runs (`x.to(x.dtype)` runs nothing)."""
    if not func.has_kernel_for_dispatch_key(torch._C.DispatchKey.CompositeImplicitAutograd):
        return NotImplemented
    with mode:
        return func.decompose(*args, **kwargs)


def op_name(func: Any) -> str:
    """`aten.add` for `aten.add.Tensor`: the overload packet, without the overload."""
    packet = getattr(func, "overloadpacket", func)
    return str(packet)


def is_view_op(func: Any) -> bool:
    packet = getattr(func, "overloadpacket", None)
    return packet is not None and packet.__name__ in VIEW_OPS


class _WholeFunctions(TorchFunctionMode):
    """Sees `WHOLE_FUNCTIONS` at the Python level (before autograd decomposes them): counts one operation and
    runs the function with the counter suspended."""

    def __init__(self, counter: OpCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = WHOLE_FUNCTIONS.get(func)
        if name is None or self.counter.suspended:
            return func(*args, **kwargs)
        self.counter.counts[name] += 1
        self.counter.suspended += 1
        try:
            return func(*args, **kwargs)
        finally:
            self.counter.suspended -= 1


class OpCounter(TorchDispatchMode):
    """Counts the non-view aten operations run inside it (`counts`), and the bytes their outputs allocate.

    `bytes_out` sums the outputs of operations that create new tensors (not in-place ones, whose name ends in
    `_`, and not `out=` variants): what a step materialises on top of its preallocated state.
    `WHOLE_FUNCTIONS` (attention) count as one operation each, whatever they run inside.
    """

    def __init__(self, include_views: bool = False) -> None:
        super().__init__()
        self.include_views = include_views
        self.counts: Counter[str] = Counter()
        self.bytes_out = 0
        self.suspended = 0
        self._depth = 0
        self._functions: _WholeFunctions | None = None

    def __enter__(self):
        if self._depth == 0:  # re-entered (without a second function mode) while decomposing
            self._functions = _WholeFunctions(self)
            self._functions.__enter__()
        self._depth += 1
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._depth -= 1
            if self._depth == 0 and self._functions is not None:
                self._functions.__exit__(*exc)
                self._functions = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.suspended:
            return func(*args, **kwargs)
        out = _decompose(self, func, args, kwargs)
        if out is not NotImplemented:
            return out
        out = func(*args, **kwargs)
        if self.include_views or not is_view_op(func):
            self.counts[op_name(func)] += 1
            name = func.overloadpacket.__name__
            if not is_view_op(func) and not name.endswith("_") and "out" not in kwargs:
                flat, _ = tree_flatten(out)
                self.bytes_out += sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))
        return out


def count_ops(fn: Callable[[], Any], include_views: bool = False) -> Counter[str]:
    """Run `fn()` once and return how many times each non-view aten operation ran (views too if asked)."""
    with OpCounter(include_views=include_views) as counter:
        fn()
    return counter.counts


class HostSyncError(RuntimeError):
    """An operation that makes the host wait for the device ran where none is allowed (a bug, not bad input)."""


class NoHostSync(TorchDispatchMode):
    """Raises `HostSyncError` on any host synchronisation inside it.

    Caught: reading a value back (`aten._local_scalar_dense`, i.e. `.item()`, `int(t)`, `bool(t)`, `.tolist()`;
    `aten.item`, `aten.equal`), copies whose destination is the CPU while the source is not (`.cpu()`,
    `.to("cpu")`, `cpu_tensor.copy_(device_tensor)`), and, unless `allow_dynamic_shapes`, operations whose
    output shape depends on the data (`nonzero`, `masked_select`, `unique`, indexing with a boolean mask, ...). Run it on the meta device
    (or CUDA) to check a step: on the CPU, every tensor is already on the host and copies are not syncs.
    """

    def __init__(self, allow_dynamic_shapes: bool = False) -> None:
        super().__init__()
        self.allow_dynamic_shapes = allow_dynamic_shapes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = _decompose(self, func, args, kwargs)
        if out is not NotImplemented:
            return out
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            raise HostSyncError(f"host synchronisation: {func} reads a tensor value back to the host")
        if name in DYNAMIC_SHAPE_OPS and not self.allow_dynamic_shapes:
            raise HostSyncError(f"host synchronisation: {func} has a data-dependent output shape")
        if name in ("index", "index_put", "index_put_") and not self.allow_dynamic_shapes:
            flat, _ = tree_flatten(args[1])
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in flat):
                raise HostSyncError(f"host synchronisation: {func} with a boolean mask has a data-dependent shape")
        if name == "_to_copy":
            src, device = args[0], kwargs.get("device")
            if device is not None and torch.device(device).type == "cpu" and src.device.type != "cpu":
                raise HostSyncError(f"host synchronisation: {func} copies a {src.device.type} tensor to the cpu")
        if name in ("copy_", "copy"):
            dst, src = args[0], args[1]
            if isinstance(src, torch.Tensor) and dst.device.type == "cpu" and src.device.type != "cpu":
                raise HostSyncError(f"host synchronisation: {func} copies a {src.device.type} tensor to the cpu")
        return func(*args, **kwargs)
