"""What a conversation starts with when the caller names nothing: the released default text prompt and the
preferred voice. `personaplex offline`, `personaplex serve` and the evaluation all use these."""

from __future__ import annotations

DEFAULT_TEXT_PROMPT = ("You are a wise and friendly teacher. Answer questions or provide advice in a clear and "
                       "engaging way.")
# The first of these the checkpoint has is the default voice (the demo checkpoint has DEMO_LOW, and with
# the released names as aliases NATF2 too); else its first voice in name order.
PREFERRED_VOICES = ("NATF2", "NATF0", "DEMO_LOW")


def choose_voice(personas, requested: str | None) -> str | None:
    """`requested` when given, else the default voice among `personas.available_voices()` (None: no voices)."""
    if requested:
        return requested
    available = personas.available_voices()
    for name in PREFERRED_VOICES:
        if name in available:
            return name
    return available[0] if available else None
