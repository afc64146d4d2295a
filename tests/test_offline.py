"""`personaplex offline` and `personaplex voice` end to end on a tiny checkpoint in the released layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import speech_like
from personaplex.cli import main


def _offline(demo_dir, tmp_path, wav, *extra):
    out, text = tmp_path / "agent.wav", tmp_path / "agent.json"
    code = main(["offline", "--checkpoint", str(demo_dir), "--input-wav", str(wav), "--output-wav", str(out),
                 "--output-text", str(text), "--no-progress", *extra])
    return code, out, text


@pytest.mark.parametrize("seconds,rate,channels", [(1.0, 24000, 1), (0.37, 16000, 1), (0.9, 44100, 2),
                                                   (0.25, 8000, 1)])
def test_output_has_the_input_duration(demo_dir, tmp_path, seconds, rate, channels):
    x = speech_like(seconds, rate=rate)
    wav = tmp_path / "user.wav"
    sf.write(wav, np.stack([x] * channels, 1) if channels > 1 else x, rate)
    code, out, text = _offline(demo_dir, tmp_path, wav, "--seed", "1")
    assert code == 0
    y, out_rate = sf.read(out)
    assert out_rate == 24000 and y.ndim == 1
    assert abs(len(y) - len(x) * 24000 / rate) <= 0.5  # same duration, to the sample
    pieces = json.loads(text.read_text())
    assert len(pieces) == -(-len(y) // 1920)  # one transcript entry per 80 ms frame
    assert all(isinstance(p, str) for p in pieces)


def test_seed_reproduces_and_voice_choice_matters(demo_dir, tmp_path):
    wav = tmp_path / "user.wav"
    sf.write(wav, speech_like(0.8, seed=2), 24000)
    runs = []
    for voice in ("DEMO_LOW", "DEMO_LOW", "DEMO_HIGH"):
        code, out, _ = _offline(demo_dir, tmp_path / voice / str(len(runs)), wav, "--seed", "4",
                                "--voice-prompt", voice)
        assert code == 0
        runs.append(out.read_bytes())
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_voice_file_command_and_use(demo_dir, tmp_path):
    voice_wav = tmp_path / "me.flac"
    sf.write(voice_wav, speech_like(1.5, seed=5, rate=22050), 22050)
    assert main(["voice", str(voice_wav), "-o", str(tmp_path / "ME.pt"), "--checkpoint", str(demo_dir)]) == 0
    data = torch.load(tmp_path / "ME.pt", weights_only=True)
    assert data["cache"].shape == (1, 17, 4)
    wav = tmp_path / "user.wav"
    sf.write(wav, speech_like(0.5), 24000)
    code, out, _ = _offline(demo_dir, tmp_path, wav, "--voice-prompt", str(tmp_path / "ME.pt"), "--text-prompt", "")
    assert code == 0 and out.is_file()


@pytest.mark.parametrize("case", ["missing", "empty", "garbage", "voice"])
def test_bad_input_is_one_line_error(demo_dir, tmp_path, capsys, case):
    wav = tmp_path / "user.wav"
    extra = []
    if case == "empty":
        sf.write(wav, np.zeros(0, np.float32), 24000)
    elif case == "garbage":
        wav.write_bytes(b"RIFF\x00\x00garbage")
    elif case == "voice":
        sf.write(wav, speech_like(0.3), 24000)
        extra = ["--voice-prompt", "NOPE"]
    code, out, _ = _offline(demo_dir, tmp_path, wav, *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert err[-1].startswith("personaplex offline: error:") and "Traceback" not in "\n".join(err)
    expected = {"missing": "file not found", "empty": "no audio", "garbage": "cannot read audio",
                "voice": "available: DEMO_HIGH, DEMO_LOW"}[case]
    assert expected in err[-1]
