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
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import sphn
from aiohttp import WSCloseCode, WSMsgType, web

from ..config import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE, TEXT_EPAD, TEXT_PAD
from ..engine import EngineFullError, Personas, SamplingParams
from ..errors import PersonaplexError, VoiceNotFoundError
from ..hub import VOICE_SUFFIXES
from . import protocol
from .loop import Admission, InputBuffer, ModelLoop, Slot, Waiter

log = logging.getLogger("personaplex.server")

STATIC_DIR = Path(__file__).parent / "static"
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
        self.frames += 1
        self.ready.set()


class ChatSession:
    """One `/api/chat` websocket: query -> admission -> persona and row -> handshake -> audio both ways."""

    _numbers = itertools.count(1)

    def __init__(self, server: "ChatServer", ws: web.WebSocketResponse, request: web.Request) -> None:
        self.server, self.ws, self.request = server, ws, request
        self.name = f"#{next(self._numbers)} ({request.remote})"
        settings = server.settings
        self.outbox = Outbox(settings.output_buffer_frames)
        self.slot: Slot | None = None
        self.joined = False
        self.admitted = False
        self.waiter: Waiter | None = None
        self.opus_in = sphn.OpusStreamReader(SAMPLE_RATE)
        self.opus_out = sphn.OpusStreamWriter(SAMPLE_RATE)
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
            log.info("conversation %s refused: %s", self.name, error)
            await self.close_with_error(str(error), WSCloseCode.POLICY_VIOLATION)
            return
        self.slot = Slot(voice, request.text_prompt, request.params, deliver=self._on_frame,
                         input=InputBuffer(int(server.settings.input_buffer_seconds * SAMPLE_RATE)),
                         failed=self._on_failed)
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
        log.info("conversation %s started: voice %s, prompt of %d characters, seed %s", self.name,
                 voice, len(request.text_prompt), request.params.seed)
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
        while True:
            self.outbox.put(protocol.metadata_message(
                {"status": "queued", "queue_position": waiter.position, "queue_length": len(admission.waiting)}))
            waiter.moved.clear()
            moved = asyncio.create_task(waiter.moved.wait())
            await asyncio.wait({waiter.admitted, moved, self.reader}, return_when=asyncio.FIRST_COMPLETED)
            moved.cancel()
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
        self.outbox.put_frame(pcm, piece)
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
            try:
                pcm = self.opus_in.append_bytes(payload)
            except Exception as error:  # sphn raises ValueError on bytes that are not Ogg: start afresh
                self.opus_in = sphn.OpusStreamReader(SAMPLE_RATE)
                self._complain("audio", f"malformed Ogg/Opus audio ignored ({error})")
                return
            if self.joined and pcm is not None and pcm.size:
                self.slot.input.push(pcm)
        elif kind == protocol.Kind.CONTROL:
            try:
                protocol.parse_control(payload)  # accepted; the model runs full duplex whatever the control
            except protocol.ProtocolError as error:
                self._complain("control", f"{error}; message ignored")

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
                pcm, piece = item
                if pcm is not None:
                    outbox.frames -= 1
                    pages = self.opus_out.append_pcm(pcm)
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
                         "bad_messages": 0, "completed": 0}

    def voices(self) -> list[str]:
        return self.personas.available_voices()

    # -- HTTP handlers -------------------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=1 << 20, heartbeat=self.settings.heartbeat_seconds)
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

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "active": self.model_loop.active,
                                  "admitted": self.admission.active, "queued": len(self.admission.waiting),
                                  "max_conversations": self.settings.max_conversations})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=render_metrics(self), content_type="text/plain",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def index(self, request: web.Request) -> web.StreamResponse:
        page = STATIC_DIR / "index.html"
        if page.is_file():
            return web.FileResponse(page)
        return web.Response(text=MISSING_CLIENT_PAGE, content_type="text/html")

    async def static_file(self, request: web.Request) -> web.StreamResponse:
        path = _static_path(request.match_info.get("path", ""))
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


def _static_path(relative: str) -> Path | None:
    """A file inside STATIC_DIR named by a URL path, or None; nothing outside the folder, no hidden files."""
    parts = [p for p in relative.split("/") if p]
    if not parts or any(p.startswith(".") or "\\" in p or "\x00" in p for p in parts):
        return None
    root = STATIC_DIR.resolve()
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
           {'{reason="full"}': counters["rejected_full"], '{reason="bad_request"}': counters["rejected_bad_request"]})
    metric("connection_errors_total", "counter", "Connections ended by an unexpected error.", counters["errors"])
    metric("bad_messages_total", "counter", "Client messages ignored (unknown kind, malformed audio, text).",
           counters["bad_messages"])
    return "\n".join(lines) + "\n"


SERVER_KEY: web.AppKey["ChatServer"] = web.AppKey("chat_server")


def make_runner(server: ChatServer) -> web.AppRunner:
    """An AppRunner for `server`'s app whose request line fits the longest accepted prompt (released clients
    send the prompt in the query string, up to 12 URL characters per character)."""
    line = max(8190, 12 * server.settings.max_prompt_chars + 4096)
    return web.AppRunner(create_app(server), access_log=None, handle_signals=False, max_line_size=line,
                         max_field_size=max(8190, line))


def create_app(server: ChatServer) -> web.Application:
    """The aiohttp application of `server`; the model loop is started and stopped with the app."""
    app = web.Application()
    app[SERVER_KEY] = server

    async def start_loop(app: web.Application) -> None:
        if not server.model_loop.started:
            await asyncio.get_running_loop().run_in_executor(
                None, server.model_loop.start, asyncio.get_running_loop(),
                (server.settings.default_voice, server.settings.default_text_prompt))

    async def close_sessions(app: web.Application) -> None:
        for session in list(server.sessions):
            await session.close_with_error("the server is shutting down")

    async def stop_loop(app: web.Application) -> None:
        await asyncio.get_running_loop().run_in_executor(None, server.model_loop.stop)

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
