"""Synthetic conversations: turn timing, the dataset files they produce, TTS backends, word time estimates."""

from __future__ import annotations

import json

import numpy as np
import pytest

from personaplex.audio import read_audio
from personaplex.train.data import read_conversation
from personaplex.train.synth import (TTS, EspeakTTS, Script, ScriptError, ToneTTS, Turn, TTSError, estimate_word_times,
                                     load_tts, read_scripts, render, synthesize)


def _script(**kw) -> Script:
    turns = [Turn("agent", "Hello there."), Turn("user", "Hi, I need help.", pause=0.3),
             Turn("agent", "Mm-hmm.", overlap=0.5), Turn("agent", "Sure.", start=5.0)]
    return Script("s1", turns, text_prompt="You are Sam.", agent_voice="a", user_voice="u", **kw)


def test_turn_timing_and_channels():
    tts = ToneTTS()
    audio, agent, user = render(_script(), tts, lead=0.5, tail=0.5, pause=0.4)
    hello = tts.synthesize("Hello there.", "a")
    hi = tts.synthesize("Hi, I need help.", "u")
    first_end = 0.5 + len(hello.pcm) / 24_000
    assert agent[0].text == "Hello" and agent[0].start == pytest.approx(0.5, abs=1e-3)
    assert user[0].text == "Hi," and user[0].start == pytest.approx(first_end + 0.3, abs=1e-3)
    user_end = first_end + 0.3 + len(hi.pcm) / 24_000
    assert agent[2].text == "Mm-hmm." and agent[2].start == pytest.approx(user_end - 0.5, abs=1e-3)  # overlaps
    assert agent[3].text == "Sure." and agent[3].start == pytest.approx(5.0)
    assert audio.shape[0] == 2 and audio.shape[1] / 24_000 == pytest.approx(5.0 + len(tts.synthesize("Sure.", "a").pcm)
                                                                            / 24_000 + 0.5, abs=1e-3)
    a = int(agent[1].start * 24_000)
    assert np.abs(audio[0, a:a + 100]).max() > 0 and np.abs(audio[1, :int(user[0].start * 24_000) - 10]).max() == 0


def test_synthesize_writes_the_dataset_format(tmp_path):
    report = synthesize([_script(), _script(voice_prompt="NATF2")], tmp_path / "a", ToneTTS(), progress=False)
    assert report.failed == [] and report.written == ["s1", "s1"]
    spec = read_conversation(tmp_path / "a" / "s1.json", tmp_path / "a")
    assert spec.voice_prompt == "NATF2" and spec.text_prompt == "You are Sam."
    assert [w.text for w in spec.agent_words] == ["Hello", "there.", "Mm-hmm.", "Sure."]
    report = synthesize([_script()], tmp_path / "b", ToneTTS(), progress=False)
    raw = json.loads((tmp_path / "b" / "s1.json").read_text())
    voice = tmp_path / "b" / raw["voice_prompt"]  # a synthesised sample of the agent's TTS voice
    assert voice.is_file() and raw["voice_prompt"].startswith("voices/")
    stereo = read_audio(tmp_path / "b" / "s1.wav", channel="all")
    assert stereo.shape[0] == 2


def test_scripts_from_files_and_errors(tmp_path):
    good = {"id": "x", "turns": [{"speaker": "user", "text": "hi"}]}
    (tmp_path / "one.json").write_text(json.dumps(good))
    (tmp_path / "many.json").write_text(json.dumps({"dialogues": [{"turns": good["turns"]}] * 2}))
    (tmp_path / "lines.jsonl").write_text(json.dumps({**good, "id": "y"}) + "\n")
    scripts = read_scripts([tmp_path])
    assert sorted(s.id for s in scripts) == ["many-0000", "many-0001", "x", "y"]
    (tmp_path / "bad.json").write_text(json.dumps({"turns": [{"speaker": "robot", "text": "hi"}]}))
    with pytest.raises(ScriptError, match="speaker"):
        read_scripts([tmp_path / "bad.json"])
    with pytest.raises(TTSError, match="unknown TTS"):
        load_tts("nope")
    assert isinstance(load_tts("tones"), TTS)


def test_estimated_word_times_follow_word_length():
    pcm = np.concatenate([np.zeros(2400), np.ones(24_000) * 0.3, np.zeros(2400)]).astype(np.float32)
    words = estimate_word_times("a bbb", pcm, 24_000)
    assert words[0].start == pytest.approx(0.1, abs=0.01) and words[1].end == pytest.approx(1.1, abs=0.01)
    assert words[0].end == pytest.approx(0.1 + 1.0 * 2 / 6, abs=0.01)  # weights len+1: 2 and 4


def test_espeak_backend():
    try:
        tts = EspeakTTS()
    except TTSError:
        pytest.skip("espeak-ng is not installed (pip install espeakng-loader)")
    utt = tts.synthesize("Hello there, how are you today?", "en-us+f3")
    assert utt.sample_rate > 0 and len(utt.pcm) > 0.5 * utt.sample_rate
    assert [w.text for w in utt.words] == ["Hello", "there,", "how", "are", "you", "today?"]
    starts = [w.start for w in utt.words]
    assert starts == sorted(starts) and starts[-1] < len(utt.pcm) / utt.sample_rate
    with pytest.raises(TTSError, match="no voice"):
        tts.synthesize("hi", "xx-nope")
