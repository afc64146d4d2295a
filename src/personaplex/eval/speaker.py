"""`personaplex eval speaker`: how much the agent's output sounds like its voice prompt.

The paper's metric is the cosine similarity of speaker embeddings of the voice prompt and the agent's output
from a WavLM encoder with an x-vector TDNN head ("WavLM-TDNN"). Here that is transformers' `WavLMForXVector`
loaded from a local directory (`--speaker-model DIR`, e.g. a copy of microsoft/wavlm-base-plus-sv: its
`config.json`, weights and `preprocessor_config.json`). Nothing is downloaded.

`--speaker-backend resemblyzer` is an offline fallback whose model ships inside its wheel: a GE2E d-vector
(LSTM over mel frames), not the paper's model, so its figures are NOT comparable with published ones; the
results say so.

    personaplex eval speaker --outputs runs/agent_wavs --voice-prompt NATF2.wav --speaker-model models/wavlm-sv
    personaplex eval speaker --fdb-root fdb/candor_pause_handling --voice-prompt NATF2 --checkpoint DIR \\
        --speaker-model models/wavlm-sv --out speaker.json

Both sides are read at 16 kHz mono and reduced to their active speech (20 ms frames within `--gate-db` of the
loudest frame): an agent's output is mostly listening, and embeddings of silence say nothing about a voice.
Long audio is embedded in segments of at most `--segment-seconds` whose unit embeddings are averaged,
weighted by length.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from . import EvalError, missing_extra

log = logging.getLogger("personaplex.eval.speaker")

SPEAKER_RATE = 16_000  # what both speaker models take
BACKENDS = ("wavlm", "resemblyzer")
RESEMBLYZER_LABEL = ("resemblyzer GE2E d-vector (offline fallback): NOT the paper's WavLM-TDNN metric, "
                     "not comparable with published speaker similarity")


class SpeakerEncoder(Protocol):
    """Speaker embeddings: 16 kHz mono float audio -> a unit vector."""

    name: str

    def embed(self, pcm: np.ndarray) -> np.ndarray:
        ...


# -- encoders -------------------------------------------------------------------------------------------------
class WavLMSpeakerEncoder:
    """transformers' `WavLMForXVector` from a local directory (`save_pretrained` layout)."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", segment_seconds: float = 20.0) -> None:
        try:
            import torch
            from transformers import AutoFeatureExtractor, Wav2Vec2FeatureExtractor, WavLMForXVector
        except ImportError as exc:
            raise missing_extra("transformers") from exc
        directory = Path(model_dir)
        if not (directory / "config.json").is_file():
            raise EvalError(f"--speaker-model {directory}: not a model directory (no config.json); pass a local "
                            "copy of a WavLMForXVector model such as microsoft/wavlm-base-plus-sv")
        try:
            model = WavLMForXVector.from_pretrained(str(directory), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with the folder, it is the user's to fix
            raise EvalError(f"--speaker-model {directory}: cannot load a WavLMForXVector from it "
                            f"({str(exc).splitlines()[0]})") from exc
        if (directory / "preprocessor_config.json").is_file():
            self.features = AutoFeatureExtractor.from_pretrained(str(directory), local_files_only=True)
        else:
            log.warning("%s has no preprocessor_config.json: using zero-mean unit-variance input at 16 kHz",
                        directory)
            self.features = Wav2Vec2FeatureExtractor(sampling_rate=SPEAKER_RATE, do_normalize=True)
        rate = getattr(self.features, "sampling_rate", SPEAKER_RATE)
        if rate != SPEAKER_RATE:
            raise EvalError(f"--speaker-model {directory} expects {rate} Hz audio; only {SPEAKER_RATE} Hz models "
                            "are supported")
        self.torch = torch
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.segment = max(1, int(segment_seconds * SPEAKER_RATE))
        self.name = f"wavlm-xvector:{directory.name}"

    def embed(self, pcm: np.ndarray) -> np.ndarray:
        total, weights = None, 0.0
        for start in range(0, len(pcm), self.segment):
            piece = pcm[start:start + self.segment]
            if len(piece) < SPEAKER_RATE // 4 and start > 0:  # a sliver at the end adds noise, not voice
                continue
            inputs = self.features(piece, sampling_rate=SPEAKER_RATE, return_tensors="pt")
            with self.torch.inference_mode():
                out = self.model(input_values=inputs["input_values"].to(self.device))
            e = _unit(out.embeddings[0].float().cpu().numpy())
            total = e * len(piece) if total is None else total + e * len(piece)
            weights += len(piece)
        if total is None:
            raise EvalError("no audio to embed")
        return _unit(total / weights)


class ResemblyzerEncoder:
    """resemblyzer's `VoiceEncoder` (its weights ship in the wheel): the offline fallback."""

    name = "resemblyzer"
    label = RESEMBLYZER_LABEL

    def __init__(self, device: str = "cpu") -> None:
        self.encoder_class, self.preprocess = _import_resemblyzer()
        self.encoder = self.encoder_class(device=device, verbose=False)

    def embed(self, pcm: np.ndarray) -> np.ndarray:
        wav = self.preprocess(pcm.astype(np.float32))  # already 16 kHz: volume norm + its own VAD trim
        if len(wav) < SPEAKER_RATE // 4:
            raise EvalError("resemblyzer found no speech in it")
        return _unit(np.asarray(self.encoder.embed_utterance(wav), dtype=np.float64))


def _import_resemblyzer():
    """(VoiceEncoder, preprocess_wav). resemblyzer needs `webrtcvad`, whose 2.0.10 release reads its own
    version through `pkg_resources`, gone from current setuptools; a stand-in answering that one call is put
    in place for the import only."""
    stand_in = None
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        from importlib import metadata

        stand_in = types.ModuleType("pkg_resources")
        stand_in.get_distribution = lambda name: types.SimpleNamespace(version=metadata.version(name))
        sys.modules["pkg_resources"] = stand_in
    try:
        from resemblyzer import VoiceEncoder, preprocess_wav
    except ImportError as exc:
        raise missing_extra("resemblyzer") from exc
    finally:
        if stand_in is not None and sys.modules.get("pkg_resources") is stand_in:
            del sys.modules["pkg_resources"]
    return VoiceEncoder, preprocess_wav


def load_encoder(backend: str, model_dir: str | None = None, device: str | None = None,
                 segment_seconds: float = 20.0) -> SpeakerEncoder:
    device = device or "cpu"
    if backend == "wavlm":
        if not model_dir:
            raise EvalError("--speaker-model DIR is needed for the WavLM-TDNN metric (a local copy of a "
                            "WavLMForXVector model such as microsoft/wavlm-base-plus-sv); or use "
                            "--speaker-backend resemblyzer, an offline fallback that is not the paper's metric")
        return WavLMSpeakerEncoder(model_dir, device, segment_seconds)
    if backend == "resemblyzer":
        return ResemblyzerEncoder(device)
    raise EvalError(f"unknown speaker backend {backend!r}; use {', '.join(BACKENDS)}")


# -- audio ----------------------------------------------------------------------------------------------------
def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64).reshape(-1)
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(_unit(a), _unit(b)))


def active_speech(pcm: np.ndarray, rate: int = SPEAKER_RATE, gate_db: float = 40.0,
                  floor_dbfs: float = -60.0) -> np.ndarray:
    """The 20 ms frames of `pcm` within `gate_db` of its loudest frame and above `floor_dbfs`, joined."""
    frame = rate // 50
    n = len(pcm) // frame
    if n == 0:
        return pcm[:0]
    frames = pcm[: n * frame].reshape(n, frame)
    level = 10 * np.log10(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-12)
    keep = (level >= level.max() - gate_db) & (level >= floor_dbfs)
    return frames[keep].reshape(-1).astype(np.float32)


@dataclass
class SpeakerSample:
    id: str
    path: Path


def read_speech(path: str | Path, gate_db: float, min_seconds: float) -> np.ndarray:
    from ..audio import read_audio

    speech = active_speech(read_audio(path, SPEAKER_RATE), SPEAKER_RATE, gate_db)
    if len(speech) < min_seconds * SPEAKER_RATE:
        raise EvalError(f"{path}: only {len(speech) / SPEAKER_RATE:.2f} s of speech (at least {min_seconds} s "
                        "needed)")
    return speech


def collect_samples(outputs: str | None = None, fdb_root: str | None = None) -> list[SpeakerSample]:
    """`--outputs DIR`: every *.wav in it (id: the file stem); `--fdb-root DIR`: every folder under it with an
    output.wav (id: the folder's path relative to the root)."""
    if bool(outputs) == bool(fdb_root):
        raise EvalError("give exactly one of --outputs DIR (a folder of agent wavs) or --fdb-root DIR")
    root = Path(outputs or fdb_root)
    if not root.is_dir():
        raise EvalError(f"{root}: no such folder")
    if outputs:
        samples = [SpeakerSample(p.stem, p) for p in sorted(root.glob("*.wav")) if p.is_file()]
    else:
        samples = [SpeakerSample(str(p.parent.relative_to(root)), p) for p in sorted(root.rglob("output.wav"))]
    if not samples:
        what = "*.wav files" if outputs else "sample folders with an output.wav"
        raise EvalError(f"{root}: no {what} found")
    return samples


# -- voice prompt ---------------------------------------------------------------------------------------------
def voice_audio_path(spec: str, voices_dir: str | Path | None) -> Path:
    """An audio file for a voice prompt: an existing audio file path, or a voice name among `voices_dir`.

    A released `.pt` voice holds the model's summed input embeddings of the voice steps and the tokens of its
    last frame only, not audio nor its codes, so it cannot be heard or embedded: an audio file with the same
    name beside it is used when there is one, else this asks for the recording.
    """
    from ..voices import VOICE_AUDIO_SUFFIXES, find_voice

    path = Path(spec)
    if not path.is_file():
        path = find_voice(spec, voices_dir)
    if path.suffix.lower() != ".pt":
        return path
    for suffix in VOICE_AUDIO_SUFFIXES:
        sibling = path.with_suffix(suffix)
        if sibling.is_file():
            return sibling
    raise EvalError(f"voice {spec!r} is a released .pt voice file ({path}): it holds model input embeddings, "
                    "not audio, so it cannot be compared; pass the voice's audio recording instead "
                    "(--voice-prompt path/to/voice.wav)")


def resolve_voice(args: argparse.Namespace) -> Path:
    spec = args.voice_prompt
    if Path(spec).is_file():
        return voice_audio_path(spec, None)
    voices_dir = args.voice_prompt_dir
    if voices_dir is None:
        from ..hub import resolve_checkpoint

        source = args.checkpoint
        if args.demo:
            from ..demo import demo_checkpoint_dir

            source = demo_checkpoint_dir()
        voices_dir = resolve_checkpoint(source, revision=args.hf_revision, need=("voices",)).voices_dir
    return voice_audio_path(spec, voices_dir)


# -- scoring --------------------------------------------------------------------------------------------------
def score_samples(encoder: SpeakerEncoder, reference: np.ndarray, samples: list[SpeakerSample],
                  gate_db: float = 40.0, min_seconds: float = 0.5, progress: bool = False) -> dict:
    """Cosine of each sample's embedding with the reference speech's; samples that cannot be scored (too
    little speech, unreadable) are listed with their error and left out of the mean."""
    from tqdm import tqdm

    from ..errors import PersonaplexError

    ref = encoder.embed(reference)
    rows, values = [], []
    for sample in tqdm(samples, unit="sample", desc="speaker", disable=not progress):
        row: dict = {"id": sample.id, "path": str(sample.path)}
        try:
            value = cosine(ref, encoder.embed(read_speech(sample.path, gate_db, min_seconds)))
        except PersonaplexError as exc:
            row["error"] = str(exc)
        else:
            row["similarity"] = round(value, 6)
            values.append(value)
        rows.append(row)
    return {"mean": float(np.mean(values)) if values else None,
            "std": float(np.std(values)) if values else None,
            "count": len(values), "failed": len(rows) - len(values), "samples": rows}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import add_checkpoint_args

    data = parser.add_argument_group("input and output")
    data.add_argument("--outputs", default=None, help="folder of agent output wavs (every *.wav)")
    data.add_argument("--fdb-root", default=None, help="Full-Duplex-Bench folder: every sample's output.wav")
    data.add_argument("--voice-prompt", required=True,
                      help="the voice prompt the outputs were made with: an audio file, or a voice name among "
                           "the checkpoint's voices (a released .pt voice holds no audio: give its recording)")
    data.add_argument("--voice-prompt-dir", default=None, help="folder of voices (default: the checkpoint's)")
    data.add_argument("--out", default=None, help="results JSON (default: print only)")
    model = parser.add_argument_group("speaker model")
    model.add_argument("--speaker-backend", choices=BACKENDS, default="wavlm",
                       help="wavlm: WavLMForXVector from --speaker-model (the paper's metric, default); "
                            "resemblyzer: offline fallback with its own model, NOT comparable")
    model.add_argument("--speaker-model", default=None,
                       help="local directory of a WavLMForXVector model (e.g. microsoft/wavlm-base-plus-sv)")
    model.add_argument("--segment-seconds", type=float, default=20.0, help="longest piece embedded at once")
    model.add_argument("--gate-db", type=float, default=40.0,
                       help="keep 20 ms frames within this many dB of the loudest (default 40)")
    model.add_argument("--min-speech", type=float, default=0.5,
                       help="seconds of speech a sample needs to be scored (default 0.5)")
    add_checkpoint_args(parser)  # only for voice names (the checkpoint's voices) and --device
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.segment_seconds <= 0 or args.min_speech < 0 or args.gate_db <= 0:
        raise EvalError("--segment-seconds and --gate-db must be positive, --min-speech non-negative")
    samples = collect_samples(args.outputs, args.fdb_root)
    voice = resolve_voice(args)
    reference = read_speech(voice, args.gate_db, args.min_speech)
    from ..checkpoint import resolve_device

    device = str(resolve_device(args.device))
    encoder = load_encoder(args.speaker_backend, args.speaker_model, device, args.segment_seconds)
    if args.speaker_backend == "resemblyzer":
        log.warning("%s", RESEMBLYZER_LABEL)
    result = score_samples(encoder, reference, samples, args.gate_db, args.min_speech,
                           progress=not args.no_progress)
    summary = {"metric": "speaker_similarity", "backend": args.speaker_backend, "model": encoder.name,
               "note": RESEMBLYZER_LABEL if args.speaker_backend == "resemblyzer" else
               "cosine of WavLMForXVector embeddings (the paper's WavLM-TDNN metric)",
               "voice_prompt": str(voice), **result}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=1) + "\n")
    mean = "n/a" if result["mean"] is None else f"{result['mean']:.4f} (std {result['std']:.4f})"
    failed = f", {result['failed']} not scored" if result["failed"] else ""
    wrote = f"; wrote {args.out}" if args.out else ""
    print(f"speaker similarity [{encoder.name}]: {mean} over {result['count']} samples{failed}{wrote}")
    return 0 if result["count"] else 1
