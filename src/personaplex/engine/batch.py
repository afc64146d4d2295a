"""Many full-duplex conversations stepped together, one 80 ms frame per call.

`BatchEngine` holds up to `max_batch` conversations in the rows of preallocated, fixed-shape state: the LM KV
cache and token columns, the Mimi encoder/decoder states, the sampling settings. Every kind of per-row state
has the same row operations (`reset_row`, `copy_row`), so join, leave and rollback are one loop over them.
Active conversations occupy rows 0..n-1 (a new one takes row n with its persona's cached prompt state copied
in; a leaving one is replaced by the last row), and each tick runs on the smallest *bucket* of rows (1, 2, 4,
8, ... max_batch) that holds them, the rows past n being padding (`active` false: they neither advance nor
count). A join or leave therefore never changes a shape the tick sees, except when it crosses a bucket.

A tick (`_tick`) is device work only, from the user frames in `pcm_in` to agent audio in `pcm_out` and the
frame's tokens in `frame_out`: Mimi encode, LM step, sampling, Mimi decode, all in place, with no host
synchronisation and no data-dependent shape, so on a GPU each (bucket, variant) is captured once as a CUDA
graph and replayed (`graphs.py`); elsewhere it runs eagerly, the same code. `step` copies the user frames in,
runs the tick, and reads the outputs back.

A conversation's output does not depend on who else is in the batch: the sampling noise is keyed by the
conversation's own seed and frame counter, and a row past the 240 s window changes nothing for the others.

Timing (Moshi's): the user frame given at call c is read in the same call; the agent frame returned at call
c has its acoustic codebooks sampled in this call and its text and semantic codebook one call earlier. The
token layout is the released one; the released PersonaPlex generator returns the same stream one call
later (it reads each user frame one call late).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
from dataclasses import dataclass

import torch

from ..config import FRAME_SIZE
from ..lm import LMModel, LMState, step_frame
from ..lm.depformer import DepformerCache
from .persona import Persona
from .sampling import FrameSampler, SamplingParams

log = logging.getLogger("personaplex.engine")

_IDS = itertools.count()  # conversation ids are unique across engines (a server may rebuild its engine)

GRAPH_KMAX = (32, 256)  # top-k bounds the CUDA graphs are captured for (the defaults 25 / 250 fit)


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
    pinned: bool = True  # the prompt stays in the window for good (False: it slides out after 240 s)


@dataclass
class FrameResult:
    pcm: torch.Tensor  # (1920,) float32 agent audio
    text_token: int
    audio_codes: torch.Tensor  # (8,) agent codes of this frame


@dataclass
class RowTensors:
    """Per-row settings and token columns: (max_batch, ...) tensors on the model device, and host mirrors of
    what the host decides with (`*_cpu`), so a tick never waits for the device to learn them."""

    column: torch.Tensor  # (B, 17) next grid column (user delay-0 entries filled at step time)
    temperature: torch.Tensor  # (B, 2): text, audio
    topk: torch.Tensor  # (B, 2) long
    seed: torch.Tensor  # (B,) long
    counter: torch.Tensor  # (B,) long: frames stepped, keys the sampling noise
    active: torch.Tensor  # (B,) bool: a conversation holds the row
    topk_cpu: torch.Tensor  # (B, 2) host
    active_cpu: torch.Tensor  # (B,) host

    @classmethod
    def empty(cls, batch: int, streams: int, device) -> "RowTensors":
        z = lambda *shape, dtype=torch.long, dev=device: torch.zeros(shape, dtype=dtype, device=dev)  # noqa: E731
        return cls(z(batch, streams), z(batch, 2, dtype=torch.float32), z(batch, 2) + 1, z(batch), z(batch),
                   z(batch, dtype=torch.bool), z(batch, 2, dev="cpu") + 1, z(batch, dtype=torch.bool, dev="cpu"))

    def _tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    def rows(self, start: int, stop: int) -> "RowTensors":
        return RowTensors(*(t[start:stop] for t in self._tensors()))

    def reset_row(self, row: int) -> None:
        for t in self._tensors():
            t[row] = 1 if t is self.topk or t is self.topk_cpu else 0

    def copy_row(self, dst: int, src: "RowTensors", src_row: int) -> None:
        for mine, theirs in zip(self._tensors(), src._tensors()):
            mine[dst] = theirs[src_row]


@dataclass
class TickViews:
    """The first `size` rows of every buffer a tick touches: the same tensors every tick of that bucket (a
    captured CUDA graph replays on exactly these)."""

    size: int
    kv: object
    dep: DepformerCache
    enc: object
    dec: object
    rows: RowTensors
    pcm_in: torch.Tensor  # (size, 1920) float32
    pcm_out: torch.Tensor  # (size, 1920) float32
    frame_out: torch.Tensor  # (size, 1 + codebooks) long: text token and agent codes of the frame returned


def buckets_for(max_batch: int) -> list[int]:
    """Powers of two below max_batch, and max_batch: 1, 2, 4, ..., max_batch."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return sizes + [max_batch]


class BatchEngine:
    def __init__(self, lm: LMModel, mimi, max_batch: int = 8, pin_prompt: bool = True,
                 cuda_graphs: bool | None = None, pinned_capacity: int | None = None) -> None:
        """`cuda_graphs`: capture each bucket's tick as a CUDA graph (default: on a CUDA device).
        `pinned_capacity`: prompt frames a conversation can pin (default min(context / 2, 512)); a longer
        persona runs unpinned (the released behaviour), with a warning."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.lm, self.mimi = lm, mimi
        self.max_batch = max_batch
        self.pin_prompt = pin_prompt
        self.buckets = buckets_for(max_batch)
        c = lm.config
        self.codebooks = cb = c.audio_codebooks
        self.device = dev = lm.device
        self.state = lm.init_state(max_batch, pinned_capacity=pinned_capacity if pin_prompt else 0)
        self.rows = RowTensors.empty(max_batch, c.num_streams, dev)
        self.enc = mimi.init_encoder_state(max_batch)
        self.dec = mimi.init_decoder_state(max_batch)
        self._pcm_in = torch.zeros(max_batch, FRAME_SIZE, device=dev)
        self._pcm_out = torch.zeros(max_batch, FRAME_SIZE, device=dev)
        self._frame_out = torch.zeros(max_batch, 1 + cb, dtype=torch.long, device=dev)
        self._conversations: list[Conversation] = []  # row order
        delays = torch.tensor(c.delays)
        user = torch.arange(1 + cb, c.num_streams)
        gen = torch.arange(0, 1 + cb)
        self._user_now = _index(user[delays[user] == 0], dev)  # user streams read in this call ...
        self._user_now_code = _index(user[delays[user] == 0] - 1 - cb, dev)  # ... and their Mimi codebook
        self._user_next = _index(user[delays[user] > 0], dev)  # ... in the next call
        self._user_next_code = _index(user[delays[user] > 0] - 1 - cb, dev)
        self._gen_now = _index(gen[delays[gen] == 0], dev)  # generated streams whose frame-c token is in the column
        self._gen_next = _index(gen[delays[gen] > 0], dev)  # ... sampled in the call that returns frame c
        self._views = {b: self._make_views(b) for b in self.buckets}
        self._row_states = (self.state.kv, self.enc, self.dec, self.rows)
        self._warned_kmax = False
        self.graphs = None
        if cuda_graphs is None:
            cuda_graphs = dev.type == "cuda"
        if cuda_graphs:
            from .graphs import TickGraphs

            variants = (False, True) if self.state.kv.pinned_capacity > 0 else (False,)
            self.graphs = TickGraphs(self, [(b, slid, self.graph_kmax()) for b in self.buckets for slid in variants])

    # -- membership -----------------------------------------------------------------------------------------
    @property
    def active(self) -> int:
        return len(self._conversations)

    @property
    def conversations(self) -> list[Conversation]:
        """The active conversations in step order: row i of `step`'s input and output belongs to item i."""
        return list(self._conversations)

    def join(self, persona: Persona, params: SamplingParams | None = None) -> Conversation:
        """Start a conversation from a persona's cached prompt state (no prompt step is re-run)."""
        params = (params or SamplingParams()).validate()
        if self.active >= self.max_batch:
            raise EngineFullError(f"all {self.max_batch} conversation slots are in use")
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        conv = Conversation(next(_IDS), persona.length, params, seed, row=self.active)
        kv = self.state.kv
        conv.pinned = self.pin_prompt and persona.length <= kv.pinned_capacity
        if self.pin_prompt and not conv.pinned:
            log.warning("conversation %d: its prompt of %d frames is longer than the %d this engine can pin; it "
                        "will slide out of the window after %d s", conv.id, persona.length, kv.pinned_capacity,
                        self.lm.config.context * FRAME_SIZE // 24_000)
        r = conv.row
        try:
            for state in self._row_states:
                state.reset_row(r)
            kv.load_prefix_(r, persona.keys, persona.values, pin=conv.pinned)
            rows = self.rows
            rows.column[r] = persona.next_column
            greedy = params.greedy
            rows.temperature[r, 0] = 0.0 if greedy else params.text_temperature
            rows.temperature[r, 1] = 0.0 if greedy else params.audio_temperature
            rows.topk[r, 0], rows.topk[r, 1] = params.text_topk, params.audio_topk
            rows.topk_cpu[r, 0], rows.topk_cpu[r, 1] = params.text_topk, params.audio_topk
            rows.seed[r] = seed
            self._prime(r, persona)
            rows.active[r] = rows.active_cpu[r] = True
            self._pcm_in[r] = 0
        except BaseException:  # e.g. out of memory: leave the batch exactly as it was
            for state in self._row_states:
                state.reset_row(r)
            conv.active = False
            raise
        self._conversations.append(conv)
        return conv

    def leave(self, conv: Conversation) -> None:
        """End a conversation; the last row moves into its place."""
        if not conv.active:
            return
        conv.active = False
        r, last = conv.row, self.active - 1
        if r != last:
            for state in self._row_states:
                state.copy_row(r, state, last)
            moved = self._conversations[last]
            moved.row = r
            self._conversations[r] = moved
        self._conversations.pop()
        for state in self._row_states:
            state.reset_row(last)
        self._pcm_in[last] = 0

    def clear(self) -> None:
        """End every conversation at once (e.g. after a failed step) and return to an empty batch."""
        for conv in self._conversations:
            conv.active = False
        self._conversations.clear()
        everyone = torch.ones(self.max_batch, dtype=torch.bool)
        self.state.kv.reset(everyone)
        self.enc.reset(everyone.to(self.device))
        self.dec.reset(everyone.to(self.device))
        for r in range(self.max_batch):
            self.rows.reset_row(r)
        self._pcm_in.zero_()

    # -- stepping -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, user_pcm: torch.Tensor) -> list[FrameResult]:
        """One 80 ms frame for every active conversation, in row order.

        user_pcm: (n, 1920) float at 24 kHz, row i for `self.conversations[i]`. On the meta device (to count
        what a tick costs) the results hold meta tensors and text token -1.
        """
        n = self.active
        if n == 0:
            return []
        if tuple(user_pcm.shape) != (n, FRAME_SIZE):
            raise ValueError(f"expected user audio ({n}, {FRAME_SIZE}), got {tuple(user_pcm.shape)}")
        views = self._views[self._bucket(n)]
        views.pcm_in[:n].copy_(user_pcm)
        key = (views.size, views.kv.any_slid(self.lm.config.context), self._kmax(n))
        if self.graphs is None or not self.graphs.replay(key):
            self._tick(views, key[1], key[2])
        views.kv.pos_cpu.add_(views.rows.active_cpu)  # the host mirror of what the tick advanced
        for conv in self._conversations:
            conv.frames += 1
        if self.device.type == "meta":
            return [FrameResult(views.pcm_out[i], -1, views.frame_out[i, 1:]) for i in range(n)]
        pcm = views.pcm_out[:n].to("cpu", torch.float32, copy=True)  # the one device-to-host read of a tick
        frame = views.frame_out[:n].to("cpu", copy=True)
        return [FrameResult(pcm[i], int(frame[i, 0]), frame[i, 1:]) for i in range(n)]

    def _tick(self, v: TickViews, slid: bool, kmax: tuple[int, int]) -> None:
        """Device work of one frame for the rows of `v`: fixed shapes, in place, no host synchronisation."""
        b, cb = v.size, self.codebooks
        codes = self.mimi.encode_step(v.pcm_in.view(b, 1, FRAME_SIZE), v.enc)[:, :cb, 0]  # (b, 8)
        rows = v.rows
        column = rows.column
        column[:, self._user_now] = codes[:, self._user_now_code]
        sampler = FrameSampler(rows.temperature, rows.topk, rows.seed, rows.counter, kmax, cb, self.lm.config.card)
        tokens = step_frame(self.lm, LMState(v.kv, v.dep), column, sample=sampler, num_codebooks=cb,
                            active=rows.active, slid=slid).tokens  # (b, 1 + 8): the next column's generated part
        frame = v.frame_out
        frame[:, self._gen_now] = column[:, self._gen_now]
        frame[:, self._gen_next] = tokens[:, self._gen_next]
        column[:, : 1 + cb] = tokens
        column[:, self._user_next] = codes[:, self._user_next_code]
        v.pcm_out.copy_(self.mimi.decode_step(frame[:, 1:, None], v.dec)[:, 0])
        rows.counter.add_(rows.active)

    def _prime(self, r: int, persona: Persona) -> None:
        """The step that consumes the prompt's last column (its agent output is the prompt's last silence
        frame, dropped); afterwards the row is ready for its first user frame. Eager, on row r alone."""
        rows, cb = self.rows.rows(r, r + 1), self.codebooks
        kv = self.state.kv.rows(r, r + 1)
        dep = DepformerCache(self.state.dep.keys[:, r:r + 1], self.state.dep.values[:, r:r + 1])
        kmax = tuple(_kmax_bucket(int(k), v) for k, v in zip(rows.topk_cpu[0], self._vocab()))
        sampler = FrameSampler(rows.temperature, rows.topk, rows.seed, rows.counter, kmax, cb, self.lm.config.card)
        forced = persona.forced_after[None, : 1 + cb]
        with torch.no_grad():
            tokens = step_frame(self.lm, LMState(kv, dep), rows.column, sample=sampler, forced=forced,
                                num_codebooks=cb).tokens
        rows.column[:, : 1 + cb] = tokens
        rows.column[:, self._user_next] = persona.forced_after[self._user_next]
        rows.counter.add_(1)

    # -- shapes -----------------------------------------------------------------------------------------------
    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _vocab(self) -> tuple[int, int]:
        c = self.lm.config
        return c.text_card, c.card

    def _kmax(self, n: int) -> tuple[int, int]:
        """Static top-k bounds for the active rows (host mirror): the graphs' bounds when they suffice."""
        need = self.rows.topk_cpu[:n].max(dim=0).values.tolist()
        captured = self.graph_kmax()
        if all(k <= g for k, g in zip(need, captured)):
            return captured
        if self.graphs is not None and not self._warned_kmax:
            self._warned_kmax = True
            log.warning("a conversation asks for top-k %s beyond the %s its CUDA graphs were captured for; "
                        "those ticks run eagerly", need, captured)
        return tuple(_kmax_bucket(k, v) for k, v in zip(need, self._vocab()))

    def graph_kmax(self) -> tuple[int, int]:
        """The top-k bounds of the captured graphs (and of every tick whose rows stay within them)."""
        return tuple(min(g, v) for g, v in zip(GRAPH_KMAX, self._vocab()))

    def _make_views(self, b: int) -> TickViews:
        dep = self.state.dep
        return TickViews(b, self.state.kv.rows(0, b), DepformerCache(dep.keys[:, :b], dep.values[:, :b]),
                         _state_rows(self.enc, b), _state_rows(self.dec, b), self.rows.rows(0, b),
                         self._pcm_in[:b], self._pcm_out[:b], self._frame_out[:b])


def _index(streams: torch.Tensor, device) -> slice | torch.Tensor:
    """Stream indices as a slice when they are a contiguous run (a copy instead of a gather + scatter)."""
    values = streams.tolist()
    if values and values == list(range(values[0], values[-1] + 1)):
        return slice(values[0], values[-1] + 1)
    return streams.to(device)


def _kmax_bucket(k: int, vocab: int) -> int:
    """The power of two >= k (at most the vocabulary): few distinct shapes, the same draws (see FrameSampler)."""
    return min(vocab, 1 << max(0, k - 1).bit_length())


def _state_rows(state, b: int):
    """A view of the first b rows of a Mimi streaming state (every tensor sliced; writes go to `state`)."""
    return state._replace_all(lambda t: t[:b], lambda s: _state_rows(s, b))


__all__ = ["BatchEngine", "Conversation", "FrameResult", "EngineFullError", "RowTensors", "buckets_for"]
