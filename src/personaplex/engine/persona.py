"""A persona is the model state after a hybrid prompt, computed once and shared by every conversation that
starts with the same (voice, text prompt)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable

import torch

from ..errors import PersonaplexError
from ..lm import NOT_FORCED, LMModel
from ..lm.transformer import KVCache
from .prompt import VoicePrompt, prompt_frames


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
def build_persona(lm: LMModel, voice: VoicePrompt | None, text_ids: list[int], text_prompt: str = "") -> Persona:
    """Run the prompt as one prefill of the temporal transformer (all tokens forced: no depformer, no
    sampling); the result is the state the released generator reaches after stepping it frame by frame."""
    frames = prompt_frames(voice, text_ids, lm).to(lm.device)  # (17, N)
    n = frames.shape[1]
    limit = lm.config.context // 2
    if n > limit:
        raise PromptTooLongError(f"the prompt takes {n} frames but at most {limit} fit this model's context "
                                 f"({lm.config.context}); shorten the text prompt or the voice prompt")
    grid = lm.delay(torch.cat([frames, frames[:, -1:]], dim=1)[None])[0]  # (17, N+2)
    x = lm.embed(grid[None, :, :n])
    if voice is not None and voice.embeddings is not None:
        e = voice.embeddings.shape[0]
        x[0, :e] = voice.embeddings.to(device=x.device, dtype=x.dtype)
    c = lm.config
    cache = KVCache.empty(c.num_layers, 1, c.num_heads, n, c.dim // c.num_heads, device=lm.device, dtype=lm.dtype)
    lm.temporal(x, cache)
    delayed = torch.tensor(c.delays, device=lm.device) > 0
    forced_after = torch.where(delayed, grid[:, n + 1], torch.full_like(grid[:, n + 1], NOT_FORCED))
    return Persona(cache.keys[:, 0].clone(), cache.values[:, 0].clone(), grid[:, n].clone(), forced_after,
                   text_prompt, voice.name if voice is not None else "")


class PersonaCache:
    """Least-recently-used personas, keyed by whatever identifies (voice, text prompt)."""

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self._items: OrderedDict[Hashable, Persona] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, build: Callable[[], Persona]) -> Persona:
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        self.misses += 1
        persona = build()
        self._items[key] = persona
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return persona

    def __len__(self) -> int:
        return len(self._items)
