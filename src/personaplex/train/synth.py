"""`personaplex synth`: scripted dialogues -> training conversations (stereo wav + word timestamps JSON).

A script (JSON; a file may hold one, a list, or one per line)::

    {"id": "booking-001",
     "text_prompt": "You are a helpful airline agent.",
     "voice_prompt": "NATF2",                 # optional; default: a short sample of agent_voice, synthesised
     "agent_voice": "en-us+f3", "user_voice": "en-us+m3",          # TTS voices (backend-specific)
     "turns": [{"speaker": "user", "text": "Hi, I need to change my flight."},
               {"speaker": "agent", "text": "Sure, what is your booking code?", "pause": 0.3},
               {"speaker": "user", "text": "Mm-hmm.", "overlap": 0.6},
               {"speaker": "agent", "text": "Thanks.", "start": 6.0}]}

Timing: a turn starts `pause` seconds (default 0.4) after everything said so far has ended, or `overlap`
seconds before that (never before the previous turn's start), or at an absolute `start`. The agent is
written to the left channel, the user to the right, at 24 kHz.

TTS backends follow the `TTS` protocol: `synthesize(text, voice) -> Utterance` (mono audio, its rate, and
word times when the engine knows them). Built in: "espeak" (espeak-ng through its C library, from the
`espeakng-loader` wheel or the system's libespeak-ng; word times from its word events) and "tones" (a
dependency-free stand-in that "speaks" each word as a short harmonic tone, for tests). Any class with that
interface loads with `--tts package.module:Class`. When a backend gives no word times they are estimated:
the utterance's voiced span (above -40 dB of its peak) is split between its words in proportion to their
length in characters (+1 for the gap).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..config import SAMPLE_RATE
from ..errors import PersonaplexError
from .data import Word

DEFAULT_VOICE_PROMPT_TEXT = "Hello, this is how I sound when I talk."


class TTSError(PersonaplexError):
    """A TTS backend is missing or failed."""


class ScriptError(PersonaplexError):
    """A dialogue script is malformed."""


@dataclass
class Utterance:
    pcm: np.ndarray  # (T,) float32 mono
    sample_rate: int
    words: list[Word] | None = None  # times relative to the start of `pcm`; None: estimated


@runtime_checkable
class TTS(Protocol):
    """What `synth` needs from a text-to-speech engine."""

    name: str

    def synthesize(self, text: str, voice: str | None = None) -> Utterance:
        """Speak `text` with `voice` (backend-specific name; None: the backend's default)."""
        ...


# -- word times ---------------------------------------------------------------------------------------------
def estimate_word_times(text: str, pcm: np.ndarray, sample_rate: int) -> list[Word]:
    """Split the voiced span of `pcm` between the words of `text` in proportion to their lengths."""
    words = text.split()
    if not words:
        return []
    frame = max(1, sample_rate // 100)
    energy = np.sqrt(np.convolve(pcm.astype(np.float64) ** 2, np.ones(frame) / frame, mode="same"))
    voiced = np.nonzero(energy > energy.max() * 0.01)[0] if energy.max() > 0 else np.array([0, len(pcm) - 1])
    start, end = voiced[0] / sample_rate, (voiced[-1] + 1) / sample_rate
    weights = np.array([len(w) + 1 for w in words], dtype=np.float64)
    edges = start + (end - start) * np.concatenate([[0], np.cumsum(weights) / weights.sum()])
    return [Word(w, float(edges[i]), float(edges[i + 1])) for i, w in enumerate(words)]


# -- espeak-ng ------------------------------------------------------------------------------------------------
class _EspeakEvent(ctypes.Structure):
    # espeak_EVENT of speak_lib.h (stable since espeak 1.4x)
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                   ctypes.POINTER(_EspeakEvent))
_EVENT_LIST_TERMINATED, _EVENT_WORD, _EVENT_END = 0, 1, 5
_ESPEAK_LOCK = threading.Lock()
_ESPEAK: dict[str, Any] = {}  # the library is process-global: initialised once


def _find_espeak() -> tuple[str, str | None]:
    """(library path, folder holding espeak-ng-data or None for the library's default)."""
    try:
        import espeakng_loader

        return espeakng_loader.get_library_path(), os.path.dirname(espeakng_loader.get_data_path())
    except ImportError:
        pass
    from ctypes.util import find_library

    found = find_library("espeak-ng")
    if found:
        return found, None
    raise TTSError("espeak-ng is not installed: `pip install espeakng-loader` (or `apt-get install espeak-ng`), "
                   "or use --tts tones")


class EspeakTTS:
    """espeak-ng through ctypes: word times from its WORD events (exact, not estimated)."""

    name = "espeak"

    def __init__(self, words_per_minute: int = 165) -> None:
        with _ESPEAK_LOCK:
            if not _ESPEAK:
                path, data = _find_espeak()
                lib = ctypes.CDLL(path)
                rate = lib.espeak_Initialize(2, 0, data.encode() if data else None, 0)  # 2: synchronous output
                if rate <= 0:
                    raise TTSError(f"espeak-ng ({path}) failed to initialise; reinstall it")
                _ESPEAK.update(lib=lib, rate=rate, chunks=[], events=[])

                def collect(wav, count, events):
                    if count > 0:
                        _ESPEAK["chunks"].append(ctypes.string_at(wav, count * 2))
                    i = 0
                    while events[i].type != _EVENT_LIST_TERMINATED:
                        e = events[i]
                        _ESPEAK["events"].append((e.type, e.text_position, e.audio_position))
                        i += 1
                    return 0

                _ESPEAK["callback"] = _SYNTH_CALLBACK(collect)  # keep a reference: C holds the pointer
                lib.espeak_SetSynthCallback(_ESPEAK["callback"])
        self.sample_rate = _ESPEAK["rate"]
        self.words_per_minute = words_per_minute

    def synthesize(self, text: str, voice: str | None = None) -> Utterance:
        lib = _ESPEAK["lib"]
        with _ESPEAK_LOCK:
            if lib.espeak_SetVoiceByName((voice or "en-us").encode()) != 0:
                raise TTSError(f"espeak-ng has no voice {voice!r}; try en-us, en-gb, en-us+f3, en-us+m3")
            lib.espeak_SetParameter(1, int(self.words_per_minute), 0)  # espeakRATE, absolute
            _ESPEAK["chunks"], _ESPEAK["events"] = [], []
            data = text.encode("utf-8")
            if lib.espeak_Synth(ctypes.c_char_p(data), len(data) + 1, 0, 0, 0, 1, None, None) != 0:  # 1: UTF-8
                raise TTSError(f"espeak-ng could not speak {text[:40]!r}")
            lib.espeak_Synchronize()
            pcm = np.frombuffer(b"".join(_ESPEAK["chunks"]), dtype=np.int16).astype(np.float32) / 32768.0
            events = list(_ESPEAK["events"])
        return Utterance(pcm, self.sample_rate, _espeak_words(text, events, len(pcm) / self.sample_rate))


def _espeak_words(text: str, events: list[tuple[int, int, int]], duration: float) -> list[Word] | None:
    """Map WORD events (1-based character position, audio ms) onto the whitespace-separated words."""
    words, spans, pos = text.split(), [], 0
    for w in words:
        pos = text.index(w, pos)
        spans.append((pos, pos + len(w)))
        pos += len(w)
    starts: dict[int, float] = {}
    ends = sorted(ms / 1000 for kind, _, ms in events if kind == _EVENT_END)
    for kind, char, ms in events:
        if kind != _EVENT_WORD:
            continue
        for i, (a, b) in enumerate(spans):
            if a <= char - 1 < b:
                starts.setdefault(i, ms / 1000)
    if len(starts) != len(words):
        return None  # punctuation-only words, numbers read as several words...: estimate instead
    out = []
    for i, w in enumerate(words):
        nxt = starts[i + 1] if i + 1 < len(words) else duration
        sentence_end = next((e for e in ends if starts[i] < e <= nxt), nxt)
        out.append(Word(w, starts[i], max(starts[i], sentence_end)))
    return out


# -- a dependency-free stand-in -------------------------------------------------------------------------------
class ToneTTS:
    """Each word becomes a harmonic tone (pitch from the voice and the word), 60 ms gaps; exact word times.
    Not speech: for tests and for trying the pipeline without a TTS engine."""

    name = "tones"
    sample_rate = SAMPLE_RATE

    def synthesize(self, text: str, voice: str | None = None) -> Utterance:
        base = 100 + _hash(voice or "") % 120
        t0, parts, words = 0.0, [], []
        gap = np.zeros(int(0.06 * self.sample_rate), np.float32)
        for w in text.split():
            seconds = 0.12 + 0.045 * len(w)
            t = np.arange(int(seconds * self.sample_rate)) / self.sample_rate
            f0 = base * (1 + (_hash(w.lower()) % 7) / 10)
            envelope = np.sin(np.pi * t / seconds)
            tone = sum(np.sin(2 * np.pi * h * f0 * t) / h for h in range(1, 5)) * envelope * 0.3
            words.append(Word(w, t0, t0 + seconds))
            parts += [tone.astype(np.float32), gap]
            t0 += seconds + len(gap) / self.sample_rate
        pcm = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        return Utterance(pcm, self.sample_rate, words)


def _hash(text: str) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16)


BACKENDS = {"espeak": EspeakTTS, "tones": ToneTTS}


def load_tts(spec: str) -> TTS:
    """A built-in backend name or `package.module:Class` (constructed without arguments)."""
    if spec in BACKENDS:
        return BACKENDS[spec]()
    if ":" not in spec:
        raise TTSError(f"unknown TTS {spec!r}; use {', '.join(BACKENDS)} or package.module:Class")
    module, _, cls = spec.partition(":")
    try:
        backend = getattr(importlib.import_module(module), cls)()
    except (ImportError, AttributeError) as exc:
        raise TTSError(f"cannot load TTS {spec!r}: {exc}") from exc
    if not isinstance(backend, TTS):
        raise TTSError(f"{spec} does not implement the TTS protocol (name, synthesize(text, voice))")
    return backend


# -- scripts --------------------------------------------------------------------------------------------------
SPEAKERS = ("agent", "user")


@dataclass
class Turn:
    speaker: str
    text: str
    pause: float | None = None
    overlap: float | None = None
    start: float | None = None


@dataclass
class Script:
    id: str
    turns: list[Turn]
    text_prompt: str = ""
    voice_prompt: str | None = None
    agent_voice: str | None = None
    user_voice: str | None = None
    voice_prompt_text: str | None = None
    folder: Path | None = None  # where relative voice_prompt paths start


def read_scripts(paths: list[str | Path]) -> list[Script]:
    """Scripts from files (one object, a list, {"dialogues": [...]}, or JSON lines) or folders of *.json."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("*.json")) + sorted(p.glob("*.jsonl"))
        elif p.is_file():
            files.append(p)
        else:
            raise ScriptError(f"{p}: no such file or folder")
    scripts = []
    for f in files:
        text = f.read_text(encoding="utf-8")
        try:
            lines = [line for line in text.splitlines() if line.strip()]
            raw = json.loads(text) if f.suffix != ".jsonl" else [json.loads(line) for line in lines]
        except json.JSONDecodeError as exc:
            raise ScriptError(f"{f}: not valid JSON ({exc})") from exc
        items = raw.get("dialogues", raw) if isinstance(raw, dict) else raw
        items = [items] if isinstance(items, dict) else items
        if not isinstance(items, list):
            raise ScriptError(f"{f}: expected a dialogue object or a list of them")
        for i, item in enumerate(items):
            name = f.stem if len(items) == 1 else f"{f.stem}-{i:04d}"
            scripts.append(_script(item, f"{f.name}[{i}]", name, f.parent))
    ids = [s.id for s in scripts]
    if len(set(ids)) != len(ids):
        raise ScriptError(f"dialogue ids must be unique; repeated: {sorted({i for i in ids if ids.count(i) > 1})[:3]}")
    return scripts


def _script(raw: Any, where: str, default_id: str, folder: Path) -> Script:
    if not isinstance(raw, dict) or not isinstance(raw.get("turns"), list) or not raw["turns"]:
        raise ScriptError(f"{where}: a dialogue needs a non-empty \"turns\" list")
    turns = []
    for i, t in enumerate(raw["turns"]):
        if not isinstance(t, dict) or t.get("speaker") not in SPEAKERS or not str(t.get("text", "")).strip():
            raise ScriptError(f"{where}: turns[{i}] needs \"speaker\" (agent or user) and a non-empty \"text\"")
        timing = {k: t.get(k) for k in ("pause", "overlap", "start")}
        for k, v in timing.items():
            if v is not None and (not isinstance(v, (int, float)) or v < 0):
                raise ScriptError(f"{where}: turns[{i}].{k} must be a non-negative number of seconds")
        turns.append(Turn(t["speaker"], str(t["text"]).strip(), **timing))
    sid = str(raw.get("id", default_id))
    if not sid or "/" in sid or sid.startswith("."):
        raise ScriptError(f"{where}: id {sid!r} must be a plain file name")
    return Script(sid, turns, raw.get("text_prompt", ""), raw.get("voice_prompt"), raw.get("agent_voice"),
                  raw.get("user_voice"), raw.get("voice_prompt_text"), folder)


def _speak(tts: TTS, text: str, voice: str | None) -> tuple[np.ndarray, list[Word]]:
    """24 kHz audio (peak 0.5) and word times of one utterance."""
    from ..audio import resample

    utt = tts.synthesize(text, voice)
    pcm = resample(np.asarray(utt.pcm, dtype=np.float32), utt.sample_rate, SAMPLE_RATE)
    peak = float(np.abs(pcm).max()) if len(pcm) else 0.0
    if peak > 0:
        pcm = pcm * (0.5 / peak)
    words = utt.words if utt.words is not None else estimate_word_times(text, pcm, SAMPLE_RATE)
    return pcm.astype(np.float32), words


def render(script: Script, tts: TTS, lead: float = 0.5, tail: float = 0.5, pause: float = 0.4
           ) -> tuple[np.ndarray, list[Word], list[Word]]:
    """(2, T) 24 kHz stereo (agent left, user right) and the word times of each side."""
    placed, said_until, last_start = [], lead, 0.0
    for i, turn in enumerate(script.turns):
        voice = script.agent_voice if turn.speaker == "agent" else script.user_voice
        pcm, words = _speak(tts, turn.text, voice)
        if turn.start is not None:
            start = turn.start
        elif turn.overlap is not None:
            start = max(last_start, said_until - turn.overlap)
        else:
            start = said_until + (0.0 if i == 0 else (turn.pause if turn.pause is not None else pause))
        placed.append((turn.speaker, start, pcm, words))
        last_start, said_until = start, max(said_until, start + len(pcm) / SAMPLE_RATE)
    total = int(np.ceil((said_until + tail) * SAMPLE_RATE))
    audio = np.zeros((2, total), np.float32)
    words_of: dict[str, list[Word]] = {"agent": [], "user": []}
    for speaker, start, pcm, words in placed:
        a = int(round(start * SAMPLE_RATE))
        channel = 0 if speaker == "agent" else 1
        audio[channel, a:a + len(pcm)] += pcm[: total - a]
        words_of[speaker] += [Word(w.text, round(start + w.start, 3), round(start + w.end, 3)) for w in words]
    for side in words_of.values():
        side.sort(key=lambda w: w.start)
    return np.clip(audio, -1, 1), words_of["agent"], words_of["user"]


@dataclass
class SynthReport:
    written: list[str]
    failed: list[tuple[str, str]]
    seconds: float = 0.0


def synthesize(scripts: list[Script], output: str | Path, tts: TTS, progress: bool = True, **timing) -> SynthReport:
    """Write `<id>.wav` + `<id>.json` (the dataset format) per script into `output`; failures are listed."""
    from tqdm import tqdm

    from ..audio import write_wav

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    report = SynthReport([], [])
    for script in tqdm(scripts, unit="dialogue", desc="synth", disable=not progress):
        try:
            audio, agent, user = render(script, tts, **timing)
            voice = _voice_prompt(script, tts, output)
        except (PersonaplexError, OSError, ValueError, RuntimeError) as exc:
            report.failed.append((script.id, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
            continue
        write_wav(output / f"{script.id}.wav", audio, SAMPLE_RATE)
        record = {"text_prompt": script.text_prompt, "voice_prompt": voice,
                  "agent": _word_list(agent), "user": _word_list(user),
                  "synth": {"tts": tts.name, "agent_voice": script.agent_voice, "user_voice": script.user_voice}}
        (output / f"{script.id}.json").write_text(json.dumps(record, indent=1) + "\n")
        report.written.append(script.id)
        report.seconds += audio.shape[1] / SAMPLE_RATE
    return report


def _word_list(words: list[Word]) -> list[dict]:
    return [{"word": w.text, "start": w.start, "end": w.end} for w in words]


def _voice_prompt(script: Script, tts: TTS, output: Path) -> str:
    """The conversation's voice prompt: as given (a relative path made absolute), else a synthesised sample
    of the agent's TTS voice, shared by every dialogue with that voice."""
    from ..audio import write_wav

    if script.voice_prompt:
        given = (script.folder or Path(".")) / script.voice_prompt
        return str(given.resolve()) if given.is_file() else script.voice_prompt
    text = script.voice_prompt_text or DEFAULT_VOICE_PROMPT_TEXT
    name = f"{tts.name}-{script.agent_voice or 'default'}-{_hash(text):08x}"
    name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    path = output / "voices" / f"{name}.wav"
    if not path.is_file():
        pcm, _ = _speak(tts, text, script.agent_voice)
        write_wav(path, pcm, SAMPLE_RATE)
    return f"voices/{name}.wav"
