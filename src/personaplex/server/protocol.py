"""The `/api/chat` websocket protocol shared with the released PersonaPlex and Moshi clients.

Every websocket message is binary; its first byte says what the rest is:

| kind | name      | payload                          | direction                                        |
|------|-----------|----------------------------------|--------------------------------------------------|
| 0x00 | handshake | none                             | server -> client, once the conversation is ready |
| 0x01 | audio     | Ogg/Opus pages, 24 kHz mono      | both ways                                        |
| 0x02 | text      | UTF-8 piece of the agent's words | server -> client                                 |
| 0x03 | control   | one byte: start, endTurn, pause, restart | client -> server (accepted, ignored)     |
| 0x04 | metadata  | UTF-8 JSON                       | server -> client (queue position)                |
| 0x05 | error     | UTF-8 message                    | server -> client                                 |
| 0x06 | ping      | none                             | either way (ignored)                             |

The conversation's settings come from the query string of the upgrade request (`parse_query`). Names and
limits follow the released web client; the parameters it sends that the model has no use for (`pad_mult`,
`text_seed`, `repetition_penalty`, ...) are accepted and ignored.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from ..engine.sampling import SamplingParams


class Kind(enum.IntEnum):
    HANDSHAKE = 0x00
    AUDIO = 0x01
    TEXT = 0x02
    CONTROL = 0x03
    METADATA = 0x04
    ERROR = 0x05
    PING = 0x06


class Control(enum.IntEnum):
    """The control byte of a 0x03 message (the released client's names)."""

    START = 0
    END_TURN = 1
    PAUSE = 2
    RESTART = 3


class ProtocolError(ValueError):
    """A request or message the server cannot accept; the message is sent to the client as an 0x05 error."""


# -- messages ------------------------------------------------------------------------------------------------
HANDSHAKE = bytes([Kind.HANDSHAKE])


def audio_message(ogg_pages: bytes) -> bytes:
    return bytes([Kind.AUDIO]) + ogg_pages


def text_message(piece: str) -> bytes:
    return bytes([Kind.TEXT]) + piece.encode("utf-8")


def metadata_message(data: Mapping[str, Any]) -> bytes:
    return bytes([Kind.METADATA]) + json.dumps(data, separators=(",", ":")).encode("utf-8")


def error_message(text: str) -> bytes:
    return bytes([Kind.ERROR]) + text.encode("utf-8", errors="replace")


def control_message(control: Control) -> bytes:
    return bytes([Kind.CONTROL, control])


def ping_message() -> bytes:
    return bytes([Kind.PING])


def parse_message(data: bytes) -> tuple[Kind, bytes]:
    """(kind, payload) of a binary message; ProtocolError for an empty message or an unknown kind."""
    if not data:
        raise ProtocolError("empty message: the first byte must be the message kind (0x00-0x06)")
    try:
        kind = Kind(data[0])
    except ValueError:
        raise ProtocolError(f"unknown message kind 0x{data[0]:02x}: expected 0x00-0x06") from None
    return kind, bytes(data[1:])


def parse_control(payload: bytes) -> Control:
    if len(payload) != 1:
        raise ProtocolError(f"a control message holds one byte, got {len(payload)}")
    try:
        return Control(payload[0])
    except ValueError:
        raise ProtocolError(f"unknown control byte {payload[0]}: expected 0-3") from None


# -- the upgrade request's query ------------------------------------------------------------------------------
@dataclass(frozen=True)
class QueryLimits:
    max_prompt_chars: int = 4000
    default_voice: str | None = None
    default_text_prompt: str = ""


@dataclass(frozen=True)
class ChatRequest:
    """What a client asked for: a persona (voice name, text prompt) and its sampling settings."""

    voice: str | None  # a voice NAME among the server's voices (never a path); None: the server has none
    text_prompt: str
    params: SamplingParams


_FLOAT_PARAMS = {"text_temperature": (0.0, 10.0), "audio_temperature": (0.0, 10.0)}
_INT_PARAMS = {"text_topk": (1, 100_000), "audio_topk": (1, 100_000)}
_MAX_VALUE_CHARS = 32


def parse_query(query: Mapping[str, str], limits: QueryLimits = QueryLimits()) -> ChatRequest:
    """Validate the query of an `/api/chat` request. Raises ProtocolError with a message that says what to fix.

    `voice_prompt` may be missing (the server's default voice) and keeps its released form (`NATF0.pt`);
    it is only checked for shape here, the lookup among the server's voices happens later. A missing or
    blank `text_prompt` means no text prompt. `seed` -1 (or absent) means a random seed.
    """
    text_prompt = query.get("text_prompt", limits.default_text_prompt)
    if len(text_prompt) > limits.max_prompt_chars:
        raise ProtocolError(f"text_prompt has {len(text_prompt)} characters; this server accepts at most "
                            f"{limits.max_prompt_chars}: shorten it")
    if "\x00" in text_prompt:
        raise ProtocolError("text_prompt contains a NUL character")
    voice = query.get("voice_prompt", "") or limits.default_voice
    values: dict[str, Any] = {}
    for name, (low, high) in _FLOAT_PARAMS.items():
        if name in query:
            values[name] = _number(query, name, float, low, high)
    for name, (low, high) in _INT_PARAMS.items():
        if name in query:
            values[name] = _number(query, name, int, low, high)
    seed = _number(query, "seed", int, -1, 2**63 - 1) if "seed" in query else -1
    params = SamplingParams(**values, seed=None if seed < 0 else seed)
    try:
        params.validate()
    except ValueError as error:  # the ranges above already hold; this keeps the engine's rules authoritative
        raise ProtocolError(str(error)) from None
    return ChatRequest(voice=voice, text_prompt=text_prompt, params=params)


def _number(query: Mapping[str, str], name: str, kind: type, low: float, high: float):
    raw = query[name].strip()
    shown = repr(raw[:_MAX_VALUE_CHARS])
    if len(raw) > _MAX_VALUE_CHARS:
        raise ProtocolError(f"{name}={shown}... is too long: use a number between {low} and {high}")
    try:
        value = kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ProtocolError(f"{name}={shown} is not {what}: use {what} between {low} and {high}") from None
    if kind is float and not math.isfinite(value) or not low <= value <= high:
        raise ProtocolError(f"{name}={shown} is out of range: use a value between {low} and {high}")
    return value


__all__ = [
    "Kind", "Control", "ProtocolError", "HANDSHAKE", "audio_message", "text_message", "metadata_message",
    "error_message", "control_message", "ping_message", "parse_message", "parse_control", "QueryLimits",
    "ChatRequest", "parse_query",
]
