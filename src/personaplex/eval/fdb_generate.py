"""Generation step of `personaplex eval fdb`: the model's answer to each sample's `input.wav`, many at once.

Samples run as conversations on one `BatchEngine` (continuous batching: when one ends, the next joins). Each
output is agent-only 24 kHz mono of exactly the input's duration, written atomically (a partial file never
counts as done, so an interrupted run resumes where it stopped). Each sample's seed is derived from `--seed`
and its folder name, so a sample's output does not depend on which others ran beside it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger("personaplex.eval.fdb")


@dataclass
class _Running:
    folder: Path
    user: np.ndarray  # (frames * 1920,) 24 kHz, zero-padded
    length: int  # samples of the input at 24 kHz
    frames: int
    done: int = 0
    out: list = field(default_factory=list)


def sample_seed(seed: int, folder: Path) -> int:
    return (seed * 1_000_003 + zlib.crc32(folder.name.encode())) % (2 ** 31)


def write_output_wav(path: Path, pcm: np.ndarray, rate: int) -> None:
    from ..audio import write_wav

    tmp = path.with_name("output.partial.wav")
    write_wav(tmp, pcm, rate)
    os.replace(tmp, path)


def input_frames(folders: list[Path]) -> int:
    """Frames of all the inputs; reading them all first makes a bad file fail before any compute."""
    from ..audio import read_audio
    from ..config import FRAME_SIZE

    return sum(max(1, -(-len(read_audio(folder / "input.wav")) // FRAME_SIZE)) for folder in folders)


def generate(ckpt, folders: list[Path], text_prompt: str, voice: str | None, seed: int, batch: int = 8,
             sampling=None, progress: bool = True) -> int:
    """Write `output.wav` in every folder of `folders`; returns how many were written."""
    import torch
    from tqdm import tqdm

    from ..audio import read_audio
    from ..config import FRAME_SIZE, SAMPLE_RATE
    from ..engine import BatchEngine, Personas, SamplingParams
    from ..offline import choose_voice

    if not folders:
        return 0
    if batch < 1:
        from . import EvalError
        raise EvalError("--batch must be at least 1")
    total_frames = input_frames(folders)
    personas = Personas(ckpt.lm, ckpt.mimi, ckpt.tokenizer, ckpt.files.voices_dir, allow_paths=True)
    voice = choose_voice(personas, voice)
    persona = personas.get(voice, text_prompt)
    log.info("generating %d output(s), batch %d, voice %s, prompt %r", len(folders), batch, voice or "(none)",
             text_prompt)
    engine = BatchEngine(ckpt.lm, ckpt.mimi, max_batch=min(batch, len(folders)))
    base = sampling or SamplingParams()
    pending = list(folders)
    running: dict[int, _Running] = {}  # conversation id -> its sample
    written = 0
    bar = tqdm(total=total_frames, unit="frame", desc="generate", disable=not progress)
    try:
        while pending or running:
            while pending and len(running) < engine.max_batch:
                folder = pending.pop(0)
                user = read_audio(folder / "input.wav")  # read again: a whole set may not fit in memory
                frames = max(1, -(-len(user) // FRAME_SIZE))
                padded = np.zeros(frames * FRAME_SIZE, dtype=np.float32)
                padded[: len(user)] = user
                params = dataclasses.replace(base, seed=sample_seed(seed, folder)).validate()
                conv = engine.join(persona, params)
                running[conv.id] = _Running(folder, padded, len(user), frames)
            convs = engine.conversations
            rows = [running[c.id] for c in convs]
            user = torch.from_numpy(np.stack([r.user[r.done * FRAME_SIZE:(r.done + 1) * FRAME_SIZE]
                                              for r in rows]))  # (n_active, 1920)
            results = engine.step(user)
            bar.update(len(rows))
            for conv, r, res in zip(convs, rows, results):
                r.out.append(res.pcm.numpy())
                r.done += 1
                if r.done == r.frames:
                    pcm = np.concatenate(r.out)[: r.length]
                    write_output_wav(r.folder / "output.wav", pcm, SAMPLE_RATE)
                    written += 1
                    engine.leave(conv)
                    del running[conv.id]
    finally:
        bar.close()
        for conv in list(engine.conversations):
            engine.leave(conv)
    return written
