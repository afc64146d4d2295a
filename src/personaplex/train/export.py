"""`personaplex train-export`: a training run -> a checkpoint in the released layout, or a LoRA file.

The default output is a checkpoint directory that `load_checkpoint` (so `personaplex offline`, `serve`,
`info`) loads like the released one: `model.safetensors` (LoRA merged, released tensor names, bf16 unless
told otherwise), `config.json`, and the base checkpoint's Mimi, text tokenizer and voices copied beside it.
With `lora_only`, just the adapters are written (`lora.safetensors`, fp32, configuration in the header);
`merge_lora_file` turns base + such a file into a checkpoint directory later.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import torch

from ..errors import PersonaplexError
from ..hub import MIMI_FILE, TEXT_TOKENIZER_FILE, CheckpointFiles
from ..voices import VOICES_ARCHIVE, VOICES_DIR, list_voices

log = logging.getLogger("personaplex.train")
LORA_FILE = "lora.safetensors"


class ExportError(PersonaplexError):
    """A run cannot be exported (no run, no checkpoint, LoRA-only export of a full fine-tune)."""


def run_config(run_dir: str | Path):
    """The `TrainConfig` a run was started with."""
    from .loop import RUN_CONFIG, TrainConfig

    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise ExportError(f"{run_dir} is not a training run (no {RUN_CONFIG}); "
                          "pass the --run-dir of `personaplex train`")
    raw = json.loads(path.read_text())
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in raw.items() if k in names})


def write_checkpoint(lm, files: CheckpointFiles, output: str | Path, dtype: torch.dtype | None = torch.bfloat16
                     ) -> Path:
    """`model.safetensors` + `config.json` of `lm`, and the base checkpoint's other files copied."""
    from ..checkpoint import save_lm

    output = Path(output)
    if not output.is_dir():
        output.mkdir(parents=True)
        log.info("created %s", output)
    save_lm(lm, output, dtype=dtype)
    for src, name in ((files.mimi, MIMI_FILE), (files.tokenizer, TEXT_TOKENIZER_FILE)):
        if src is None:
            raise ExportError(f"the base checkpoint has no {name} to copy")
        shutil.copyfile(src, output / name)
    root = Path(files.root) if files.root else None
    if root is not None and (root / VOICES_ARCHIVE).is_file():
        shutil.copyfile(root / VOICES_ARCHIVE, output / VOICES_ARCHIVE)
    if files.voices_dir and list_voices(files.voices_dir):
        target = output / VOICES_DIR
        target.mkdir(exist_ok=True)
        for voice in Path(files.voices_dir).iterdir():
            if voice.is_file() and voice.stem in list_voices(files.voices_dir):
                shutil.copyfile(voice, target / voice.name)
    return output


def export_run(run_dir: str | Path, output: str | Path, step: int | None = None, lora_only: bool = False,
               dtype: torch.dtype | None = torch.bfloat16) -> Path:
    """Export checkpoint `step` (default: the latest) of a run. Returns the written directory or file."""
    from .lora import merge_lora, save_lora_file
    from .loop import build_model
    from .parallel import checkpoint_dir, latest_checkpoint, load_model_state

    cfg = run_config(run_dir)
    source = checkpoint_dir(Path(run_dir), step) if step is not None else latest_checkpoint(Path(run_dir))
    if source is None or not (source / "trainer.json").is_file():
        raise ExportError(f"{run_dir} has no complete checkpoint" + (f" at step {step}" if step is not None else ""))
    if lora_only and cfg.mode != "lora":
        raise ExportError("--lora-only needs a LoRA run; this run fine-tuned every weight")
    lm, files = build_model(cfg, torch.device("cpu"), bf16=False, need=("lm", "mimi", "tokenizer"))
    load_model_state(source, lm)
    lm.eval()
    log.info("loaded %s (base %s, %s)", source, files.source, cfg.mode)
    output = Path(output)
    if lora_only:
        path = output if output.suffix == ".safetensors" else output / LORA_FILE
        return save_lora_file(path, lm, cfg.lora_config(), base=str(files.source))
    if cfg.mode == "lora":
        merge_lora(lm)
    return write_checkpoint(lm, files, output, dtype)


def merge_lora_file(base: str | Path, lora_file: str | Path, output: str | Path, config=None,
                    dtype: torch.dtype | None = torch.bfloat16) -> Path:
    """Base checkpoint + a `lora.safetensors` -> a merged checkpoint directory."""
    from ..checkpoint import load_lm
    from ..hub import resolve_checkpoint
    from .lora import apply_lora_file

    files = resolve_checkpoint(str(base), need=("lm", "mimi", "tokenizer"))
    if config is None and files.config is not None:
        config = Path(files.config)
    lm = load_lm(files.lm, config=config, device="cpu", dtype=torch.float32)
    apply_lora_file(lm, lora_file)
    return write_checkpoint(lm, files, output, dtype)
