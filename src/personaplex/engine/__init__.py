"""Conversations on the model: hybrid persona prompts, batched full-duplex stepping, sampling."""

from .batch import BatchEngine, Conversation, EngineFullError, FrameResult
from .persona import Persona, PersonaCache, Personas, PromptTooLongError, build_persona
from ..voices import load_voice_file, save_voice_file  # voice files live in voices.py; re-exported here
from .prompt import SILENCE_TOKENS, SINE_TOKENS, VoicePrompt, VoicePromptError, prompt_frames, voice_from_audio
from .sampling import SamplingParams

__all__ = [
    "BatchEngine", "Conversation", "EngineFullError", "FrameResult", "Persona", "PersonaCache", "Personas",
    "PromptTooLongError", "build_persona", "SILENCE_TOKENS", "SINE_TOKENS", "VoicePrompt", "VoicePromptError",
    "load_voice_file", "prompt_frames", "save_voice_file", "voice_from_audio", "SamplingParams",
]
