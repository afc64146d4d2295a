"""The aiohttp application: `/api/chat` (the conversation websocket), `/api/voices`, `/api/info`, `/healthz`,
`/metrics`, and the web client from `static/` at `/` and `/static/...` (docs/serving.md lists them all).

Each websocket is a `ChatSession`. A caller is admitted when a batch row is free, waits in a bounded queue
(told its position with 0x04 metadata), or is told the server is full (0x05) and closed. Every failure of one
connection is contained to it: logged, reported with 0x05 while the socket is open, its row freed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import WSCloseCode, WSMsgType, web

from ..config import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE, TEXT_EPAD, TEXT_PAD
from ..engine import EngineFullError, Personas, SamplingParams
from ..errors import PersonaplexError, VoiceNotFoundError
from ..hub import VOICE_SUFFIXES
from . import guard, protocol
from .guard import GuardSettings
from .loop import Admission, InputBuffer, ModelLoop, Slot, Waiter
from .ogg import STARVE_BYTES, OggFilter
from .opus import CodecPool

log = logging.getLogger("personaplex.server")

STATIC_DIR = Path(__file__).parent / "static"
MAX_MESSAGE_BYTES = 1 << 20  # the largest websocket message accepted (1 MiB, that size included)
MAX_AUDIO_MESSAGE_BYTES = 64 * 1024  # the largest 0x01 audio message decoded (a page is ~100-400 bytes)
DRAINING_MESSAGE = "server is draining: it takes no new calls before it stops; connect to another server"
MISSING_CLIENT_PAGE = """<!doctype html><meta charset="utf-8"><title>PersonaPlex</title>
<p>The PersonaPlex server is running, but its web client is missing (no <code>static/index.html</code> in the
package). Connect a client to <code>/api/chat</code>, or reinstall the package.</p>
"""


@dataclass
class ServerSettings:
    max_conversations: int = 8
    queue: int = 0  # callers allowed to wait for a free row
    max_prompt_chars: int = 4000
    input_buffer_seconds: float = 1.0  # caller audio kept beyond what the model has consumed
    output_buffer_frames: int = 25  # agent frames (2 s) queued for a slow reader before dropping
    default_voice: str | None = None
    default_text_prompt: str = ""
    demo: bool = False
    heartbeat_seconds: float | None = 30.0  # websocket pings; a peer that never answers is closed
    idle_timeout_seconds: float | None = 60.0  # a caller sending no audio this long loses its row
    codec_workers: int = 1  # Opus codec processes (opus.py); 0: the codec runs on the event loop
    drain_seconds: float = 30.0  # on SIGTERM, calls in progress may go on this long before being closed
    queue_timeout_seconds: float | None = 120.0  # a queued caller waiting this long is told so and closed
    static_dir: Path | None = None  # another web client build to serve instead of the built-in one
    guard: GuardSettings = field(default_factory=GuardSettings)  # who may connect, and how much (guard.py)


class Outbox:
    """What a connection still has to send, oldest first. Agent frames beyond `max_frames` lose their audio
    (oldest first, counted) so a client that reads too slowly costs bounded memory; their text is kept."""

    def __init__(self, max_frames: int) -> None:
        self.max_frames = max(1, max_frames)
        self.items: deque = deque()  # bytes (a ready message) or [pcm | None, text piece]
        self.frames = 0  # items still holding audio
        self.dropped = 0
        self.ready = asyncio.Event()

    def put(self, message: bytes) -> None:
        self.items.append(message)
        self.ready.set()

    def put_frame(self, pcm, piece: str) -> None:
        if self.frames >= self.max_frames:
            for item in self.items:
                if isinstance(item, list) and item[0] is not None:
                    item[0] = None
                    self.frames -= 1
                    self.dropped += 1
                    break
        while len(self.items) >= 4 * self.max_frames:  # a reader that never reads: drop text too
            item = self.items.popleft()
            if isinstance(item, list) and item[0] is not None:
                self.frames -= 1
                self.dropped += 1
        self.items.append([pcm, piece])
        self.frames += pcm is not None
        self.ready.set()


class ChatSession:
    """One `/api/chat` websocket: query -> admission -> persona and row -> handshake -> audio both ways."""

    _numbers = itertools.count(1)

    def __init__(self, server: "ChatServer", ws: web.WebSocketResponse, request: web.Request) -> None:
        self.server, self.ws, self.request = server, ws, request
        self.name = f"#{next(self._numbers)}"  # the call's id in every log line about it (loop.py too)
        settings = server.settings
        self.outbox = Outbox(settings.output_buffer_frames)
        self.slot: Slot | None = None
        self.joined = False
        self.admitted = False
        self.waiter: Waiter | None = None
        self.ogg = OggFilter()  # caller audio is checked and re-paged here, decoded in a codec worker
        self.codec = server.codec.open(self._on_pcm, self._on_codec_error)
        self.reader: asyncio.Task | None = None
        self.sender: asyncio.Task | None = None
        self.ended: asyncio.Future = asyncio.get_running_loop().create_future()  # the model dropped us
        self._send_lock = asyncio.Lock()
        self._complained: set[str] = set()

    async def run(self) -> None:
        server = self.server
        try:
            request = protocol.parse_query(self.request.query, server.limits)
            voice = resolve_voice(server.personas, request.voice)
        except (protocol.ProtocolError, VoiceNotFoundError) as error:
            server.counters["rejected_bad_request"] += 1
            log.info("conversation %s (%s) refused: %s", self.name, self.request.remote, error)
            await self.close_with_error(str(error), WSCloseCode.POLICY_VIOLATION)
            return
        if server.draining:
            server.counters["rejected_draining"] += 1
            await self.close_with_error(DRAINING_MESSAGE, WSCloseCode.TRY_AGAIN_LATER)
            return
        self.slot = Slot(voice, request.text_prompt, request.params, deliver=self._on_frame,
                         input=InputBuffer(int(server.settings.input_buffer_seconds * SAMPLE_RATE)),
                         failed=self._on_failed, name=self.name)
        self.sender = asyncio.create_task(self._send_loop())
        self.reader = asyncio.create_task(self._read_loop())
        if not await self._admit():
            return
        join = asyncio.create_task(server.model_loop.join(self.slot))
        await asyncio.wait({join, self.reader}, return_when=asyncio.FIRST_COMPLETED)
        if not join.done():  # the caller left while its persona was being prepared
            join.cancel()
            return
        try:
            join.result()
        except (PersonaplexError, EngineFullError, ValueError) as error:
            server.counters["rejected_bad_request"] += 1
            log.info("conversation %s could not start: %s", self.name, error)
            await self.close_with_error(str(error))
            return
        except ConnectionResetError:
            return
        self._mark_joined()
        log.info("conversation %s (%s) started: voice %s, prompt of %d characters, seed %s", self.name,
                 self.request.remote, voice, len(request.text_prompt), request.params.seed)
        await asyncio.wait({self.reader, self.sender, self.ended}, return_when=asyncio.FIRST_COMPLETED)
        if self.ended.done():
            await self.close_with_error(self.ended.result())
        else:
            server.counters["completed"] += 1

    async def _admit(self) -> bool:
        admission = self.server.admission
        if admission.try_enter():
            self.admitted = True
            return True
        self.waiter = waiter = admission.enqueue()
        if waiter is None:
            self.server.counters["rejected_full"] += 1
            await self.close_with_error(f"server full: {admission.active} conversations in progress, try again "
                                        "later", WSCloseCode.TRY_AGAIN_LATER)
            return False
        limit = self.server.settings.queue_timeout_seconds
        deadline = asyncio.get_running_loop().time() + limit if limit else None
        while True:
            self.outbox.put(protocol.metadata_message(
                {"status": "queued", "queue_position": waiter.position, "queue_length": len(admission.waiting)}))
            waiter.moved.clear()
            moved = asyncio.create_task(waiter.moved.wait())
            left = None if deadline is None else max(0.0, deadline - asyncio.get_running_loop().time())
            await asyncio.wait({waiter.admitted, moved, self.reader}, timeout=left,
                               return_when=asyncio.FIRST_COMPLETED)
            moved.cancel()
            if self.server.draining and not waiter.admitted.done():  # begin_drain woke us
                self.server.counters["rejected_draining"] += 1
                await self.close_with_error(DRAINING_MESSAGE, WSCloseCode.TRY_AGAIN_LATER)
                return False
            if not waiter.admitted.done() and deadline is not None and \
                    asyncio.get_running_loop().time() >= deadline:
                self.server.counters["rejected_queue_timeout"] += 1
                await self.close_with_error(f"no free row after {limit:g} s in the queue: the server is busy, "
                                            "try again later", WSCloseCode.TRY_AGAIN_LATER)
                return False
            if waiter.admitted.done():
                self.admitted, self.waiter = True, None
                self.outbox.put(protocol.metadata_message(
                    {"status": "preparing", "queue_position": 0, "queue_length": len(admission.waiting)}))
                return True
            if self.reader.done():
                return False

    def _mark_joined(self) -> None:
        """Send the handshake once: when the join is reported or, if a tick outran that report, before the
        first frame (a client must never see audio before the handshake)."""
        if not self.joined:
            self.joined = True
            self.outbox.put(protocol.HANDSHAKE)

    # -- model side (event loop callbacks) -----------------------------------------------------------------
    def _on_frame(self, pcm, token: int) -> None:
        self._mark_joined()
        piece = self.server.tokenizer.piece(token) if token not in (TEXT_EPAD, TEXT_PAD) else ""
        before = self.outbox.dropped
        encoded = self.codec.submit_encode(pcm)  # encoding starts now, in a codec worker
        if encoded is None:
            self.outbox.dropped += 1  # the codec worker is too far behind: this frame's audio is dropped
        self.outbox.put_frame(encoded, piece)
        if self.outbox.dropped != before:
            self.slot.stats.dropped_out += self.outbox.dropped - before
            self.server.model_loop.stats.frames_dropped_out += self.outbox.dropped - before

    def _on_failed(self, reason: str) -> None:
        if not self.ended.done():
            self.ended.set_result(reason)

    # -- websocket IO --------------------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        async for message in self.ws:
            try:
                if message.type == WSMsgType.BINARY:
                    self._on_binary(message.data)
                elif message.type == WSMsgType.TEXT:
                    self._complain("text", "text messages are not part of this protocol: send binary messages "
                                           "whose first byte is the kind (0x01 for Ogg/Opus audio)")
                elif message.type == WSMsgType.ERROR:
                    return
            except Exception:  # a bad message must never end the conversation
                log.exception("conversation %s: message ignored", self.name)

    def _on_binary(self, data: bytes) -> None:
        try:
            kind, payload = protocol.parse_message(data)
        except protocol.ProtocolError as error:
            self._complain("kind", f"{error}; message ignored")
            return
        if kind == protocol.Kind.AUDIO:
            self._on_audio(payload)
        elif kind == protocol.Kind.CONTROL:
            try:
                protocol.parse_control(payload)  # accepted; the model runs full duplex whatever the control
            except protocol.ProtocolError as error:
                self._complain("control", f"{error}; message ignored")

    def _on_audio(self, payload: bytes) -> None:
        """Caller audio: bounded and checked here (ogg.py), decoded in a codec worker, pushed to the model's
        input buffer from there. Nothing is decoded before the handshake or while queued."""
        ignored = self.server.audio_counters
        if len(payload) > MAX_AUDIO_MESSAGE_BYTES:
            ignored["too_large"] += 1
            self._complain("audio-size", f"an audio message of {len(payload)} bytes was ignored: at most "
                                         f"{MAX_AUDIO_MESSAGE_BYTES} per message (send one Ogg page per message)")
            return
        if not self.joined:
            ignored["not_joined"] += 1  # queued or preparing: the model is not listening yet
            return
        result = self.ogg.feed(payload, time.monotonic())
        ignored["empty"] += result.empty
        ignored["absurd"] += result.absurd
        ignored["over_real_time"] += result.over_budget
        if result.malformed:
            ignored["malformed"] += result.malformed
            self._complain("audio", "malformed Ogg/Opus audio ignored (send Ogg pages of Opus audio, 24 kHz mono)")
        if result.starved:
            ignored["reader_resets"] += 1
            self._complain("audio-starved", f"no audio in the last {STARVE_BYTES // 1024} KiB of input: the Ogg "
                                            "reader was reset (send complete Ogg pages of Opus audio)")
        if result.pages and not self.codec.decode(result.pages, result.samples):
            ignored["codec_busy"] += 1

    def _on_pcm(self, pcm) -> None:
        """Decoded caller audio from the codec worker, to the model's input buffer (which takes a lock)."""
        if self.slot is not None and self.joined and not self.slot.closed:
            self.slot.input.push(pcm)

    def _on_codec_error(self, text: str, fatal: bool = False) -> None:
        if fatal:
            self._on_failed(text)
        else:
            self._complain("audio", text)

    def _complain(self, what: str, text: str) -> None:
        """Count a bad message; tell the client the first time for each kind of problem."""
        self.server.counters["bad_messages"] += 1
        if what not in self._complained:
            self._complained.add(what)
            log.info("conversation %s: %s", self.name, text)
            self.outbox.put(protocol.error_message(text))

    async def _send_loop(self) -> None:
        outbox = self.outbox
        while not self.ws.closed:
            await outbox.ready.wait()
            outbox.ready.clear()
            while outbox.items:
                item = outbox.items.popleft()
                if isinstance(item, bytes):
                    await self._send(item)
                    continue
                encoded, piece = item  # a future of the frame's Ogg pages (None: audio dropped)
                if encoded is not None:
                    outbox.frames -= 1
                    pages = await encoded
                    if pages:
                        await self._send(protocol.audio_message(pages))
                if piece:
                    await self._send(protocol.text_message(piece))

    async def _send(self, message: bytes) -> None:
        async with self._send_lock:
            await self.ws.send_bytes(message)

    async def close_with_error(self, text: str, code: int = WSCloseCode.OK) -> None:
        """Send an 0x05 error (if the socket is still open) and close; never raises."""
        if self.ws.closed:
            return
        try:
            await asyncio.wait_for(self._send(protocol.error_message(text)), timeout=2.0)
        except (Exception, asyncio.TimeoutError):
            pass
        try:
            await asyncio.wait_for(self.ws.close(code=code), timeout=2.0)
        except (Exception, asyncio.TimeoutError):
            pass

    async def cleanup(self) -> None:
        """Free whatever this connection holds: its batch row, its admission or queue place, its tasks."""
        if self.slot is not None:
            self.server.model_loop.leave(self.slot)
        if self.admitted:
            self.server.admission.release()
        elif self.waiter is not None:
            self.server.admission.cancel(self.waiter)
        self.admitted, self.waiter = False, None
        tasks = [t for t in (self.reader, self.sender) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.codec.close()
        if not self.ws.closed:
            try:
                await asyncio.wait_for(self.ws.close(), timeout=2.0)
            except (Exception, asyncio.TimeoutError):
                pass
        if self.slot is not None and self.joined:
            s = self.slot.stats
            log.info("conversation %s ended: %d frames, %d missing, %d dropped in, %d dropped out", self.name,
                     s.frames, s.missing, s.dropped_in, s.dropped_out)


class ChatServer:
    """Everything one server holds: model loop, personas, admission, settings and counters."""

    def __init__(self, model_loop: ModelLoop, personas: Personas, tokenizer, settings: ServerSettings,
                 model_info: dict | None = None) -> None:
        self.model_loop, self.personas, self.tokenizer = model_loop, personas, tokenizer
        self.settings = settings
        self.model_info = model_info or {}
        self.admission = Admission(settings.max_conversations, settings.queue)
        self.limits = protocol.QueryLimits(settings.max_prompt_chars, settings.default_voice,
                                           settings.default_text_prompt)
        self.sessions: set[ChatSession] = set()
        self.counters = {"connections": 0, "rejected_full": 0, "rejected_bad_request": 0, "errors": 0,
                         "bad_messages": 0, "completed": 0, "rejected_queue_timeout": 0, "rejected_draining": 0}
        # caller audio not decoded, by reason (docs/serving.md "Limits")
        self.audio_counters = dict.fromkeys(("not_joined", "too_large", "empty", "absurd", "malformed",
                                             "over_real_time", "codec_busy", "reader_resets"), 0)
        self.codec = CodecPool(settings.codec_workers)
        self.draining = False
        self.connection_counter = None  # the guard.ConnectionCounter of the site serving this server (/metrics)

    def begin_drain(self) -> None:
        """Take no new calls (they get DRAINING_MESSAGE, /healthz says "draining"); queued callers are told
        and closed; calls in progress go on."""
        self.draining = True
        for session in self.sessions:
            if session.waiter is not None:
                session.waiter.moved.set()  # wakes its queue loop, which sees `draining`

    async def drain(self, seconds: float) -> None:
        """begin_drain, then wait up to `seconds` for the calls in progress to end by themselves."""
        self.begin_drain()
        deadline = time.monotonic() + max(0.0, seconds)
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    async def close_sessions(self, text: str = "the server is shutting down") -> None:
        """Close every connection at once (each waits at most ~4 s for its peer, all of them together)."""
        await asyncio.gather(*(session.close_with_error(text) for session in list(self.sessions)),
                             return_exceptions=True)

    def voices(self) -> list[str]:
        return self.personas.available_voices()

    # -- HTTP handlers -------------------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        # aiohttp refuses a message whose size equals max_msg_size: + 1 so that exactly 1 MiB is accepted
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES + 1, heartbeat=self.settings.heartbeat_seconds)
        await ws.prepare(request)
        self.counters["connections"] += 1
        session = ChatSession(self, ws, request)
        self.sessions.add(session)
        try:
            await session.run()
        except asyncio.CancelledError:
            raise
        except Exception as error:  # contained: this connection only
            self.counters["errors"] += 1
            log.exception("conversation %s failed", session.name)
            await session.close_with_error(_describe(error))
        finally:
            self.sessions.discard(session)
            await session.cleanup()
        return ws

    async def voices_handler(self, request: web.Request) -> web.Response:
        return web.json_response({"voices": self.voices(), "default": self.settings.default_voice})

    async def info(self, request: web.Request) -> web.Response:
        defaults = SamplingParams()
        return web.json_response({
            "model": self.model_info,
            "demo": self.settings.demo,
            "max_conversations": self.settings.max_conversations,
            "queue": self.settings.queue,
            "max_prompt_chars": self.settings.max_prompt_chars,
            "sample_rate": SAMPLE_RATE,
            "frame_rate": FRAME_RATE,
            "frame_size": FRAME_SIZE,
            "sampling_defaults": {"text_temperature": defaults.text_temperature, "text_topk": defaults.text_topk,
                                  "audio_temperature": defaults.audio_temperature,
                                  "audio_topk": defaults.audio_topk},
            "default_voice": self.settings.default_voice,
            "default_text_prompt": self.settings.default_text_prompt,
        })

    def health_status(self) -> tuple[str, int]:
        """(status, HTTP code) of /healthz, for load balancers: 200 "ok" while a row is free, 200 "busy" while
        every row is taken but the queue has room, 503 "full" when rows and queue are all taken, 503
        "draining" once the server is shutting down (docs/serving.md)."""
        admission = self.admission
        if self.draining:
            return "draining", 503
        if admission.active < admission.capacity and not admission.waiting:
            return "ok", 200
        if len(admission.waiting) < admission.queue_limit:
            return "busy", 200
        return "full", 503

    async def health(self, request: web.Request) -> web.Response:
        status, code = self.health_status()
        return web.json_response({"status": status, "active": self.model_loop.active,
                                  "admitted": self.admission.active, "queued": len(self.admission.waiting),
                                  "max_conversations": self.settings.max_conversations}, status=code)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=render_metrics(self), content_type="text/plain",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def index(self, request: web.Request) -> web.StreamResponse:
        page = (self.settings.static_dir or STATIC_DIR) / "index.html"
        if page.is_file():
            return web.FileResponse(page)
        return web.Response(text=MISSING_CLIENT_PAGE, content_type="text/html")

    async def static_file(self, request: web.Request) -> web.StreamResponse:
        path = _static_path(request.match_info.get("path", ""), self.settings.static_dir or STATIC_DIR)
        if path is None:
            raise web.HTTPNotFound()
        return web.FileResponse(path)


def resolve_voice(personas: Personas, name: str | None) -> str | None:
    """The voice name to build a persona with: a name among the server's voices, never a path.

    Released clients append `.pt` ("NATF0.pt"); where a voice exists only as audio ("DEMO_LOW.wav"), the
    name without its extension is accepted too. Raises VoiceNotFoundError listing the voices otherwise.
    """
    if name is None:
        return None
    try:
        personas.voice_path(name)
        return name
    except VoiceNotFoundError:
        stem, dot, suffix = name.rpartition(".")
        if not (dot and stem and "." + suffix.lower() in VOICE_SUFFIXES):
            raise
    try:
        personas.voice_path(stem)
        return stem
    except VoiceNotFoundError:
        raise VoiceNotFoundError(f"voice {name!r} not found; available: "
                                 f"{', '.join(personas.available_voices()) or '(none)'}") from None


def _static_path(relative: str, folder: Path = STATIC_DIR) -> Path | None:
    """A file inside `folder` named by a URL path, or None; nothing outside the folder, no hidden files."""
    parts = [p for p in relative.split("/") if p]
    if not parts or any(p.startswith(".") or "\\" in p or "\x00" in p for p in parts):
        return None
    root = folder.resolve()
    try:
        path = root.joinpath(*parts).resolve()
    except (OSError, ValueError):
        return None
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return path


def _describe(error: BaseException) -> str:
    if isinstance(error, (PersonaplexError, protocol.ProtocolError)):
        return str(error)
    return f"internal server error ({type(error).__name__}); the conversation was ended"


def render_metrics(server: ChatServer) -> str:
    """The server's counters in Prometheus text format (tick times over the last 60 s of ticks)."""
    stats, cache, counters = server.model_loop.stats, server.personas.cache, server.counters
    lines: list[str] = []

    def metric(name: str, kind: str, text: str, values) -> None:
        lines.append(f"# HELP personaplex_{name} {text}")
        lines.append(f"# TYPE personaplex_{name} {kind}")
        for labels, value in (values.items() if isinstance(values, dict) else [("", values)]):
            lines.append(f"personaplex_{name}{labels} {value:g}" if isinstance(value, float)
                         else f"personaplex_{name}{labels} {value}")

    metric("active_conversations", "gauge", "Conversations stepping in the batch.", server.model_loop.active)
    metric("admitted_conversations", "gauge", "Callers holding a row (active or preparing their persona).",
           server.admission.active)
    metric("queued_callers", "gauge", "Callers waiting for a free row.", len(server.admission.waiting))
    metric("max_conversations", "gauge", "Rows of the batch.", server.settings.max_conversations)
    metric("ticks_total", "counter", "Model ticks (one 80 ms frame for every active conversation).", stats.ticks)
    quantiles = stats.percentiles()
    metric("tick_seconds", "gauge", "Duration of a model tick over the recent window, by quantile.",
           {f'{{quantile="{q:g}"}}': float(v) for q, v in quantiles.items()})
    metric("tick_overruns_total", "counter", "Ticks that ended after the next one was due (behind real time).",
           stats.overruns)
    metric("step_errors_total", "counter", "Model steps that failed (their conversations were ended).",
           stats.step_errors)
    metric("frames_missing_total", "counter", "Frames stepped with silence because a caller had not sent "
           "enough audio.", stats.frames_missing)
    metric("frames_dropped_total", "counter", "Frames dropped: caller audio beyond the input buffer (in), agent "
           "audio a caller did not read in time (out).",
           {'{direction="in"}': stats.frames_dropped_in, '{direction="out"}': stats.frames_dropped_out})
    metric("persona_cache_hits_total", "counter", "Conversations that reused a cached persona.", cache.hits)
    metric("persona_cache_misses_total", "counter", "Personas built (prompt prefill).", cache.misses)
    metric("persona_build_seconds_total", "counter", "Time spent building personas.", float(stats.persona_seconds))
    metric("connections_total", "counter", "Websocket connections accepted.", counters["connections"])
    metric("rejected_total", "counter", "Connections refused, by reason.",
           {'{reason="full"}': counters["rejected_full"], '{reason="bad_request"}': counters["rejected_bad_request"],
            '{reason="queue_timeout"}': counters["rejected_queue_timeout"],
            '{reason="draining"}': counters["rejected_draining"]})
    metric("connection_errors_total", "counter", "Connections ended by an unexpected error.", counters["errors"])
    metric("bad_messages_total", "counter", "Client messages ignored (unknown kind, malformed audio, text).",
           counters["bad_messages"])
    if server.connection_counter is not None:  # served by a guard.GuardedSite
        sockets = server.connection_counter
        metric("open_sockets", "gauge", "Sockets open (counted from accept, before any request).", sockets.total)
        metric("sockets_refused_total", "counter", "Sockets closed by the guard, by reason: the server's or one "
               "address's connection cap, no request head in time.",
               {f'{{reason="{k}"}}': v for k, v in sockets.refused.items()})
    metric("audio_ignored_total", "counter", "Caller audio not decoded, by reason: messages before the handshake "
           "or too large, packets empty, absurd, malformed or ahead of real time, decodes the codec was too busy "
           "for, Ogg readers reset for lack of audio.",
           {f'{{reason="{k}"}}': v for k, v in server.audio_counters.items()})
    metric("codec_dropped_total", "counter", "Codec requests dropped because a codec worker's queue was full.",
           {'{direction="decode"}': server.codec.dropped_decodes, '{direction="encode"}': server.codec.dropped_encodes})
    return "\n".join(lines) + "\n"


SERVER_KEY: web.AppKey["ChatServer"] = web.AppKey("chat_server")


MAX_HEADERS = 64  # header lines per request, each at most aiohttp's default 8190 bytes (name + value)
KEEPALIVE_SECONDS = 15.0  # an idle keep-alive connection is closed after this long


def make_runner(server: ChatServer) -> web.AppRunner:
    """An AppRunner for `server`'s app whose request line fits the longest accepted prompt (released clients
    send the prompt in the query string, up to 12 URL characters per character). Only the request line gets
    that room: each header line keeps aiohttp's default bound (`max_field_size` limits header lines only),
    so an incomplete request holds at most line + MAX_HEADERS x 8190 bytes."""
    line = max(8190, 12 * server.settings.max_prompt_chars + 4096)
    quiet = guard.ThrottledLog(logging.getLogger("personaplex.server.http"),
                               server.settings.guard.log_interval_seconds)
    return web.AppRunner(create_app(server), access_log=None, handle_signals=False, max_line_size=line,
                         max_headers=MAX_HEADERS, logger=quiet,
                         keepalive_timeout=max(KEEPALIVE_SECONDS, server.settings.guard.header_timeout_seconds))


def create_app(server: ChatServer) -> web.Application:
    """The aiohttp application of `server`; the model loop is started and stopped with the app."""
    app = web.Application(middlewares=guard.middlewares(server.settings.guard))
    app[SERVER_KEY] = server
    app.on_response_prepare.append(guard.strip_banner)

    async def start_loop(app: web.Application) -> None:
        if server.codec.loop is None:
            await server.codec.start()
        if not server.model_loop.started:
            await asyncio.get_running_loop().run_in_executor(
                None, server.model_loop.start, asyncio.get_running_loop(),
                (server.settings.default_voice, server.settings.default_text_prompt))

    async def close_sessions(app: web.Application) -> None:
        server.begin_drain()  # nobody new gets in while the others are being closed
        await server.close_sessions()

    async def stop_loop(app: web.Application) -> None:
        await asyncio.get_running_loop().run_in_executor(None, server.model_loop.stop)
        await server.codec.close()

    app.on_startup.append(start_loop)
    app.on_shutdown.append(close_sessions)
    app.on_cleanup.append(stop_loop)
    app.router.add_get("/api/chat", server.chat)
    app.router.add_get("/api/voices", server.voices_handler)
    app.router.add_get("/api/info", server.info)
    app.router.add_get("/healthz", server.health)
    app.router.add_get("/metrics", server.metrics)
    app.router.add_get("/", server.index)
    app.router.add_get("/static/{path:.+}", server.static_file)
    app.router.add_get("/{path:.+}", server.static_file)  # the released client's assets live at the root
    return app


__all__ = ["ChatServer", "ChatSession", "ServerSettings", "create_app", "make_runner", "render_metrics", "STATIC_DIR"]
