"""The hybrid persona prompt: voice prompt, 0.5 s silence, `<system> … <system>` text, 0.5 s silence.

All prompt tokens are forced, so the prompt's effect on the model is deterministic: it is computed once per
(voice, text) as one batched prefill of the temporal transformer (no depformer, no sampling) and kept as a
`PromptState` that any number of conversations start from.

Layout, in un-delayed frames (what the released generator feeds, checked against it): the voice prompt's
frames 1..F-1 (frame 0 never reaches the released model: its first step sees only initial tokens), then 6
silence frames, one frame per text token, 6 silence frames. Each frame is (text, agent[8], user[8]):

    voice    PAD   Mimi codes of the voice   SINE
    silence  PAD   SILENCE                   SINE
    text     id    SILENCE                   SINE
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import SAMPLE_RATE, TEXT_PAD, LMConfig
from ..errors import PersonaplexError

SILENCE_TOKENS = (948, 243, 1178, 546, 1736, 1030, 1978, 2008)  # Mimi codes of an all-zero frame
SINE_TOKENS = (430, 1268, 381, 1611, 1095, 1495, 56, 472)  # Mimi codes of a 440 Hz sine, amplitude 0.5
SILENCE_FRAMES = 6  # int(0.5 s * 12.5 Hz)
VOICE_LUFS = -24.0
RING = 4  # slots of the released generator's token ring (`cache` of a .pt voice file, see voices.py)


class VoicePromptError(PersonaplexError):
    """A voice prompt cannot be loaded or does not fit the model."""


@dataclass
class VoicePrompt:
    """A voice prompt as the model consumes it.

    From audio: `codes` (8, F) are the Mimi codes of the loudness-normalised voice. From a released `.pt`
    file: `embeddings` (F-1, dim) are the summed input embeddings of the voice steps and `codes` holds only
    what the next steps need (the last frame, and the acoustic codes of the one before); other entries -1.
    """

    codes: torch.Tensor  # (8, F) int64
    embeddings: torch.Tensor | None = None  # (F-1, dim)
    name: str = ""

    @property
    def num_frames(self) -> int:
        return self.codes.shape[1]


def voice_from_audio(mimi, pcm: np.ndarray, name: str = "") -> VoicePrompt:
    """Encode 24 kHz mono audio (already read and resampled) as a voice prompt, normalised to -24 LUFS."""
    from ..audio import normalize_loudness

    if pcm.ndim != 1 or len(pcm) == 0:
        raise VoicePromptError(f"voice prompt {name or ''} must be non-empty mono audio")
    pcm = normalize_loudness(pcm, SAMPLE_RATE, VOICE_LUFS)
    device = next(mimi.parameters()).device
    with torch.inference_mode():
        codes = mimi.encode(torch.from_numpy(pcm).to(device).view(1, 1, -1))[0]  # (K, F), last frame zero-padded
    return VoicePrompt(codes[:8].cpu().clone(), None, name)


def prompt_frames(voice: VoicePrompt | None, text_ids: list[int], config: LMConfig) -> torch.Tensor:
    """Un-delayed prompt tokens (17, N): voice frames 1..F-1, silence, text, silence (frame 0 of the voice is
    dropped like the released generator does). Only the model's configuration is read."""
    streams = config.num_streams
    sil = torch.tensor(SILENCE_TOKENS).view(8, 1)
    sine = torch.tensor(SINE_TOKENS).view(8, 1)

    def block(text: torch.Tensor, agent: torch.Tensor) -> torch.Tensor:
        n = text.shape[0]
        return torch.cat([text.view(1, n), agent.expand(8, n), sine.expand(8, n)], dim=0)

    parts = []
    if voice is not None and voice.num_frames > 1:
        parts.append(block(torch.full((voice.num_frames - 1,), TEXT_PAD), voice.codes[:, 1:]))
    silence = block(torch.full((SILENCE_FRAMES,), TEXT_PAD), sil)
    parts.append(silence)
    if text_ids:  # an empty text prompt skips its phase, the two silences stay
        parts.append(block(torch.tensor(text_ids, dtype=torch.long), sil))
    parts.append(silence)
    frames = torch.cat(parts, dim=1)
    assert frames.shape[0] == streams, (frames.shape, streams)
    return frames
