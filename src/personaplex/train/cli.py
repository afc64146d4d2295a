"""The training sub-commands of `personaplex`:

    personaplex synth SCRIPTS... --output CONVERSATIONS [--tts espeak]
    personaplex train-prepare CONVERSATIONS SHARDS --checkpoint BASE
    personaplex train --data SHARDS --run-dir RUN --checkpoint BASE [--mode lora|full] ...
    torchrun --nproc-per-node N -m personaplex.cli train ...            (FSDP2 over N processes)
    personaplex train-export --run-dir RUN --output CHECKPOINT [--lora-only]

All four are registered in `personaplex.cli.COMMANDS` with this module: `add_arguments` picks the
sub-command from the parser's name (argparse names it "personaplex <command>") and `run` from
`args.command`.

`synth` and `train-prepare` go through many samples and never stop at a bad one; their exit status says how
it went: 0 every sample done (or already done), 3 some failed (the others are written and usable), 1 every
sample failed. Status 2 is, as for every command, an error in what was asked (a bad flag, a missing folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os

log = logging.getLogger("personaplex.train")

SOME_FAILED = 3  # exit status of synth / train-prepare when some samples failed and the others are written


def batch_status(done: int, failed: int) -> int:
    """Exit status of a command over many samples: 0 all done, 3 some failed, 1 all failed."""
    if not failed:
        return 0
    return SOME_FAILED if done else 1


# -- train-prepare --------------------------------------------------------------------------------------------
def _prepare_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import add_checkpoint_args

    parser.add_argument("source", help="folder of conversations: stereo audio (agent left, user right) + JSON")
    parser.add_argument("output", help="folder for the shards and manifest.json (resumed when it exists)")
    parser.add_argument("--shard-size", type=int, default=256, help="conversations per shard (default 256)")
    parser.add_argument("--overflow", choices=["truncate", "shift"], default="truncate",
                        help="a word's tokens that run into the next word: dropped (truncate, Moshi's default) "
                             "or pushed later (shift)")
    parser.add_argument("--voices-dir", default=None,
                        help="where voice names are looked up (default: the checkpoint's)")
    parser.add_argument("--limit", type=int, default=None, help="prepare at most N new conversations")
    parser.add_argument("--encode-frames", type=int, default=1,
                        help="Mimi frames per encoder step: 1 (default) computes exactly the engine's codes; "
                             "e.g. 25 is several times faster, same codes for the first 10 s, ~0.5%% differ later")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_checkpoint_args(parser)


def _prepare_run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_mimi, resolve_device
    from ..cli import output_dir
    from ..config import resolve_config
    from ..hub import resolve_checkpoint
    from ..text import TextTokenizer
    from ..voices import check_voices_dir
    from .data import find_conversations
    from .prepare import prepare_dataset

    find_conversations(args.source)  # a missing or empty source folder is said before anything loads
    voices_dir = check_voices_dir(args.voices_dir, "--voices-dir")
    device = resolve_device(args.device)
    output_dir(args.output, "OUTPUT")
    files = resolve_checkpoint(args.checkpoint, need=("mimi", "tokenizer"), revision=args.hf_revision, demo=args.demo)
    config = resolve_config(args.config if args.config else (files.config and str(files.config)))
    mimi = load_mimi(files.mimi, device=device, num_codebooks=config.audio_codebooks)
    report = prepare_dataset(args.source, args.output, mimi, TextTokenizer(files.tokenizer), config,
                             voices_dir=voices_dir or files.voices_dir, shard_size=args.shard_size,
                             overflow=args.overflow, limit=args.limit, progress=not args.no_progress,
                             checkpoint_name=str(files.source), frames_per_step=args.encode_frames)
    print(f"prepared {len(report.prepared)} conversation(s), {report.frames} frames ({report.hours:.2f} h) into "
          f"{report.output}; {report.skipped} already prepared; {len(report.failed)} failed; "
          f"{report.dropped_tokens} text token(s) did not fit their frames")
    for cid, reason in report.failed[:20]:
        print(f"  failed {cid}: {reason}")
    if len(report.failed) > 20:
        print(f"  ... {len(report.failed) - 20} more, listed in {report.output}/manifest.json")
    return batch_status(len(report.prepared) + report.skipped, len(report.failed))


# -- train ----------------------------------------------------------------------------------------------------
_TYPES = {"str": str, "int": int, "float": float}


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field of a config dataclass (`--lora-rank` for `lora_rank`), help from its metadata."""
    group = parser.add_argument_group("training (every field of TrainConfig)")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type).split("|")[0].strip()
        help_text = f.metadata.get("help", "")
        default = f.default
        if kind == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            shown = f" (default: {default})" if default not in (None, "") else ""
            group.add_argument(flag, type=_TYPES[kind], default=default, help=help_text + shown,
                               required=f.name in ("data", "run_dir"))


def config_from_args(args: argparse.Namespace, cls):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    from .loop import TrainConfig

    add_config_arguments(parser, TrainConfig)


def _train_run(args: argparse.Namespace) -> int:
    from .loop import TrainConfig, train

    history = train(config_from_args(args, TrainConfig))
    last = [h for h in history if h["kind"] == "train"]
    if last and os.environ.get("RANK", "0") == "0":
        log.info("done: step %d, loss %.4f; export with `personaplex train-export --run-dir %s --output DIR`",
                 last[-1]["step"], last[-1]["loss"], args.run_dir)
    return 0


# -- train-export ---------------------------------------------------------------------------------------------
def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", default=None, help="the training run to export")
    parser.add_argument("--output", required=True,
                        help="checkpoint directory to write (with --lora-only: a folder or a .safetensors path)")
    parser.add_argument("--step", type=int, default=None, help="which checkpoint (default: the latest)")
    parser.add_argument("--lora-only", action="store_true", help="write the LoRA adapters alone (lora.safetensors)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="weights dtype of model.safetensors (default bfloat16, as released)")
    parser.add_argument("--base", default=None, help="with --lora: base checkpoint to merge the LoRA file into")
    parser.add_argument("--lora", default=None, help="a lora.safetensors to merge into --base (instead of a run)")


def _export_run(args: argparse.Namespace) -> int:
    import torch

    from .export import ExportError, export_run, merge_lora_file

    dtype = getattr(torch, args.dtype)
    if args.lora:
        if not args.base:
            raise ExportError("--lora needs --base, the checkpoint the adapters were trained on")
        out = merge_lora_file(args.base, args.lora, args.output, dtype=dtype)
    elif args.run_dir:
        out = export_run(args.run_dir, args.output, step=args.step, lora_only=args.lora_only, dtype=dtype)
    else:
        raise ExportError("pass --run-dir RUN (or --lora FILE --base CHECKPOINT)")
    print(f"wrote {out}")
    return 0


# -- synth ----------------------------------------------------------------------------------------------------
def _synth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scripts", nargs="+", help="dialogue scripts: JSON / JSONL files or folders of them")
    parser.add_argument("--output", required=True, help="folder for the conversations (wav + JSON)")
    parser.add_argument("--tts", default="espeak", help="espeak, tones, or package.module:Class (default espeak)")
    parser.add_argument("--words-per-minute", type=int, default=165, help="espeak speaking rate")
    parser.add_argument("--lead", type=float, default=0.5, help="silence before the first turn (s)")
    parser.add_argument("--tail", type=float, default=0.5, help="silence after the last turn (s)")
    parser.add_argument("--pause", type=float, default=0.4, help="default gap between turns (s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _synth_run(args: argparse.Namespace) -> int:
    from ..cli import output_dir
    from .synth import EspeakTTS, load_tts, read_scripts, synthesize

    scripts = read_scripts(args.scripts)
    tts = EspeakTTS(args.words_per_minute) if args.tts == "espeak" else load_tts(args.tts)
    output_dir(args.output, "--output")
    report = synthesize(scripts, args.output, tts, progress=not args.no_progress,
                        lead=args.lead, tail=args.tail, pause=args.pause)
    print(f"wrote {len(report.written)} conversation(s) ({report.seconds / 60:.1f} min) into {args.output}; "
          f"{len(report.failed)} failed")
    for sid, reason in report.failed:
        print(f"  failed {sid}: {reason}")
    return batch_status(len(report.written), len(report.failed))


_COMMANDS = {
    "train-prepare": (_prepare_arguments, _prepare_run),
    "train": (_train_arguments, _train_run),
    "train-export": (_export_arguments, _export_run),
    "synth": (_synth_arguments, _synth_run),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _COMMANDS[parser.prog.split()[-1]][0](parser)


def run(args: argparse.Namespace) -> int:
    return _COMMANDS[args.command][1](args)
