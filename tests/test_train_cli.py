"""The training commands' user-facing behaviour: exit statuses over many samples (0 all done, 3 some failed,
1 all failed), `train` checks --data before loading anything, and its sequence length fits the model."""

from __future__ import annotations

import json

import pytest

from personaplex.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = {"id": "ok", "text_prompt": "You are Sam.", "voice_prompt": "DEMO_LOW",
          "turns": [{"speaker": "user", "text": "Hi there"}, {"speaker": "agent", "text": "Hello"}]}


@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    """One good synthetic conversation and one broken JSON beside it."""
    root = tmp_path_factory.mktemp("train-cli")
    (root / "script.json").write_text(json.dumps(SCRIPT))
    assert main(["synth", str(root / "script.json"), "--output", str(root / "conv"), "--tts", "tones",
                 "--no-progress"]) == 0
    (root / "conv" / "broken.json").write_text("{not json")
    return root


def _prepare(demo_dir, source, output) -> int:
    return main(["train-prepare", str(source), str(output), "--checkpoint", str(demo_dir), "--device", "cpu",
                 "--no-progress", "--encode-frames", "25"])


def test_prepare_exit_status_says_how_many_samples_failed(demo_dir, conversations, tmp_path, capsys):
    shards = conversations / "shards"
    assert _prepare(demo_dir, conversations / "conv", shards) == 3  # one prepared, one failed
    out = capsys.readouterr().out
    assert "prepared 1 conversation(s)" in out and "1 failed" in out and "failed broken: " in out
    assert _prepare(demo_dir, conversations / "conv", shards) == 3  # resumed: the good one is kept, still 1 failed
    assert "1 already prepared; 1 failed" in capsys.readouterr().out
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "broken.json").write_text("{not json")
    assert _prepare(demo_dir, only_bad, tmp_path / "bad-shards") == 1  # nothing could be prepared
    assert _prepare(demo_dir, tmp_path / "missing", tmp_path / "x") == 2  # a user error: one line
    assert "dataset folder" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "x").exists()


def test_train_checks_data_before_loading_the_model(tmp_path, monkeypatch, capsys):
    import personaplex.train.loop as loop

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before --data was checked")

    monkeypatch.setattr(loop, "build_model", no_model)
    assert main(["train", "--data", str(tmp_path / "missing"), "--run-dir", str(tmp_path / "run"), "--demo"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("personaplex train: error:") and "missing" in line
    assert not (tmp_path / "run").exists()


def test_train_sequence_length_fits_the_model_context(demo_dir, conversations, tmp_path, capsys, caplog):
    shards = conversations / "shards"
    if not (shards / "manifest.json").is_file():
        assert _prepare(demo_dir, conversations / "conv", shards) == 3
    common = ["train", "--data", str(shards), "--checkpoint", str(demo_dir), "--steps", "1", "--batch-size", "1",
              "--no-progress", "--eval-every", "0", "--lora-rank", "2"]
    assert main([*common, "--run-dir", str(tmp_path / "long"), "--seq-frames", "2048"]) == 2
    assert "--seq-frames 2048 exceeds the model context (1000 frames)" in capsys.readouterr().err
    with caplog.at_level("INFO", logger="personaplex"):
        assert main([*common, "--run-dir", str(tmp_path / "default")]) == 0  # default: the model context
    assert "sequences of 1000 frames" in caplog.text and f"created {tmp_path / 'default'}" in caplog.text


def test_log_lines_are_written_above_the_progress_bar(tmp_path):
    """While training shows its bar, console log handlers go through tqdm (lines above the bar, not into it)."""
    import logging
    import sys

    from personaplex.train.loop import RunLog, TrainConfig
    from personaplex.train.parallel import Dist

    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)
    root.addHandler(console)
    run_log = RunLog(TrainConfig(data="x", run_dir=str(tmp_path), steps=2, progress=True), Dist(), 0)
    try:
        with run_log.redirect_logging():
            assert console not in root.handlers
            assert any(type(h).__name__ == "_TqdmLoggingHandler" for h in root.handlers)
        assert console in root.handlers
    finally:
        run_log.close()
        root.removeHandler(console)
