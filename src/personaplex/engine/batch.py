"""Many full-duplex conversations stepped together, one 80 ms frame per call.

`BatchEngine` holds up to `max_batch` conversations in the rows of one batch-first state (LM KV cache and
token columns, Mimi encoder/decoder states, sampling settings). Active conversations always occupy rows
0..n-1: a new one takes row n (its persona's cached prompt state copied in), a leaving one is replaced by
the last row. Every call of `step` encodes each conversation's user frame, runs one LM step for all of them
and decodes one frame of agent audio each. A conversation's output does not depend on who else is in the
batch: the sampling noise is keyed by the conversation's own seed and frame counter.

Timing (Moshi's): the user frame given at call c is read in the same call; the agent frame returned at call
c has its acoustic codebooks sampled in this call and its text and semantic codebook one call earlier. The
token layout is the released one; the released PersonaPlex generator returns the same stream one call
later (it reads each user frame one call late).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import torch

from ..config import FRAME_SIZE
from ..lm import LMModel, LMState, step_frame
from ..lm.depformer import DepformerCache
from .persona import Persona
from .sampling import SamplingParams, sample


_IDS = itertools.count()  # conversation ids are unique across engines (a server may rebuild its engine)


class EngineFullError(RuntimeError):
    """Every row of the batch is taken."""


@dataclass
class Conversation:
    """A handle on one conversation of the engine."""

    id: int
    persona_length: int  # prompt frames (the persona itself stays in the cache, not with the conversation)
    params: SamplingParams
    seed: int
    row: int = -1
    frames: int = 0  # user frames consumed
    active: bool = True


@dataclass
class FrameResult:
    pcm: torch.Tensor  # (1920,) float32 agent audio
    text_token: int
    audio_codes: torch.Tensor  # (8,) agent codes of this frame


@dataclass
class _Rows:
    """Per-row settings and token columns, (max_batch, …) tensors on the model device."""

    column: torch.Tensor  # (B, 17) next grid column (user delay-0 entries filled at step time)
    temperature: torch.Tensor  # (B, 2): text, audio
    topk: torch.Tensor  # (B, 2)
    topk_cpu: torch.Tensor  # (B, 2) host copy: the largest top-k of a step is known without a device sync
    seed: torch.Tensor  # (B,)
    counter: torch.Tensor  # (B,) frames stepped, keys the sampling noise
    conversations: list[Conversation] = field(default_factory=list)


class BatchEngine:
    def __init__(self, lm: LMModel, mimi, max_batch: int = 8, pin_prompt: bool = True) -> None:
        self.lm, self.mimi = lm, mimi
        self.max_batch = max_batch
        self.pin_prompt = pin_prompt
        c = lm.config
        self.codebooks = c.audio_codebooks
        self.device = lm.device
        self.state = lm.init_state(max_batch)
        dev = self.device
        self.rows = _Rows(
            column=torch.zeros(max_batch, c.num_streams, dtype=torch.long, device=dev),
            temperature=torch.zeros(max_batch, 2, device=dev),
            topk=torch.ones(max_batch, 2, dtype=torch.long, device=dev),
            topk_cpu=torch.ones(max_batch, 2, dtype=torch.long),
            seed=torch.zeros(max_batch, dtype=torch.long, device=dev),
            counter=torch.zeros(max_batch, dtype=torch.long, device=dev),
        )
        delays = torch.tensor(c.delays)
        user = torch.arange(1 + c.audio_codebooks, c.num_streams)
        self._user_now = user[delays[user] == 0].to(dev)  # user streams read in this call
        self._user_next = user[delays[user] > 0].to(dev)  # ... in the next call
        gen = torch.arange(0, 1 + c.audio_codebooks)
        self._gen_now = gen[delays[gen] == 0].to(dev)  # generated streams whose frame-c token is in the column
        self._gen_next = gen[delays[gen] > 0].to(dev)  # ... sampled in the call that returns frame c
        self.enc = None  # Mimi encoder state of rows 0..n-1
        self.dec = None

    # -- membership -----------------------------------------------------------------------------------------
    @property
    def active(self) -> int:
        return len(self.rows.conversations)

    @property
    def conversations(self) -> list[Conversation]:
        """The active conversations in step order: row i of `step`'s input and output belongs to item i."""
        return list(self.rows.conversations)

    def join(self, persona: Persona, params: SamplingParams | None = None) -> Conversation:
        """Start a conversation from a persona's cached prompt state (no prompt step is re-run)."""
        params = (params or SamplingParams()).validate()
        if self.active >= self.max_batch:
            raise EngineFullError(f"all {self.max_batch} conversation slots are in use")
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        conv = Conversation(next(_IDS), persona.length, params, seed, row=self.active)
        r = conv.row
        rows = self.rows
        enc, dec = self.enc, self.dec
        try:
            self.state.kv.load_prefix_(r, persona.keys, persona.values, pin=self.pin_prompt)
            rows.column[r] = persona.next_column
            greedy = params.greedy
            rows.temperature[r, 0] = 0.0 if greedy else params.text_temperature
            rows.temperature[r, 1] = 0.0 if greedy else params.audio_temperature
            rows.topk[r, 0], rows.topk[r, 1] = params.text_topk, params.audio_topk
            rows.topk_cpu[r] = rows.topk[r].cpu()
            rows.seed[r], rows.counter[r] = seed, 0
            rows.conversations.append(conv)
            self.enc = _append(enc, self.mimi.init_encoder_state(1))
            self.dec = _append(dec, self.mimi.init_decoder_state(1))
            self._prime(r, persona)
        except BaseException:  # e.g. out of memory: leave the batch exactly as it was
            if rows.conversations and rows.conversations[-1] is conv:
                rows.conversations.pop()
            self.enc, self.dec = enc, dec
            self.state.kv.reset(_row_mask(r, self.max_batch, self.device))
            conv.active = False
            raise
        return conv

    def leave(self, conv: Conversation) -> None:
        """End a conversation; the last row moves into its place."""
        if not conv.active:
            return
        conv.active = False
        rows, r, last = self.rows, conv.row, self.active - 1
        if r != last:
            self.state.kv.copy_row_(r, self.state.kv, last)
            for t in (rows.column, rows.temperature, rows.topk, rows.topk_cpu, rows.seed, rows.counter):
                t[r] = t[last]
            moved = rows.conversations[last]
            moved.row = r
            rows.conversations[r] = moved
        rows.conversations.pop()
        order = [i if i != r else last for i in range(last)]
        self.enc = self.enc.index_select(order) if order else None
        self.dec = self.dec.index_select(order) if order else None
        self.state.kv.reset(_row_mask(last, self.max_batch, self.device))

    def clear(self) -> None:
        """End every conversation at once (e.g. after a failed step) and return to an empty batch."""
        for conv in self.rows.conversations:
            conv.active = False
        self.rows.conversations.clear()
        self.enc = self.dec = None
        self.state.kv.reset()

    # -- stepping -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, user_pcm: torch.Tensor) -> list[FrameResult]:
        """One 80 ms frame for every active conversation, in row order.

        user_pcm: (n, 1920) float at 24 kHz, row i for `self.rows.conversations[i]`.
        """
        n = self.active
        if n == 0:
            return []
        if tuple(user_pcm.shape) != (n, FRAME_SIZE):
            raise ValueError(f"expected user audio ({n}, {FRAME_SIZE}), got {tuple(user_pcm.shape)}")
        user_codes = self.mimi.encode_step(user_pcm.to(self.device, torch.float32).view(n, 1, -1), self.enc)
        user_codes = user_codes[:, : self.codebooks, 0]  # (n, 8)
        rows = self.rows
        column = rows.column[:n]
        column[:, self._user_now] = user_codes[:, self._user_now - 1 - self.codebooks]
        tokens = self._lm_step(0, n, column, forced=None)  # (n, 1 + 8): the next column's generated part
        frame = torch.empty(n, 1 + self.codebooks, dtype=torch.long, device=self.device)
        frame[:, self._gen_now] = column[:, self._gen_now]
        frame[:, self._gen_next] = tokens[:, self._gen_next]
        column[:, : 1 + self.codebooks] = tokens
        column[:, self._user_next] = user_codes[:, self._user_next - 1 - self.codebooks]
        pcm = self.mimi.decode_step(frame[:, 1:, None], self.dec)[:, 0]  # (n, 1920)
        for conv in rows.conversations:
            conv.frames += 1
        pcm, frame = pcm.float().cpu(), frame.cpu()
        return [FrameResult(pcm[i], int(frame[i, 0]), frame[i, 1:]) for i in range(n)]

    def _prime(self, r: int, persona: Persona) -> None:
        """The step that consumes the prompt's last column (its agent output is the prompt's last silence
        frame, dropped); afterwards the row is ready for its first user frame."""
        column = self.rows.column[r : r + 1]
        forced = persona.forced_after[None, : 1 + self.codebooks]
        with torch.no_grad():
            tokens = self._lm_step(r, r + 1, column, forced=forced)
        column[:, : 1 + self.codebooks] = tokens
        column[:, self._user_next] = persona.forced_after[self._user_next]

    def _lm_step(self, start: int, stop: int, column: torch.Tensor, forced: torch.Tensor | None) -> torch.Tensor:
        rows = self.rows
        temperature, topk = rows.temperature[start:stop], rows.topk[start:stop]
        seed, counter = rows.seed[start:stop], rows.counter[start:stop]
        kmax = rows.topk_cpu[start:stop].max(dim=0).values.tolist()

        def sampler(logits: torch.Tensor, k: int) -> torch.Tensor:
            kind = 0 if k == 0 else 1
            return sample(logits, temperature[:, kind], topk[:, kind], seed, counter, stream=k, kmax=kmax[kind])

        state = LMState(self.state.kv.rows(start, stop), _dep_rows(self.state.dep, start, stop))
        out = step_frame(self.lm, state, column, sample=sampler, forced=forced, num_codebooks=self.codebooks)
        counter.add_(1)
        return out.tokens


def _append(state, new):
    return new if state is None else type(new).cat([state, new])


def _dep_rows(dep: DepformerCache, start: int, stop: int) -> DepformerCache:
    return DepformerCache(dep.keys[:, start:stop], dep.values[:, start:stop])


def _row_mask(row: int, size: int, device) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool, device=device)
    mask[row] = True
    return mask


__all__ = ["BatchEngine", "Conversation", "FrameResult", "EngineFullError"]
