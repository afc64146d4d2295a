"""`personaplex train-prepare`: a folder of conversations -> token shards and a manifest.

Output folder::

    manifest.json                 format, stream layout, tokenizer hash, shards and their conversations, failures
    shard-00000.safetensors       one int16 (17, T) token grid per conversation, keyed by its id
    voices/<name>-<hash>.safetensors   each voice prompt once: Mimi codes, plus embeddings for released .pt voices

Audio is encoded the way the inference engine encodes a microphone: Mimi streaming, one 80 ms frame per
step (so the user codes are the ones the engine would compute), the last frame zero-padded. Voice prompts go
through the engine's own loader (`Personas`), so the prompt is token for token the one inference builds.

Resumable: a shard is written (atomically) every `shard_size` conversations and then recorded in the
manifest; a new run skips every conversation already in a recorded shard and retries the failed ones.
Unusable conversations (unreadable, mono, bad timestamps, unknown voice, prompt too long) are listed in
the manifest with a one-line reason, counted and skipped; preparation never stops on one.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import FRAME_SIZE, SAMPLE_RATE, LMConfig
from ..errors import PersonaplexError, UsageError
from .data import (FORMAT, FORMAT_VERSION, MANIFEST, OVERFLOW_MODES, VOICES_SUBDIR, ConversationSpec, DatasetError,
                   SampleError, align_words, check_word_times, find_conversations, read_conversation, read_manifest,
                   word_tokens, write_manifest)

log = logging.getLogger("personaplex.train")


@dataclass
class PrepareReport:
    output: Path
    prepared: list[str] = field(default_factory=list)  # ids prepared by this run
    skipped: int = 0  # already in a finished shard
    failed: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)
    frames: int = 0  # conversation frames prepared by this run
    dropped_tokens: int = 0  # text tokens that did not fit their frames (see `align_words`)

    @property
    def hours(self) -> float:
        return self.frames * FRAME_SIZE / SAMPLE_RATE / 3600


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def encode_streaming(mimi, pcm: np.ndarray, frames_per_step: int = 1) -> torch.Tensor:
    """(C, T) 24 kHz audio -> (C, 8, ceil(T / 1920)) Mimi codes, streamed as the engine encodes the user's
    microphone (last frame zero-padded). One frame per step is exactly the engine's computation; more frames
    per step is several times faster and gives the same codes for the first 10 s (Mimi's attention window),
    then differs on a fraction of a percent of the codes (see codec/transformer.py)."""
    channels, samples = pcm.shape
    frames = -(-samples // FRAME_SIZE)
    padded = np.zeros((channels, frames * FRAME_SIZE), dtype=np.float32)
    padded[:, :samples] = pcm
    device = next(mimi.parameters()).device
    x = torch.from_numpy(padded).to(device).view(channels, 1, -1)
    state = mimi.init_encoder_state(channels)
    step = max(1, frames_per_step) * FRAME_SIZE
    codes = [mimi.encode_step(x[:, :, i:i + step], state) for i in range(0, frames * FRAME_SIZE, step)]
    return torch.cat(codes, dim=2)[:, :8].cpu()


class ConversationEncoder:
    """Turns one conversation into its token grid with the very pieces the inference engine uses."""

    def __init__(self, mimi, tokenizer, config: LMConfig, voices_dir=None, overflow: str = "truncate",
                 frames_per_step: int = 1) -> None:
        from ..engine import Personas
        from ..lm import LMModel

        if overflow not in OVERFLOW_MODES:
            raise ValueError(f"overflow must be one of {', '.join(OVERFLOW_MODES)}, got {overflow!r}")
        with torch.device("meta"):
            shape_only = LMModel(config)  # .pt voices need the model's sizes, never its weights
        self.config, self.mimi, self.tokenizer, self.overflow = config, mimi, tokenizer, overflow
        self.frames_per_step = frames_per_step
        self.personas = Personas(shape_only, mimi, tokenizer, voices_dir, allow_paths=True)
        self.voice_keys: dict[str, str] = {}

    def voice(self, spec: ConversationSpec):
        """(key, VoicePrompt) of the conversation's voice prompt, or (None, None)."""
        if not spec.voice_prompt:
            return None, None
        relative = spec.json_path.parent / spec.voice_prompt
        name = str(relative.resolve()) if relative.is_file() else spec.voice_prompt
        try:
            path = self.personas.voice_path(name)
            _, voice = self.personas.voice(name)
        except PersonaplexError as exc:
            raise SampleError(f"voice_prompt {spec.voice_prompt!r}: {exc}") from exc
        key = self.voice_keys.get(str(path))
        if key is None:
            stem = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem)[:40]
            key = self.voice_keys[str(path)] = f"{stem}-{file_sha256(path)[:12]}"
        return key, voice

    def encode(self, spec: ConversationSpec) -> tuple[torch.Tensor, dict, object]:
        """(tokens (17, T), manifest record, (voice key, VoicePrompt))."""
        from ..audio import read_audio
        from ..config import FRAME_RATE
        from ..engine.prompt import SILENCE_FRAMES

        c = self.config
        key, voice = self.voice(spec)
        prompt_ids = self.tokenizer.system_prompt_ids(spec.text_prompt)
        prompt_len = (voice.num_frames - 1 if voice is not None and voice.num_frames > 1 else 0)
        prompt_len += 2 * SILENCE_FRAMES + len(prompt_ids)
        if prompt_len > c.context // 2:
            raise SampleError(f"the prompt takes {prompt_len} frames but at most {c.context // 2} fit this model's "
                              "context; shorten the text prompt or the voice prompt")
        pcm = read_audio(spec.audio_path, channel="all")  # (C, T) at 24 kHz
        if pcm.ndim != 2 or pcm.shape[0] != 2:
            raise SampleError(f"{spec.audio_path.name}: has {pcm.shape[0] if pcm.ndim == 2 else 1} channel(s); "
                              "a conversation is stereo: agent on the left, user on the right")
        duration = pcm.shape[1] / SAMPLE_RATE
        check_word_times(spec.agent_words, duration, f"{spec.json_path.name}: agent")
        check_word_times(spec.user_words, duration, f"{spec.json_path.name}: user")
        audio = encode_streaming(self.mimi, pcm, self.frames_per_step)  # (2, 8, T)
        frames = audio.shape[2]
        words = word_tokens(spec.agent_words, self.tokenizer, c.text_card, spec.json_path.name)
        text, dropped = align_words(words, frames, self.overflow, FRAME_RATE)
        tokens = torch.cat([torch.tensor(text).view(1, frames), audio[0], audio[1]], dim=0)
        record = {"id": spec.id, "frames": frames, "prompt_ids": prompt_ids, "voice": key,
                  "text_prompt": spec.text_prompt, "words": len(words), "dropped_tokens": dropped}
        return tokens, record, (key, voice)


def _save_voice(folder: Path, key: str, voice) -> None:
    from ..checkpoint import write_safetensors

    path = folder / VOICES_SUBDIR / f"{key}.safetensors"
    if path.is_file():
        return
    tensors = {"codes": voice.codes.long().contiguous()}
    if voice.embeddings is not None:
        tensors["embeddings"] = voice.embeddings.to(torch.bfloat16).contiguous()  # the released files are bf16
    write_safetensors(tensors, path, {"name": voice.name or key})


def _write_shard(folder: Path, name: str, grids: dict[str, torch.Tensor]) -> None:
    from ..checkpoint import write_safetensors

    biggest = max(int(g.max()) for g in grids.values())
    dtype = torch.int16 if biggest < 2**15 else torch.int32
    write_safetensors({k: g.to(dtype).contiguous() for k, g in grids.items()}, folder / name, {"format": FORMAT})


def prepare_dataset(source: str | Path, output: str | Path, mimi, tokenizer, config: LMConfig, voices_dir=None,
                    shard_size: int = 256, overflow: str = "truncate", limit: int | None = None,
                    progress: bool = True, checkpoint_name: str = "", frames_per_step: int = 1) -> PrepareReport:
    """Prepare every conversation of `source` into shards in `output` (see the module docstring)."""
    from tqdm import tqdm

    source, output = Path(source), Path(output)
    if shard_size < 1:
        raise UsageError("--shard-size must be at least 1")
    paths = find_conversations(source)
    tokenizer_sha = file_sha256(Path(tokenizer.path))
    output.mkdir(parents=True, exist_ok=True)
    if (output / MANIFEST).is_file():
        manifest = read_manifest(output)
        for name, value in (("tokenizer_sha256", tokenizer_sha), ("streams", config.num_streams),
                            ("overflow", overflow)):
            if manifest.get(name) != value:
                raise DatasetError(f"{output} was prepared with another {name} ({manifest.get(name)!r}); "
                                   "prepare into a new folder")
    else:
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "streams": config.num_streams,
                    "codebooks": config.audio_codebooks, "text_card": config.text_card, "card": config.card,
                    "frame_rate": 12.5, "overflow": overflow, "tokenizer_sha256": tokenizer_sha,
                    "checkpoint": checkpoint_name, "shards": [], "failed": []}
    done = {rec["id"] for shard in manifest["shards"] for rec in shard["conversations"]}
    encoder = ConversationEncoder(mimi, tokenizer, config, voices_dir, overflow, frames_per_step)
    report = PrepareReport(output)
    todo = []
    for path in paths:
        cid = path.relative_to(source).with_suffix("").as_posix()
        if cid in done:
            report.skipped += 1
        else:
            todo.append(path)
    if limit is not None:
        todo = todo[:limit]
    failed: dict[str, str] = {}
    grids: dict[str, torch.Tensor] = {}
    records: list[dict] = []

    def flush() -> None:
        if not grids:
            return
        name = f"shard-{len(manifest['shards']):05d}.safetensors"
        _write_shard(output, name, grids)
        manifest["shards"].append({"file": name, "conversations": list(records)})
        manifest["failed"] = [{"id": k, "error": v} for k, v in failed.items()]
        write_manifest(output, manifest)
        grids.clear()
        records.clear()

    bar = tqdm(todo, unit="conv", desc="prepare", disable=not progress)
    for path in bar:
        cid = path.relative_to(source).with_suffix("").as_posix()
        try:
            spec = read_conversation(path, source)
            tokens, record, (key, voice) = encoder.encode(spec)
            if key is not None:
                _save_voice(output, key, voice)
        except (PersonaplexError, OSError, ValueError, RuntimeError) as exc:
            failed[cid] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.warning("skipping %s: %s", cid, failed[cid])
        else:
            grids[cid] = tokens
            records.append(record)
            report.prepared.append(cid)
            report.frames += record["frames"]
            report.dropped_tokens += record["dropped_tokens"]
            if len(grids) >= shard_size:
                flush()
        bar.set_postfix(ok=len(report.prepared), failed=len(failed))
    flush()
    manifest["failed"] = [{"id": k, "error": v} for k, v in failed.items()]
    write_manifest(output, manifest)
    report.failed = sorted(failed.items())
    return report
