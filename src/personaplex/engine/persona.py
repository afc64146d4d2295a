"""A persona is the model state after a hybrid prompt, computed once and shared by every conversation that
starts with the same (voice, text prompt)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable

import torch

from ..errors import PersonaplexError, VoiceNotFoundError
from ..lm import NOT_FORCED, LMModel
from ..lm.transformer import KVCache
from .prompt import VoicePrompt, VoicePromptError, prompt_frames


class PromptTooLongError(PersonaplexError):
    """The prompt does not fit the model's context."""


@dataclass
class Persona:
    """The deterministic state after the prompt: the temporal KV of its N frames and the token columns the
    first conversation step continues from."""

    keys: torch.Tensor  # (L, H, N, Dh)
    values: torch.Tensor
    next_column: torch.Tensor  # (17,) grid column N: the next input
    forced_after: torch.Tensor  # (17,) grid column N+1 where already known (delayed streams), else NOT_FORCED
    text_prompt: str = ""
    voice_name: str = ""

    @property
    def length(self) -> int:
        return self.keys.shape[2]


@torch.no_grad()
def build_persona(lm: LMModel, voice: VoicePrompt | None, text_ids: list[int], text_prompt: str = "",
                  bare: bool = False) -> Persona:
    """Run the prompt as one prefill of the temporal transformer (all tokens forced: no depformer, no
    sampling); the result is the state the released generator reaches after stepping it frame by frame.
    `bare`: no prompt at all (Moshi models, which have no persona prompt)."""
    if bare:
        frames = torch.zeros(lm.config.num_streams, 0, dtype=torch.long, device=lm.device)
    else:
        frames = prompt_frames(voice, text_ids, lm.config).to(lm.device)  # (17, N)
    n = frames.shape[1]
    limit = lm.config.context // 2
    if n > limit:
        raise PromptTooLongError(f"the prompt takes {n} frames but at most {limit} fit this model's context "
                                 f"({lm.config.context}); shorten the text prompt or the voice prompt")
    # Two columns past the prompt: N (next input) and N+1, known for the delayed streams (frame N-1).
    after = torch.full((frames.shape[0], 1), NOT_FORCED, dtype=torch.long, device=lm.device)
    grid = lm.delay(torch.cat([frames, after], dim=1)[None])[0]  # (17, N+2)
    c = lm.config
    cache = KVCache.empty(c.num_layers, 1, c.num_heads, n, c.dim // c.num_heads, device=lm.device, dtype=lm.dtype)
    if n:
        x = lm.embed(grid[None, :, :n])
        if voice is not None and voice.embeddings is not None:
            e = voice.embeddings.shape[0]
            x[0, :e] = voice.embeddings.to(device=x.device, dtype=x.dtype)
        lm.temporal(x, cache)
    delayed = torch.tensor(c.delays, device=lm.device) > 0
    forced_after = torch.where(delayed, grid[:, n + 1], torch.full_like(grid[:, n + 1], NOT_FORCED))
    return Persona(cache.keys[:, 0].clone(), cache.values[:, 0].clone(), grid[:, n].clone(), forced_after,
                   text_prompt, voice.name if voice is not None else "")


class PersonaCache:
    """Least-recently-used personas, keyed by whatever identifies (voice, text prompt), bounded both in count
    and in prompt frames (a persona's KV costs ~0.5 MiB per frame on the 7B model in bf16)."""

    def __init__(self, capacity: int = 16, max_frames: int = 4096) -> None:
        self.capacity = capacity
        self.max_frames = max_frames
        self._items: OrderedDict[Hashable, Persona] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def frames(self) -> int:
        return sum(p.length for p in self._items.values())

    def get(self, key: Hashable, build: Callable[[], Persona]) -> Persona:
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        self.misses += 1
        persona = build()
        self._items[key] = persona
        while len(self._items) > 1 and (len(self._items) > self.capacity or self.frames > self.max_frames):
            self._items.popitem(last=False)
        return persona

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items


class Personas:
    """Voice prompts and personas of one model, each built once.

    A voice is named like the released voices (`NATF2`, `NATF2.pt`) and looked up only among the files of
    `voices_dir`; with `allow_paths` (command line, never the server) an existing file path works too. Audio
    voices are encoded with Mimi (any rate, mono or stereo); `.pt` voices are the released format.
    """

    def __init__(self, lm: LMModel, mimi, tokenizer, voices_dir=None, capacity: int = 16,
                 allow_paths: bool = False, bare: bool | None = None) -> None:
        self.lm, self.mimi, self.tokenizer = lm, mimi, tokenizer
        self.voices_dir = voices_dir
        self.allow_paths = allow_paths
        # Moshi models (depformer predicting the agent only) were trained without a persona prompt.
        self.bare = lm.config.dep_q < lm.config.n_q if bare is None else bare
        self.cache = PersonaCache(capacity)
        self._voices: OrderedDict[Hashable, VoicePrompt] = OrderedDict()

    def available_voices(self) -> list[str]:
        from ..voices import list_voices

        return list_voices(self.voices_dir) if self.voices_dir else []

    def voice_path(self, spec: str) -> Path:
        """The file of a voice: a name among the voices (`NATF2`, `NATF2.pt`), else, with `allow_paths`,
        an existing file path."""
        from ..voices import find_voice

        try:
            return find_voice(spec, self.voices_dir)
        except VoiceNotFoundError:
            if self.allow_paths and Path(spec).is_file():
                return Path(spec)
            raise

    def voice(self, spec: str | None) -> tuple[Hashable, VoicePrompt | None]:
        """(cache key, voice prompt) of a voice spec; no voice for an empty spec."""
        if not spec:
            return None, None
        path = self.voice_path(spec)
        key = _file_key(path)
        if key not in self._voices:
            self._voices[key] = self._load_voice(path)
            while len(self._voices) > self.cache.capacity:
                self._voices.popitem(last=False)
        return key, self._voices[key]

    def _load_voice(self, path: Path) -> VoicePrompt:
        from ..audio import read_audio
        from ..voices import load_voice_file
        from .prompt import voice_from_audio

        if path.suffix == ".pt":
            return load_voice_file(path, self.lm)
        return voice_from_audio(self.mimi, read_audio(path), name=path.stem)

    def key(self, voice: str | None, text_prompt: str) -> Hashable:
        """What identifies the persona of (voice, text prompt), found without building anything."""
        if self.bare:
            return ("bare",)
        voice_key = _file_key(self.voice_path(voice)) if voice else None
        return voice_key, tuple(self.tokenizer.system_prompt_ids(text_prompt))

    def cached(self, voice: str | None, text_prompt: str) -> bool:
        """Whether `get` would return at once (no prompt to run)."""
        return self.key(voice, text_prompt) in self.cache

    def get(self, voice: str | None, text_prompt: str) -> Persona:
        """The persona for (voice, text prompt), computed on first use (no prompt at all for bare models)."""
        key = self.key(voice, text_prompt)
        if self.bare:
            return self.cache.get(key, lambda: build_persona(self.lm, None, [], bare=True))
        prompt = list(key[1])
        _, voice_prompt = self.voice(voice)
        return self.cache.get(key, lambda: build_persona(self.lm, voice_prompt, prompt, text_prompt))


def _file_key(path: Path) -> tuple[str, int]:
    """Identifies a voice file's content for the caches: its resolved path and modification time."""
    return str(path.resolve()), path.stat().st_mtime_ns
