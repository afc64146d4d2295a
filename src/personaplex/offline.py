"""`personaplex offline`: a wav in, the agent's wav (same duration, time-aligned) and transcript out.

Flags follow the released `offline.py` (so benchmark harnesses can call either), plus `--checkpoint` and
`--demo`. The agent's frame c comes out at the time of input frame c (Moshi's timing: 80 ms earlier than the
released script, which answers one frame late; the token layout is the same).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from .config import FRAME_SIZE, SAMPLE_RATE
from .defaults import DEFAULT_TEXT_PROMPT, PREFERRED_VOICES, choose_voice  # noqa: F401 (choose_voice: re-export)
from .errors import UsageError

log = logging.getLogger("personaplex.offline")

# SamplingParams field -> the flag that sets it (for error messages in the flag's words).
SAMPLING_FLAGS = {"text_temperature": "--temp-text", "text_topk": "--topk-text", "audio_temperature": "--temp-audio",
                  "audio_topk": "--topk-audio", "seed": "--seed"}


@dataclass
class OfflineResult:
    pcm: np.ndarray  # (T,) 24 kHz agent audio, the input's length
    tokens: list[int]  # text token per frame
    pieces: list[str]  # transcript entry per frame ("PAD", "EPAD" or the text piece)
    seconds: float  # wall time of the conversation (after the prompt)


def run_conversation(engine, persona, user: np.ndarray, params, tokenizer, progress: bool = False) -> OfflineResult:
    """Feed 24 kHz mono `user` audio through one conversation; returns audio of exactly len(user)."""
    from tqdm import tqdm

    frames = -(-len(user) // FRAME_SIZE)
    padded = np.zeros(frames * FRAME_SIZE, dtype=np.float32)
    padded[: len(user)] = user
    conv = engine.join(persona, params)
    out, tokens = [], []
    start = time.perf_counter()
    try:
        bar = tqdm(total=frames, unit="frame", disable=not progress, desc="conversation",
                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} frames [{elapsed}<{remaining}, {rate_fmt}]")
        with bar:
            for i in range(frames):
                chunk = torch.from_numpy(padded[i * FRAME_SIZE:(i + 1) * FRAME_SIZE]).view(1, FRAME_SIZE)
                result = engine.step(chunk)[conv.row]
                out.append(result.pcm.numpy())
                tokens.append(result.text_token)
                bar.update(1)
    finally:
        engine.leave(conv)
    seconds = time.perf_counter() - start
    pcm = np.concatenate(out)[: len(user)] if out else np.zeros(0, np.float32)
    return OfflineResult(pcm, tokens, [tokenizer.piece(t) for t in tokens], seconds)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import add_checkpoint_args

    io = parser.add_argument_group("input and output")
    io.add_argument("--input-wav", required=True, help="the user's side: any common format, rate and channels")
    io.add_argument("--input-channel", choices=["mix", "left", "right"], default="mix",
                    help="which channel of the input is the user: all mixed, or one of a stereo file (right: "
                         "the user side of a training conversation, which has the agent on the left)")
    io.add_argument("--output-wav", required=True, help="where to write the agent's audio (24 kHz mono wav)")
    io.add_argument("--output-text", default=None, help="where to write the transcript (JSON list, one per frame)")
    persona = parser.add_argument_group("persona")
    persona.add_argument("--text-prompt", default=DEFAULT_TEXT_PROMPT, help="the role; empty for none")
    persona.add_argument("--voice-prompt", default=None,
                         help="a voice name (e.g. NATF2 or NATF2.pt) among the checkpoint's voices or "
                              "--voice-prompt-dir, or a path to an audio file or .pt voice file "
                              f"(default: the first of {', '.join(PREFERRED_VOICES)} available)")
    persona.add_argument("--voice-prompt-dir", default=None, help="folder of voice files (default: the checkpoint's)")
    persona.add_argument("--forget-persona", action="store_true",
                         help="let the prompt slide out of the 240 s context like the released code "
                              "(default: the prompt stays pinned)")
    sampling = parser.add_argument_group("sampling (the released defaults)")
    sampling.add_argument("--temp-audio", type=float, default=0.8, help="temperature of the audio tokens (0-10)")
    sampling.add_argument("--temp-text", type=float, default=0.7, help="temperature of the text tokens (0-10)")
    sampling.add_argument("--topk-audio", type=int, default=250, help="audio tokens sampled among the k likeliest")
    sampling.add_argument("--topk-text", type=int, default=25, help="text tokens sampled among the k likeliest")
    sampling.add_argument("--greedy", action="store_true", help="argmax decoding (ignores temperatures and top-k)")
    sampling.add_argument("--seed", type=int, default=-1, help="seed for reproducible output (-1: random)")
    add_checkpoint_args(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from .audio import read_audio, write_wav
    from .cli import open_checkpoint, output_file
    from .engine import BatchEngine, Personas
    from .voices import check_voices_dir

    # Everything the user typed is checked before anything large is loaded.
    user = read_audio(args.input_wav, channel=args.input_channel)
    voices_dir = check_voices_dir(args.voice_prompt_dir)
    params = sampling_params(args)
    output_wav = output_file(args.output_wav, "--output-wav")
    output_text = output_file(args.output_text, "--output-text") if args.output_text else None
    ckpt = open_checkpoint(args)
    personas = Personas(ckpt.lm, ckpt.mimi, ckpt.tokenizer, voices_dir or ckpt.files.voices_dir, allow_paths=True)
    voice = choose_voice(personas, args.voice_prompt)
    started = time.perf_counter()
    persona = personas.get(voice, args.text_prompt)
    log.info("persona ready in %.2f s: voice %s, prompt of %d frames", time.perf_counter() - started,
             voice or "(none)", persona.length)
    engine = BatchEngine(ckpt.lm, ckpt.mimi, max_batch=1, pin_prompt=not args.forget_persona,
                         cuda_graphs=None if getattr(args, "cuda_graphs", True) else False)
    result = run_conversation(engine, persona, user, params, ckpt.tokenizer, progress=not args.no_progress)
    write_wav(output_wav, result.pcm, SAMPLE_RATE)
    if output_text:
        output_text.write_text(json.dumps(result.pieces, ensure_ascii=False))
    duration = len(user) / SAMPLE_RATE
    log.info("wrote %s (%.2f s of audio, %.2fx real time)%s", output_wav, duration,
             duration / max(result.seconds, 1e-9), f" and {output_text}" if output_text else "")
    return 0


def sampling_params(args: argparse.Namespace):
    """The sampling flags as `SamplingParams`, a bad value refused in the flag's words."""
    from .engine import SamplingParams

    params = SamplingParams(text_temperature=args.temp_text, text_topk=args.topk_text,
                            audio_temperature=args.temp_audio, audio_topk=args.topk_audio,
                            seed=None if args.seed < 0 else args.seed, greedy=args.greedy)
    try:
        return params.validate()
    except ValueError as exc:
        message = str(exc)
        for field, flag in SAMPLING_FLAGS.items():
            message = message.replace(field, flag)
        raise UsageError(message) from None
