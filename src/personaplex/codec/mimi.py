"""Mimi, the 24 kHz neural audio codec of Moshi / PersonaPlex: 80 ms frames <-> 8 (of 32) tokens.

    pcm (B, 1, T) 24 kHz -> SEANet encoder (25 Hz, 512-d) -> transformer -> strided conv (12.5 Hz)
        -> split RVQ -> codes (B, K, T // 1920)
    codes -> RVQ decode -> depthwise transposed conv (25 Hz) -> transformer -> SEANet decoder -> pcm

Whole-signal use: `codes = mimi.encode(pcm)`, `pcm = mimi.decode(codes)`; encode pads the signal with zeros to
a whole number of frames (ceil(T / 1920) frames), like the reference.

Streaming: the model holds weights only; a stream's memory is a `MimiEncoderState` / `MimiDecoderState`
(batch-first, preallocated, updated in place, see `state.py`), held by you:

    stream = mimi.stream(B)                   # or `with mimi.streaming(B) as stream:`
    codes = stream.encode(frame)              # frame (B, 1, 1920 * n) -> (B, K, n)
    audio = stream.decode(codes)              # (B, K, n) -> (B, 1, 1920 * n)
    stream.reset_row(i)                       # row i starts a new stream (also copy_row, load_row, ...)

or with the states themselves: `enc = mimi.init_encoder_state(B)`, `mimi.encode_step(frame, enc)`, and
`mimi.decode_step(codes, dec)`. `mimi.encode` / `mimi.decode` are always whole-signal. Streaming gives the
same codes as whole-signal encoding (the convolutions are exactly chunk-invariant; only the attention window
differs after 10 s, see `transformer.py`).

A step has a fixed shape for a given batch and frame count, writes every state tensor in place (their
storage never changes, so a CUDA graph can be captured over it) and never waits for the device: no value is
read back and no shape depends on data (the range check of codes runs on CPU tensors only). Steps run under
`torch.no_grad()`; inside `torch.inference_mode()` they work too, as the states are never inference tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .conv import CausalConv1d, ConvState, ConvTrState, DepthwiseConvTranspose1d
from .quantizer import SplitResidualVQ
from .seanet import SeanetDecoder, SeanetDecoderState, SeanetEncoder, SeanetEncoderState
from .state import StreamState
from .transformer import MimiTransformer, TransformerState


@dataclass
class MimiConfig:
    """Mimi's hyper-parameters; the defaults are the released model (`tokenizer-e351c8d8-checkpoint125`).

    Fixed by the architecture: ELU, causal convs with zero padding, identity skips, layer norm, GELU, RoPE.
    """

    sample_rate: int = 24_000
    frame_rate: float = 12.5
    channels: int = 1
    # SEANet
    dimension: int = 512
    n_filters: int = 64
    ratios: tuple[int, ...] = (8, 6, 5, 4)  # decoder order; the encoder downsamples by 4, 5, 6, 8
    n_residual_layers: int = 1
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3
    dilation_base: int = 2
    compress: int = 2
    # transformers (same shape on both sides)
    num_heads: int = 8
    num_layers: int = 8
    dim_feedforward: int = 2048
    context: int = 250  # attention window in 25 Hz steps (10 s)
    layer_scale: float = 0.01
    max_period: float = 10_000.0
    norm_eps: float = 1e-5
    # split RVQ
    codebook_dim: int = 256
    codebook_size: int = 2048
    total_codebooks: int = 32
    semantic_codebooks: int = 1
    num_codebooks: int = 8  # codebooks used by encode (PersonaPlex uses 8)
    codebook_eps: float = 1e-5

    @property
    def hop_length(self) -> int:
        """Samples per SEANet latent step (960)."""
        return math.prod(self.ratios)

    @property
    def resample_stride(self) -> int:
        """Latent steps per frame (25 Hz -> 12.5 Hz: 2)."""
        stride = self.sample_rate / self.hop_length / self.frame_rate
        if stride != int(stride) or stride < 1:
            raise ValueError(
                f"encoder rate {self.sample_rate / self.hop_length} Hz is not a multiple of {self.frame_rate}"
            )
        return int(stride)

    @property
    def frame_size(self) -> int:
        """Samples per frame (1920)."""
        return self.hop_length * self.resample_stride

    @classmethod
    def preset(cls, name: str) -> MimiConfig:
        """`mimi`: the released codec. `tiny`: same frame layout, small widths, for tests."""
        if name == "mimi":
            return cls()
        if name == "tiny":
            return cls(
                dimension=32,
                n_filters=4,
                num_heads=2,
                num_layers=2,
                dim_feedforward=64,
                context=6,
                codebook_dim=8,
                codebook_size=64,
                total_codebooks=4,
                num_codebooks=4,
            )
        raise ValueError(f"unknown Mimi preset {name!r}; available: mimi, tiny")

    def to_moshi_dict(self) -> dict[str, Any]:
        """The same model as the reference's `mimi_config` dict (`moshi.models.loaders.get_mimi`)."""
        seanet = dict(
            channels=self.channels,
            dimension=self.dimension,
            causal=True,
            n_filters=self.n_filters,
            n_residual_layers=self.n_residual_layers,
            activation="ELU",
            compress=self.compress,
            dilation_base=self.dilation_base,
            disable_norm_outer_blocks=0,
            kernel_size=self.kernel_size,
            residual_kernel_size=self.residual_kernel_size,
            last_kernel_size=self.last_kernel_size,
            norm="none",
            pad_mode="constant",
            ratios=list(self.ratios),
            true_skip=True,
        )
        quantizer = dict(
            dimension=self.codebook_dim,
            n_q=self.total_codebooks,
            bins=self.codebook_size,
            input_dimension=self.dimension,
            output_dimension=self.dimension,
        )
        transformer = dict(
            d_model=self.dimension,
            num_heads=self.num_heads,
            num_layers=self.num_layers,
            causal=True,
            layer_scale=self.layer_scale,
            context=self.context,
            conv_layout=True,
            max_period=self.max_period,
            gating="none",
            norm="layer_norm",
            positional_embedding="rope",
            dim_feedforward=self.dim_feedforward,
            input_dimension=self.dimension,
            output_dimensions=[self.dimension],
        )
        return dict(
            sample_rate=self.sample_rate,
            channels=self.channels,
            frame_rate=self.frame_rate,
            seanet=seanet,
            quantizer=quantizer,
            transformer=transformer,
        )


@dataclasses.dataclass
class MimiEncoderState(StreamState):
    seanet: SeanetEncoderState
    transformer: TransformerState
    downsample: ConvState


@dataclasses.dataclass
class MimiDecoderState(StreamState):
    upsample: ConvTrState
    transformer: TransformerState
    seanet: SeanetDecoderState


class Mimi(nn.Module):
    def __init__(self, config: MimiConfig | None = None, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config = config or MimiConfig()
        factory = {"device": device, "dtype": dtype}
        stride = config.resample_stride

        def transformer() -> MimiTransformer:
            return MimiTransformer(
                config.dimension,
                config.num_heads,
                config.num_layers,
                config.dim_feedforward,
                config.context,
                config.layer_scale,
                config.max_period,
                config.norm_eps,
                **factory,
            )

        self.encoder = SeanetEncoder(config, **factory)
        self.encoder_transformer = transformer()
        self.downsample = CausalConv1d(
            config.dimension, config.dimension, 2 * stride, stride=stride, bias=False, pad_mode="replicate", **factory
        )
        self.quantizer = SplitResidualVQ(
            config.dimension,
            config.codebook_dim,
            config.codebook_size,
            config.total_codebooks,
            config.semantic_codebooks,
            config.num_codebooks,
            config.codebook_eps,
            **factory,
        )
        self.upsample = DepthwiseConvTranspose1d(config.dimension, 2 * stride, stride, **factory)
        self.decoder_transformer = transformer()
        self.decoder = SeanetDecoder(config, **factory)

    # ---- properties -------------------------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def frame_rate(self) -> float:
        return self.config.frame_rate

    @property
    def frame_size(self) -> int:
        return self.config.frame_size

    @property
    def cardinality(self) -> int:
        return self.config.codebook_size

    @property
    def total_codebooks(self) -> int:
        return self.config.total_codebooks

    @property
    def num_codebooks(self) -> int:
        return self.quantizer.num_codebooks

    def set_num_codebooks(self, n: int) -> None:
        self.quantizer.set_num_codebooks(n)

    # ---- streaming state ----------------------------------------------------------------------------------
    def init_encoder_state(self, batch_size: int = 1) -> MimiEncoderState:
        return MimiEncoderState(
            self.encoder.init_state(batch_size),
            self.encoder_transformer.init_state(batch_size),
            self.downsample.init_state(batch_size),
        )

    def init_decoder_state(self, batch_size: int = 1) -> MimiDecoderState:
        return MimiDecoderState(
            self.upsample.init_state(batch_size),
            self.decoder_transformer.init_state(batch_size),
            self.decoder.init_state(batch_size),
        )

    def stream(self, batch_size: int = 1) -> MimiStream:
        """A new stream of `batch_size` rows (fresh encoder and decoder states)."""
        return MimiStream(self, batch_size)

    @contextlib.contextmanager
    def streaming(self, batch_size: int = 1) -> Iterator[MimiStream]:
        """`with mimi.streaming(B) as stream:` is `stream = mimi.stream(B)` (the reference's spelling); the
        module itself keeps no state, so `mimi.encode` / `mimi.decode` stay whole-signal inside the block."""
        yield self.stream(batch_size)

    # ---- public API ---------------------------------------------------------------------------------------
    def encode(self, pcm: torch.Tensor) -> torch.Tensor:
        """pcm (B, 1, T) float at 24 kHz -> codes (B, num_codebooks, ceil(T / 1920)) int64, whole signal."""
        pcm = self._check_pcm(pcm, streaming=False)
        pad = -pcm.shape[-1] % self.frame_size
        if pad:
            pcm = nn.functional.pad(pcm, (0, pad))
        with torch.inference_mode():
            return self._encode(pcm, None)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, K, F) int -> pcm (B, 1, F * 1920), whole signal."""
        codes = self._check_codes(codes)
        with torch.inference_mode():
            return self._decode(codes, None)

    def encode_step(self, pcm: torch.Tensor, state: MimiEncoderState) -> torch.Tensor:
        """Continue the streams in `state` (updated in place): pcm (B, 1, 1920 * n) -> codes (B, num_codebooks, n)."""
        pcm = self._check_pcm(pcm, streaming=True)
        _check_batch(pcm.shape[0], state, "encoder")
        with torch.no_grad():
            return self._encode(pcm, state)

    def decode_step(self, codes: torch.Tensor, state: MimiDecoderState) -> torch.Tensor:
        """Continue the streams in `state` (updated in place): codes (B, K, n) -> pcm (B, 1, 1920 * n)."""
        codes = self._check_codes(codes)
        _check_batch(codes.shape[0], state, "decoder")
        with torch.no_grad():
            return self._decode(codes, state)

    # ---- implementation -----------------------------------------------------------------------------------
    def _encode(self, pcm: torch.Tensor, state: MimiEncoderState | None) -> torch.Tensor:
        x = self.encoder(pcm, state.seanet if state else None)  # (B, D, 2F)
        x = x.transpose(1, 2)  # (B, 2F, D)
        if state is None:
            x = self.encoder_transformer(x)
        else:
            x = self.encoder_transformer.step(x, state.transformer)
        x = self.downsample(x.transpose(1, 2), state.downsample if state else None)  # (B, D, F)
        return self.quantizer.encode(x).contiguous()  # (B, K, F); a view when F = 1

    def _decode(self, codes: torch.Tensor, state: MimiDecoderState | None) -> torch.Tensor:
        x = self.quantizer.decode(codes)  # (B, D, F)
        x = self.upsample(x, state.upsample if state else None).transpose(1, 2)  # (B, 2F, D)
        if state is None:
            x = self.decoder_transformer(x)
        else:
            x = self.decoder_transformer.step(x, state.transformer)
        return self.decoder(x.transpose(1, 2), state.seanet if state else None)  # (B, 1, F * frame_size)

    def _check_pcm(self, pcm: torch.Tensor, streaming: bool) -> torch.Tensor:
        channels = self.config.channels
        if not isinstance(pcm, torch.Tensor) or pcm.dim() != 3 or pcm.shape[1] != channels:
            shape = tuple(pcm.shape) if isinstance(pcm, torch.Tensor) else type(pcm).__name__
            raise ValueError(f"expected audio of shape (batch, {channels}, samples), got {shape}")
        if not pcm.is_floating_point():
            raise ValueError(f"expected floating point audio, got {pcm.dtype}")
        T = pcm.shape[-1]
        if T == 0:
            raise ValueError("expected at least one audio sample, got an empty signal")
        if streaming and T % self.frame_size != 0:
            raise ValueError(
                f"streaming encode takes whole frames: the number of samples must be a positive multiple of "
                f"{self.frame_size} ({1000 / self.frame_rate:g} ms at {self.sample_rate} Hz), got {T}; "
                f"buffer the audio before calling"
            )
        return pcm.to(self.downsample.weight.dtype)

    def _check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        if not isinstance(codes, torch.Tensor) or codes.dim() != 3:
            shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise ValueError(f"expected codes of shape (batch, codebooks, frames), got {shape}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"expected integer codes, got {codes.dtype}")
        K, F_ = codes.shape[1], codes.shape[2]
        if not 1 <= K <= self.total_codebooks:
            raise ValueError(f"expected between 1 and {self.total_codebooks} codebooks, got {K}")
        if F_ == 0:
            raise ValueError("expected at least one frame of codes, got 0")
        # Out-of-range tokens would crash deep inside the embedding; the check costs a sync on GPUs, so CPU only.
        if codes.device.type == "cpu" and (int(codes.min()) < 0 or int(codes.max()) >= self.cardinality):
            raise ValueError(
                f"codes must be in [0, {self.cardinality}), got values in [{int(codes.min())}, {int(codes.max())}]"
            )
        return codes.long()


def _check_batch(batch: int, state: StreamState, side: str) -> None:
    if state.batch_size != batch:
        raise ValueError(f"the {side} state holds {state.batch_size} streams but the input has batch size {batch}")


class MimiStream:
    """`batch_size` streams through one Mimi: an encoder and a decoder state, stepped frame by frame.

    Row operations apply to both states, in place: `reset_row(i)`, `reset(mask)`, `copy_row(dst, src, src_row)`
    and `load_row(row, src, src_row=0)` (`src` another `MimiStream`, e.g. a batch-1 one), `restore(snapshot)`.
    """

    def __init__(self, mimi: Mimi, batch_size: int = 1) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.mimi = mimi
        self.encoder_state = mimi.init_encoder_state(batch_size)
        self.decoder_state = mimi.init_decoder_state(batch_size)

    @property
    def batch_size(self) -> int:
        return self.encoder_state.batch_size

    def encode(self, pcm: torch.Tensor) -> torch.Tensor:
        """pcm (B, 1, 1920 * n) -> codes (B, num_codebooks, n), continuing each row's stream."""
        return self.mimi.encode_step(pcm, self.encoder_state)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, K, n) -> pcm (B, 1, 1920 * n), continuing each row's stream."""
        return self.mimi.decode_step(codes, self.decoder_state)

    def reset_row(self, row: int) -> None:
        self.encoder_state.reset_row(row)
        self.decoder_state.reset_row(row)

    def reset(self, mask: torch.Tensor) -> None:
        self.encoder_state.reset(mask)
        self.decoder_state.reset(mask)

    def copy_row(self, dst: int, src: MimiStream, src_row: int) -> None:
        self.encoder_state.copy_row(dst, src.encoder_state, src_row)
        self.decoder_state.copy_row(dst, src.decoder_state, src_row)

    def load_row(self, row: int, src: MimiStream, src_row: int = 0) -> None:
        self.copy_row(row, src, src_row)

    def snapshot(self) -> MimiStream:
        copy = object.__new__(MimiStream)
        copy.mimi = self.mimi
        copy.encoder_state, copy.decoder_state = self.encoder_state.snapshot(), self.decoder_state.snapshot()
        return copy

    def restore(self, snapshot: MimiStream) -> None:
        self.encoder_state.restore(snapshot.encoder_state)
        self.decoder_state.restore(snapshot.decoder_state)
