"""The model loop: one thread steps every active conversation together, one 80 ms frame per tick.

All torch work of the server happens on this thread (persona prompts, joining, stepping, leaving), so the
event loop only moves bytes. Each conversation is a `Slot`: a bounded buffer of the caller's decoded audio
that the event loop fills, and a `deliver` callback the loop calls (on the event loop) with each frame of
agent audio and its text token. A tick takes one 1920-sample frame from every slot, or silence where a
client has not sent enough (counted as missing), so a slow or silent caller never holds up the others.

Ticks start every 80 ms of real time; a tick that runs longer makes the next one start at once (an overrun)
instead of bunching up to catch up.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..config import FRAME_SIZE, SAMPLE_RATE
from ..engine import BatchEngine, Conversation, EngineFullError, Personas, SamplingParams
from ..errors import PersonaplexError

log = logging.getLogger("personaplex.server")

TICK_SECONDS = FRAME_SIZE / SAMPLE_RATE  # 0.08


class ConversationStartError(PersonaplexError):
    """The model thread could not start a conversation for a reason that is not the caller's (e.g. out of
    memory); the caller is told, the others are not affected."""


class InputBuffer:
    """Decoded caller audio waiting for the model, at most `max_samples` (the oldest is dropped first).

    Filled by the event loop, emptied by the model thread, hence the lock.
    """

    def __init__(self, max_samples: int) -> None:
        self.max_samples = max(FRAME_SIZE, max_samples)
        self._data = np.zeros(0, dtype=np.float32)
        self._lock = threading.Lock()
        self.dropped_samples = 0
        self._backlog_ticks = 0

    def push(self, pcm: np.ndarray) -> None:
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        with self._lock:
            data = np.concatenate([self._data, pcm]) if self._data.size else pcm.copy()
            excess = data.size - self.max_samples
            if excess > 0:
                self.dropped_samples += excess
                data = data[excess:]
            self._data = data

    # A backlog left by a network stall would add its length to the caller's latency for the rest of the call:
    # when more than this much audio stays queued for `BACKLOG_TICKS` ticks in a row, the excess is dropped.
    BACKLOG_SAMPLES = 2 * FRAME_SIZE
    BACKLOG_TICKS = 25  # 2 s

    def take_frame(self) -> tuple[np.ndarray, bool]:
        """One frame (1920,) and whether it was complete; a short buffer is padded with silence."""
        with self._lock:
            got, self._data = self._data[:FRAME_SIZE], self._data[FRAME_SIZE:]
            self._backlog_ticks = self._backlog_ticks + 1 if self._data.size > self.BACKLOG_SAMPLES else 0
            if self._backlog_ticks >= self.BACKLOG_TICKS:
                excess = self._data.size - FRAME_SIZE // 2
                self.dropped_samples += excess
                self._data = self._data[excess:]
                self._backlog_ticks = 0
        if got.size == FRAME_SIZE:
            return got, True
        frame = np.zeros(FRAME_SIZE, dtype=np.float32)
        frame[: got.size] = got
        return frame, False

    def __len__(self) -> int:
        return self._data.size


@dataclass
class SlotStats:
    frames: int = 0  # frames stepped
    missing: int = 0  # ticks where the caller had not delivered a whole frame (silence or padding used)
    dropped_in: int = 0  # input frames dropped because the caller sent faster than real time
    dropped_out: int = 0  # output frames dropped because the caller did not read fast enough
    silent_streak: int = 0  # consecutive ticks without a whole frame from the caller


@dataclass
class Slot:
    """One caller's seat at the model: persona request, input buffer, output callback and counters."""

    voice: str | None
    text_prompt: str
    params: SamplingParams
    deliver: Callable[[np.ndarray, int], None]  # (pcm (1920,), text token), called on the event loop
    input: InputBuffer
    id: int = field(default_factory=itertools.count().__next__)
    name: str = ""  # the call's id in log lines (the session's "#n"); "slot <id>" when not given
    stats: SlotStats = field(default_factory=SlotStats)
    closed: bool = False  # set by the event loop when the caller is gone
    failed: Callable[[str], None] | None = None  # called on the event loop if the model drops this slot
    conversation: Conversation | None = None  # model thread only

    def __post_init__(self) -> None:
        self.name = self.name or f"slot {self.id}"


@dataclass
class TickStats:
    """Counters of the loop, read by the metrics endpoint (plain ints: safe to read from another thread)."""

    ticks: int = 0
    overruns: int = 0
    step_errors: int = 0
    frames_missing: int = 0
    frames_dropped_in: int = 0
    frames_dropped_out: int = 0
    persona_builds: int = 0
    persona_seconds: float = 0.0
    window: deque = field(default_factory=lambda: deque(maxlen=750))  # recent tick durations (s): 60 s
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, seconds: float) -> None:
        with self.lock:
            self.window.append(seconds)
        self.ticks += 1

    def percentiles(self, qs=(0.5, 0.9, 0.99)) -> dict[float, float]:
        with self.lock:
            values = sorted(self.window)
        if not values:
            return {q: 0.0 for q in qs}
        return {q: values[min(len(values) - 1, int(q * len(values)))] for q in qs}


class Admission:
    """At most `capacity` callers hold a row; up to `queue_limit` more wait in order. Event-loop only."""

    def __init__(self, capacity: int, queue_limit: int) -> None:
        self.capacity, self.queue_limit = capacity, queue_limit
        self.active = 0
        self.waiting: deque[Waiter] = deque()

    def try_enter(self) -> bool:
        if self.active < self.capacity and not self.waiting:
            self.active += 1
            return True
        return False

    def enqueue(self) -> "Waiter | None":
        if len(self.waiting) >= self.queue_limit:
            return None
        waiter = Waiter(asyncio.get_running_loop().create_future(), len(self.waiting) + 1)
        self.waiting.append(waiter)
        return waiter

    def cancel(self, waiter: "Waiter") -> None:
        """A queued caller left (or was admitted and then left before using its row)."""
        if waiter in self.waiting:
            self.waiting.remove(waiter)
            self._renumber()
        elif waiter.admitted.done():
            self.release()

    def release(self) -> None:
        self.active -= 1
        while self.waiting and self.active < self.capacity:
            waiter = self.waiting.popleft()
            self.active += 1
            waiter.admitted.set_result(True)
        self._renumber()

    def _renumber(self) -> None:
        for i, waiter in enumerate(self.waiting, start=1):
            if waiter.position != i:
                waiter.position = i
                waiter.moved.set()


@dataclass(eq=False)
class Waiter:
    admitted: asyncio.Future
    position: int
    moved: asyncio.Event = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.moved = asyncio.Event()


class ModelLoop:
    """Owns a `BatchEngine` and the thread that drives it.

    `engine_factory()` builds a fresh engine; it is called once at start and again if a failed step left
    the engine unusable. `on_frame(slot, frame_index, user_pcm, result)`, if given, is called on the model
    thread for every conversation frame (tests use it to compare with solo runs).
    """

    def __init__(self, engine_factory: Callable[[], BatchEngine], personas: Personas,
                 tick_seconds: float = TICK_SECONDS, on_frame: Callable[..., Any] | None = None,
                 idle_ticks: int | None = None) -> None:
        self.engine_factory = engine_factory
        self.idle_ticks = idle_ticks  # a caller silent (no audio at all) this many ticks is dropped
        self.personas = personas
        self.tick_seconds = tick_seconds
        self.on_frame = on_frame
        self.stats = TickStats()
        self.engine: BatchEngine | None = None
        self._slots: dict[int, Slot] = {}  # conversation id -> slot, model thread only
        self._commands: queue.Queue = queue.Queue()
        self._deferred: deque = deque()  # joins waiting for their persona to be built (model thread only)
        self._built_since_tick = False  # a persona prompt already ran since the last tick
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self._deadline = 0.0

    # -- event-loop side -----------------------------------------------------------------------------------
    @property
    def active(self) -> int:
        return len(self._slots)

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self, loop: asyncio.AbstractEventLoop, warm_up: tuple[str | None, str] | None = None) -> None:
        """Start the thread; `warm_up` = (voice, text prompt) builds that persona before the first tick."""
        self._loop = loop
        ready = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(ready, warm_up), name="personaplex-model",
                                        daemon=True)
        self._thread.start()
        ready.result()  # re-raises a failure to build the engine

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._commands.put(("wake", None, None))
        if self._thread is not None:
            self._thread.join(timeout)

    async def join(self, slot: Slot) -> Conversation:
        """Build (or reuse) the slot's persona and give it a row; raises what persona building raises."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("join", slot, future))
        return await asyncio.wrap_future(future)

    def leave(self, slot: Slot) -> None:
        """Free the slot's row at the next tick (safe to call more than once, or before it joined)."""
        slot.closed = True
        self._commands.put(("leave", slot, None))

    # -- model thread --------------------------------------------------------------------------------------
    def _run(self, ready: concurrent.futures.Future, warm_up) -> None:
        try:
            with torch.no_grad():
                self.engine = self.engine_factory()
                if warm_up is not None:  # the default persona, and one step so the first caller waits less
                    conv = self.engine.join(self._build_persona(*warm_up))
                    self.engine.step(torch.zeros(1, FRAME_SIZE))
                    self.engine.leave(conv)
        except BaseException as error:
            ready.set_exception(error)
            return
        ready.set_result(None)
        with torch.no_grad():
            self._deadline = time.perf_counter()
            while not self._stopping.is_set():
                try:
                    self._iterate()
                except Exception:  # never let the thread die: log, breathe, carry on
                    log.exception("model loop error")
                    time.sleep(self.tick_seconds)
                    self._deadline = time.perf_counter()
        for slot in list(self._slots.values()):
            self._fail(slot, "the server is shutting down")
        while True:  # joins that never ran: their callers must not wait forever
            try:
                kind, _, future = self._deferred.popleft() if self._deferred else self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "join" and future.set_running_or_notify_cancel():
                future.set_exception(ConnectionResetError("the server is shutting down"))

    def _iterate(self) -> None:
        if self.engine is None:  # a rebuild failed earlier (e.g. out of memory): try again
            self.engine = self.engine_factory()
        if not self._slots:
            self._built_since_tick = False  # nobody to delay
            try:  # idle: sleep until someone joins
                if not self._deferred:
                    self._deferred.append(self._commands.get(timeout=0.5))
                self._drain_commands()
            except queue.Empty:
                pass
            self._deadline = time.perf_counter()
            return
        self._drain_commands()
        if not self._slots:
            return
        pause = self._deadline - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        started = time.perf_counter()
        self._tick()
        self._built_since_tick = False
        finished = time.perf_counter()
        self.stats.record(finished - started)
        self._deadline += self.tick_seconds
        if finished > self._deadline:  # behind real time: start the next tick now, do not bunch up
            self.stats.overruns += 1
            self._deadline = finished

    def _drain_commands(self) -> None:
        """Handle what arrived since the last tick, one command at a time: a command that fails fails its own
        caller only, and the commands after it still run (they stay queued until handled). A persona that is
        not cached yet runs its prompt (a prefill that delays everyone's next frame), so at most one is built
        per tick; later ones wait a tick each."""
        pending = self._deferred
        while True:
            try:
                pending.append(self._commands.get_nowait())
            except queue.Empty:
                break
        later: deque = deque()
        try:
            while pending:
                command = pending.popleft()
                kind, slot, _ = command
                if kind == "join" and not slot.closed and not self._persona_cached(slot):
                    if self._built_since_tick:
                        later.append(command)
                        continue
                    self._built_since_tick = True
                self._handle_one(command)
        finally:
            pending.extendleft(reversed(later))  # ahead of anything not reached, in arrival order

    def _handle_one(self, command) -> None:
        kind, slot, future = command
        try:
            self._handle(command)
        except Exception as error:
            log.exception("conversation %s: %s failed", slot.name, kind)
            if kind == "join" and future is not None and not future.done():
                future.set_exception(ConversationStartError(
                    f"the server could not start this conversation ({type(error).__name__}: {error}); "
                    "try again later"))
            elif slot is not None and not slot.closed:
                self._fail(slot, f"the server failed on this conversation ({type(error).__name__}); "
                                 "please reconnect")

    def _persona_cached(self, slot: Slot) -> bool:
        try:
            return self.personas.cached(slot.voice, slot.text_prompt)
        except Exception:  # an unknown voice and the like: let the join report it
            return True

    def _handle(self, command) -> None:
        kind, slot, future = command
        if kind == "leave":
            self._leave(slot)
        elif kind == "join":
            if not future.set_running_or_notify_cancel():
                return
            try:
                if slot.closed:
                    raise ConnectionResetError("the caller left before joining")
                persona = self._build_persona(slot.voice, slot.text_prompt)
                if slot.closed:  # the caller left while its persona was being built
                    raise ConnectionResetError("the caller left while its persona was being built")
                if self.engine is None:  # a failed rebuild earlier (e.g. out of memory): try again
                    self.engine = self.engine_factory()
                slot.conversation = self.engine.join(persona, slot.params)
                self._slots[slot.conversation.id] = slot
            except (PersonaplexError, EngineFullError, ValueError, ConnectionResetError) as error:
                # the caller's (a bad persona, a full batch, gone already): told as it is
                future.set_exception(error)
                return
            except Exception as error:  # the server's (out of memory, a bug): logged, the caller told plainly
                log.exception("conversation %s could not join the batch", slot.name)
                future.set_exception(ConversationStartError(
                    f"the server could not start this conversation ({type(error).__name__}); try again later"))
                return
            log.info("conversation %s joined the batch (engine row of conversation %d)", slot.name,
                     slot.conversation.id)
            future.set_result(slot.conversation)

    def _build_persona(self, voice: str | None, text_prompt: str):
        cache = self.personas.cache
        misses, started = cache.misses, time.perf_counter()
        persona = self.personas.get(voice, text_prompt)
        if cache.misses != misses:
            self.stats.persona_builds += 1
            self.stats.persona_seconds += time.perf_counter() - started
        return persona

    def _leave(self, slot: Slot) -> None:
        conv = slot.conversation
        if conv is None or self._slots.pop(conv.id, None) is None:
            return
        try:
            self.engine.leave(conv)
        except Exception:
            log.exception("conversation %s: leaving the batch failed; rebuilding the engine", slot.name)
            self._reset_engine("the model failed while another conversation ended")

    def _tick(self) -> None:
        engine = self.engine
        for conv in [c for c in engine.conversations if c.id not in self._slots]:
            log.error("engine conversation %d holds a row without a caller; freeing it", conv.id)
            engine.leave(conv)  # never step rows nobody listens to (and never stall on them)
        rows = engine.conversations
        if not rows:
            return
        slots = [self._slots[conv.id] for conv in rows]
        frames = []
        for slot in slots:
            dropped = slot.input.dropped_samples // FRAME_SIZE
            if dropped > slot.stats.dropped_in:
                self.stats.frames_dropped_in += dropped - slot.stats.dropped_in
                slot.stats.dropped_in = dropped
            frame, complete = slot.input.take_frame()
            if not complete:
                slot.stats.missing += 1
                self.stats.frames_missing += 1
            slot.stats.silent_streak = 0 if complete else slot.stats.silent_streak + 1
            if self.idle_ticks and slot.stats.silent_streak == self.idle_ticks and not slot.closed:
                self._fail(slot, f"no audio received for {self.idle_ticks * self.tick_seconds:.0f} s: "
                                 "the conversation was closed")
            frames.append(frame)
        user = torch.from_numpy(np.stack(frames))  # (n, 1920)
        try:
            results = engine.step(user)
        except Exception:
            # A batched step cannot be pinned on one caller: end every conversation of this batch, keep serving.
            self.stats.step_errors += 1
            log.exception("model step failed for %d conversations (%s); ending them", len(slots),
                          ", ".join(slot.name for slot in slots))
            self._reset_engine("the model failed on this conversation; please reconnect")
            return
        outputs = []
        for slot, frame, result in zip(slots, frames, results):
            slot.stats.frames += 1
            outputs.append((slot, result.pcm.numpy(), result.text_token))
            if self.on_frame is not None:
                try:
                    self.on_frame(slot, slot.stats.frames - 1, frame, result)
                except Exception:
                    log.exception("conversation %s: on_frame hook failed", slot.name)
        self._call_soon(_deliver_all, outputs)

    def _reset_engine(self, reason: str) -> None:
        """End every conversation; the engine's rows are freed, or the engine rebuilt if that fails too."""
        for slot in list(self._slots.values()):
            self._fail(slot, reason)
        self._slots.clear()
        try:
            self.engine.clear()
            return
        except Exception:
            log.exception("freeing the batch failed; rebuilding the engine")
        self.engine = None  # free its memory before allocating the new one
        self.engine = self.engine_factory()

    def _fail(self, slot: Slot, reason: str) -> None:
        slot.closed = True
        if slot.failed is not None:
            self._call_soon(slot.failed, reason)

    def _call_soon(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: the server is going away
            pass


def _deliver_all(outputs) -> None:
    for slot, pcm, token in outputs:
        if not slot.closed:
            try:
                slot.deliver(pcm, token)
            except Exception:
                log.exception("conversation %s: delivering a frame failed", slot.name)


__all__ = ["ConversationStartError", "Admission", "Waiter", "ModelLoop", "Slot", "SlotStats", "InputBuffer",
           "TickStats", "TICK_SECONDS"]
