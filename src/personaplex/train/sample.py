"""The training sample is what inference sees: the hybrid persona prompt built by the engine's own
`prompt_frames` (voice phase, 0.5 s silence, `<system> … <system>` text, 0.5 s silence), then the
conversation, in the un-delayed 17-stream layout (text, agent audio 8, user audio 8). The model's `forward`
applies the delays, exactly as the engine's step does.

Conversations longer than a training sequence are cut into consecutive chunks, each with the prompt in
front: `seq_frames` = prompt + chunk. That is also what inference computes once a conversation has slid past
its context: the engine pins the prompt and attends to it as if it sat right before the oldest kept frame.

A released `.pt` voice prompt carries the embeddings of its voice steps, not tokens; they are fed through
`LMModel.forward(prefix_embeddings=…)` in place of the first grid columns, as `build_persona` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..config import LMConfig
from ..engine.prompt import SILENCE_FRAMES, VoicePrompt, prompt_frames
from ..lm.layers import ZERO_TOKEN
from .data import DatasetError, PreparedDataset


def prompt_length(voice: VoicePrompt | None, prompt_ids: Sequence[int]) -> int:
    """Frames of the hybrid prompt (`prompt_frames` drops the voice's first frame)."""
    voice_frames = voice.num_frames - 1 if voice is not None and voice.num_frames > 1 else 0
    return voice_frames + 2 * SILENCE_FRAMES + len(prompt_ids)


@dataclass(frozen=True)
class Item:
    """One training sequence: a chunk of a conversation (its prompt goes in front)."""

    conversation: int  # index in the dataset
    start: int  # first conversation frame of the chunk
    frames: int  # conversation frames in the chunk


def chunk_items(dataset: PreparedDataset, seq_frames: int) -> list[Item]:
    """Every conversation cut into consecutive chunks so that prompt + chunk <= seq_frames."""
    items = []
    for index, rec in enumerate(dataset.records):
        prompt = prompt_length(dataset.voice(rec.voice), rec.prompt_ids)
        room = seq_frames - prompt
        if room < 1:
            raise DatasetError(f"conversation {rec.id}: its prompt takes {prompt} frames, no room left in sequences "
                               f"of {seq_frames} frames; raise --seq-frames")
        items.extend(Item(index, start, min(room, rec.frames - start)) for start in range(0, rec.frames, room))
    return items


@dataclass
class TrainingSample:
    codes: torch.Tensor  # (17, P + L) int64: prompt, then the conversation chunk
    prompt_frames: int  # P: no loss before this position
    prefix: torch.Tensor | None = None  # (E, dim) voice-step embeddings of a released .pt voice


def build_sample(dataset: PreparedDataset, item: Item, config: LMConfig) -> TrainingSample:
    rec = dataset.records[item.conversation]
    voice = dataset.voice(rec.voice)
    prompt = prompt_frames(voice, rec.prompt_ids, config)  # (17, P), the engine's own layout
    talk = dataset.tokens(item.conversation)[:, item.start:item.start + item.frames]  # (17, L)
    prefix = voice.embeddings if voice is not None and voice.embeddings is not None else None
    return TrainingSample(torch.cat([prompt, talk], dim=1), prompt.shape[1], prefix)


@dataclass
class Batch:
    codes: torch.Tensor  # (B, 17, T) int64; ZERO_TOKEN (-1) after each sample's end: zero input, no loss
    lengths: torch.Tensor  # (B,) real frames of each sample
    prompt_frames: torch.Tensor  # (B,) prompt frames of each sample (no loss there)
    counted: torch.Tensor  # (B,) bool: False for filler samples that keep ranks in step (no loss)
    prefix: torch.Tensor | None = None  # (B, E, dim) float32, NaN where a sample keeps its token embeddings

    @property
    def frames(self) -> int:
        """Real frames of the counted samples (padding and fillers excluded)."""
        return int(self.lengths[self.counted].sum())

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.codes), move(self.lengths), move(self.prompt_frames), move(self.counted),
                     move(self.prefix))


def collate(samples: Sequence[TrainingSample], counted: Sequence[bool] | None = None) -> Batch:
    """Right-pad to the longest sample with ZERO_TOKEN (causal attention: padding never reaches a real
    position) and stack the .pt voice embeddings, NaN-filled where a sample has fewer or none."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    streams = samples[0].codes.shape[0]
    T = max(s.codes.shape[1] for s in samples)
    codes = torch.full((len(samples), streams, T), ZERO_TOKEN, dtype=torch.long)
    for i, s in enumerate(samples):
        codes[i, :, : s.codes.shape[1]] = s.codes
    lengths = torch.tensor([s.codes.shape[1] for s in samples])
    prompts = torch.tensor([s.prompt_frames for s in samples])
    counted_t = torch.tensor(list(counted) if counted is not None else [True] * len(samples))
    prefix = None
    with_prefix = [s.prefix for s in samples if s.prefix is not None]
    if with_prefix:
        E, dim = max(p.shape[0] for p in with_prefix), with_prefix[0].shape[1]
        prefix = torch.full((len(samples), E, dim), float("nan"))
        for i, s in enumerate(samples):
            if s.prefix is not None:
                prefix[i, : s.prefix.shape[0]] = s.prefix.float()
    return Batch(codes, lengths, prompts, counted_t, prefix)


class ItemOrder:
    """An endless, seeded order over `n` items, reshuffled every epoch. Position p (items consumed so far)
    is epoch p // n, entry p % n of that epoch's permutation: the position alone restores the data stream."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        if n < 1:
            raise DatasetError("the dataset has no training sequence")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm = torch.randperm(self.n, generator=g)
            else:
                self._perm = torch.arange(self.n)
            self._epoch = epoch
        return self._perm

    def take(self, position: int, count: int) -> list[int]:
        """Item indices at positions position .. position + count - 1."""
        return [int(self._permutation(p // self.n)[p % self.n]) for p in range(position, position + count)]
