"""Training end to end on the tiny demo model: overfitting a few synthetic conversations and generating them
back through the inference engine after export, resuming bit for bit, FSDP2 over two processes (gloo)
against one process, LoRA export, and the command line."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import speech_like
from personaplex.audio import read_audio, write_wav
from personaplex.checkpoint import load_checkpoint
from personaplex.cli import main
from personaplex.engine import BatchEngine, Personas, SamplingParams
from personaplex.train.data import PreparedDataset
from personaplex.train.export import export_run, merge_lora_file
from personaplex.train.loop import TrainConfig, train
from personaplex.train.prepare import prepare_dataset
from personaplex.train.synth import Script, ToneTTS, Turn, synthesize

LINES = [("You are Sam.", "Hello there.", "Hi, can you help me?", "Sure thing."),
         ("You are Alex, a driver.", "Good morning.", "I need a taxi.", "Right away."),
         ("You work at a shop.", "Welcome back.", "Is it open?", "Yes it is.")]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(checkpoint, tmp_path_factory):
    """Three ~2 s conversations (agent, user, agent) with distinct prompts and a 0.6 s voice prompt."""
    root = tmp_path_factory.mktemp("train-loop")
    write_wav(root / "conv" / "voice.wav", speech_like(0.6, 3))
    scripts = [Script(f"c{i}", [Turn("agent", a), Turn("user", u, pause=0.2), Turn("agent", b, pause=0.2)],
                      text_prompt=prompt, voice_prompt="voice.wav", agent_voice="agent", user_voice="user")
               for i, (prompt, a, u, b) in enumerate(LINES)]
    synthesize(scripts, root / "conv", ToneTTS(), progress=False, lead=0.2, tail=0.2)
    lm = checkpoint.lm
    report = prepare_dataset(root / "conv", root / "shards", checkpoint.mimi, checkpoint.tokenizer, lm.config,
                             checkpoint.files.voices_dir, progress=False)
    assert len(report.prepared) == 3, report.failed
    return root


def _config(data: Path, demo_dir: Path, run: str, **kw) -> TrainConfig:
    base = dict(data=str(data / "shards"), run_dir=str(data / run), checkpoint=str(demo_dir), seq_frames=400,
                batch_size=3, warmup_steps=5, eval_every=0, save_every=0, progress=False, mode="full")
    return TrainConfig(**{**base, **kw})


def _losses(history, kind="train"):
    return [h["loss"] for h in history if h["kind"] == kind]


def test_overfit_export_and_generate_the_memorised_conversation(data, demo_dir):
    # High learning rate and full acoustic weight: memorised in ~50 steps (the recipe's 0.02 needs ~3x more).
    cfg = _config(data, demo_dir, "overfit", steps=60, lr=8e-3, acoustic_weight=1.0, eval_fraction=0.0)
    history = train(cfg)
    losses = _losses(history)
    assert losses[-1] < 0.01 * losses[0], losses[::10]
    assert history[-1]["text_acc"] == 1.0 and history[-1]["audio_acc"] == 1.0
    out = export_run(data / "overfit", data / "exported")  # bf16 weights, as released
    ckpt = load_checkpoint(out, device="cpu")
    personas = Personas(ckpt.lm, ckpt.mimi, ckpt.tokenizer, ckpt.files.voices_dir, allow_paths=True)
    dataset = PreparedDataset(data / "shards")
    agree_text = agree_audio = frames = 0
    for index, rec in enumerate(dataset.records):
        persona = personas.get(str(data / "conv" / "voice.wav"), rec.text_prompt)
        engine = BatchEngine(ckpt.lm, ckpt.mimi, max_batch=1)
        engine.join(persona, SamplingParams(greedy=True))
        user = read_audio(data / "conv" / f"{rec.id}.wav", channel="right")
        user = np.pad(user, (0, rec.frames * 1920 - len(user)))
        results = [engine.step(torch.from_numpy(user[i * 1920:(i + 1) * 1920]).view(1, -1))[0]
                   for i in range(rec.frames)]
        target = dataset.tokens(index)  # (17, T): what it was trained on
        text = torch.tensor([r.text_token for r in results])
        audio = torch.stack([r.audio_codes for r in results], dim=1)
        agree_text += int((text == target[0]).sum())
        # The last frame's acoustic codes are predicted one step after the sequence: never trained.
        agree_audio += int((audio[:, :-1] == target[1:9, :-1]).sum()) + int((audio[0, -1] == target[1, -1]).sum())
        frames += rec.frames
    # Greedy generation replays the training targets exactly here (100%); the margin allows for another
    # CPU's rounding flipping a near-tie after bf16 export, which would then derail the rest of that turn.
    assert agree_text / frames >= 0.95 and agree_audio / (8 * frames - 7 * len(dataset)) >= 0.95, \
        (agree_text / frames, agree_audio / (8 * frames - 7 * len(dataset)))


def test_resume_continues_the_same_loss_curve(data, demo_dir):
    cfg = _config(data, demo_dir, "resume-a", steps=6, batch_size=2, save_every=3, lr=3e-3, keep_checkpoints=0)
    full = _losses(train(cfg))
    assert len(full) == 6
    # A run interrupted after step 3: its directory holds only the step-3 checkpoint.
    part = data / "resume-b"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(data / "resume-a" / "checkpoints" / "step-0000003", part / "checkpoints" / "step-0000003")
    shutil.copy(data / "resume-a" / "train_config.json", part / "train_config.json")
    resumed = train(dataclasses.replace(cfg, run_dir=str(part)))
    assert [h["step"] for h in resumed] == [4, 5, 6]
    assert _losses(resumed) == full[3:]  # bit for bit: weights, optimizer, data position, RNG
    with pytest.raises(ValueError, match="other mode"):
        train(dataclasses.replace(cfg, run_dir=str(part), mode="lora", steps=7))


def test_fsdp_over_two_processes_matches_one_process(data, demo_dir):
    flags = ["--data", str(data / "shards"), "--checkpoint", str(demo_dir), "--seq-frames", "400",
             "--batch-size", "2", "--steps", "3", "--lr", "3e-3", "--warmup-steps", "2", "--mode", "full",
             "--eval-every", "0", "--save-every", "3", "--no-progress"]
    cfg = _config(data, demo_dir, "single", steps=3, batch_size=2, lr=3e-3, warmup_steps=2, save_every=3)
    single = _losses(train(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "personaplex.cli", "train",
               "--run-dir", str(data / "fsdp"), *flags]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (data / "fsdp" / "log.jsonl").read_text().splitlines()]
    sharded = [r["loss"] for r in records if r["kind"] == "train"]
    assert sharded == pytest.approx(single, rel=1e-5, abs=1e-6), (sharded, single)
    # The sharded checkpoint reloads in one process (DCP reshards) and holds the same weights.
    a = load_file(str(export_run(data / "single", data / "single-out", dtype=torch.float32) / "model.safetensors"))
    b = load_file(str(export_run(data / "fsdp", data / "fsdp-out", dtype=torch.float32) / "model.safetensors"))
    assert a.keys() == b.keys()
    # Same weights up to rounding, except that Adam blows rounding-level gradients of entries whose true
    # gradient is zero up to a fraction of the learning rate per step: the query rows of the first depformer
    # step (it attends to itself only, so its softmax has one entry). Bound those by 3 steps x lr, the rest
    # at rounding level.
    dim = a["depformer.layers.0.self_attn.in_proj_weight"].shape[1]
    zero_gradient = 0
    for k in a:
        d = (a[k] - b[k]).abs()
        if k.startswith("depformer.layers.") and k.endswith("self_attn.in_proj_weight"):
            assert float(d[:dim].max()) < 3 * 3e-3, k  # step 0's query rows
            zero_gradient += d[:dim].numel()
            d = d[dim:]
        assert float(d.max()) < 1e-4, (k, float(d.max()))
    total = sum(t.numel() for t in a.values())
    assert zero_gradient < 1e-2 * total


def test_lora_training_and_exports(data, demo_dir):
    cfg = _config(data, demo_dir, "lora", mode="lora", steps=20, lr=1e-2, lora_rank=16, lora_targets="all",
                  acoustic_weight=1.0, eval_fraction=0.34, eval_every=10, batch_size=2, save_every=20)
    history = train(cfg)
    losses = _losses(history)
    assert losses[-1] < 0.5 * losses[0], losses
    evals = [h for h in history if h["kind"] == "eval"]
    assert [h["step"] for h in evals] == [10, 20] and all(np.isfinite(h["loss"]) for h in evals)
    merged = export_run(data / "lora", data / "lora-merged")
    adapters = export_run(data / "lora", data / "lora-only", lora_only=True)
    assert adapters.name == "lora.safetensors"
    assert adapters.stat().st_size < 0.2 * (demo_dir / "model.safetensors").stat().st_size
    again = merge_lora_file(demo_dir, adapters, data / "lora-merged-again")
    a, b = load_file(str(merged / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(str(demo_dir / "model.safetensors"))
    assert not torch.equal(a["transformer.layers.0.self_attn.in_proj_weight"].float(),
                           base["transformer.layers.0.self_attn.in_proj_weight"].float())
    assert torch.equal(a["emb.0.weight"].float(), base["emb.0.weight"].to(torch.bfloat16).float())  # frozen


def test_command_line(data, demo_dir, tmp_path, capsys):
    script = {"id": "cli", "text_prompt": "You are Sam.", "voice_prompt": "DEMO_LOW",
              "turns": [{"speaker": "user", "text": "Hi there"}, {"speaker": "agent", "text": "Hello"}]}
    (tmp_path / "script.json").write_text(json.dumps(script))
    assert main(["synth", str(tmp_path / "script.json"), "--output", str(tmp_path / "conv"), "--tts", "tones",
                 "--no-progress"]) == 0
    assert main(["train-prepare", str(tmp_path / "conv"), str(tmp_path / "shards"), "--checkpoint", str(demo_dir),
                 "--device", "cpu", "--no-progress"]) == 0
    assert "prepared 1 conversation(s)" in capsys.readouterr().out
    assert main(["train", "--data", str(tmp_path / "shards"), "--run-dir", str(tmp_path / "run"), "--checkpoint",
                 str(demo_dir), "--steps", "2", "--batch-size", "1", "--seq-frames", "400", "--no-progress",
                 "--lora-rank", "4", "--eval-every", "0"]) == 0
    assert main(["train-export", "--run-dir", str(tmp_path / "run"), "--output", str(tmp_path / "out")]) == 0
    assert load_checkpoint(tmp_path / "out", device="cpu").lm.config.dim == 64
    assert main(["train-export", "--run-dir", str(tmp_path / "nothing"), "--output", str(tmp_path / "x")]) == 2
    assert "not a training run" in capsys.readouterr().err
