"""`personaplex` command line: one sub-command per job.

Errors a user can cause are `PersonaplexError`s: one line on stderr, exit status 2 (`-v` adds the traceback,
the status stays 2). Anything else is a bug: its traceback is shown and the status is 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from pathlib import Path

from . import __version__
from .errors import OutputError, PersonaplexError

log = logging.getLogger("personaplex")

# name -> (module, help). Each module has `add_arguments(parser)` and `run(args) -> exit code`.
COMMANDS: dict[str, tuple[str, str]] = {
    "offline": ("personaplex.offline", "run one conversation from a wav file: agent wav and transcript out"),
    "voice": ("personaplex.voice_cmd", "turn an audio file into a reusable voice file (.pt)"),
    "info": ("personaplex.cli", "describe a checkpoint: files, model configuration, parameter count"),
    "synth": ("personaplex.train.cli", "scripted dialogues -> training conversations (stereo wav + word times)"),
    "train-prepare": ("personaplex.train.cli", "prepare a folder of conversations into training token shards"),
    "train": ("personaplex.train.cli", "fine-tune a checkpoint (LoRA or full; torchrun for FSDP2)"),
    "train-export": ("personaplex.train.cli", "export a training run as a checkpoint (or its LoRA weights)"),
    "serve": ("personaplex.server.cli", "real-time websocket server for the web client and released clients"),
    "eval": ("personaplex.eval.cli", "evaluate: Full-Duplex-Bench, speaker similarity, service judge, live latency"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already says it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        on_off = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))  # says it by its name
        if ("default" in text or not action.option_strings or action.default in (None, False, "") or on_off
                or action.default is argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    """The common flags: which checkpoint, on which device, in which dtype."""
    from .hub import DEFAULT_REPO

    group = parser.add_argument_group("checkpoint")
    group.add_argument("--checkpoint", default=DEFAULT_REPO,
                       help=f"local directory or hub repo id in the released layout (default: {DEFAULT_REPO})")
    group.add_argument("--demo", action="store_true",
                       help="use a tiny model with RANDOM weights built on the fly (tries the whole path; "
                            "its speech is noise)")
    group.add_argument("--config", default=None,
                       help="model preset (personaplex-7b, moshi-7b, tiny) or config.json; default: the "
                            "checkpoint's config.json, else personaplex-7b")
    group.add_argument("--hf-revision", default=None, help="hub revision (branch, tag or commit)")
    group.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    group.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                       help="LM weights dtype (default: bfloat16 on GPU, float32 on CPU)")
    group.add_argument("--quantize", default="none", choices=["none", "int8", "fp8"],
                       help="weight-only quantisation of the LM's linear layers while loading (torchao; "
                            "--dtype stays the activation dtype): int8 halves the weights, fp8 needs a GPU "
                            "of compute capability >= 8.9")
    group.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                       help="step the model eagerly on a GPU instead of replaying a CUDA graph of each tick "
                            "(the same output; for debugging and profiling)")
    group.add_argument("--offload", action="store_true",
                       help="keep the temporal layers in host memory and stream them to the GPU ahead of use "
                            "(GPUs too small for the weights; far slower than real time)")


def open_checkpoint(args: argparse.Namespace):
    """Load the checkpoint named by the common flags (the demo one with --demo)."""
    import torch

    from .checkpoint import load_checkpoint, resolve_device

    device = resolve_device(args.device)  # a missing GPU is said before anything is read
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if getattr(args, "offload", False):
        args.cuda_graphs = False  # offloaded layers are copied in around each block: no graph can replay that
    return load_checkpoint(args.checkpoint, config=args.config, device=device, dtype=dtype,
                           quantize=getattr(args, "quantize", None), offload=getattr(args, "offload", False),
                           revision=args.hf_revision, demo=args.demo)


def output_dir(path: str | Path, flag: str) -> Path:
    """An output folder: created (with a log line) when missing; `OutputError` when it cannot be."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists():
        raise OutputError(f"{flag} {path} is a file: pass a folder (it is created when missing)")
    try:
        folder.mkdir(parents=True)
    except OSError as error:
        raise OutputError(f"{flag}: cannot create the folder {path} ({error.strerror or error}); "
                          "pick a writable place") from None
    log.info("created %s", folder)
    return folder


def output_file(path: str | Path, flag: str) -> Path:
    """An output file's path, its folder created (with a log line) when missing; refused when it names a
    folder or its folder cannot be written."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise OutputError(f"{flag} {path} is a folder: pass a file name")
    folder = output_dir(file.parent, flag) if str(file.parent) not in ("", ".") else Path(".")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{flag}: cannot write into {folder} (permission denied); pick a writable place")
    return file


def format_count(n: int) -> str:
    """A parameter count for people: 8.37 B, 5.2 M, 12.3 k."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return str(n)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `personaplex info`."""
    add_checkpoint_args(parser)


def run(args: argparse.Namespace) -> int:
    """`personaplex info`."""
    from .voices import list_voices

    ckpt = open_checkpoint(args)
    files = ckpt.files
    print(f"checkpoint: {files.source}")
    for name in ("lm", "mimi", "tokenizer", "config", "voices_dir"):
        print(f"  {name:<10} {getattr(files, name)}")
    c = ckpt.config
    print(f"model: dim {c.dim}, {c.num_layers} layers, {c.num_heads} heads, context {c.context}, "
          f"n_q {c.n_q}, dep_q {c.dep_q}, {format_count(ckpt.lm.num_parameters())} parameters, "
          f"{ckpt.lm.dtype} on {ckpt.lm.device}")
    from .quantize import memory_summary

    print(f"weights: {memory_summary(ckpt.lm)}")
    print(f"text tokenizer: {ckpt.tokenizer.vocab_size} pieces")
    voices = list_voices(files.voices_dir) if files.voices_dir else []
    print(f"voices: {', '.join(voices) if voices else '(none)'}")
    return 0


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `only`, the flags of that command alone are set up (the other commands'
    modules are not imported: a command starts faster and does not depend on the others)."""
    import torch

    parser = argparse.ArgumentParser(
        prog="personaplex", description="PersonaPlex: real-time full-duplex speech-to-speech with persona control.",
        epilog="`personaplex COMMAND -h` shows a command's flags. Errors you can fix print one line and exit "
               "with status 2 (-v adds the traceback); try --demo to run any command without the weights.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    parser.add_argument("--version", action="version", version=f"personaplex {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if only is None or name == only:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)  # the top level has no valued options
    parser = build_parser(command if command in COMMANDS else None)
    if not argv:  # bare `personaplex`: the overview, with argparse's status for a missing command
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except PersonaplexError as exc:
        # Something the user can fix: one line (with -v, the traceback first). Anything else is a bug and
        # keeps its traceback and status 1.
        if args.verbose:
            traceback.print_exc()
        print(f"personaplex {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
