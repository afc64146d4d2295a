"""Word timestamps for Full-Duplex-Bench's `output.json`, through a pluggable ASR gated by silero VAD.

A backend is any object with `transcribe(wav16k: np.ndarray) -> list[Word]` (16 kHz mono float32; an empty list
for no speech). Offline ASRs invent words in silence and place word starts early, so by default each word is
kept only where it overlaps a VAD speech segment, with its start and end clipped to the segments it overlaps.

Backends: `whisper` (faster-whisper, a local model folder or a hub id), `parakeet` (NeMo, FDB's own choice:
nvidia/parakeet-tdt-0.6b-v2; needs NeMo installed), `pocketsphinx` (ships its model; timing only, its words are
poor). `existing` is no backend: the `output.json` already in each folder is used as is.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from . import EvalError, missing_extra
from .vad import VAD_RATE, speech_seconds, to_16k

ASR_CHOICES = ("existing", "whisper", "parakeet", "pocketsphinx")


@dataclass(frozen=True)
class Word:
    text: str
    start: float  # seconds from the start of the audio given to the backend
    end: float


class AsrBackend(Protocol):
    name: str

    def transcribe(self, wav16k: np.ndarray) -> list[Word]: ...


class WhisperAsr:
    """faster-whisper with word timestamps (English, no built-in VAD filter: silero gating is done here)."""

    name = "whisper"

    def __init__(self, model: str = "base", device: str = "cpu", compute_type: str = "int8") -> None:
        try:
            from faster_whisper import WhisperModel
        except ImportError:
            raise missing_extra("faster-whisper") from None
        try:
            self.model = WhisperModel(model, device=device, compute_type=compute_type)
        except Exception as exc:  # a missing folder, no network for a hub id, a bad model
            raise EvalError(f"cannot load the faster-whisper model {model!r} ({exc}); pass --asr-model with a "
                            "local CTranslate2 model folder") from None

    def transcribe(self, wav16k: np.ndarray) -> list[Word]:
        if len(wav16k) == 0:
            return []
        segments, _ = self.model.transcribe(np.asarray(wav16k, np.float32), language="en", word_timestamps=True,
                                            vad_filter=False, condition_on_previous_text=False, beam_size=5,
                                            temperature=0.0)  # no sampled fallback: the same words every run
        words = []
        for segment in segments:
            for w in segment.words or []:
                text = w.word.strip()
                if text:
                    words.append(Word(text, float(w.start), float(w.end)))
        return words


class ParakeetAsr:
    """NeMo Parakeet-TDT, as FDB's `asr.py` runs it (a temporary wav, `timestamps=True`, word times)."""

    name = "parakeet"

    def __init__(self, model: str = "nvidia/parakeet-tdt-0.6b-v2", device: str = "cpu") -> None:
        try:
            import nemo.collections.asr as nemo_asr
        except ImportError:
            raise EvalError("NeMo is not installed; --asr parakeet needs `pip install nemo_toolkit[asr]` "
                            "(or use --asr whisper)") from None
        if Path(model).is_file():
            self.model = nemo_asr.models.ASRModel.restore_from(model)
        else:
            self.model = nemo_asr.models.ASRModel.from_pretrained(model_name=model)
        self.model = self.model.to(device).eval()

    def transcribe(self, wav16k: np.ndarray) -> list[Word]:
        import soundfile as sf

        if len(wav16k) == 0:
            return []
        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / "audio.wav")
            sf.write(path, wav16k, VAD_RATE)
            result = self.model.transcribe([path], timestamps=True)[0]
        return [Word(str(w["word"]), float(w["start"]), float(w["end"])) for w in result.timestamp["word"]]


class PocketsphinxAsr:
    """CMU pocketsphinx with its bundled US-English model: good word timing, poor words (timing only)."""

    name = "pocketsphinx"
    _FILLER = re.compile(r"^(<s>|</s>|<sil>|\[.*\]|\+\+.*\+\+)$")

    def __init__(self) -> None:
        try:
            from pocketsphinx import Decoder
        except ImportError:
            raise missing_extra("pocketsphinx") from None
        self.decoder = Decoder(samprate=VAD_RATE, loglevel="FATAL")
        self.frame_rate = float(self.decoder.config["frate"])

    def transcribe(self, wav16k: np.ndarray) -> list[Word]:
        if len(wav16k) == 0:
            return []
        pcm = (np.clip(wav16k, -1, 1) * 32767).astype(np.int16)
        self.decoder.start_utt()
        self.decoder.process_raw(pcm.tobytes(), full_utt=True)
        self.decoder.end_utt()
        words = []
        for seg in self.decoder.seg():
            if self._FILLER.match(seg.word):
                continue
            text = re.sub(r"\(\d+\)$", "", seg.word)  # alternative pronunciations: "the(2)"
            words.append(Word(text, seg.start_frame / self.frame_rate, (seg.end_frame + 1) / self.frame_rate))
        return words


def make_backend(name: str, model: str | None = None, device: str = "cpu") -> AsrBackend | None:
    """The backend named by `--asr` (None for `existing`)."""
    if name == "existing":
        return None
    if name == "whisper":
        return WhisperAsr(model or "base", device=device, compute_type="int8" if device == "cpu" else "float16")
    if name == "parakeet":
        return ParakeetAsr(model or "nvidia/parakeet-tdt-0.6b-v2", device=device)
    if name == "pocketsphinx":
        return PocketsphinxAsr()
    raise EvalError(f"--asr must be one of {', '.join(ASR_CHOICES)}, not {name!r}")


def gate_words(words: Sequence[Word], speech: Sequence[tuple[float, float]]) -> list[Word]:
    """Words that overlap a speech segment, their times clipped to the span of the segments they overlap."""
    kept = []
    for w in words:
        hits = [(s, e) for s, e in speech if s < w.end and e > w.start]
        if not hits:
            continue
        start, end = max(w.start, hits[0][0]), min(w.end, hits[-1][1])
        kept.append(Word(w.text, start, max(start, end)))
    return kept


def transcribe_output(backend: AsrBackend, wav: np.ndarray, rate: int, offset: float = 0.0,
                      vad_gate: bool = True) -> dict:
    """`output.json` for an agent output: the audio from `offset` seconds on (FDB crops user_interruption at
    the interruption's end, sample int(offset * rate)), times shifted back by `offset`."""
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim == 2:  # FDB averages channels; outputs here are agent-only mono anyway
        wav = wav.mean(axis=1)
    cropped = wav[int(offset * rate):]
    wav16k = to_16k(cropped, rate)
    words = backend.transcribe(wav16k)
    if vad_gate:
        words = gate_words(words, speech_seconds(wav16k, VAD_RATE))
    chunks = [{"text": w.text, "timestamp": [w.start + offset, w.end + offset]} for w in words]
    return {"text": " ".join(w.text for w in words), "chunks": chunks}
