"""Causal 1-d convolutions and transposed convolutions that stream with an explicit state.

Streaming equals running on the whole signal: a conv keeps the last `(kernel - 1) * dilation + 1 - stride`
input samples of each row (`ConvState.previous`: zeros at the start, or the first sample repeated for
`pad_mode="replicate"`), a transposed conv keeps the `kernel - stride` output samples that the next input
still adds to (`ConvTrState.partial`, without the bias).

Streaming updates the state in place (the tensors keep their storage): a step is `cat([previous, x])`, the
conv, and `previous.copy_(tail)`; a transposed conv's step is its product, one overlap-add and
`partial.copy_(tail)`.

Speed note (CPU, streaming): an 80 ms frame is only 1-2 time steps in the deep layers, where the cost is
reading the weights. There we run the conv as one matrix product `W @ cols.T` with `cols` (tokens, in) laid
out row-major: on the CPU that is 2-4x faster than `F.conv1d` (oneDNN) for a handful of tokens (see
`small_matmul`). Long inputs, and every input on other devices (CUDA, meta), go through `F.conv1d`.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from .state import FRESH, StreamState, allocating

# Up to this many output tokens, a conv or linear layer on the CPU is one `W @ x.T` product (see `small_matmul`).
SMALL_GEMM_TOKENS = 16


def _small_gemm(x: torch.Tensor, tokens: int) -> bool:
    return x.device.type == "cpu" and tokens <= SMALL_GEMM_TOKENS


def small_matmul(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`weight (O, I)` applied to `rows (N, I)`: returns `(O, N)`, possibly as a transposed view.

    For few rows on the CPU, `weight @ rows.T` with `rows` contiguous is the fastest sgemm layout; otherwise
    (many rows, or another device) `F.linear` is as good and the result is the transposed view of `(N, O)`.
    """
    if _small_gemm(rows, rows.shape[0]):
        return weight @ rows.contiguous().t()
    return F.linear(rows, weight).t()


def linear_rows(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(rows, weight)` without bias, `(N, I) -> (N, O)`, with the fast small-N layout on the CPU
    (then a transposed view; contiguous elsewhere)."""
    return small_matmul(weight, rows).t()


@dataclasses.dataclass
class ConvState(StreamState):
    previous: torch.Tensor  # (B, C_in, context): input samples the next step still needs
    first: torch.Tensor = dataclasses.field(metadata={FRESH: True})  # (B,) bool: no input seen yet (replicate padding)


@dataclasses.dataclass
class ConvTrState(StreamState):
    partial: torch.Tensor  # (B, C_out, kernel - stride): overlap still to be added to the next output


def _init_like_torch(weight: torch.Tensor, bias: torch.Tensor | None, fan_in: int) -> None:
    # Same distribution as nn.Conv1d / nn.ConvTranspose1d, so random models look like the reference's.
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)


class CausalConv1d(nn.Module):
    """Causal conv: output t sees inputs up to t*stride + stride - 1. Weight (C_out, C_in, kernel)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        bias: bool = True,
        pad_mode: str = "constant",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if pad_mode not in ("constant", "replicate"):
            raise ValueError(f"pad_mode must be 'constant' or 'replicate', got {pad_mode!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
        self.pad_mode = pad_mode
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        if self.weight.device.type != "meta":
            _init_like_torch(self.weight, self.bias, in_channels * kernel_size)

    @property
    def context(self) -> int:
        """Input samples carried from one step to the next."""
        return (self.kernel_size - 1) * self.dilation + 1 - self.stride

    def init_state(self, batch_size: int) -> ConvState:
        w = self.weight
        with allocating():
            previous = torch.zeros(batch_size, self.in_channels, self.context, device=w.device, dtype=w.dtype)
            return ConvState(previous, torch.ones(batch_size, dtype=torch.bool, device=w.device))

    def forward(self, x: torch.Tensor, state: ConvState | None = None) -> torch.Tensor:
        """x: (B, C_in, T) with T a multiple of the stride -> (B, C_out, T // stride).

        Without a state the input starts from silence (a fresh stream); with one, the state is updated.
        """
        B, C, T = x.shape
        if T % self.stride != 0:
            raise ValueError(f"conv input length {T} must be a multiple of the stride {self.stride}")
        ctx = self.context
        if ctx > 0:
            if state is None:
                if self.pad_mode == "replicate":
                    x = torch.cat([x[..., :1].expand(B, C, ctx), x], dim=-1)
                else:
                    x = F.pad(x, (ctx, 0))
            else:
                previous = state.previous
                if self.pad_mode == "replicate":
                    # A row's first input fills the left context with its first sample.
                    torch.where(state.first.view(B, 1, 1), x[..., :1], previous, out=previous)
                    state.first.fill_(False)
                x = torch.cat([previous, x], dim=-1)
                previous.copy_(x[..., -ctx:])
        return self._conv(x)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T = x.shape
        K, S, D = self.kernel_size, self.stride, self.dilation
        t_out = (T - D * (K - 1) - 1) // S + 1
        if not _small_gemm(x, B * t_out):
            return F.conv1d(x, self.weight, self.bias, stride=S, dilation=D)
        x = x.contiguous()
        # im2col: cols[b, t, c, k] = x[b, c, t*S + k*D], one row per output step.
        cols = x.as_strided((B, t_out, C, K), (C * T, S, T, D)).reshape(B * t_out, C * K)
        w = self.weight.view(self.out_channels, C * K)
        if self.bias is not None:
            y = torch.addmm(self.bias[:, None], w, cols.t())  # (C_out, B*t_out)
        else:
            y = w @ cols.t()
        return y.view(self.out_channels, B, t_out).transpose(0, 1)


def overlap_add(z: torch.Tensor, stride: int, state: ConvTrState | None, bias: torch.Tensor | None) -> torch.Tensor:
    """Sum the kernel-long contributions z (B, C, T, K) of T input steps, `stride` apart -> (B, C, T*stride).

    The last kernel - stride samples are not final yet: they go to `state.partial` (dropped without state,
    which is the causal trim of the reference).
    """
    B, C, T, K = z.shape
    S = stride
    if state is not None and K == 2 * S:
        # Streaming, kernel = 2 * stride (all of Mimi's): output block t = piece 0 of step t + piece 1 of step
        # t - 1, where step -1 is what the previous call left in `partial`.
        later = torch.cat([state.partial.view(B, C, 1, S), z[..., S:]], dim=2)  # (B, C, T + 1, S)
        out = torch.add(later[:, :, :T], z[..., :S])  # laid out like `later`: contiguous
        if bias is not None:
            out.add_(bias.view(1, C, 1, 1))
        state.partial.copy_(later[:, :, T].view(B, C, S))  # no bias: it is added when the samples are output
        return out.reshape(B, C, T * S)  # a view: `out` is contiguous
    pieces = -(-K // S)
    if pieces * S != K:
        z = F.pad(z, (0, pieces * S - K))
    # full[b, c, t, s] = sample t*S + s; piece j of input step t lands on block t + j.
    full = z.new_empty(B, C, T + pieces - 1, S)
    if bias is not None:  # blocks < T are the output: they get the bias, once, from piece 0
        torch.add(z[..., :S], bias.view(1, C, 1, 1), out=full[:, :, :T])
    else:
        full[:, :, :T] = z[..., :S]
    full[:, :, T:] = 0
    for j in range(1, pieces):
        full[:, :, j : j + T] += z[..., j * S : (j + 1) * S]
    full = full.view(B, C, (T + pieces - 1) * S)
    overlap = K - S
    if state is not None and overlap > 0:
        full[..., :overlap] += state.partial
        state.partial.copy_(full[..., T * S : T * S + overlap])
    return full[..., : T * S]


class CausalConvTranspose1d(nn.Module):
    """Causal transposed conv (upsampling by `stride`), trimmed on the right.

    The weight is stored as (C_out, kernel, C_in), a transposed copy of torch's (C_in, C_out, kernel), so that
    the whole layer is one `W @ x.T` product followed by an overlap-add (`keys.py` converts the layout).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = kernel_size, stride
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, kernel_size, in_channels, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        if self.weight.device.type != "meta":
            # torch's init for (C_in, C_out, K) weights: fan_in is computed from dim 1, i.e. C_out * K.
            torch_layout = torch.empty(in_channels, out_channels, kernel_size)
            _init_like_torch(torch_layout, self.bias, out_channels * kernel_size)
            with torch.no_grad():
                self.weight.copy_(torch_layout.permute(1, 2, 0))

    def init_state(self, batch_size: int) -> ConvTrState:
        w = self.weight
        overlap = self.kernel_size - self.stride
        with allocating():
            return ConvTrState(torch.zeros(batch_size, self.out_channels, overlap, device=w.device, dtype=w.dtype))

    def forward(self, x: torch.Tensor, state: ConvTrState | None = None) -> torch.Tensor:
        """x: (B, C_in, T) -> (B, C_out, T * stride)."""
        B, C, T = x.shape
        rows = x.transpose(1, 2).reshape(B * T, C)
        w = self.weight.view(self.out_channels * self.kernel_size, C)
        z = small_matmul(w, rows).view(self.out_channels, self.kernel_size, B, T)
        return overlap_add(z.permute(2, 0, 3, 1), self.stride, state, self.bias)


class DepthwiseConvTranspose1d(nn.Module):
    """Per-channel causal transposed conv without bias (Mimi's learnt 12.5 -> 25 Hz upsampling).

    Weight (C, 1, kernel) as in torch (`groups = C`).
    """

    def __init__(self, channels: int, kernel_size: int, stride: int, device=None, dtype=None) -> None:
        super().__init__()
        self.channels, self.kernel_size, self.stride = channels, kernel_size, stride
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size, device=device, dtype=dtype))
        if self.weight.device.type != "meta":
            _init_like_torch(self.weight, None, kernel_size)

    def init_state(self, batch_size: int) -> ConvTrState:
        w = self.weight
        overlap = self.kernel_size - self.stride
        with allocating():
            return ConvTrState(torch.zeros(batch_size, self.channels, overlap, device=w.device, dtype=w.dtype))

    def forward(self, x: torch.Tensor, state: ConvTrState | None = None) -> torch.Tensor:
        """x: (B, C, T) -> (B, C, T * stride)."""
        z = x.unsqueeze(-1) * self.weight.view(1, self.channels, 1, self.kernel_size)  # (B, C, T, K)
        return overlap_add(z, self.stride, state, None)
