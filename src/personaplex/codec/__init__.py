"""Mimi neural audio codec (24 kHz audio <-> 12.5 Hz tokens), streaming with explicit per-stream state."""

from .keys import mimi_from_released, mimi_to_released
from .mimi import Mimi, MimiConfig, MimiDecoderState, MimiEncoderState, MimiStream
from .state import StreamState

__all__ = [
    "Mimi",
    "MimiConfig",
    "MimiDecoderState",
    "MimiEncoderState",
    "MimiStream",
    "StreamState",
    "mimi_from_released",
    "mimi_to_released",
]
