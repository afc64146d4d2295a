"""`personaplex` command line: one sub-command per job. Errors the user can fix print one line and exit 2."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import PersonaplexError

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


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
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


def open_checkpoint(args: argparse.Namespace):
    """Load the checkpoint named by the common flags (the demo one with --demo)."""
    import torch

    from .checkpoint import load_checkpoint

    source = args.checkpoint
    if args.demo:
        from .demo import demo_checkpoint_dir

        source = demo_checkpoint_dir()
        logging.getLogger("personaplex").warning("DEMO checkpoint: tiny model with random weights (%s)", source)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return load_checkpoint(source, config=args.config, device=args.device, dtype=dtype, revision=args.hf_revision)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `personaplex info`."""
    add_checkpoint_args(parser)


def run(args: argparse.Namespace) -> int:
    """`personaplex info`."""
    from .hub import list_voices

    ckpt = open_checkpoint(args)
    files = ckpt.files
    print(f"checkpoint: {files.source}")
    for name in ("lm", "mimi", "tokenizer", "config", "voices_dir"):
        print(f"  {name:<10} {getattr(files, name)}")
    c = ckpt.config
    print(f"model: dim {c.dim}, {c.num_layers} layers, {c.num_heads} heads, context {c.context}, "
          f"n_q {c.n_q}, dep_q {c.dep_q}, {ckpt.lm.num_parameters() / 1e9:.3f} B parameters, "
          f"{ckpt.lm.dtype} on {ckpt.lm.device}")
    print(f"text tokenizer: {ckpt.tokenizer.vocab_size} pieces")
    voices = list_voices(files.voices_dir) if files.voices_dir else []
    print(f"voices: {', '.join(voices) if voices else '(none)'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="personaplex", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (PersonaplexError, ValueError, OSError) as exc:
        # Bad input and missing files: one line, no traceback (-v shows it).
        if args.verbose:
            raise
        print(f"personaplex {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
