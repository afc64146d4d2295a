"""Voices: the voice prompts a checkpoint ships, and voice files.

A checkpoint's voices are `voices/*.pt` (or audio files) beside its weights; the released repo ships them as
`voices.tgz`, extracted once, safely, into `voices/` (or a cache folder when that is read-only).
`list_voices` lists a folder, `find_voice` looks a (client-chosen) name up among the listed files only and
never joins it onto a path. `load_voice_file` / `save_voice_file` read and write the released `.pt` format
(the model's input embeddings of the voice steps and a ring of its last tokens); `check_voices_dir` and
`check_voice_recording` refuse a missing folder and an unusable recording with one line.

Errors are `VoiceNotFoundError` / `CheckpointError` / `VoicePromptError` with a message that says what to do.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import logging
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CheckpointError, UsageError, VoiceNotFoundError, first_line

if TYPE_CHECKING:
    import numpy as np
    import torch

    from .engine.prompt import VoicePrompt
    from .lm import LMModel

log = logging.getLogger(__name__)

VOICES_ARCHIVE = "voices.tgz"  # holds voices/*.pt
VOICES_DIR = "voices"
VOICE_AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")
VOICE_SUFFIXES = (".pt", *VOICE_AUDIO_SUFFIXES)  # lookup order when a name comes without extension
_VOICE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")

# Bounds on what a voices archive may unpack to (the released one is a few MB).
_MAX_VOICE_BYTES = 512 * 2**20
_MAX_VOICES = 4096

# What `personaplex voice` accepts as a recording (the released voices hold ~10 s of speech).
MIN_VOICE_SECONDS = 1.0
SILENCE_DBFS = -60.0  # a recording whose RMS level is below this is silent


# -- a checkpoint's voices ---------------------------------------------------------------------------------------
def voices_for(root: Path, archive: Path | None) -> Path | None:
    """The voices folder of a checkpoint: `root/voices` if it holds voices, else `archive` extracted."""
    folder = root / VOICES_DIR
    if list_voices(folder):
        return folder
    if archive is not None:
        return extract_voices(archive, folder)
    return folder if folder.is_dir() else None


def extract_voices(archive: Path, target: Path) -> Path:
    """Extract the `*.pt` voice prompts of `archive` into `target` (or a cache folder if that is read-only).

    Only regular files named `NAME.pt` or `FOLDER/NAME.pt` are written, under their base name. An entry with
    an absolute path, a `..` component, a link or a device makes the whole archive rejected. The cache folder
    is `$PERSONAPLEX_CACHE/voices/<hash>` (default `~/.cache/personaplex`), one per archive content.
    """
    target = Path(target)
    if (target.is_dir() or not target.exists()) and os.access(target.parent, os.W_OK):
        try:
            return _extract_into(archive, target)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise CheckpointError(f"cannot extract {archive} into {target}: {first_line(error)}") from error
    fallback = _fallback_voices_dir(archive)
    if list_voices(fallback):
        return fallback
    try:
        fallback.parent.mkdir(parents=True, exist_ok=True)
        return _extract_into(archive, fallback)
    except OSError as error:
        raise CheckpointError(
            f"cannot extract {archive} ({target.parent} is read-only and {fallback}: {first_line(error)}):"
            " set PERSONAPLEX_CACHE to a writable folder"
        ) from error


def _extract_into(archive: Path, target: Path) -> Path:
    log.info("extracting %s into %s", archive, target)
    staging = Path(tempfile.mkdtemp(prefix=".voices-", dir=target.parent))
    try:
        _extract_voice_members(archive, staging)
        try:
            os.rename(staging, target)  # atomic; also replaces an empty target folder
        except OSError:
            target.mkdir(exist_ok=True)  # target already there (maybe a concurrent run): add the files to it
            for item in staging.iterdir():
                os.replace(item, target / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _extract_voice_members(archive: Path, into: Path) -> None:
    count = 0
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:  # one streaming pass; nothing is written outside `into`
                name = _voice_member_name(member, archive)
                if name is None:
                    continue
                count += 1
                if count > _MAX_VOICES or member.size > _MAX_VOICE_BYTES:
                    raise CheckpointError(
                        f"{archive} is unreasonably large ({member.name!r}):"
                        " delete it and download the checkpoint again"
                    )
                source = tar.extractfile(member)
                if source is None:
                    continue
                with source, open(into / name, "wb") as out:
                    shutil.copyfileobj(source, out)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise CheckpointError(
            f"cannot read {archive} ({first_line(error)}): delete it and download the checkpoint again"
        ) from error


def _voice_member_name(member: tarfile.TarInfo, archive: Path) -> str | None:
    """The file name to write for a safe voice entry, None to skip it; raises on hostile entries."""
    raw = member.name
    parts = [p for p in raw.replace("\\", "/").split("/") if p not in ("", ".")]
    hostile = None
    if "\x00" in raw or raw.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", raw):
        hostile = "an absolute path"
    elif ".." in parts:
        hostile = "a '..' component"
    elif member.issym() or member.islnk():
        hostile = "a link"
    elif member.isdev():
        hostile = "a device or pipe"
    if hostile:
        raise CheckpointError(
            f"refusing to extract {archive}: entry {raw[:80]!r} has {hostile}; delete it and download the"
            f" checkpoint again, or unpack the voices into a {VOICES_DIR}/ folder yourself"
        )
    if not member.isfile() or not 1 <= len(parts) <= 2:
        return None
    base = parts[-1]
    if not base.lower().endswith(".pt") or not is_valid_voice_name(base):
        return None  # e.g. macOS '._NATF0.pt' resource forks, READMEs
    return base


def _fallback_voices_dir(archive: Path) -> Path:
    """A per-archive cache folder, for checkpoints in read-only directories."""
    digest = hashlib.sha256()
    with open(archive, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    from .hub import cache_root

    return cache_root() / "voices" / digest.hexdigest()[:16]


def is_valid_voice_name(name: object) -> bool:
    """A plain file name: 1-64 of [A-Za-z0-9_.-], not starting with '.'."""
    return isinstance(name, str) and _VOICE_NAME.fullmatch(name) is not None and not name.startswith(".")


def _voice_files(voices_dir: str | os.PathLike[str] | None) -> dict[str, Path]:
    """File name -> path of the voice files in `voices_dir` (only names `find_voice` accepts)."""
    if voices_dir is None:
        return {}
    folder = Path(voices_dir)
    try:
        entries = list(folder.iterdir())
    except OSError:
        return {}
    return {
        p.name: p
        for p in entries
        if is_valid_voice_name(p.name) and p.suffix.lower() in VOICE_SUFFIXES and p.is_file()
    }


def list_voices(voices_dir: str | os.PathLike[str] | None) -> list[str]:
    """Sorted names (file stems) of the voice prompts (`*.pt`, `*.wav`, `*.flac`, `*.mp3`, `*.ogg`) there."""
    return sorted({Path(name).stem for name in _voice_files(voices_dir)})


def find_voice(name: str, voices_dir: str | os.PathLike[str] | None) -> Path:
    """The file of voice `name` ("NATF0" or "NATF0.pt"), looked up among `list_voices(voices_dir)` only.

    The name is never joined onto a path, so "../x", "/abs" or "a/b" cannot reach outside the folder.
    """
    files = _voice_files(voices_dir)  # lists `voices_dir` only, whatever `name` is
    available = _available(files)
    if not is_valid_voice_name(name):
        shown = repr(name[:64] if isinstance(name, str) else name)
        raise VoiceNotFoundError(
            f"invalid voice name {shown}: use a plain name (letters, digits, '_', '-', '.'); available: {available}"
        )
    if name in files:
        return files[name]
    for suffix in VOICE_SUFFIXES:
        if name + suffix in files:
            return files[name + suffix]
    folded = [p for fname, p in files.items() if fname.lower() in {name.lower() + s for s in ("", *VOICE_SUFFIXES)}]
    if len({p.stem for p in folded}) == 1:
        return sorted(folded, key=lambda p: VOICE_SUFFIXES.index(p.suffix.lower()))[0]
    raise VoiceNotFoundError(f"voice {name!r} not found; available: {available}")


def _available(files: dict[str, Path], limit: int = 40) -> str:
    names = sorted({Path(n).stem for n in files})
    if not names:
        return (
            "none (this checkpoint has no voices/ folder or voices.tgz;"
            " use a PersonaPlex checkpoint or add voice files)"
        )
    shown = ", ".join(names[:limit])
    return shown + (", …" if len(names) > limit else "")


def check_voices_dir(folder: str | os.PathLike[str] | None, flag: str = "--voice-prompt-dir") -> Path | None:
    """A voices folder given on the command line, refused with one line when it is not a folder."""
    if folder is None:
        return None
    path = Path(folder).expanduser()
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise UsageError(f"{flag} {folder} {what}: pass a folder of voice files (.pt, .wav, ...), or leave it "
                         "out to use the checkpoint's voices")
    return path


def check_voice_recording(pcm: np.ndarray, sample_rate: int, where: str) -> None:
    """Refuse a recording too short or too quiet to make a voice from (24 kHz mono float audio)."""
    import numpy as np

    from .engine.prompt import VoicePromptError

    seconds = len(pcm) / sample_rate
    if seconds < MIN_VOICE_SECONDS:
        raise VoicePromptError(f"{where}: {seconds:.2f} s of audio; a voice needs at least {MIN_VOICE_SECONDS:g} s "
                               "of speech (the released voices hold about 10 s)")
    rms = float(np.sqrt(np.mean(np.square(pcm, dtype=np.float64))))
    level = 20 * np.log10(rms) if rms > 0 else -np.inf
    if level < SILENCE_DBFS:
        shown = "digital silence" if rms == 0 else f"{level:.0f} dBFS"
        raise VoicePromptError(f"{where}: the recording is silent ({shown}, below {SILENCE_DBFS:g} dBFS): "
                               "record a few seconds of clear speech")


# -- voice files (the released .pt format) ------------------------------------------------------------------------
def load_voice_file(path: str | Path, lm: LMModel) -> VoicePrompt:
    """A released PersonaPlex `.pt` voice file: {"embeddings": (F-1, 1, 1, dim), "cache": (1, 17, 4)}."""
    import torch

    from .engine.prompt import RING, VoicePrompt, VoicePromptError
    from .lm.layers import ZERO_TOKEN

    path = Path(path)
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise VoicePromptError(f"{path}: not a readable voice file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict) or not {"embeddings", "cache"} <= set(data):
        raise VoicePromptError(f"{path}: a voice file must hold 'embeddings' and 'cache' tensors")
    emb, cache = data["embeddings"], data["cache"]
    dim, streams = lm.config.dim, lm.config.num_streams
    if not isinstance(emb, torch.Tensor) or emb.dim() != 4 or emb.shape[1:] != (1, 1, dim) or emb.shape[0] < 1:
        raise VoicePromptError(f"{path}: embeddings must have shape (N, 1, 1, {dim}) for this model, "
                               f"got {tuple(getattr(emb, 'shape', ()))} - a voice file of another model?")
    if not isinstance(cache, torch.Tensor) or tuple(cache.shape) != (1, streams, RING):
        raise VoicePromptError(f"{path}: cache must have shape (1, {streams}, {RING}), got {tuple(cache.shape)}")
    frames = emb.shape[0] + 1
    # The ring holds grid column F-1 (all streams) and, for delayed streams, column F.
    last = cache[0, :, (frames - 1) % RING].long()
    after = cache[0, :, frames % RING].long()
    codes = torch.full((8, frames), ZERO_TOKEN, dtype=torch.long)
    codes[0, -1] = last[1]  # semantic codebook (delay 0) of the last voice frame
    codes[1:, -1] = after[2:9]  # acoustic codebooks (delay 1) of the last voice frame
    codes[1:, -2] = last[2:9]  # frames >= 2: embeddings has at least one row
    return VoicePrompt(codes, emb[:, 0, 0].to(lm.dtype), path.stem)


def save_voice_file(path: str | Path, voice: VoicePrompt, lm: LMModel) -> Path:
    """Write a voice prompt in the released `.pt` format (loadable by the released code), mode 0644."""
    import torch

    from .checkpoint import current_umask
    from .engine.prompt import RING, VoicePromptError, prompt_frames

    if voice.embeddings is not None:
        embeddings = voice.embeddings
        if voice.codes.lt(0).any():
            raise VoicePromptError("this voice was itself loaded from a .pt file; save the original file instead")
    else:
        embeddings = voice_embeddings(lm, voice)
    frames = voice.num_frames
    grid = lm.delay(prompt_frames(voice, [], lm.config)[None, :, :frames])[0]  # (17, F+1)
    ring = torch.full((1, lm.config.num_streams, RING), -2, dtype=torch.long)
    for col in range(max(0, frames - RING), frames):
        ring[0, :, col % RING] = grid[:, col]
    delayed = torch.tensor(lm.config.delays) > 0
    ring[0, delayed, frames % RING] = grid[delayed, frames]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    emb = embeddings.to(torch.bfloat16).cpu().view(-1, 1, 1, lm.config.dim)
    torch.save({"embeddings": emb, "cache": ring}, str(path))
    os.chmod(path, 0o666 & ~current_umask())
    return path


def voice_embeddings(lm: LMModel, voice: VoicePrompt) -> torch.Tensor:
    """Summed input embeddings of the voice steps (grid columns 0..F-2): (F-1, dim)."""
    import torch

    from .engine.prompt import prompt_frames

    grid = lm.delay(prompt_frames(voice, [], lm.config)[None, :, : voice.num_frames].to(lm.device))
    with torch.no_grad():
        return lm.embed(grid[:, :, : voice.num_frames - 1])[0]
