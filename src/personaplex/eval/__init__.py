"""`personaplex eval`: Full-Duplex-Bench scoring and timing, speaker similarity, service-agent judging, live latency.

Nothing heavy is imported here: each sub-command imports its own dependencies (the `eval` extra) when it runs.
"""

from __future__ import annotations

from ..errors import PersonaplexError


class EvalError(PersonaplexError):
    """Bad evaluation input: a missing file, a folder that is not in Full-Duplex-Bench's layout, a bad flag."""


def missing_extra(package: str, extra: str = "eval") -> EvalError:
    """The error for an optional dependency that is not installed."""
    return EvalError(f"{package} is not installed; install the evaluation extra: pip install -e \".[{extra}]\"")


__all__ = ["EvalError", "missing_extra"]
