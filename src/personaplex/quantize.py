"""Weight-only quantisation of the LM's linear layers (torchao), applied tensor by tensor while loading.

`--quantize int8` stores every linear weight of the LM as int8 with one fp32 scale per output row (torchao's
`Int8Tensor`, the layout of its `Int8WeightOnlyConfig`): the temporal transformer's projections, the text
head, `depformer_in`, the depformer's per-step projections and its heads (`linears`). Embeddings and norms
keep the load dtype, and so do activations and the KV cache. A weight is quantised in blocks of rows as it is
read (`quantize_weight`), so a load never holds more than one tensor of the file at full precision plus one
block's temporaries. `--quantize fp8` uses torchao's float8 weight-only layout (e4m3, per-row scales), on GPUs
of compute capability 8.9 or newer.

The weights of a quantised model are torchao tensor subclasses; `precision` and `weight_bytes` read them, so
`personaplex info` and `/api/info` describe what is loaded, not a flag.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from typing import Iterator

import torch
from torch import nn

from .errors import PersonaplexError

QUANTIZE_MODES = ("none", "int8", "fp8")
_BLOCK_ELEMENTS = 1 << 20  # rows quantised together: at most 1 M elements (4 MB in fp32) at a time


class QuantizeError(PersonaplexError):
    """A quantisation mode that cannot run here (unknown mode, torchao missing, fp8 without a capable GPU)."""


@contextlib.contextmanager
def _quiet_import() -> Iterator[None]:
    # torchao logs a warning per optional CUDA extension it cannot load (always, on a CPU build of torch).
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _torchao():
    try:
        with _quiet_import():
            import torchao.quantization as tq
    except ImportError as exc:
        raise QuantizeError(f"--quantize needs torchao ({exc}); install it with: pip install -e \".[quant]\"") \
            from exc
    return tq


def check_quantize(mode: str | None, device: torch.device | str) -> str:
    """Validate a quantisation mode for a device before anything is loaded; returns the mode ("none" for None)."""
    mode = mode or "none"
    if mode not in QUANTIZE_MODES:
        raise QuantizeError(f"unknown quantisation {mode!r}; use one of {', '.join(QUANTIZE_MODES)}")
    if mode == "none":
        return mode
    _torchao()
    device = torch.device(device)
    if mode == "fp8":
        capable = device.type == "cuda" and torch.cuda.is_available() and \
            torch.cuda.get_device_capability(device) >= (8, 9)
        if not capable:
            raise QuantizeError("fp8 needs a GPU with compute capability >= 8.9 (Ada, Hopper or newer); "
                                "use --quantize int8 here")
    return mode


def quantized_module_names(model: nn.Module) -> list[str]:
    """The modules whose `weight` a quantised load stores quantised: every linear layer of the LM (the
    depformer's per-step `StepLinear`s included); embeddings and norms are not linear layers."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is None]


@torch.no_grad()
def quantize_weight(weight: torch.Tensor, mode: str, device: torch.device | str, dtype: torch.dtype) -> nn.Parameter:
    """A (out, in) weight as a frozen quantised parameter on `device`. `dtype` is the activation dtype the
    layer will compute in (the weight is read in blocks of rows, cast to it on the device, quantised)."""
    tq = _torchao()
    device = torch.device(device)
    if weight.ndim != 2:
        raise ValueError(f"only 2-d linear weights are quantised, got shape {list(weight.shape)}")
    if mode == "int8":
        quantised = nn.Parameter(_int8_rows(tq, weight, device, dtype), requires_grad=False)
        _return_freed_memory()
        return quantised
    if mode == "fp8":
        holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        holder.weight = nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=False)
        tq.quantize_(holder, tq.Float8WeightOnlyConfig())
        return holder.weight
    raise QuantizeError(f"unknown quantisation {mode!r}; use one of {', '.join(QUANTIZE_MODES)}")


def _int8_rows(tq, weight: torch.Tensor, device: torch.device, dtype: torch.dtype):
    """torchao's per-row symmetric int8 (`Int8Tensor.from_hp(w, PerRow())`), computed block by block: rows
    are independent, so the result is the same tensor without a full-precision copy of the whole weight."""
    from torchao.quantization.granularity import PerRow

    rows, cols = weight.shape
    qdata = torch.empty(rows, cols, dtype=torch.int8, device=device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=device)
    zero_point = torch.empty(rows, 1, dtype=torch.int8, device=device)
    step = max(1, _BLOCK_ELEMENTS // max(cols, 1))
    block_size = [1, cols]
    for start in range(0, rows, step):
        part = tq.Int8Tensor.from_hp(weight[start:start + step].to(device=device, dtype=dtype), PerRow())
        qdata[start:start + step] = part.qdata
        scale[start:start + step] = part.scale
        zero_point[start:start + step] = part.zero_point
        block_size = list(part.block_size)
    return tq.Int8Tensor(qdata, scale, block_size, dtype, zero_point=zero_point)


def _return_freed_memory() -> None:
    """Give the blocks' freed temporaries back to the OS (glibc keeps freed heap pages that sit between live
    allocations, which would otherwise add up to a few hundred MB over a 7B load). No-op elsewhere."""
    global _TRIM
    if _TRIM is None:
        try:
            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


# -- what is loaded -------------------------------------------------------------------------------------------
def _storage(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding a (possibly subclass) tensor's data."""
    if type(t) in (torch.Tensor, nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return [t]
    names, _ = t.__tensor_flatten__()
    parts = [getattr(t, n) for n in names]
    return [leaf for p in parts if isinstance(p, torch.Tensor) for leaf in _storage(p)]


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers take (quantised weights: int8/fp8 data plus their scales)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(leaf.numel() * leaf.element_size() for t in tensors for leaf in _storage(t))


def weight_format(t: torch.Tensor) -> str:
    """"int8", "fp8" or the dtype's name of one weight."""
    kind = type(t).__name__
    if kind == "Int8Tensor":
        return "int8"
    if kind == "Float8Tensor":
        return "fp8"
    return str(t.dtype).removeprefix("torch.")


def precision(model: nn.Module) -> str:
    """A one-line label: e.g. "int8 weights (torchao weight-only, per-row scales), float32 activations"."""
    linear = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    formats = {weight_format(w) for w in linear}
    activation = str(next(p.dtype for p in model.parameters())).removeprefix("torch.")
    quantised = sorted(formats & {"int8", "fp8"})
    if not quantised:
        return activation
    return f"{'+'.join(quantised)} weights (torchao weight-only, per-row scales), {activation} activations"


def weights_info(model: nn.Module) -> dict:
    """Precision and memory of a loaded LM, as `/api/info` reports it (bytes; `offloaded_bytes` live in host
    memory with `--offload` and stream to the device each frame)."""
    from .offload import offload_of

    total = weight_bytes(model)
    streamer = offload_of(model) if hasattr(model, "transformer") else None
    host = streamer.streamed_bytes() if streamer is not None else 0
    return {"precision": precision(model), "weight_bytes": total, "offloaded_bytes": host}


def memory_summary(model: nn.Module) -> str:
    """One line for `personaplex info`: precision and the memory the weights take."""
    info = weights_info(model)
    line = f"{info['precision']}, {info['weight_bytes'] / 2**30:.2f} GiB"
    if info["offloaded_bytes"]:
        line += f" ({info['offloaded_bytes'] / 2**30:.2f} GiB of temporal layers offloaded to host memory)"
    return line
