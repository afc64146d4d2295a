"""`personaplex eval SUBCOMMAND`: one module per evaluation, each with `add_arguments(parser)` and `run(args)`.

A module that is not part of this build yet (or fails to import for a missing optional dependency at import
time, which it should not) gives a sub-command that says so instead of breaking the whole command line.
"""

from __future__ import annotations

import argparse
import importlib

from . import EvalError

# name -> (module, help)
EVALS: dict[str, tuple[str, str]] = {
    "fdb": ("personaplex.eval.fdb_cmd",
            "Full-Duplex-Bench v1.0 task: generate, transcribe, score (FDB's rules) and report"),
    "fdb-timing": ("personaplex.eval.fdb_timing",
                   "Full-Duplex-Bench v1.5 overlap sets: stop and response latency intervals from silero VAD"),
    "speaker": ("personaplex.eval.speaker", "speaker similarity of the voice prompt to the agent's output"),
    "service": ("personaplex.eval.service", "service-agent run judged on naturalness and task adherence (0-5)"),
    "latency": ("personaplex.eval.latency", "real-time calls against a running server: response and stop latency"),
}


def _unavailable(name: str, module_name: str):
    def run(args: argparse.Namespace) -> int:
        raise EvalError(f"`personaplex eval {name}` is not available in this build ({module_name} is missing)")
    return run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `personaplex eval`: one sub-command per evaluation."""
    sub = parser.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    for name, (module_name, help_text) in EVALS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            p.set_defaults(eval_run=_unavailable(name, module_name))
            continue
        module.add_arguments(p)
        p.set_defaults(eval_run=module.run)


def run(args: argparse.Namespace) -> int:
    """`personaplex eval ...`: dispatch to the chosen evaluation."""
    return args.eval_run(args)
