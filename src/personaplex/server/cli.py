"""`personaplex serve`: the real-time websocket server (wire-compatible with the released web client).

    personaplex serve --checkpoint nvidia/personaplex-7b-v1      # GPU host, HF_TOKEN set
    personaplex serve --demo                                      # tiny random model, any machine

Binds 127.0.0.1 unless told otherwise; see docs/serving.md for TLS and reverse proxies.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import ssl

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
    persona = parser.add_argument_group("persona")
    persona.add_argument("--voice-prompt-dir", default=None,
                         help="folder of voice files clients may name (default: the checkpoint's voices)")
    persona.add_argument("--default-text-prompt", default=DEFAULT_TEXT_PROMPT,
                         help="text prompt of clients that send none")
    persona.add_argument("--forget-persona", action="store_true",
                         help="let the prompt slide out of the 240 s context like the released server "
                              "(default: the prompt stays pinned)")
    add_checkpoint_args(parser)


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
                 personas=None):
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
    model_loop = ModelLoop(lambda: BatchEngine(lm, mimi, max_batch=size, pin_prompt=pin_prompt), personas,
                           on_frame=on_frame, idle_ticks=max(1, round(idle / TICK_SECONDS)) if idle else None)
    c = lm.config
    info = {"source": str(checkpoint.files.source), "dim": c.dim, "num_layers": c.num_layers,
            "num_heads": c.num_heads, "context": c.context, "n_q": c.n_q, "dep_q": c.dep_q,
            "parameters": lm.num_parameters(), "dtype": str(lm.dtype).replace("torch.", ""),
            "device": str(lm.device), "pinned_prompt": pin_prompt, "weights": weights_info(lm)}
    return ChatServer(model_loop, personas, checkpoint.tokenizer, settings, model_info=info)


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
    from .app import ServerSettings

    for name in ("max_conversations", "queue", "max_prompt_chars"):
        value = getattr(args, name)
        if value is not None and value < (1 if name != "queue" else 0):
            raise UsageError(f"--{name.replace('_', '-')} must be {'at least 1' if name != 'queue' else '>= 0'}")
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be between 0 and 65535, got {args.port}")
    context = ssl_context(args.ssl_cert, args.ssl_key)
    check_voices_dir(args.voice_prompt_dir)  # before the model loads
    ckpt = open_checkpoint(args)
    settings = ServerSettings(
        max_conversations=args.max_conversations or default_max_conversations(ckpt.lm),
        queue=args.queue, max_prompt_chars=args.max_prompt_chars, demo=args.demo,
        default_text_prompt=args.default_text_prompt, idle_timeout_seconds=args.idle_timeout or None)
    server = build_server(ckpt, settings, voices_dir=args.voice_prompt_dir, pin_prompt=not args.forget_persona)
    voices = server.voices()
    log.info("voices: %s (default %s)", ", ".join(voices) if voices else "(none)", settings.default_voice)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s: the server is reachable from other machines; put it behind TLS", args.host)
    asyncio.run(_serve(server, args.host, args.port, context))
    return 0


async def _serve(server, host: str, port: int, context) -> None:
    from aiohttp import web

    from .app import make_runner

    runner = make_runner(server)
    await runner.setup()  # starts the model loop and builds the default persona
    site = web.TCPSite(runner, host, port, ssl_context=context)
    await site.start()
    scheme = "https" if context else "http"
    shown = f"[{host}]" if ":" in host else host
    bound = site._server.sockets[0].getsockname()[1] if site._server and site._server.sockets else port
    print(f"personaplex serve: listening on {scheme}://{shown}:{bound} ({server.settings.max_conversations} "
          f"conversations, queue {server.settings.queue}); Ctrl+C to stop", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        await stop.wait()
    finally:
        print("personaplex serve: stopping", flush=True)
        await runner.cleanup()


__all__ = ["add_arguments", "run", "build_server", "default_max_conversations", "ssl_context"]
