"""The project's exceptions. Every message is one line that says what to do next."""

from __future__ import annotations


class PersonaplexError(Exception):
    """Base class of the errors this package raises on purpose (bad input, missing files, no network)."""


class CheckpointError(PersonaplexError):
    """A checkpoint (local directory or hub repo) cannot be found, downloaded or read."""


class VoiceNotFoundError(PersonaplexError):
    """A voice prompt name is unknown or not a plain file name."""
