"""silero VAD (the `silero-vad` wheel, which ships its model) as Full-Duplex-Bench calls it.

- Backchannel (`eval_backchannel.py`): all defaults, `return_seconds=True` (0.1 s rounding), and the 16 kHz
  rate assumed whatever the file's rate. `rate_mode="native"` reproduces that (a 24 kHz file is read as if it
  were 16 kHz: times x1.5); `"resample16k"` (the default) resamples to 16 kHz first, as FDB does since PR #12.
- v1.5 timing (`get_timing.py`): resample to 16 kHz, `sampling_rate=16000`, segments in samples / 16000.
- ASR gating: the same VAD, unrounded seconds.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from . import EvalError, missing_extra

VAD_RATE = 16_000
BC_RATE_MODES = ("resample16k", "native")


@lru_cache(maxsize=1)
def _silero():
    try:
        import silero_vad
    except ImportError:
        raise missing_extra("silero-vad") from None
    return silero_vad.load_silero_vad(), silero_vad.get_speech_timestamps


def to_16k(wav: np.ndarray, rate: int) -> np.ndarray:
    from ..audio import resample

    wav = np.asarray(wav, dtype=np.float32)
    return wav if rate == VAD_RATE else resample(wav, rate, VAD_RATE).astype(np.float32)


def speech_timestamps(wav16k: np.ndarray, return_seconds: bool = False) -> list[tuple[float, float]]:
    """silero's `get_speech_timestamps` with every default (threshold 0.5, 250 ms min speech, 100 ms min
    silence, 30 ms pad), on audio taken to be 16 kHz: [(start, end)] in samples, or in seconds rounded to 0.1."""
    import torch

    model, get_speech_timestamps = _silero()
    audio = torch.from_numpy(np.ascontiguousarray(wav16k, dtype=np.float32))
    if audio.ndim != 1:
        raise EvalError("the VAD takes mono audio")
    with torch.no_grad():
        found = get_speech_timestamps(audio, model, return_seconds=return_seconds)
    return [(t["start"], t["end"]) for t in found]


def backchannel_segments(wav: np.ndarray, rate: int, rate_mode: str = "resample16k") -> list[tuple[float, float]]:
    """Speech segments of an output, in seconds (0.1 s), as FDB's backchannel eval computes them."""
    if rate_mode not in BC_RATE_MODES:
        raise EvalError(f"--bc-vad-rate must be one of {', '.join(BC_RATE_MODES)}, not {rate_mode!r}")
    audio = np.asarray(wav, dtype=np.float32) if rate_mode == "native" else to_16k(wav, rate)
    return speech_timestamps(audio, return_seconds=True)


def speech_seconds(wav: np.ndarray, rate: int) -> list[tuple[float, float]]:
    """Speech segments in unrounded seconds (16 kHz VAD), for timing and for gating ASR words."""
    return [(s / VAD_RATE, e / VAD_RATE) for s, e in speech_timestamps(to_16k(wav, rate))]
