"""Load and save models in the released checkpoint layout.

Models are built on the meta device and filled tensor by tensor from the safetensors file (cast to the
chosen dtype on the chosen device), so a 7B load never holds two copies. Before any data is read, the file's
header is checked against the model: a corrupt file, a missing tensor or a misshaped one raises a
`CheckpointError` that names the file and the first offending tensor. Key renames live in `adapter.py`.

The LM is read one tensor at a time with plain file reads (no memory map, whose touched pages would count
as the process's memory until the file is closed), each tensor cast, quantised (`quantize="int8"`, see
`quantize.py`) or placed in host memory for offload (`offload=True`, see `offload.py`) before the next is
read: a load holds the model as loaded plus one tensor of the file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .adapter import lm_from_released, lm_to_released, mimi_from_released, mimi_to_released
from .config import LMConfig, resolve_config
from .errors import CheckpointError, DeviceError
from .hub import CONFIG_FILE, LM_FILE, CheckpointFiles, resolve_checkpoint
from .lm import LMModel
from .quantize import check_quantize, quantize_weight, quantized_module_names

Rename = Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """`device` (default: cuda when available, else cpu), checked to exist on this machine (`DeviceError`)."""
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {str(device)!r}: use cpu, cuda or cuda:N") from None
    if resolved.type in ("cpu", "meta"):  # meta: shapes only (tests, tools)
        return resolved
    if resolved.type == "mps" and torch.backends.mps.is_available():
        return resolved
    if resolved.type != "cuda":
        raise DeviceError(f"device {str(device)!r} is not available here: use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no GPU found"
        raise DeviceError(f"CUDA is not available on this machine (torch {torch.__version__}, {build}); "
                          "use --device cpu")
    if resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise DeviceError(f"there is no {resolved} on this machine ({torch.cuda.device_count()} GPU(s)): "
                          f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return resolved


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU (bf16 matmuls are slow and inexact on most CPUs)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


# -- generic safetensors <-> module --------------------------------------------------------------------------
def _header(path: Path) -> dict[str, tuple[int, ...]]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated or garbled files
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def _normalised_shapes(shapes: Mapping[str, tuple[int, ...]], to_ours: Rename, to_released: Rename
                       ) -> dict[str, tuple[int, ...]]:
    """Map a file's (name -> shape) through the adapter both ways on the meta device, so that every accepted
    spelling of the names compares equal to what `save` writes."""
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    return {k: tuple(v.shape) for k, v in to_released(to_ours(meta)).items()}


def _check_layout(path: Path, model: nn.Module, to_ours: Rename, to_released: Rename) -> None:
    try:
        found = _normalised_shapes(_header(path), to_ours, to_released)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    expected = {k: tuple(v.shape) for k, v in to_released(model.state_dict()).items()}
    for key, shape in expected.items():
        if key not in found:
            raise CheckpointError(f"{path}: missing tensor {key!r} (expected shape {list(shape)}); "
                                  f"the file has {len(found)} of {len(expected)} tensors - wrong model or config?")
        if found[key] != shape:
            raise CheckpointError(f"{path}: tensor {key!r} has shape {list(found[key])}, the model expects "
                                  f"{list(shape)} - wrong model or config?")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor {extra[0]!r} ({len(extra)} extra) - wrong model or config?")


def load_into(model: nn.Module, path: Path, to_ours: Rename, to_released: Rename,
              device: torch.device, dtype: torch.dtype | None) -> nn.Module:
    """Fill a meta-device `model` from a released-layout safetensors file (floating tensors cast to dtype)."""
    path = Path(path)
    _check_layout(path, model, to_ours, to_released)
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                state[key] = t.to(device)
    except Exception as exc:
        raise CheckpointError(f"{path}: could not read tensor data ({exc}); the file may be truncated") from exc
    model.load_state_dict(to_ours(state), strict=True, assign=True)
    return model


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    stop: int


def _entries(path: Path) -> dict[str, _Entry]:
    """The tensors of a safetensors file and where their bytes lie (the header is already validated)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        start, stop = info["data_offsets"]
        out[key] = _Entry(_SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + size + start, 8 + size + stop)
    return out


def _read(f, entry: _Entry, staging: torch.Tensor) -> torch.Tensor:
    """One tensor's bytes read into the front of `staging` (reused for every tensor, so that freed read
    buffers never pile up in the allocator); the result is a view of it, valid until the next read."""
    buffer = staging[:entry.stop - entry.start]
    f.seek(entry.start)
    if f.readinto(buffer.numpy()) != buffer.numel():
        raise EOFError("the file ends inside this tensor")
    return buffer.view(entry.dtype).view(entry.shape)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor, quantised: bool) -> None:
    prefix, _, leaf = name.rpartition(".")
    module = model.get_submodule(prefix)
    if leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        grad = module._parameters[leaf].requires_grad and not quantised and value.is_floating_point()
        module._parameters[leaf] = nn.Parameter(value, requires_grad=grad)


def load_streaming(model: nn.Module, path: Path, to_ours: Rename, to_released: Rename, device: torch.device,
                   dtype: torch.dtype | None, quantize: str = "none",
                   host: Callable[[str], bool] | None = None) -> nn.Module:
    """Fill a meta-device `model` one file tensor at a time: floating tensors cast to `dtype`, linear weights
    quantised when `quantize` is "int8" or "fp8", and the tensors for which `host(name)` is true kept in CPU
    memory (offloaded layers) instead of on `device`. `to_ours` must map each released tensor on its own."""
    path = Path(path)
    _check_layout(path, model, to_ours, to_released)
    entries = sorted(_entries(path).items(), key=lambda item: item[1].start)
    quantised = {f"{name}.weight" for name in quantized_module_names(model)} if quantize != "none" else set()
    filled: set[str] = set()
    staging = torch.empty(max((e.stop - e.start for _, e in entries), default=0), dtype=torch.uint8)
    try:
        with open(path, "rb") as f:
            for key, entry in entries:
                for name, value in to_ours({key: _read(f, entry, staging)}).items():
                    where = torch.device("cpu") if host is not None and host(name) else device
                    if name in quantised:
                        value = quantize_weight(value, quantize, where, dtype or value.dtype)
                    else:
                        cast = dtype if dtype is not None and value.is_floating_point() else value.dtype
                        value = value.to(device=where, dtype=cast, copy=True)  # out of the staging buffer
                    _set_tensor(model, name, value, name in quantised)
                    filled.add(name)
    except (OSError, EOFError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: could not read tensor data ({exc}); the file may be truncated") from exc
    missing = [n for n, _ in model.named_parameters() if n not in filled]
    if missing:  # the layout check makes this a bug, not bad input
        raise AssertionError(f"{path}: {len(missing)} tensors not filled, first {missing[0]}")
    return model


def save_from(model: nn.Module, path: Path, to_released: Rename, dtype: torch.dtype | None = None,
              metadata: dict[str, str] | None = None) -> Path:
    """Write a module's weights under the released names (optionally cast, e.g. to bf16 as released)."""
    state = {}
    for key, t in to_released(model.state_dict()).items():
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        state[key] = t.contiguous().cpu()
    return write_safetensors(state, path, metadata or {"format": "pt"})


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """Write a safetensors file atomically (a `.partial` renamed into place: never a half-written file under
    the real name) with the usual file mode (0644 under umask 022; safetensors alone creates files 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o666 & ~current_umask())
    tmp.replace(path)
    return path


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (os.umask alone must set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


# -- LM -----------------------------------------------------------------------------------------------------
def load_lm(path: str | Path, config: LMConfig | str | dict | Path | None = None,
            device: torch.device | str | None = None, dtype: torch.dtype | None = None,
            quantize: str | None = None, offload: bool = False, **hub) -> LMModel:
    """Load the LM from a `model.safetensors` file, a checkpoint directory or a hub repo id.

    config: preset name, `LMConfig`, Moshi-style dict, or `config.json` path; by default the checkpoint's
    `config.json` when it has one, else the `personaplex-7b` preset.
    quantize: "none" (default), "int8" or "fp8" weight-only quantisation of the linear layers, applied
    tensor by tensor while loading (`quantize.py`); `dtype` stays the activation (and KV) dtype.
    offload: keep the temporal layers in (pinned) host memory and stream them to `device` ahead of use
    (`offload.py`), for GPUs too small for the weights.
    """
    path = Path(path)
    if path.is_file():
        weights, config_file = path, path.parent / CONFIG_FILE
    else:
        files = resolve_checkpoint(str(path), need=("lm",), **hub)
        weights, config_file = files.lm, files.config
    if config is None and config_file is not None and Path(config_file).is_file():
        config = Path(config_file)
    cfg = resolve_config(config)
    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    quantize = check_quantize(quantize, device)
    with torch.device("meta"):
        model = LMModel(cfg, dtype=dtype)
    host = (lambda name: name.startswith("transformer.layers.")) if offload else None
    load_streaming(model, weights, lm_from_released, lm_to_released, device, dtype, quantize, host)
    model.eval()
    if offload:
        from .offload import offload_temporal

        offload_temporal(model, device)
    return model


def save_lm(model: LMModel, directory: str | Path, dtype: torch.dtype | None = torch.bfloat16) -> Path:
    """Write `model.safetensors` (released names, bf16 by default) and a Moshi-style `config.json`."""
    from .quantize import precision

    if "weights" in precision(model):
        raise CheckpointError("a quantised model cannot be saved in the released layout; load the checkpoint "
                              "without --quantize to export it")
    directory = Path(directory)
    path = save_from(model, directory / LM_FILE, lm_to_released, dtype)
    (directory / CONFIG_FILE).write_text(json.dumps(model.config.to_moshi_dict(), indent=2) + "\n")
    return path


def write_random_lm(directory: str | Path, config: LMConfig | str, seed: int = 0,
                    dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write `model.safetensors` + `config.json` of a randomly initialised LM in the released layout, one
    tensor at a time (a 7B file without ever holding the model: benchmarks and memory tests). Matrices are
    N(0, 1/fan_in), norms 1; tensor k of the file is drawn from seed + k."""
    cfg = resolve_config(config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in lm_to_released(LMModel(cfg).state_dict()).items()}
    names = sorted(shapes)
    code = {v: k for k, v in _SAFETENSORS_DTYPES.items()}[dtype]
    element = torch.empty(0, dtype=dtype).element_size()
    header, offset = {}, 0
    for key in names:
        size = math.prod(shapes[key]) * element
        header[key] = {"dtype": code, "shape": list(shapes[key]), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = directory / LM_FILE
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for k, key in enumerate(names):
            shape = shapes[key]
            if key.endswith("alpha"):
                t = torch.ones(shape, dtype=dtype)
            else:
                g = torch.Generator().manual_seed(seed + k)
                t = (torch.randn(shape, generator=g) / math.sqrt(shape[-1])).to(dtype)
            f.write(t.reshape(-1).view(torch.uint8).numpy())
            del t
    tmp.replace(path)
    (directory / CONFIG_FILE).write_text(json.dumps(cfg.to_moshi_dict(), indent=2) + "\n")
    return path


# -- Mimi ---------------------------------------------------------------------------------------------------
def load_mimi(path: str | Path, device: torch.device | str | None = None, num_codebooks: int = 8, **hub):
    """Load the Mimi codec from its safetensors file, a checkpoint directory or a hub repo id (always fp32:
    the codec is small and its quantizer distances are precision-sensitive)."""
    from .codec import Mimi, MimiConfig

    path = Path(path)
    weights = path if path.is_file() else resolve_checkpoint(str(path), need=("mimi",), **hub).mimi
    device = resolve_device(device)
    with torch.device("meta"):
        mimi = Mimi(MimiConfig(num_codebooks=num_codebooks))
    load_into(mimi, weights, mimi_from_released, mimi_to_released, device, torch.float32)
    return mimi.eval()


def save_mimi(mimi: nn.Module, path: str | Path) -> Path:
    return save_from(mimi, Path(path), mimi_to_released, torch.float32)


# -- whole checkpoint ---------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    lm: LMModel
    mimi: nn.Module
    tokenizer: "TextTokenizer"  # noqa: F821
    files: CheckpointFiles

    @property
    def config(self) -> LMConfig:
        return self.lm.config


def load_checkpoint(source: str | Path, config: LMConfig | str | dict | Path | None = None,
                    device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                    quantize: str | None = None, offload: bool = False, **hub) -> Checkpoint:
    """LM, Mimi and text tokenizer of a checkpoint directory or hub repo id (`nvidia/personaplex-7b-v1`).
    `quantize` and `offload` apply to the LM (see `load_lm`); Mimi stays fp32."""
    from .text import TextTokenizer

    check_quantize(quantize, resolve_device(device))  # before any download
    files = resolve_checkpoint(str(source), need=("lm", "mimi", "tokenizer"), **hub)
    if config is None and files.config is not None:
        config = Path(files.config)
    lm = load_lm(files.lm, config=resolve_config(config), device=device, dtype=dtype, quantize=quantize,
                 offload=offload)
    mimi = load_mimi(files.mimi, device=lm.device, num_codebooks=lm.config.audio_codebooks)
    tokenizer = TextTokenizer(files.tokenizer)
    return Checkpoint(lm, mimi, tokenizer, files)
