"""`personaplex serve`: the real-time websocket server (wire-compatible with the released web client).

    personaplex serve --checkpoint nvidia/personaplex-7b-v1      # GPU host, HF_TOKEN set
    personaplex serve --demo                                      # tiny random model, any machine

Binds 127.0.0.1 unless told otherwise; see docs/serving.md for TLS and reverse proxies.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import ssl
from pathlib import Path

from ..errors import UsageError

log = logging.getLogger("personaplex.server")

# docs/performance.md measures one conversation in real time on 2 CPU cores (the demo model) and not two:
# a CPU server steps one conversation unless told otherwise, so a second caller queues or is refused
# instead of making every call stutter.
CPU_MAX_CONVERSATIONS = 1
GPU_MAX_CONVERSATIONS = 64
GPU_MEMORY_SHARE = 0.85  # of the free memory after loading, at most, for the batch's KV cache by default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import add_checkpoint_args
    from ..defaults import DEFAULT_TEXT_PROMPT

    net = parser.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1",
                     help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it to the network)")
    net.add_argument("--port", type=int, default=8998, help="port (default 8998)")
    net.add_argument("--ssl-cert", default=None, help="TLS certificate (PEM); serve https/wss with --ssl-key")
    net.add_argument("--ssl-key", default=None, help="TLS private key (PEM)")
    net.add_argument("--server-name", action="append", default=[], metavar="NAME",
                     help="a host name clients reach this server by (Host header; repeatable; '*': any). "
                          "Its own address and, on loopback, localhost are always accepted")
    net.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                     help="a web page origin (scheme://host[:port]) allowed to open conversations besides the "
                          "server's own (repeatable; '*': any)")
    net.add_argument("--auth-token", default=os.environ.get("PERSONAPLEX_AUTH_TOKEN"),
                     help="require this access token on /api/chat and /metrics (Authorization: Bearer, or the "
                          "released client's worker_auth_id); default: env PERSONAPLEX_AUTH_TOKEN")
    net.add_argument("--static", default=None, metavar="DIR",
                     help="serve this web client build (a folder with index.html, e.g. the released client's "
                          "dist/) instead of the built-in page")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-conversations", type=int, default=None,
                        help=f"conversations stepped together (default {CPU_MAX_CONVERSATIONS} on CPU, "
                             f"{GPU_MAX_CONVERSATIONS} on GPU or what fits its memory)")
    limits.add_argument("--queue", type=int, default=0,
                        help="callers allowed to wait for a free slot (default 0: refuse when full)")
    limits.add_argument("--max-prompt-chars", type=int, default=4000, help="longest text prompt accepted")
    limits.add_argument("--idle-timeout", type=float, default=60.0,
                        help="close a conversation whose caller sends no audio for this many seconds "
                             "(default 60; 0: never)")
    limits.add_argument("--drain-seconds", type=float, default=30.0,
                        help="on SIGTERM take no new calls and let current ones go on this long before closing "
                             "them (default 30; a second SIGTERM, or SIGINT, stops at once)")
    limits.add_argument("--codec-workers", type=int, default=None,
                        help="processes doing the Opus decode/encode of callers' audio (default: half the CPU "
                             "cores, 1 to 8; 0: on the event loop)")
    limits.add_argument("--queue-timeout", type=float, default=120.0,
                        help="tell a queued caller to try later after this many seconds (default 120; 0: never)")
    limits.add_argument("--max-connections", type=int, default=1024,
                        help="open sockets in all, counted from accept (default 1024, lowered to what the "
                             "open-file limit allows; 0: that limit)")
    limits.add_argument("--max-connections-per-ip", type=int, default=64,
                        help="open sockets from one client address (default 64; 0: no limit, e.g. behind a "
                             "proxy that limits per client itself)")
    limits.add_argument("--header-timeout", type=float, default=10.0,
                        help="close a socket that has not sent a whole request head (or finished its TLS "
                             "handshake) within this many seconds (default 10)")
    persona = parser.add_argument_group("persona")
    persona.add_argument("--voice-prompt-dir", default=None,
                         help="folder of voice files clients may name (default: the checkpoint's voices)")
    persona.add_argument("--default-text-prompt", default=DEFAULT_TEXT_PROMPT,
                         help="text prompt of clients that send none")
    persona.add_argument("--forget-persona", action="store_true",
                         help="let the prompt slide out of the 240 s context like the released server "
                              "(default: the prompt stays pinned)")
    add_checkpoint_args(parser)


def default_codec_workers(wanted: int | None) -> int:
    """--codec-workers, or half the CPU cores (1 to 8): one worker carries ~40 callers (docs/performance.md)."""
    if wanted is not None:
        return wanted
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def default_max_conversations(lm) -> int:
    """1 on CPU (what is measured in real time); on GPU 64 (an estimate, not measured), or fewer if their
    KV caches would not fit in most of the free memory."""
    import torch

    if lm.device.type != "cuda":
        return CPU_MAX_CONVERSATIONS
    c = lm.config
    element = torch.empty(0, dtype=lm.dtype).element_size()
    per_conversation = 2 * c.num_layers * c.context * c.dim * element  # keys + values
    free, _ = torch.cuda.mem_get_info(lm.device)
    fits = int(free * GPU_MEMORY_SHARE // per_conversation)
    if fits < GPU_MAX_CONVERSATIONS:
        log.warning("%.1f GiB free on %s: %d conversations fit (%.2f GiB of KV cache each); "
                    "use --max-conversations to override", free / 2**30, lm.device, fits, per_conversation / 2**30)
    return max(1, min(GPU_MAX_CONVERSATIONS, fits))


def build_server(checkpoint, settings=None, voices_dir=None, pin_prompt: bool = True, on_frame=None,
                 personas=None, cuda_graphs: bool = True):
    """A `ChatServer` on a loaded checkpoint (its model loop starts with the app). `personas` may be shared
    between servers of the same checkpoint (tests), else one is made for `voices_dir`; never with paths."""
    from ..engine import BatchEngine, Personas
    from ..defaults import choose_voice
    from ..quantize import weights_info
    from .app import ChatServer, ServerSettings
    from .loop import TICK_SECONDS, ModelLoop

    settings = settings or ServerSettings()
    voices_dir = voices_dir or checkpoint.files.voices_dir
    if personas is None:
        personas = Personas(checkpoint.lm, checkpoint.mimi, checkpoint.tokenizer, voices_dir, allow_paths=False)
    elif personas.allow_paths:
        raise ValueError("a server's personas must not accept file paths as voice names")
    if settings.default_voice is None:
        settings.default_voice = choose_voice(personas, None)
    lm, mimi, size = checkpoint.lm, checkpoint.mimi, settings.max_conversations
    idle = settings.idle_timeout_seconds
    graphs = None if cuda_graphs else False  # None: on a CUDA device
    model_loop = ModelLoop(lambda: BatchEngine(lm, mimi, max_batch=size, pin_prompt=pin_prompt, cuda_graphs=graphs),
                           personas,
                           on_frame=on_frame, idle_ticks=max(1, round(idle / TICK_SECONDS)) if idle else None)
    c = lm.config
    info = {"name": model_name(checkpoint.files.source, settings.demo), "dim": c.dim, "num_layers": c.num_layers,
            "num_heads": c.num_heads, "context": c.context, "n_q": c.n_q, "dep_q": c.dep_q,
            "parameters": lm.num_parameters(), "dtype": str(lm.dtype).replace("torch.", ""),
            "device": str(lm.device), "pinned_prompt": pin_prompt, "weights": weights_info(lm)}
    return ChatServer(model_loop, personas, checkpoint.tokenizer, settings, model_info=info)


def model_name(source, demo: bool = False) -> str:
    """What `/api/info` calls the model: a hub repo id as it is, a local checkpoint by its folder name only
    (never a filesystem path)."""
    if demo:
        return "demo (random weights)"
    text = str(source or "")
    if not text:
        return "unknown"
    if text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") != 1 or Path(text).exists():
        return Path(text).name or "local checkpoint"
    return text


def exposure_warning(host: str, tls: bool, token: bool) -> str | None:
    """The start-up warning for a server other machines can reach (None on loopback): what it lacks."""
    if host in ("127.0.0.1", "localhost", "::1"):
        return None
    advice = [] if tls else ["serve TLS (--ssl-cert/--ssl-key) or put it behind a TLS proxy"]
    if not token:
        advice.append("set an access token (--auth-token or PERSONAPLEX_AUTH_TOKEN) unless it is meant to be open")
    return (f"binding {host}: the server is reachable from other machines" +
            ("; " + " and ".join(advice) if advice else " (TLS and an access token on)"))


def ssl_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if not cert and not key:
        return None
    if not (cert and key):
        raise UsageError("--ssl-cert and --ssl-key go together: pass both (PEM files) or neither")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as error:
        raise UsageError(f"cannot load the TLS certificate {cert} / key {key}: {error}") from None
    return context


def run(args: argparse.Namespace) -> int:
    from ..cli import open_checkpoint
    from ..voices import check_voices_dir
    from . import guard
    from .app import ServerSettings

    for name in ("max_conversations", "queue", "max_prompt_chars"):
        value = getattr(args, name)
        if value is not None and value < (1 if name != "queue" else 0):
            raise UsageError(f"--{name.replace('_', '-')} must be {'at least 1' if name != 'queue' else '>= 0'}")
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be between 0 and 65535, got {args.port}")
    context = ssl_context(args.ssl_cert, args.ssl_key)
    check_voices_dir(args.voice_prompt_dir)  # before the model loads
    static = None
    if args.static is not None:
        static = Path(args.static).expanduser().resolve()
        if not (static / "index.html").is_file():
            raise UsageError(f"--static {args.static}: no index.html there; give the folder of a built web "
                             "client (e.g. the released client's dist/ after `npm run build`)")
    if args.drain_seconds < 0:
        raise UsageError("--drain-seconds must be >= 0 (0: close calls at once on SIGTERM)")
    if args.codec_workers is not None and not 0 <= args.codec_workers <= 64:
        raise UsageError(f"--codec-workers must be between 0 and 64, got {args.codec_workers}")
    if args.queue_timeout < 0:
        raise UsageError("--queue-timeout must be >= 0 seconds (0: wait for ever)")
    soft, _ = guard.raise_nofile_limit()
    limits = guard.GuardSettings(
        host=args.host, server_names=tuple(args.server_name), allow_origins=tuple(args.allow_origin),
        auth_token=args.auth_token or None, max_connections_per_ip=args.max_connections_per_ip,
        header_timeout_seconds=args.header_timeout, max_connections=args.max_connections)
    guard.check_settings(limits)
    limits.max_connections = guard.fitting_max_connections(args.max_connections, soft)
    ckpt = open_checkpoint(args)
    settings = ServerSettings(
        max_conversations=args.max_conversations or default_max_conversations(ckpt.lm),
        queue=args.queue, max_prompt_chars=args.max_prompt_chars, demo=args.demo,
        default_text_prompt=args.default_text_prompt, idle_timeout_seconds=args.idle_timeout or None,
        queue_timeout_seconds=args.queue_timeout or None, static_dir=static, guard=limits,
        drain_seconds=args.drain_seconds, codec_workers=default_codec_workers(args.codec_workers))
    server = build_server(ckpt, settings, voices_dir=args.voice_prompt_dir, pin_prompt=not args.forget_persona,
                          cuda_graphs=getattr(args, "cuda_graphs", True))
    voices = server.voices()
    log.info("voices: %s (default %s)", ", ".join(voices) if voices else "(none)", settings.default_voice)
    warning = exposure_warning(args.host, tls=context is not None, token=bool(limits.auth_token))
    if warning:
        log.warning("%s", warning)
    asyncio.run(_serve(server, args.host, args.port, context))
    return 0


async def _serve(server, host: str, port: int, context) -> None:
    from .app import make_runner
    from .guard import GuardedSite

    runner = make_runner(server)
    await runner.setup()  # starts the model loop and builds the default persona
    site = GuardedSite(runner, host, port, server.settings.guard, ssl_context=context)
    server.connection_counter = site.counter
    await site.start()
    scheme = "https" if context else "http"
    shown = f"[{host}]" if ":" in host else host
    bound = site.port
    print(f"personaplex serve: listening on {scheme}://{shown}:{bound} ({server.settings.max_conversations} "
          f"conversations, queue {server.settings.queue}); Ctrl+C to stop", flush=True)
    stop, now = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig) -> None:  # SIGTERM drains first; SIGINT, or SIGTERM while draining, stops at once
        if sig == signal.SIGINT or stop.is_set():
            now.set()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        await stop.wait()
        seconds = server.settings.drain_seconds
        if not now.is_set() and seconds > 0 and server.sessions:
            print(f"personaplex serve: draining ({len(server.sessions)} connections, up to {seconds:g} s; "
                  "signal again to stop now)", flush=True)
            drain = asyncio.create_task(server.drain(seconds))
            stopped = asyncio.create_task(now.wait())
            await asyncio.wait({drain, stopped}, return_when=asyncio.FIRST_COMPLETED)
            drain.cancel()
            stopped.cancel()
    finally:
        print("personaplex serve: stopping", flush=True)
        await runner.cleanup()


__all__ = ["add_arguments", "run", "build_server", "default_max_conversations", "ssl_context"]
