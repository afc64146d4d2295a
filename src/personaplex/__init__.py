"""PersonaPlex: real-time full-duplex speech-to-speech with persona control, compatible with the released
`nvidia/personaplex-7b-v1` and Moshi checkpoints.

    import personaplex
    ckpt = personaplex.load_checkpoint("nvidia/personaplex-7b-v1")   # LM, Mimi, tokenizer
    mimi = personaplex.load_mimi(path)                                 # codec only
    lm = personaplex.load_lm(path, config="personaplex-7b")            # LM only

Importing the package loads nothing heavy: the names below resolve on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_checkpoint": "personaplex.checkpoint",
    "load_lm": "personaplex.checkpoint",
    "load_mimi": "personaplex.checkpoint",
    "save_lm": "personaplex.checkpoint",
    "save_mimi": "personaplex.checkpoint",
    "Checkpoint": "personaplex.checkpoint",
    "LMConfig": "personaplex.config",
    "get_preset": "personaplex.config",
    "LMModel": "personaplex.lm",
    "Mimi": "personaplex.codec",
    "MimiConfig": "personaplex.codec",
    "TextTokenizer": "personaplex.text",
    "BatchEngine": "personaplex.engine",
    "Personas": "personaplex.engine",
    "SamplingParams": "personaplex.engine",
    "PersonaplexError": "personaplex.errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'personaplex' has no attribute {name!r}")
