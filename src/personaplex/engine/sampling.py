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


def uniform_noise(seed: torch.Tensor, counter: torch.Tensor, stream: int, vocab: int) -> torch.Tensor:
    """Uniform (0, 1) noise (B, vocab), float32, from per-row int64 seed and counter (B,)."""
    key = _splitmix(_splitmix(seed * 0x2545F491 + counter) + stream)  # (B,)
    ids = torch.arange(vocab, device=seed.device, dtype=torch.int64)
    bits = _shr(_splitmix(key[:, None] ^ (ids * _GOLDEN)), 40)  # 24 random bits
    return (bits.to(torch.float32) + 0.5) / float(1 << 24)


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


def sample(logits: torch.Tensor, temperature: torch.Tensor, topk: torch.Tensor, seed: torch.Tensor,
           counter: torch.Tensor, stream: int, kmax: int | None = None) -> torch.Tensor:
    """Draw one token per row. logits (B, V); temperature (B,) float, topk (B,) int, seed/counter (B,) int64.
    Rows with temperature <= 0 or topk == 1 take the argmax. `kmax` (>= every row's top-k) spares a device
    sync when the caller knows it."""
    B, V = logits.shape
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    kmax = min(int(topk.max()) if kmax is None else kmax, V)
    top_values, top_index = logits.topk(kmax, dim=-1)  # (B, kmax), sorted
    keep = torch.arange(kmax, device=logits.device)[None, :] < topk[:, None]
    temp = temperature.clamp(min=1e-5)[:, None]
    noise = uniform_noise(seed, counter, stream, V).gather(1, top_index)
    gumbel = -torch.log(-torch.log(noise))
    scores = torch.where(keep, top_values / temp + gumbel, float("-inf"))
    sampled = top_index.gather(1, scores.argmax(dim=-1, keepdim=True))[:, 0]
    return torch.where((temperature <= 0) | (topk <= 1), greedy, sampled)
