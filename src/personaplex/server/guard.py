"""Who may talk to the server, and how much of it one client can hold (docs/serving.md, "On the open internet").

Two layers, both built from one `GuardSettings`:

- **Connections** (`GuardedSite`, a drop-in for `web.TCPSite`): every accepted socket is counted from the
  moment it is accepted, before it sends a byte and, with TLS, before its handshake; past `max_connections`
  in all or `max_connections_per_ip` from one address, a new socket gets a one-line 503 and is closed. A
  socket that has not sent a whole request head within `header_timeout_seconds` is closed (slowloris).
- **Requests** (`middlewares`): the Host header must name this server (DNS-rebinding defence), a browser's
  Origin on `/api/chat` must be this server's own or listed (a cross-site page cannot open a conversation),
  and with an access token set, `/api/chat` and `/metrics` need it (`Authorization: Bearer T` or the released
  client's `worker_auth_id=T`). No response names library versions, and malformed requests are logged as one
  line per interval with a count instead of a traceback each.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from ..errors import UsageError

log = logging.getLogger("personaplex.server")

SERVER_HEADER = "personaplex"  # the whole `Server` header: no library or version names
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::"})
PROTECTED_PREFIXES = ("/api/chat", "/metrics")  # what the access token guards; /healthz stays open to probes
FD_RESERVE = 64  # descriptors kept for model files, logs and the listening sockets


@dataclass
class GuardSettings:
    host: str = "127.0.0.1"  # the bind address: names the server answers to follow from it
    server_names: tuple[str, ...] = ()  # more Host names to answer to ("*": any)
    allow_origins: tuple[str, ...] = ()  # browser origins besides the server's own ("*": any)
    auth_token: str | None = None  # required on /api/chat and /metrics when set
    max_connections: int = 1024  # open sockets in all (0: no limit)
    max_connections_per_ip: int = 64  # open sockets from one client address (0: no limit)
    header_timeout_seconds: float = 10.0  # to send a whole request head (and finish a TLS handshake)
    log_interval_seconds: float = 10.0  # at most one log line per interval for malformed requests


class GuardError(UsageError):
    """A guard setting that cannot work (raised at start, shown as one line)."""


def check_settings(settings: GuardSettings) -> None:
    for name in ("max_connections", "max_connections_per_ip"):
        if getattr(settings, name) < 0:
            raise GuardError(f"--{name.replace('_', '-')} must be >= 0 (0: no limit)")
    if not settings.header_timeout_seconds > 0:
        raise GuardError("--header-timeout must be a positive number of seconds")
    if settings.auth_token is not None and len(settings.auth_token) < 16:
        raise GuardError("the access token is too short: use at least 16 characters, e.g. "
                         "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    for origin in settings.allow_origins:
        if origin != "*" and _origin_key(origin) is None:
            raise GuardError(f"--allow-origin {origin!r} is not an origin: write scheme://host[:port], "
                             "e.g. https://talk.example.com, or '*' for any")


# -- descriptors ---------------------------------------------------------------------------------------------
def raise_nofile_limit() -> tuple[int, int]:
    """Raise this process's open-file limit (RLIMIT_NOFILE) to its hard limit; returns (soft, hard) after.
    Where the platform has no such limit, returns (-1, -1)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return -1, -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard_value = 1 << 20
    else:
        hard_value = hard
    if soft != resource.RLIM_INFINITY and soft < hard_value:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard_value, hard))
            soft = hard_value
        except (ValueError, OSError) as error:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard_value, error)
    return soft, hard


def fitting_max_connections(requested: int, soft_limit: int) -> int:
    """`requested` (0: no limit), lowered to what the descriptor limit leaves after `FD_RESERVE`."""
    if soft_limit < 0:
        return requested
    fits = max(1, soft_limit - FD_RESERVE)
    if requested == 0:
        return fits
    if requested > fits:
        log.warning("the open-file limit is %d: at most %d connections (raise it with `ulimit -n` or "
                    "LimitNOFILE= in the systemd unit)", soft_limit, fits)
        return fits
    return requested


# -- connections ---------------------------------------------------------------------------------------------
class ConnectionCounter:
    """Open sockets in all and per client address; event-loop only."""

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total, self.max_per_ip = max_total, max_per_ip
        self.total = 0
        self.by_ip: dict[str, int] = {}
        self.refused = {"total": 0, "per_ip": 0, "header_timeout": 0}

    def enter(self, ip: str) -> str | None:
        """Count a new socket from `ip`, or return why it is refused."""
        if self.max_total and self.total >= self.max_total:
            self.refused["total"] += 1
            return f"too many connections to this server ({self.max_total}); try again later"
        if self.max_per_ip and self.by_ip.get(ip, 0) >= self.max_per_ip:
            self.refused["per_ip"] += 1
            return f"too many connections from your address ({self.max_per_ip}); close some and try again"
        self.total += 1
        self.by_ip[ip] = self.by_ip.get(ip, 0) + 1
        return None

    def leave(self, ip: str) -> None:
        self.total -= 1
        left = self.by_ip.get(ip, 1) - 1
        if left > 0:
            self.by_ip[ip] = left
        else:
            self.by_ip.pop(ip, None)


def client_ip(transport: asyncio.BaseTransport) -> str:
    """The client address a socket counts against: its IPv4 address, or its IPv6 /64 network (one IPv6 host
    usually holds a whole /64, so counting single addresses would bound nothing)."""
    peer = transport.get_extra_info("peername")
    host = peer[0] if isinstance(peer, (tuple, list)) and peer else str(peer or "?")
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped:
            return str(address.ipv4_mapped)
        if not address.is_loopback:
            return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class QuietRequestHandler(RequestHandler):
    """aiohttp's connection handler, whose own error responses (400 for a malformed request) carry the same
    version-free `Server` header as every other response."""

    __slots__ = ()

    def handle_error(self, request, status: int = 500, exc=None, message=None):
        response = super().handle_error(request, status, exc, message)
        response.headers[hdrs.SERVER] = SERVER_HEADER
        return response


def _make_handler(manager: web.Server) -> RequestHandler:
    try:
        return QuietRequestHandler(manager, loop=manager._loop, **manager._kwargs)
    except (AttributeError, TypeError):  # an aiohttp whose Server differs: its own handler, banner and all
        return manager()


_HEAD_END = b"\r\n\r\n"
_REFUSAL = ("HTTP/1.1 503 Service Unavailable\r\nServer: " + SERVER_HEADER + "\r\nContent-Type: text/plain; "
            "charset=utf-8\r\nConnection: close\r\nContent-Length: {length}\r\n\r\n{text}")


class GuardedConnection(asyncio.Protocol):
    """One accepted socket: counted, given `header_timeout` to send its first request head, wrapped in TLS
    here (so a socket still in its handshake counts too), then handed to aiohttp's handler."""

    def __init__(self, site: "GuardedSite") -> None:
        self.site = site
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.BaseTransport | None = None
        self.ip = "?"
        self.counted = False
        self.lost = False
        self.head_seen = False
        self._tail = b""
        self._pending: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is not None:  # the TLS layer reporting itself: nothing to do
            return
        self.transport = transport
        self.ip = client_ip(transport)
        refusal = self.site.counter.enter(self.ip)
        if refusal is not None:
            self.site.note_refused(self.ip, refusal)
            if self.site.tls is None:
                body = refusal + "\n"
                transport.write(_REFUSAL.format(length=len(body.encode()), text=body).encode())
            transport.close()
            return
        self.counted = True
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.site.settings.header_timeout_seconds, self._head_timed_out)
        if self.site.tls is None:
            self._attach(transport)
        else:
            self.site.track(loop.create_task(self._start_tls(transport)))

    async def _start_tls(self, raw: asyncio.BaseTransport) -> None:
        try:
            secure = await asyncio.get_running_loop().start_tls(
                raw, self, self.site.tls, server_side=True,
                ssl_handshake_timeout=self.site.settings.header_timeout_seconds)
        except (Exception, asyncio.CancelledError) as error:  # a bad or vanished peer, or the site stopping
            log.debug("TLS handshake with %s failed: %s", self.ip, error)
            raw.close()
            self.connection_lost(None)  # the TLS layer does not report a connection lost in its handshake
            return
        if secure is None:  # the socket went away in its handshake (closed, aborted, timed out)
            raw.close()
            self.connection_lost(None)
            return
        if self.lost:
            return
        self.transport = secure
        self._attach(secure)

    def _attach(self, transport: asyncio.BaseTransport) -> None:
        self.inner = _make_handler(self.site.manager)
        self.inner.connection_made(transport)
        pending, self._pending = self._pending, []
        for data in pending:
            self.inner.data_received(data)

    def _head_timed_out(self) -> None:
        self._timer = None
        if not self.head_seen and not self.lost and self.transport is not None:
            self.site.counter.refused["header_timeout"] += 1
            self.site.note_refused(self.ip, "no complete request head within "
                                            f"{self.site.settings.header_timeout_seconds:g} s")
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if not self.head_seen:
            window = self._tail + data
            if _HEAD_END in window:
                self.head_seen = True
                self._tail = b""
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
            else:
                self._tail = window[-3:]
        if self.inner is None:
            self._pending.append(data)
        else:
            self.inner.data_received(data)

    def eof_received(self):
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.lost:
            return
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.counted:
            self.counted = False
            self.site.counter.leave(self.ip)
        if self.inner is not None:
            self.inner.connection_lost(exc)


class GuardedSite(web.BaseSite):
    """Like `web.TCPSite`, with every connection counted and bounded by `settings` (see the module doc).

    TLS (`ssl_context`) is done per connection inside the guard, so handshakes count and time out too.
    """

    def __init__(self, runner: web.BaseRunner, host: str, port: int, settings: GuardSettings, *,
                 ssl_context=None, backlog: int = 512) -> None:
        super().__init__(runner, backlog=backlog)
        self.host, self.requested_port, self.settings, self.tls = host, port, settings, ssl_context
        self.counter = ConnectionCounter(settings.max_connections, settings.max_connections_per_ip)
        self.port = port
        self._tasks: set[asyncio.Task] = set()
        self._last_note = 0.0
        self._notes = 0

    @property
    def name(self) -> str:
        scheme = "https" if self.tls else "http"
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{shown}:{self.port}"

    @property
    def manager(self) -> web.Server:
        return self._runner.server

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: GuardedConnection(self), self.host or None,
                                                self.requested_port, backlog=self._backlog,
                                                reuse_address=True)
        if self._server.sockets:
            self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await super().stop()

    def track(self, task: asyncio.Task) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def note_refused(self, ip: str, why: str) -> None:
        """Log refusals at most once per interval, with how many there were."""
        self._notes += 1
        now = time.monotonic()
        if now - self._last_note >= self.settings.log_interval_seconds:
            log.warning("connection from %s refused: %s (%d refused since the last such line)", ip, why,
                        self._notes)
            self._last_note, self._notes = now, 0


# -- malformed requests: one log line per interval -----------------------------------------------------------
class ThrottledLog(logging.LoggerAdapter):
    """The logger aiohttp's connection handlers write to. A malformed request (the client's fault) is one line
    per `interval` seconds with a count instead of a traceback each; everything else passes through."""

    def __init__(self, logger: logging.Logger, interval: float) -> None:
        super().__init__(logger, {})
        self.interval = interval
        self.suppressed = 0
        self._last = -float("inf")

    def log(self, level, msg, *args, **kwargs) -> None:
        error = kwargs.get("exc_info")
        if level >= logging.WARNING and isinstance(msg, str) and msg.startswith("Error handling request") and \
                isinstance(error, HttpProcessingError):
            now = time.monotonic()
            if now - self._last < self.interval:
                self.suppressed += 1
                return
            remote = args[0] if args else "?"
            text = " ".join(str(error).split())[:200]
            self.logger.warning("malformed HTTP request from %s: %s (%d more since the last such line; one "
                                "line per %g s)", remote, text, self.suppressed, self.interval)
            self._last, self.suppressed = now, 0
            return
        super().log(level, msg, *args, **kwargs)


# -- requests: Host, Origin, token, banner -------------------------------------------------------------------
def _split_host(value: str) -> tuple[str, int | None] | None:
    """("name", port or None) of a Host header value, lowercased, or None if it is not one."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1:]
    else:
        name, _, port = value.partition(":")
        rest = ":" + port if _ else ""
    if rest and not (rest.startswith(":") and rest[1:].isdigit() and int(rest[1:]) < 65536):
        return None
    name = name.rstrip(".")
    if not name:
        return None
    return name, int(rest[1:]) if rest else None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _is_loopback(name: str) -> bool:
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_allowed(value: str | None, settings: GuardSettings) -> bool:
    """Whether a Host header names this server: the bind address, localhost names when it binds loopback or
    everything, any IP address when it binds everything (an address cannot be rebound by DNS), a
    `server_names` entry, or anything with "*". No Host (HTTP/1.0 probes) is allowed: browsers always send one."""
    if value is None or "*" in settings.server_names:
        return True
    parsed = _split_host(value)
    if parsed is None:
        return False
    name = parsed[0]
    if name in {n.lower().rstrip(".") for n in settings.server_names}:
        return True
    bind = settings.host.strip("[]").lower()
    if bind in WILDCARD_BINDS:
        return _is_ip(name) or _is_loopback(name)
    if name == bind:
        return True
    return _is_loopback(bind) and _is_loopback(name)


_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


def _origin_key(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an Origin value, or None for "null" and anything that is not an origin."""
    try:
        parts = urlsplit(origin.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/") or \
            parts.query or parts.username:
        return None
    return parts.scheme, parts.hostname.rstrip("."), port or _DEFAULT_PORTS[parts.scheme]


def origin_allowed(origin: str | None, host: str | None, settings: GuardSettings) -> bool:
    """Whether a browser page from `origin` may open a conversation: no Origin (not a browser), the server's own
    origin (its host and port equal the Host header's), an `allow_origins` entry, or anything with "*"."""
    if origin is None or "*" in settings.allow_origins:
        return True
    key = _origin_key(origin)
    if key is None:
        return False
    if key in {_origin_key(o) for o in settings.allow_origins}:
        return True
    parsed = _split_host(host) if host else None
    if parsed is None:
        return False
    name, port = parsed
    return key[1] == name and key[2] == (port or _DEFAULT_PORTS[key[0]])


def token_status(request: web.Request, token: str) -> int:
    """200 when the request carries `token` (Authorization: Bearer, or `worker_auth_id`), 401 when it carries
    none, 403 when it carries another; compared in constant time."""
    given = None
    authorization = request.headers.get(hdrs.AUTHORIZATION, "")
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        given = value.strip()
    elif "worker_auth_id" in request.query:
        given = request.query["worker_auth_id"]
    if not given:
        return 401
    return 200 if hmac.compare_digest(given.encode("utf-8", "replace"), token.encode("utf-8")) else 403


def _refuse(status: int, text: str, **headers: str) -> web.Response:
    return web.Response(status=status, text=text + "\n", headers=headers)


def middlewares(settings: GuardSettings) -> list:
    """The request checks of `settings`, in order: Host, Origin (on /api/chat), token."""

    @web.middleware
    async def check_request(request: web.Request, handler):
        if not host_allowed(request.headers.get(hdrs.HOST), settings):
            return _refuse(403, f"unknown Host {request.headers.get(hdrs.HOST, '')[:100]!r}: this server answers "
                                "to its own address and the names given with --server-name")
        path = request.path
        if path.startswith("/api/chat") and not origin_allowed(request.headers.get(hdrs.ORIGIN),
                                                               request.headers.get(hdrs.HOST), settings):
            return _refuse(403, f"pages from {request.headers.get(hdrs.ORIGIN, '')[:100]!r} may not open "
                                "conversations here: serve the page from this server or add its origin with "
                                "--allow-origin")
        if settings.auth_token and path.startswith(PROTECTED_PREFIXES):
            status = token_status(request, settings.auth_token)
            if status == 401:
                return _refuse(401, "this server needs an access token: send `Authorization: Bearer TOKEN` or "
                                    "the query parameter worker_auth_id=TOKEN", **{"WWW-Authenticate": "Bearer"})
            if status == 403:
                return _refuse(403, "wrong access token")
        return await handler(request)

    return [check_request]


async def strip_banner(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: a `Server` header without library versions."""
    response.headers[hdrs.SERVER] = SERVER_HEADER


__all__ = ["GuardSettings", "GuardError", "GuardedSite", "ThrottledLog", "check_settings", "client_ip",
           "middlewares", "strip_banner", "host_allowed", "origin_allowed", "raise_nofile_limit",
           "fitting_max_connections", "SERVER_HEADER"]
