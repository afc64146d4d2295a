"""The project's exceptions. Every message is one line that says what to do next.

What a user can cause (a bad flag, a missing file, an unusable recording, no network, no GPU) is a
`PersonaplexError`: the command line prints its message on one line and exits with status 2. Anything else
is a bug and keeps its traceback (status 1). The subclasses that are also `ValueError` are the ones raised
where a plain `ValueError` was raised before, so that library callers catching it keep working.
"""

from __future__ import annotations


class PersonaplexError(Exception):
    """Base class of the errors this package raises on purpose (bad input, missing files, no network)."""


class UsageError(PersonaplexError, ValueError):
    """A command-line flag or argument has a value (or a combination) that cannot work."""


class ConfigError(PersonaplexError, ValueError):
    """A model preset or config.json is unknown, unreadable or not supported."""


class DeviceError(PersonaplexError):
    """The requested device does not exist or is not available on this machine."""


class OutputError(PersonaplexError):
    """An output file or folder cannot be written."""


class CheckpointError(PersonaplexError):
    """A checkpoint (local directory or hub repo) cannot be found, downloaded or read."""


class VoiceNotFoundError(PersonaplexError):
    """A voice prompt name is unknown or not a plain file name."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
