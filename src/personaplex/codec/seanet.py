"""Mimi's causal SEANet encoder (waveform -> 25 Hz latent) and decoder (latent -> waveform).

Encoder: conv(k7) -> per ratio (4, 5, 6, 8): residual units, ELU, strided conv doubling the channels ->
ELU, conv(k3) to `dimension`. Decoder mirrors it with transposed convs (ratios 8, 6, 5, 4) and ends with
ELU, conv(k3) to the audio channels. A residual unit is x + conv_k1(ELU(conv_k3(ELU(x)))) with half the
channels inside (compress 2) and an identity skip. All convs are causal with zero left padding.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .conv import CausalConv1d, CausalConvTranspose1d, ConvState, ConvTrState
from .state import StreamState

if TYPE_CHECKING:
    from .mimi import MimiConfig


@dataclasses.dataclass
class SeanetEncoderState(StreamState):
    convs: list[ConvState]  # one per conv with left context, in execution order


@dataclasses.dataclass
class SeanetDecoderState(StreamState):
    convs: list[ConvState]  # one per conv with left context, in execution order
    upsamples: list[ConvTrState]  # one per transposed conv, in execution order


class ResidualUnit(nn.Module):
    def __init__(self, dim: int, hidden: int, kernel_size: int, dilation: int, device=None, dtype=None) -> None:
        super().__init__()
        self.conv1 = CausalConv1d(dim, hidden, kernel_size, dilation=dilation, device=device, dtype=dtype)
        self.conv2 = CausalConv1d(hidden, dim, 1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, states: list[ConvState | None]) -> torch.Tensor:
        h = self.conv1(F.elu(x), states[0])
        return x + self.conv2(F.elu(h), states[1])


class EncoderStage(nn.Module):
    def __init__(self, channels: int, ratio: int, config: MimiConfig, device=None, dtype=None) -> None:
        super().__init__()
        hidden = channels // config.compress
        self.residuals = nn.ModuleList(
            ResidualUnit(channels, hidden, config.residual_kernel_size, config.dilation_base**j, device, dtype)
            for j in range(config.n_residual_layers)
        )
        self.downsample = CausalConv1d(channels, 2 * channels, 2 * ratio, stride=ratio, device=device, dtype=dtype)


class DecoderStage(nn.Module):
    def __init__(self, channels: int, ratio: int, config: MimiConfig, device=None, dtype=None) -> None:
        super().__init__()
        out = channels // 2
        self.upsample = CausalConvTranspose1d(channels, out, 2 * ratio, ratio, device=device, dtype=dtype)
        self.residuals = nn.ModuleList(
            ResidualUnit(
                out, out // config.compress, config.residual_kernel_size, config.dilation_base**j, device, dtype
            )
            for j in range(config.n_residual_layers)
        )


def _conv_modules(module: nn.Module) -> list[CausalConv1d]:
    return [m for m in module.modules() if isinstance(m, CausalConv1d)]


class SeanetEncoder(nn.Module):
    def __init__(self, config: MimiConfig, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        c = config.n_filters
        self.input_conv = CausalConv1d(config.channels, c, config.kernel_size, **factory)
        stages = []
        for ratio in reversed(config.ratios):
            stages.append(EncoderStage(c, ratio, config, **factory))
            c *= 2
        self.stages = nn.ModuleList(stages)
        self.output_conv = CausalConv1d(c, config.dimension, config.last_kernel_size, **factory)
        # Execution order of the convs; the state keeps one buffer for each conv that has left context.
        self._order = [self.input_conv]
        for stage in self.stages:
            for unit in stage.residuals:
                self._order += [unit.conv1, unit.conv2]
            self._order.append(stage.downsample)
        self._order.append(self.output_conv)

    def init_state(self, batch_size: int) -> SeanetEncoderState:
        return SeanetEncoderState([conv.init_state(batch_size) for conv in self._order if conv.context > 0])

    def _states(self, state: SeanetEncoderState | None) -> list[ConvState | None]:
        if state is None:
            return [None] * len(self._order)
        it = iter(state.convs)
        return [next(it) if conv.context > 0 else None for conv in self._order]

    def forward(self, x: torch.Tensor, state: SeanetEncoderState | None = None) -> torch.Tensor:
        """x: (B, C, T) audio -> (B, dimension, T // hop)."""
        states = self._states(state)
        i = 0
        x = self.input_conv(x, states[i])
        i += 1
        for stage in self.stages:
            for unit in stage.residuals:
                x = unit(x, states[i : i + 2])
                i += 2
            x = stage.downsample(F.elu(x), states[i])
            i += 1
        return self.output_conv(F.elu(x), states[i])


class SeanetDecoder(nn.Module):
    def __init__(self, config: MimiConfig, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        c = config.n_filters * 2 ** len(config.ratios)
        self.input_conv = CausalConv1d(config.dimension, c, config.kernel_size, **factory)
        stages = []
        for ratio in config.ratios:
            stages.append(DecoderStage(c, ratio, config, **factory))
            c //= 2
        self.stages = nn.ModuleList(stages)
        self.output_conv = CausalConv1d(c, config.channels, config.last_kernel_size, **factory)
        self._order = [self.input_conv]
        for stage in self.stages:
            for unit in stage.residuals:
                self._order += [unit.conv1, unit.conv2]
        self._order.append(self.output_conv)

    def init_state(self, batch_size: int) -> SeanetDecoderState:
        return SeanetDecoderState(
            [conv.init_state(batch_size) for conv in self._order if conv.context > 0],
            [stage.upsample.init_state(batch_size) for stage in self.stages],
        )

    def forward(self, x: torch.Tensor, state: SeanetDecoderState | None = None) -> torch.Tensor:
        """x: (B, dimension, T) latent -> (B, C, T * hop) audio."""
        if state is None:
            states: list[ConvState | None] = [None] * len(self._order)
            ups: list[ConvTrState | None] = [None] * len(self.stages)
        else:
            it = iter(state.convs)
            states = [next(it) if conv.context > 0 else None for conv in self._order]
            ups = list(state.upsamples)
        i = 0
        x = self.input_conv(x, states[i])
        i += 1
        for stage, up_state in zip(self.stages, ups):
            x = stage.upsample(F.elu(x), up_state)
            for unit in stage.residuals:
                x = unit(x, states[i : i + 2])
                i += 2
        return self.output_conv(F.elu(x), states[i])
