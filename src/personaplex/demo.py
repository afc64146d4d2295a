"""The `--demo` checkpoint: a tiny LM and a full-size Mimi with RANDOM weights, a real (tiny) SentencePiece
tokenizer and two synthetic voices, written in the released layout. It exercises every code path (page,
microphone, server, model, audio back) on a machine without the released weights; what it says is noise.

The one `--demo` uses also offers its voices under the released names (NATF0..NATF3 and VARF0..VARF4 are
DEMO_HIGH, NATM0..NATM3 and VARM0..VARM4 are DEMO_LOW), so clients that only know those names (the released
web client) work against it unchanged.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from .config import SAMPLE_RATE, get_preset
from .errors import OutputError
from .hub import MIMI_FILE, TEXT_TOKENIZER_FILE, VOICES_DIR, cache_root

DEMO_VERSION = "3"  # bump whenever what build_demo_checkpoint writes changes
MARKER = "DEMO_RANDOM_WEIGHTS.txt"
DEMO_VOICES = {"DEMO_LOW": 110.0, "DEMO_HIGH": 220.0}  # name -> fundamental (Hz)
# The released checkpoint's voice names, each an alias (a copy) of the demo voice of the same register.
RELEASED_VOICE_ALIASES = {
    **{f"NATF{i}": "DEMO_HIGH" for i in range(4)}, **{f"NATM{i}": "DEMO_LOW" for i in range(4)},
    **{f"VARF{i}": "DEMO_HIGH" for i in range(5)}, **{f"VARM{i}": "DEMO_LOW" for i in range(5)},
}

log = logging.getLogger("personaplex.demo")


def demo_checkpoint_dir(root: Path | None = None) -> Path:
    """The demo checkpoint's directory, built on first use (a few seconds; ~330 MB, mostly Mimi)."""
    from .checkpoint import current_umask

    target = (root or cache_root()) / f"demo-v{DEMO_VERSION}"
    if not (target / MARKER).is_file():
        log.info("building the demo checkpoint in %s (first use; set PERSONAPLEX_CACHE to put it elsewhere)", target)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
        except OSError as error:
            raise OutputError(f"cannot create the demo checkpoint in {target.parent} ({error.strerror or error}): "
                              "set PERSONAPLEX_CACHE to a writable folder") from None
        try:
            os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes it 0700
            build_demo_checkpoint(staging, released_voice_names=True)
            if target.exists():  # an incomplete earlier build
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


@torch.no_grad()
def random_init_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Deterministic random weights: N(0, 1/fan_in) matrices, zero biases, unit norms, small layer scales,
    Gaussian codebooks with unit usage."""
    for name, p in module.state_dict().items():
        if not p.is_floating_point():
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("_initialized", "cluster_usage") or name.endswith("norm.weight") or leaf == "alpha":
            p.fill_(1.0)
        elif leaf == "bias" or p.dim() == 1 and "norm" in name:
            p.zero_()
        elif name.endswith("_scale") or leaf == "scale":
            p.fill_(0.01)
        elif leaf == "embedding_sum":
            p.copy_(torch.randn(p.shape, generator=generator))
        else:
            fan_in = math.prod(p.shape[1:]) if p.dim() > 1 else p.shape[0]
            p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))


def build_demo_checkpoint(directory: str | Path, seed: int = 0, released_voice_names: bool = False) -> Path:
    """Write the demo checkpoint into `directory`; with `released_voice_names`, its voices also under the
    released names (`RELEASED_VOICE_ALIASES`)."""
    from .checkpoint import save_lm, save_mimi
    from .codec import Mimi, MimiConfig
    from .lm import LMModel
    from .text import train_demo_tokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    lm = LMModel(get_preset("tiny"))
    random_init_(lm, generator)
    save_lm(lm, directory, dtype=torch.float32)
    mimi = Mimi(MimiConfig())
    random_init_(mimi, generator)
    save_mimi(mimi, directory / MIMI_FILE)
    train_demo_tokenizer(directory / TEXT_TOKENIZER_FILE, vocab_size=lm.config.text_card)
    _write_demo_voices(directory / VOICES_DIR, aliases=released_voice_names)
    (directory / MARKER).write_text(
        "This checkpoint was built by `personaplex` for --demo: a tiny LM and Mimi with RANDOM weights.\n"
        "It runs every code path but produces noise, not speech. Use the released weights for real use.\n")
    return directory


def _write_demo_voices(folder: Path, aliases: bool = False) -> None:
    """Two short synthetic 'voices' (harmonic tones with a vibrato), as wav files usable as voice prompts, and
    with `aliases` a copy of each under every released name of its register."""
    from .audio import write_wav

    t = np.arange(int(2.0 * SAMPLE_RATE)) / SAMPLE_RATE
    for name, f0 in DEMO_VOICES.items():
        phase = 2 * np.pi * f0 * t + 0.8 * np.sin(2 * np.pi * 5 * t)
        x = sum(0.3 / h * np.sin(h * phase) for h in range(1, 6)) * (0.6 + 0.4 * np.sin(2 * np.pi * 2 * t))
        write_wav(folder / f"{name}.wav", x.astype(np.float32))
    if aliases:
        for alias, name in RELEASED_VOICE_ALIASES.items():
            shutil.copyfile(folder / f"{name}.wav", folder / f"{alias}.wav")
