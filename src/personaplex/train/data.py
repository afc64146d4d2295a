"""Training conversations: the dataset format, word timestamps -> text tokens, and the prepared token shards.

A conversation is two files side by side (docs/training.md has the full description)::

    call-0001.wav    stereo: the agent on the left channel, the user on the right; any rate, any length
    call-0001.json   {"text_prompt": "You are ...", "voice_prompt": "NATF2",
                      "agent": [{"word": "Hello", "start": 0.42, "end": 0.71}, ...],
                      "user": [...]}                                   # optional, checked, not trained on

Moshi-finetune's `{"alignments": [[word, [start, end], speaker], ...]}` is accepted too (speaker
"SPEAKER_MAIN" is the agent). `train-prepare` (prepare.py) turns a folder of them into shards: per
conversation a (17, T) token grid (text, agent audio 8, user audio 8; un-delayed, T = ceil(samples / 1920))
plus the prompt ids and a reference to its voice prompt; `PreparedDataset` reads them back.

Text stream (Moshi's convention): a word's SentencePiece tokens are laid one per frame from frame
floor(start * 12.5); the frame before a word's first token becomes EPAD (0) when it holds padding; every
other frame is PAD (3). When a word starts before the previous word's tokens are all placed, `overflow`
decides: "truncate" (default, Moshi-finetune's default) drops the rest of the previous word, "shift" keeps
them and pushes the new word's tokens later (Moshi-finetune's `keep_and_shift`).
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from ..config import FRAME_RATE, TEXT_EPAD, TEXT_PAD
from ..errors import PersonaplexError

FORMAT = "personaplex-train-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VOICES_SUBDIR = "voices"
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
OVERFLOW_MODES = ("truncate", "shift")
MAIN_SPEAKER = "SPEAKER_MAIN"  # moshi-finetune's label of the model's own speaker


class DatasetError(PersonaplexError):
    """A dataset folder as a whole cannot be used (nothing to prepare, no manifest, another tokenizer)."""


class SampleError(PersonaplexError):
    """One conversation is unusable; preparation lists it, skips it and goes on."""


@dataclass
class Word:
    text: str
    start: float  # seconds from the start of the conversation audio
    end: float


@dataclass
class ConversationSpec:
    """One conversation of a dataset folder, as read from its JSON (audio not loaded yet)."""

    id: str  # path of the JSON relative to the dataset folder, without suffix
    json_path: Path
    audio_path: Path
    text_prompt: str = ""
    voice_prompt: str | None = None  # a voice name, or an audio / .pt path (relative paths: from the JSON)
    agent_words: list[Word] = field(default_factory=list)
    user_words: list[Word] = field(default_factory=list)


# -- reading a dataset folder ---------------------------------------------------------------------------------
def find_conversations(folder: str | Path) -> list[Path]:
    """Every `*.json` under `folder` (recursively, sorted), except the files a prepared dataset writes."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"dataset folder {folder} not found")
    found = [p for p in sorted(folder.rglob("*.json")) if p.name != MANIFEST and not p.name.startswith(".")]
    if not found:
        raise DatasetError(f"{folder} holds no conversation (*.json beside a stereo wav); see docs/training.md")
    return found


def read_conversation(json_path: Path, root: Path) -> ConversationSpec:
    """Parse one conversation's JSON and find its audio; every problem is a one-line `SampleError`."""
    cid = json_path.relative_to(root).with_suffix("").as_posix()
    try:
        raw = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SampleError(f"{json_path.name}: not readable JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise SampleError(f"{json_path.name}: expected a JSON object with 'agent' word timestamps")
    audio = _audio_for(json_path, raw.get("audio"))
    prompt = raw.get("text_prompt", "")
    voice = raw.get("voice_prompt")
    if not isinstance(prompt, str):
        raise SampleError(f"{json_path.name}: text_prompt must be a string")
    if voice is not None and (not isinstance(voice, str) or not voice.strip()):
        raise SampleError(f"{json_path.name}: voice_prompt must be a voice name or a file path")
    if "alignments" in raw:
        agent, user = _moshi_alignments(raw["alignments"], json_path.name)
    elif "agent" in raw:
        agent = parse_words(raw["agent"], f"{json_path.name}: agent")
        user = parse_words(raw.get("user") or [], f"{json_path.name}: user")
    else:
        raise SampleError(f"{json_path.name}: no word timestamps: add "
                          "\"agent\": [{\"word\": ..., \"start\": ..., \"end\": ...}, ...]")
    return ConversationSpec(cid, json_path, audio, prompt, voice.strip() if voice else None, agent, user)


def _audio_for(json_path: Path, named: Any) -> Path:
    if named is not None:
        if not isinstance(named, str):
            raise SampleError(f"{json_path.name}: 'audio' must be a file name")
        path = (json_path.parent / named).resolve()
        if not path.is_file():
            raise SampleError(f"{json_path.name}: audio file {named} not found")
        return path
    for suffix in AUDIO_SUFFIXES:
        path = json_path.with_suffix(suffix)
        if path.is_file():
            return path
    raise SampleError(f"{json_path.name}: no audio beside it ({json_path.stem}{{{','.join(AUDIO_SUFFIXES)}}})")


def parse_words(raw: Any, where: str) -> list[Word]:
    """[{"word", "start", "end"}, ...] -> words sorted by start. Bad entries raise `SampleError`."""
    if not isinstance(raw, list):
        raise SampleError(f"{where}: expected a list of {{\"word\", \"start\", \"end\"}}")
    words = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not {"word", "start", "end"} <= set(item):
            raise SampleError(f"{where}[{i}]: expected {{\"word\": str, \"start\": seconds, \"end\": seconds}}")
        words.append(_word(item["word"], item["start"], item["end"], f"{where}[{i}]"))
    return sorted(words, key=lambda w: w.start)


def _word(text: Any, start: Any, end: Any, where: str) -> Word:
    if not isinstance(text, str):
        raise SampleError(f"{where}: word must be a string")
    try:
        start, end = float(start), float(end)
    except (TypeError, ValueError):
        raise SampleError(f"{where}: start/end must be numbers of seconds") from None
    if not (math.isfinite(start) and math.isfinite(end)) or start < 0 or end < start:
        raise SampleError(f"{where}: bad times start={start} end={end} (need 0 <= start <= end)")
    return Word(text, start, end)


def _moshi_alignments(raw: Any, where: str) -> tuple[list[Word], list[Word]]:
    if not isinstance(raw, list):
        raise SampleError(f"{where}: alignments must be a list of [word, [start, end], speaker]")
    agent, user = [], []
    for i, item in enumerate(raw):
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[1], list) and len(item[1]) == 2):
            raise SampleError(f"{where}: alignments[{i}] must be [word, [start, end], speaker]")
        word = _word(item[0], item[1][0], item[1][1], f"{where}: alignments[{i}]")
        (agent if item[2] == MAIN_SPEAKER else user).append(word)
    return sorted(agent, key=lambda w: w.start), sorted(user, key=lambda w: w.start)


def check_word_times(words: Iterable[Word], duration: float, where: str) -> None:
    """Timestamps past the end of the audio mean the JSON belongs to another file (or another rate)."""
    for w in words:
        if w.start > duration + 1 / FRAME_RATE:
            raise SampleError(f"{where}: word {w.text!r} starts at {w.start:.2f} s but the audio lasts "
                              f"{duration:.2f} s - timestamps of another file?")


# -- words -> text stream -------------------------------------------------------------------------------------
def start_frame(seconds: float, frame_rate: float = FRAME_RATE) -> int:
    """floor(seconds * frame_rate); the epsilon keeps 0.08 s on frame 1 despite binary rounding."""
    return int(math.floor(seconds * frame_rate + 1e-6))


def align_words(words: list[tuple[list[int], float]], num_frames: int, overflow: str = "truncate",
                frame_rate: float = FRAME_RATE) -> tuple[list[int], int]:
    """Text tokens of `num_frames` frames from (token ids, start seconds) per word, sorted by start.

    Returns (tokens, dropped): `dropped` counts the tokens that did not fit (cut by the next word in
    "truncate" mode, or past the last frame).
    """
    if overflow not in OVERFLOW_MODES:
        raise ValueError(f"overflow must be one of {OVERFLOW_MODES}, got {overflow!r}")
    text = [TEXT_PAD] * num_frames
    pending: deque[int] = deque()
    dropped, nxt = 0, 0
    for t in range(num_frames):
        while nxt < len(words) and start_frame(words[nxt][1], frame_rate) <= t:
            if overflow == "shift":
                pending.extend(words[nxt][0])
            else:
                dropped += len(pending)
                pending = deque(words[nxt][0])
            nxt += 1
        if pending:
            if t > 0 and text[t - 1] == TEXT_PAD:
                text[t - 1] = TEXT_EPAD
            text[t] = pending.popleft()
    dropped += len(pending) + sum(len(ids) for ids, _ in words[nxt:])
    return text, dropped


def word_tokens(words: list[Word], tokenizer, text_card: int, where: str) -> list[tuple[list[int], float]]:
    """SentencePiece ids of each word (a leading '▁' marks the word start, as in running text)."""
    out = []
    for w in words:
        if not w.text.strip():
            continue
        ids = tokenizer.encode(w.text.strip())
        if any(i >= text_card for i in ids):
            raise SampleError(f"{where}: word {w.text!r} has token ids >= {text_card}: wrong tokenizer?")
        out.append((ids, w.start))
    return out


# -- the prepared dataset -------------------------------------------------------------------------------------
def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DatasetError(f"{folder} is not a prepared dataset (no {MANIFEST}); run `personaplex train-prepare` "
                           "on the conversations folder first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: damaged ({exc}); prepare the dataset again into a new folder") from exc
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise DatasetError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} manifest")
    return manifest


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Atomic: a crash never leaves a half-written manifest."""
    tmp = folder / (MANIFEST + ".partial")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(folder / MANIFEST)


@dataclass
class Record:
    """One prepared conversation."""

    id: str
    shard: str
    frames: int
    prompt_ids: list[int]
    voice: str | None  # key of the voice prompt in voices/, None: no voice phase
    text_prompt: str = ""


class PreparedDataset:
    """Read access to a `train-prepare` output folder: token grids, prompt ids and voice prompts."""

    def __init__(self, folder: str | Path, ids: Iterable[str] | None = None) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        keep = set(ids) if ids is not None else None
        self.records: list[Record] = []
        for shard in self.manifest["shards"]:
            for rec in shard["conversations"]:
                if keep is None or rec["id"] in keep:
                    self.records.append(Record(rec["id"], shard["file"], rec["frames"], list(rec["prompt_ids"]),
                                               rec.get("voice"), rec.get("text_prompt", "")))
        self._shards: dict[str, Any] = {}
        self._voices: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, ids: Iterable[str]) -> "PreparedDataset":
        return PreparedDataset(self.folder, ids)

    def tokens(self, index: int) -> torch.Tensor:
        """(17, T) int64 un-delayed tokens of conversation `index`: text, agent audio, user audio."""
        from safetensors import safe_open

        rec = self.records[index]
        if rec.shard not in self._shards:
            path = self.folder / rec.shard
            if not path.is_file():
                raise DatasetError(f"{path} is listed in {MANIFEST} but missing; prepare the dataset again")
            self._shards[rec.shard] = safe_open(str(path), framework="pt", device="cpu")
        return self._shards[rec.shard].get_tensor(rec.id).long()

    def voice(self, key: str | None):
        """The `VoicePrompt` stored under `key` (codes, and embeddings for released .pt voices)."""
        from safetensors.torch import load_file

        from ..engine.prompt import VoicePrompt

        if key is None:
            return None
        if key not in self._voices:
            path = self.folder / VOICES_SUBDIR / f"{key}.safetensors"
            if not path.is_file():
                raise DatasetError(f"voice prompt {path} is missing; prepare the dataset again")
            data = load_file(str(path))
            emb = data.get("embeddings")
            self._voices[key] = VoicePrompt(data["codes"].long(), emb.float() if emb is not None else None, key)
        return self._voices[key]

    def check_model(self, config, tokenizer_sha256: str | None = None) -> None:
        """Refuse shards built for another stream layout or another text tokenizer."""
        m = self.manifest
        if m.get("streams") != config.num_streams or m.get("codebooks") != config.audio_codebooks:
            raise DatasetError(f"{self.folder} was prepared for {m.get('streams')} streams, the model has "
                               f"{config.num_streams}; prepare it again with this checkpoint")
        if tokenizer_sha256 and m.get("tokenizer_sha256") not in (None, tokenizer_sha256):
            raise DatasetError(f"{self.folder} was prepared with another text tokenizer; prepare it again with "
                               "this checkpoint")
