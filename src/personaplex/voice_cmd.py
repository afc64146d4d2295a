"""`personaplex voice`: turn an audio file into a reusable voice file (the released `.pt` format).

A voice file holds the model's input embeddings of the voice prompt, so starting a conversation with it skips
the Mimi encoding; it is specific to the model it was made with, and loads in the released code too.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .voices import MIN_VOICE_SECONDS

log = logging.getLogger("personaplex.voice")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import add_checkpoint_args

    parser.add_argument("audio", help="a recording of the voice (any common format, rate and channels; "
                                      f"a few seconds of clean speech, at least {MIN_VOICE_SECONDS:g} s)")
    parser.add_argument("-o", "--output", required=True, help="the voice file to write (NAME.pt)")
    add_checkpoint_args(parser)


def run(args: argparse.Namespace) -> int:
    from .audio import read_audio
    from .cli import open_checkpoint, output_file
    from .config import SAMPLE_RATE
    from .engine import voice_from_audio
    from .voices import check_voice_recording, save_voice_file

    output = Path(args.output)
    if output.suffix != ".pt":
        output = output.with_suffix(".pt")
    output = output_file(output, "--output")
    pcm = read_audio(args.audio)
    check_voice_recording(pcm, SAMPLE_RATE, args.audio)  # before the model loads
    ckpt = open_checkpoint(args)
    voice = voice_from_audio(ckpt.mimi, pcm, name=output.stem)
    save_voice_file(output, voice, ckpt.lm)
    log.info("wrote %s: %.2f s of voice, %d frames; use it with --voice-prompt %s", output,
             len(pcm) / SAMPLE_RATE, voice.num_frames, output)
    return 0
