"""The `personaplex` command line as a new user meets it: help, version, common flags, and errors: what a user
can cause is one line and status 2 (`-v` adds the traceback), what they cannot keeps its traceback."""

from __future__ import annotations

import argparse
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import speech_like
from personaplex import cli
from personaplex.cli import format_count, main

ROOT = Path(__file__).resolve().parents[1]


def _error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err), err
    assert err[-1].startswith(f"personaplex {command}: error: "), err
    return err[-1]


def test_bare_command_prints_help_with_argparse_status(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "usage: personaplex" in err and "offline" in err and "train-prepare" in err


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert re.fullmatch(r"personaplex \d+\.\d+\.\d+ \(torch .+\)\n", capsys.readouterr().out)


@pytest.mark.parametrize("device,expected", [("gpu", "unknown device 'gpu': use cpu, cuda or cuda:N"),
                                             ("mps", "is not available here: use cpu, cuda or cuda:N")])
def test_unknown_device_is_one_line(demo_dir, capsys, device, expected):
    assert main(["info", "--checkpoint", str(demo_dir), "--device", device]) == 2
    assert expected in _error_line(capsys, "info")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_blames_the_machine_not_the_file(demo_dir, capsys):
    assert main(["info", "--checkpoint", str(demo_dir), "--device", "cuda"]) == 2
    line = _error_line(capsys, "info")
    assert f"CUDA is not available on this machine (torch {torch.__version__}" in line
    assert line.endswith("use --device cpu") and "model.safetensors" not in line


def test_verbose_keeps_status_2_and_adds_the_traceback(demo_dir, capsys):
    assert main(["-v", "info", "--checkpoint", str(demo_dir), "--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "DeviceError" in err
    assert err.strip().splitlines()[-1].startswith("personaplex info: error: unknown device")


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only PersonaplexError is the user's fault: a ValueError or OSError from inside is a bug (status 1)."""
    for error in (ValueError("internal shape mismatch"), OSError("internal")):
        def broken(args, error=error):
            raise error

        monkeypatch.setattr(cli, "run", broken)
        with pytest.raises(type(error)):
            main(["info", "--demo"])


def test_parameter_count_for_people():
    assert [format_count(n) for n in (8_365_000_000, 5_200_000, 4_750_123, 12_300, 42)] == \
        ["8.37 B", "5.2 M", "4.75 M", "12.3 k", "42"]


def test_info(demo_dir, capsys):
    assert main(["info", "--checkpoint", str(demo_dir)]) == 0
    out = capsys.readouterr().out
    assert re.search(r", \d+(\.\d+)? M parameters, torch.float32 on cpu", out), out
    assert "voices: DEMO_HIGH, DEMO_LOW" in out


def test_offline_help_shows_the_sampling_defaults():
    from personaplex import offline

    parser = argparse.ArgumentParser(prog="personaplex offline", formatter_class=cli.HelpFormatter)
    offline.add_arguments(parser)
    flat = " ".join(parser.format_help().split())
    for flag, default in (("--temp-audio", "0.8"), ("--temp-text", "0.7"), ("--topk-audio", "250"),
                          ("--topk-text", "25"), ("--seed", "-1")):
        entry = next(part for part in flat.split(" --") if part.startswith(flag[2:] + " "))
        assert f"(default: {default})" in entry, entry
    assert "default: None" not in flat and "default: False" not in flat and "(default: (default" not in flat


def test_readme_names_every_common_flag():
    """The README's sentence on the flags every command takes lists exactly the common flags."""
    parser = argparse.ArgumentParser()
    cli.add_checkpoint_args(parser)
    flags = {s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
    readme = (ROOT / "README.md").read_text()
    sentence = re.search(r"Every command that loads a model takes (.*?)\. `", readme, re.S).group(1)
    assert set(re.findall(r"`(--[a-z-]+)", sentence)) == flags, sentence


def _offline(demo_dir, tmp_path, *extra) -> int:
    wav = tmp_path / "user.wav"
    sf.write(wav, speech_like(0.3), 24000)
    return main(["offline", "--checkpoint", str(demo_dir), "--input-wav", str(wav), "--output-wav",
                 str(tmp_path / "out" / "agent.wav"), "--no-progress", *extra])


def test_offline_refuses_a_missing_voice_folder(demo_dir, tmp_path, capsys):
    assert _offline(demo_dir, tmp_path, "--voice-prompt-dir", str(tmp_path / "missing")) == 2
    assert "--voice-prompt-dir" in _error_line(capsys, "offline") and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,value,expected", [("--topk-text", "0", "--topk-text must be between 1 and"),
                                                 ("--temp-audio", "11", "--temp-audio must be between 0 and 10"),
                                                 ("--config", "huge", "unknown model preset 'huge'")])
def test_offline_bad_flag_values(demo_dir, tmp_path, capsys, flag, value, expected):
    assert _offline(demo_dir, tmp_path, flag, value) == 2
    assert expected in _error_line(capsys, "offline")


def test_output_folders_are_created_with_a_log_line(tmp_path, caplog, capsys):
    from personaplex.cli import output_dir, output_file
    from personaplex.errors import OutputError

    with caplog.at_level("INFO", logger="personaplex"):
        assert output_file(tmp_path / "a" / "b" / "agent.wav", "--output-wav") == tmp_path / "a" / "b" / "agent.wav"
        assert output_dir(tmp_path / "shards", "OUTPUT") == tmp_path / "shards"
    assert (tmp_path / "a" / "b").is_dir() and (tmp_path / "shards").is_dir()
    assert f"created {tmp_path / 'a' / 'b'}" in caplog.text and f"created {tmp_path / 'shards'}" in caplog.text
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file: pass a folder"):
        output_dir(tmp_path / "file", "OUTPUT")
    with pytest.raises(OutputError, match="cannot create the folder"):
        output_file(tmp_path / "file" / "sub" / "x.wav", "--output-wav")


def test_offline_output_that_is_a_folder(demo_dir, tmp_path, capsys):
    wav = tmp_path / "user.wav"
    sf.write(wav, speech_like(0.3), 24000)
    assert main(["offline", "--checkpoint", str(demo_dir), "--input-wav", str(wav), "--output-wav",
                 str(tmp_path)]) == 2
    assert "is a folder: pass a file name" in _error_line(capsys, "offline")


def test_serve_refuses_a_missing_voice_folder(demo_dir, tmp_path, capsys):
    assert main(["serve", "--checkpoint", str(demo_dir), "--voice-prompt-dir", str(tmp_path / "missing"),
                 "--port", "0"]) == 2
    assert "--voice-prompt-dir" in _error_line(capsys, "serve")


@pytest.mark.parametrize("case,expected", [("short", "a voice needs at least 1 s"),
                                           ("silent", "the recording is silent (digital silence"),
                                           ("quiet", "the recording is silent (-")])
def test_voice_refuses_short_and_silent_recordings(demo_dir, tmp_path, capsys, case, expected):
    audio = {"short": speech_like(0.5), "silent": np.zeros(48_000, np.float32),
             "quiet": speech_like(2.0) * 1e-4}[case]
    sf.write(tmp_path / "me.wav", audio, 24000)
    assert main(["voice", str(tmp_path / "me.wav"), "-o", str(tmp_path / "ME.pt"), "--checkpoint",
                 str(demo_dir)]) == 2
    assert expected in _error_line(capsys, "voice") and not (tmp_path / "ME.pt").exists()


def test_written_files_have_normal_modes(demo_dir, tmp_path):
    """Voice files, exported weights and safetensors outputs follow the umask (0644 under 022), not 0600."""
    from personaplex.checkpoint import load_lm, save_lm

    old = os.umask(0o022)
    try:
        sf.write(tmp_path / "me.wav", speech_like(1.2), 24000)
        assert main(["voice", str(tmp_path / "me.wav"), "-o", str(tmp_path / "v" / "ME.pt"), "--checkpoint",
                     str(demo_dir)]) == 0
        save_lm(load_lm(demo_dir / "model.safetensors", device="cpu"), tmp_path / "export")
        for path in (tmp_path / "v" / "ME.pt", tmp_path / "export" / "model.safetensors"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    finally:
        os.umask(old)
