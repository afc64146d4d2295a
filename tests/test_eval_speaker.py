"""`personaplex eval speaker`: a tiny random WavLMForXVector saved by the test loads through the command and
scores the same audio ~1 and other audio lower; resemblyzer (its model ships in the wheel) tells espeak voices
apart; voice prompts and sample folders resolve as documented."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import speech_like
from personaplex.audio import write_wav
from personaplex.cli import main
from personaplex.eval import EvalError
from personaplex.eval.speaker import SPEAKER_RATE, active_speech, collect_samples, voice_audio_path

RATE = 24_000


@pytest.fixture(scope="module")
def tiny_wavlm(tmp_path_factory):
    transformers = pytest.importorskip("transformers", reason="transformers is part of the eval extra")
    config = transformers.WavLMConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(32, 32, 32), conv_stride=(5, 4, 4), conv_kernel=(10, 8, 8), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, tdnn_dim=(32, 32, 64), tdnn_kernel=(5, 3, 1), tdnn_dilation=(1, 2, 1),
        xvector_output_dim=16, num_buckets=32, max_bucket_distance=100)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("wavlm-sv")
    transformers.WavLMForXVector(config).save_pretrained(folder)
    transformers.Wav2Vec2FeatureExtractor(sampling_rate=SPEAKER_RATE, do_normalize=True).save_pretrained(folder)
    return folder


def _espeak():
    from personaplex.train.synth import EspeakTTS, TTSError

    try:
        return EspeakTTS()
    except TTSError as exc:
        pytest.skip(f"espeak-ng is not available: {exc}")


def _say(tts, text: str, voice: str) -> np.ndarray:
    from personaplex.audio import resample

    utt = tts.synthesize(text, voice)
    return resample(utt.pcm, utt.sample_rate, RATE)


def test_wavlm_same_audio_is_one_other_audio_lower(tiny_wavlm, tmp_path, capsys):
    voice = speech_like(3.0, seed=1)
    write_wav(tmp_path / "voice.wav", voice)
    outputs = tmp_path / "outputs"
    # the agent's output: the voice itself with silence around it (the gate removes it), other audio, silence
    write_wav(outputs / "same.wav", np.concatenate([np.zeros(RATE, np.float32), voice, np.zeros(RATE, np.float32)]))
    rng = np.random.default_rng(0)
    write_wav(outputs / "other.wav", (0.3 * rng.standard_normal(3 * RATE)).astype(np.float32))
    write_wav(outputs / "silent.wav", np.zeros(2 * RATE, np.float32))
    out = tmp_path / "speaker.json"
    code = main(["eval", "speaker", "--outputs", str(outputs), "--voice-prompt", str(tmp_path / "voice.wav"),
                 "--speaker-model", str(tiny_wavlm), "--out", str(out), "--device", "cpu", "--no-progress"])
    assert code == 0
    result = json.loads(out.read_text())
    rows = {r["id"]: r for r in result["samples"]}
    assert rows["same"]["similarity"] == pytest.approx(1.0, abs=1e-3)
    # random weights map everything near one direction: "lower" is all a random model can show
    assert rows["other"]["similarity"] < rows["same"]["similarity"] - 0.002
    assert "speech" in rows["silent"]["error"] and "similarity" not in rows["silent"]
    assert result["count"] == 2 and result["failed"] == 1
    assert result["mean"] == pytest.approx((rows["same"]["similarity"] + rows["other"]["similarity"]) / 2, abs=1e-5)
    assert result["backend"] == "wavlm" and "WavLM" in result["note"]
    assert "speaker similarity" in capsys.readouterr().out


def test_wavlm_long_audio_in_segments(tiny_wavlm):
    from personaplex.eval.speaker import load_encoder

    pcm = speech_like(3.0, seed=2, rate=SPEAKER_RATE)
    encoder = load_encoder("wavlm", str(tiny_wavlm), "cpu", segment_seconds=60)
    whole = encoder.embed(pcm)
    encoder.segment = int(1.2 * SPEAKER_RATE)  # 1.2 + 1.2 + 0.6 s
    pieces = encoder.embed(pcm)
    assert whole.shape == pieces.shape == (16,)
    assert np.linalg.norm(pieces) == pytest.approx(1.0)
    assert 0.5 < float(whole @ pieces) <= 1.0 + 1e-6  # the same voice, a different cut


def test_bad_model_and_input_errors(tmp_path, tiny_wavlm, capsys):
    write_wav(tmp_path / "voice.wav", speech_like(1.0))
    write_wav(tmp_path / "outs" / "a.wav", speech_like(1.0))
    base = ["eval", "speaker", "--outputs", str(tmp_path / "outs"), "--voice-prompt", str(tmp_path / "voice.wav")]
    assert main(base + ["--speaker-model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(base) == 2
    assert "--speaker-model DIR is needed" in capsys.readouterr().err
    assert main(["eval", "speaker", "--voice-prompt", "x.wav", "--speaker-model", str(tiny_wavlm)]) == 2
    assert "exactly one of --outputs" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", "speaker", "--outputs", str(empty), "--voice-prompt", "x.wav",
                 "--speaker-model", str(tiny_wavlm)]) == 2
    assert "no *.wav files found" in capsys.readouterr().err


def test_voice_prompt_resolution(tmp_path):
    voices = tmp_path / "voices"
    voices.mkdir()
    torch.save({"embeddings": torch.zeros(2, 1, 1, 4), "cache": torch.zeros(1, 17, 4)}, voices / "NATF9.pt")
    with pytest.raises(EvalError, match="holds model input embeddings, not audio"):
        voice_audio_path("NATF9", voices)
    write_wav(voices / "NATF9.wav", speech_like(0.5))  # the recording beside the released file is used
    assert voice_audio_path("NATF9", voices) == voices / "NATF9.wav"
    assert voice_audio_path(str(voices / "NATF9.pt"), None) == voices / "NATF9.wav"
    from personaplex.errors import VoiceNotFoundError

    with pytest.raises(VoiceNotFoundError, match="available: NATF9"):
        voice_audio_path("NOPE", voices)


def test_fdb_root_samples_and_speech_gate(tmp_path):
    for name in ("b", "a/1"):
        write_wav(tmp_path / name / "output.wav", speech_like(0.5))
    (tmp_path / "c").mkdir()  # no output.wav: not a sample
    assert [s.id for s in collect_samples(fdb_root=str(tmp_path))] == ["a/1", "b"]
    frame = SPEAKER_RATE // 50
    pcm = np.concatenate([np.zeros(10 * frame), speech_like(0.2, rate=SPEAKER_RATE)[: 10 * frame],
                          1e-4 * np.ones(10 * frame)]).astype(np.float32)
    kept = active_speech(pcm)
    assert len(kept) == 10 * frame  # digital silence and a -80 dBFS hum are gated out


def test_resemblyzer_tells_espeak_voices_apart(tmp_path):
    try:
        from personaplex.eval.speaker import ResemblyzerEncoder

        ResemblyzerEncoder("cpu")  # usable here? (its import needs webrtcvad and librosa)
    except EvalError as exc:
        pytest.skip(f"resemblyzer is not usable here: {exc}")
    tts = _espeak()
    voice = _say(tts, "Hello, this is how I sound when I talk to my customers.", "en-us+f3")
    write_wav(tmp_path / "voice.wav", voice)
    outs = tmp_path / "outs"
    write_wav(outs / "same_voice.wav", _say(tts, "Your order left the warehouse this morning, on time.", "en-us+f3"))
    write_wav(outs / "other_voice.wav", _say(tts, "Your order left the warehouse this morning, on time.", "en-us+m7"))
    out = tmp_path / "r.json"
    assert main(["eval", "speaker", "--outputs", str(outs), "--voice-prompt", str(tmp_path / "voice.wav"),
                 "--speaker-backend", "resemblyzer", "--out", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    rows = {r["id"]: r["similarity"] for r in result["samples"]}
    assert rows["same_voice"] > rows["other_voice"] + 0.1, rows
    assert "NOT the paper's" in result["note"]
