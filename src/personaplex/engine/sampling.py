"""Temperature / top-k sampling with a per-conversation seed, batched.

Each conversation draws from its own counter-based random stream: the noise for (seed, frame, stream, token)
is an integer hash computed on the device, turned into Gumbel noise, and the sample is the argmax of
`logits / temperature + gumbel` over the top-k tokens. That is exactly a draw from softmax(logits / T)
restricted to the top k, and it is the same whatever else shares the batch and on any device, so a seed
reproduces a conversation byte for byte. Greedy (argmax) is temperature <= 0 or top_k == 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


def _i64(value: int) -> int:
    """An unsigned 64-bit constant as the signed int64 torch stores."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_MIX1 = _i64(0xBF58476D1CE4E5B9)
_MIX2 = _i64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _splitmix(x: torch.Tensor) -> torch.Tensor:
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


UNIFORM_BITS = 23  # (bits + 0.5) / 2^23 is exact in float32 and strictly inside (0, 1) for every pattern


def stream_keys(seed: torch.Tensor, counter: torch.Tensor, streams: int) -> torch.Tensor:
    """The random key of every (row, stream) of one frame: seed/counter (B,) int64 -> (B, streams)."""
    base = _splitmix(seed * 0x2545F491 + counter)  # (B,)
    return _splitmix(base[:, None] + torch.arange(streams, device=seed.device, dtype=torch.int64))


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^23) -> float32 in (0, 1): (bits + 0.5) / 2^23, exact for every pattern (the
    extremes are 2^-24 and 1 - 2^-24)."""
    return (bits.to(torch.float32) + 0.5) * (1.0 / (1 << UNIFORM_BITS))


def uniform(keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Uniform (0, 1) float32 noise of token `ids` under `keys`: keys (...,) int64, ids (..., N) int64 with
    the same leading shape (or broadcastable) -> (..., N). The value depends only on (key, id)."""
    bits = _shr(_splitmix(keys[..., None] ^ (ids * _GOLDEN)), 64 - UNIFORM_BITS)
    return uniform_from_bits(bits)


def gumbel(keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Gumbel noise -log(-log(u)) for token `ids` under `keys` (see `uniform`); always finite."""
    return -torch.log(-torch.log(uniform(keys, ids)))


def uniform_noise(seed: torch.Tensor, counter: torch.Tensor, stream: int, vocab: int) -> torch.Tensor:
    """Uniform (0, 1) noise (B, vocab), float32, of stream `stream` from per-row int64 seed and counter (B,)."""
    keys = stream_keys(seed, counter, stream + 1)[:, stream]
    return uniform(keys, torch.arange(vocab, device=seed.device, dtype=torch.int64))


@dataclass
class SamplingParams:
    """Per-conversation sampling settings; the defaults are the released ones."""

    text_temperature: float = 0.7
    text_topk: int = 25
    audio_temperature: float = 0.8
    audio_topk: int = 250
    seed: int | None = None  # None: a random seed is drawn
    greedy: bool = False

    def validate(self) -> "SamplingParams":
        for name in ("text_temperature", "audio_temperature"):
            value = getattr(self, name)
            if not 0 <= value <= 10:
                raise ValueError(f"{name} must be between 0 and 10, got {value}")
        for name in ("text_topk", "audio_topk"):
            value = getattr(self, name)
            if not 1 <= value <= 100_000:
                raise ValueError(f"{name} must be between 1 and 100000, got {value}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be between 0 and 2**63-1, got {self.seed}")
        return self


def _top_mask(topk: torch.Tensor, kmax: int) -> torch.Tensor:
    """(B,) top-k -> (B, kmax) additive mask: 0 for the first top-k candidates of a row, -inf after."""
    beyond = torch.arange(kmax, device=topk.device) >= topk[:, None]
    return torch.zeros(beyond.shape, device=topk.device).masked_fill_(beyond, float("-inf"))


def _draw(logits: torch.Tensor, kmax: int, inv_temp: torch.Tensor, mask: torch.Tensor, noise_of) -> torch.Tensor:
    """argmax over the top-kmax of logits / T + Gumbel noise (masked beyond each row's top-k): a draw from
    softmax(logits / T) restricted to the top k. `noise_of(index)` gives the (already scaled) noise."""
    # Top-k in the logits' own dtype (the cast to fp32 is exact, so the order is the same), on kmax values only.
    values, index = logits.topk(kmax, dim=-1)  # (B, kmax), sorted: a greedy row (no noise) takes index 0
    scores = values.float() * inv_temp + noise_of(index) + mask
    return index.gather(1, scores.argmax(dim=-1, keepdim=True))[:, 0]


class FrameSampler:
    """Temperature / top-k sampling of one frame's streams for a batch of rows, prepared once per frame.

    temperature, topk: (B, 2) per row for (text, audio); seed, counter: (B,) int64; kmax: (text, audio) python
    ints, each >= every row's top-k and <= the vocabulary (static shapes: no device sync to find them).
    `sampler(logits, k)` draws stream k (0: text, 1..audio_streams: audio codebooks). The audio streams' noise
    is drawn here for the whole vocabulary at once (one hash for every codebook), the text stream's only for
    its top-k ids; either way the noise of a token is a function of (seed, frame, stream, token id) alone, the
    same as `sample` draws. Rows with temperature <= 0 or top-k 1 take the most likely token.
    """

    def __init__(self, temperature: torch.Tensor, topk: torch.Tensor, seed: torch.Tensor, counter: torch.Tensor,
                 kmax: tuple[int, int], audio_streams: int, audio_vocab: int) -> None:
        self.kmax = kmax
        self.keys = stream_keys(seed, counter, 1 + audio_streams)  # (B, 1 + S)
        self.inv_temp = 1.0 / temperature.clamp(min=1e-5)  # (B, 2)
        self.noise_scale = ((temperature > 0) & (topk > 1)).to(torch.float32)  # (B, 2): 0 where greedy
        self.masks = [_top_mask(topk[:, i], k) for i, k in enumerate(kmax)]
        ids = torch.arange(audio_vocab, device=seed.device, dtype=torch.int64)
        self.audio_noise = gumbel(self.keys[:, 1:], ids) * self.noise_scale[:, 1, None, None]  # (B, S, V)

    def __call__(self, logits: torch.Tensor, k: int) -> torch.Tensor:
        if k == 0:
            noise_of = lambda index: gumbel(self.keys[:, 0], index) * self.noise_scale[:, :1]  # noqa: E731
            return _draw(logits, self.kmax[0], self.inv_temp[:, :1], self.masks[0], noise_of)
        noise = self.audio_noise[:, k - 1]
        return _draw(logits, self.kmax[1], self.inv_temp[:, 1:], self.masks[1], lambda index: noise.gather(1, index))


def sample(logits: torch.Tensor, temperature: torch.Tensor, topk: torch.Tensor, seed: torch.Tensor,
           counter: torch.Tensor, stream: int, kmax: int | None = None) -> torch.Tensor:
    """Draw one token per row of stream `stream`. logits (B, V); temperature (B,) float, topk (B,) int,
    seed/counter (B,) int64. Rows with temperature <= 0 or topk == 1 take the most likely token. `kmax`
    (>= every row's top-k) spares a device sync when the caller knows it."""
    kmax = min(int(topk.max()) if kmax is None else kmax, logits.shape[-1])
    keys = stream_keys(seed, counter, stream + 1)[:, stream]
    scale = ((temperature > 0) & (topk > 1)).to(torch.float32)[:, None]
    inv_temp = (1.0 / temperature.clamp(min=1e-5))[:, None]
    return _draw(logits, kmax, inv_temp, _top_mask(topk, kmax), lambda index: gumbel(keys, index) * scale)
