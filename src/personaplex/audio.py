"""Audio files in and out: read any common format, downmix, resample to 24 kHz, loudness-normalise, write wav.

Every failure a user can cause (missing, unreadable, empty file) is an `AudioError` with a one-line message.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .config import SAMPLE_RATE
from .errors import PersonaplexError


class AudioError(PersonaplexError):
    """An audio file cannot be read or holds no audio."""


def read_audio(path: str | Path, sample_rate: int = SAMPLE_RATE, channel: str = "mix") -> np.ndarray:
    """Read a file as float32 at `sample_rate`. channel: "mix" (mean of channels), "left"/"right" (the
    first/second channel of a stereo file), or "all" to keep (C, T). Mono result: (T,)."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: file not found")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (T, C)
    except Exception as exc:  # libsndfile's error types vary by format
        raise AudioError(f"{path}: cannot read audio ({str(exc).strip() or type(exc).__name__}); "
                         "use wav, flac, ogg or mp3") from exc
    if data.shape[0] == 0:
        raise AudioError(f"{path}: the file holds no audio samples")
    data = data.T  # (C, T)
    if channel == "mix":
        data = data.mean(axis=0)
    elif channel in ("left", "right"):
        index = 0 if channel == "left" else 1
        if data.shape[0] <= index:
            raise AudioError(f"{path}: has {data.shape[0]} channel(s), the {channel} channel was asked for")
        data = data[index]
    elif channel != "all":
        raise ValueError(f"channel must be mix, left, right or all, got {channel!r}")
    return resample(np.ascontiguousarray(data), rate, sample_rate)


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """High-quality resampling of (T,) or (C, T) float32 audio (soxr)."""
    if rate_in == rate_out:
        return x.astype(np.float32, copy=False)
    import soxr

    if x.ndim == 1:
        return soxr.resample(x, rate_in, rate_out, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(soxr.resample(x.T, rate_in, rate_out, quality="HQ").T, dtype=np.float32)


def normalize_loudness(x: np.ndarray, sample_rate: int = SAMPLE_RATE, target_lufs: float = -24.0) -> np.ndarray:
    """Scale mono audio to an integrated loudness of `target_lufs` (ITU-R BS.1770, pyloudnorm). Audio too
    short to measure (< 0.4 s) is measured padded with silence; silence is returned unchanged. The result
    is clipped to [-1, 1]."""
    import pyloudnorm

    meter = pyloudnorm.Meter(sample_rate)
    block = int(0.4 * sample_rate)
    measured = x if len(x) >= block else np.pad(x, (0, block - len(x)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyloudnorm warns about clipping; we clip below
        loudness = meter.integrated_loudness(measured.astype(np.float64))
    if not np.isfinite(loudness):
        return x.astype(np.float32, copy=True)
    gain = 10.0 ** ((target_lufs - loudness) / 20.0)
    return np.clip(x * gain, -1.0, 1.0).astype(np.float32)


def write_wav(path: str | Path, x: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write (T,) mono or (C, T) audio as 16-bit PCM wav, creating the folder."""
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = x.T if x.ndim == 2 else x
    sf.write(str(path), np.clip(data, -1.0, 1.0), sample_rate, subtype="PCM_16")
    return path


def voiced_signal(seconds: float, seed: int = 0, rate: int = SAMPLE_RATE) -> np.ndarray:
    """A deterministic speech-like test signal (harmonics with moving pitch and loudness, a little noise),
    used by the tests and benchmarks where a real recording is not at hand."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t + seed)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    x = sum(np.sin(h * phase) / h for h in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return (0.2 * x + 0.01 * rng.standard_normal(len(t))).astype(np.float32)
