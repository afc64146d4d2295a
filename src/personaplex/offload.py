"""Offload: the temporal transformer's layers live in host memory and are streamed to the GPU ahead of use.

For GPUs too small even for the int8 weights. `offload_temporal(lm, device)` keeps every temporal block's
weights in (pinned) host memory; before block i runs, its weights are on the device (copied on a side stream
while block i-1 computes), and after it ran they are dropped again, so at most two blocks' weights are on
the device at any time: the one computing and the one being copied. The last block prefetches the first for
the next frame. Everything else (embeddings, heads, depformer, KV cache) stays on the device.

Applied from outside the model: a forward pre-hook and hook per block (chunked prefill and teacher forcing go
through `Block.forward`) and the same around `Block.step` (the single-frame step calls it directly). Without
CUDA (tests) pinning is skipped and the copy is a plain host copy, so the same path runs on CPU. The copies
and swaps happen in Python around each block, so an offloaded model runs eagerly: no CUDA graphs.

Cost: every frame streams all temporal weights once over PCIe (shared by all conversations of the batch):
13.2 GB per frame in bf16, 6.6 GB in int8 for the 7B (`streamed_bytes`), i.e. ~0.26-0.53 s per frame at
25 GB/s, far from real time (80 ms): offload is for trying the model on a small GPU, not for serving.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from .quantize import _storage


@dataclass
class _Slot:
    """One block's weights: where each lives in the module, its host copy, and its device copy when fetched."""

    params: list[tuple[nn.Module, str, nn.Parameter]]  # (owner module, attribute, host parameter)
    device: list[nn.Parameter] | None = None
    ready: torch.cuda.Event | None = None


@dataclass
class LayerStreamer:
    """The offload state of a stack of blocks (see the module docstring)."""

    device: torch.device
    slots: list[_Slot]
    stream: torch.cuda.Stream | None = None
    max_resident: int = 0  # the most blocks that were on the device at once (tests and `info` read it)
    fetches: int = 0
    _active: set[int] = field(default_factory=set)

    @property
    def resident(self) -> int:
        return sum(slot.device is not None for slot in self.slots)

    def streamed_bytes(self) -> int:
        """Bytes copied to the device per full pass over the blocks (one frame, or one prefill chunk)."""
        return sum(leaf.numel() * leaf.element_size() for slot in self.slots for _, _, p in slot.params
                   for leaf in _storage(p))

    # -- copies -------------------------------------------------------------------------------------------
    def fetch(self, i: int) -> None:
        """Start copying block i's weights to the device (no-op when they are there or on the way)."""
        slot = self.slots[i]
        if slot.device is not None:
            return
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                slot.device = [_param(p.to(self.device, non_blocking=True)) for _, _, p in slot.params]
                slot.ready = torch.cuda.Event()
                slot.ready.record(self.stream)
        else:
            slot.device = [_param(p.to(self.device, copy=True)) for _, _, p in slot.params]
        self.fetches += 1
        self.max_resident = max(self.max_resident, self.resident)

    def enter(self, i: int) -> None:
        """Block i is about to run: its weights in place on the device, the next block's copy started."""
        slot = self.slots[i]
        if self.stream is not None and torch.cuda.is_current_stream_capturing():
            # A captured graph would replay with device copies that no longer exist.
            raise RuntimeError("offloaded layers cannot run inside a CUDA graph: build the engine with "
                               "cuda_graphs=False (--no-cuda-graphs)")
        self.fetch(i)
        if slot.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(slot.ready)
            for p in slot.device:  # memory allocated on the side stream, used on this one
                for leaf in _storage(p):
                    leaf.record_stream(current)
            slot.ready = None
        for (owner, name, _), p in zip(slot.params, slot.device):
            owner._parameters[name] = p
        self._active.add(i)
        self.fetch((i + 1) % len(self.slots))

    def leave(self, i: int) -> None:
        """Block i has run: the module points at the host copy again and the device copy is dropped."""
        slot = self.slots[i]
        for owner, name, host in slot.params:
            owner._parameters[name] = host
        slot.device = None
        self._active.discard(i)


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def offload_layers(layers: nn.ModuleList, device: torch.device | str) -> LayerStreamer:
    """Keep `layers`' weights in host memory and stream each block to `device` around its forward / step."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    slots = []
    for block in layers:
        params = []
        for module in block.modules():
            for name, p in list(module._parameters.items()):
                if p is None:
                    continue
                host = p.detach().to("cpu")
                if cuda:
                    host = host.pin_memory()  # page-locked, so the copy can run asynchronously
                module._parameters[name] = host = _param(host)
                params.append((module, name, host))
        slots.append(_Slot(params))
    streamer = LayerStreamer(device, slots, torch.cuda.Stream(device) if cuda else None)
    for i, block in enumerate(layers):
        block.register_forward_pre_hook(lambda _m, _a, i=i: streamer.enter(i))
        block.register_forward_hook(lambda _m, _a, _o, i=i: streamer.leave(i), always_call=True)
        if hasattr(block, "step"):
            block.step = functools.partial(_stepped, streamer, i, block.step)
    return streamer


def _stepped(streamer: LayerStreamer, i: int, step, *args, **kwargs):
    streamer.enter(i)
    try:
        return step(*args, **kwargs)
    finally:
        streamer.leave(i)


def offload_temporal(lm: nn.Module, device: torch.device | str) -> LayerStreamer:
    """Offload the temporal transformer's blocks of an LM; the streamer is kept as `lm.transformer.offload`
    (so `personaplex info` can report it) and returned."""
    streamer = offload_layers(lm.transformer.layers, device)
    lm.transformer.offload = streamer
    return streamer


def offload_of(lm: nn.Module) -> LayerStreamer | None:
    return getattr(lm.transformer, "offload", None)
