"""`personaplex eval service`: scripted callers (espeak-ng) in full duplex on the demo checkpoint, judged by a
loopback OpenAI-compatible server that answers one call only on the second try and never parses for the other."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import soundfile as sf

from personaplex.cli import main
from personaplex.config import FRAME_SIZE, TEXT_PAD
from personaplex.eval import EvalError
from personaplex.eval.service import Caller, CallerTiming, load_scenarios, parse_scores, select
from test_eval_judge import JudgeServer

SCENARIOS = {"scenarios": [
    {"id": "alpha", "text_prompt": "You work for Alpha Water and your name is Kim.", "voice": "DEMO_HIGH",
     "task": "Book a delivery.", "caller_voice": "en-us+m3", "turns": ["Hi there.", "Friday please."]},
    {"id": "beta", "text_prompt": "You work for Beta Bikes and your name is Lou.", "voice": "DEMO_LOW",
     "task": "Fix a flat tyre.", "caller_voice": "en-us+f3", "turns": ["Hello.", "Thanks, bye.", "Not used."]},
]}


def service_judge(messages, body, requests):
    """A judge that answers Alpha Water's call from its second ask on and never parses anything else."""
    prompt = messages[-1]["content"]
    asked = sum(r["messages"][-1]["content"] == prompt for r in requests)
    if "Alpha Water" in prompt and asked >= 2:
        return "Analysis: short but polite.\nNaturalness: 4\nTask adherence: 3"
    return "I am unable to rate this conversation."  # does not parse


def test_end_to_end_on_the_demo_checkpoint(demo_dir, tmp_path, capsys, one_thread):
    pytest.importorskip("espeakng_loader", reason="the caller's voice is espeak-ng (test extra)")
    scenarios = tmp_path / "scenarios.json"
    scenarios.write_text(json.dumps(SCENARIOS))
    out = tmp_path / "service"
    with JudgeServer(lambda m, body: service_judge(m, body, server.requests)) as server:
        url, seen = server.url, server.requests
        args = ["eval", "service", "--checkpoint", str(demo_dir), "--device", "cpu", "--scenarios", str(scenarios),
                "--out", str(out), "--judge-url", url, "--judge-model", "stand-in", "--judge-tries", "2",
                "--max-turns", "2", "--batch", "2", "--lead", "0.3", "--reply-gap", "0.4", "--max-reply", "0.8",
                "--no-progress"]
        assert main(args) == 0
        first = len(seen)
        result = json.loads((out / "results.json").read_text())
        assert main(args) == 0  # a re-run: no call is run again, every judge answer comes from the cache
        assert len(seen) == first == 4  # alpha: 2 tries; beta: 2 unparsed tries
        assert "sent 0, cached 4" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text()) == result
    assert result["scenarios"] == 2 and result["judged"] == 1 and result["unparsed"] == 1
    assert result["naturalness"] == 4 and result["adherence"] == 3 and result["demo"] is False
    calls = {c["id"]: c for c in result["calls"]}
    assert calls["alpha"]["judge"]["parsed"] and len(calls["alpha"]["judge"]["replies"]) == 2
    assert not calls["beta"]["judge"]["parsed"] and calls["beta"]["judge"]["naturalness"] is None
    assert seen[0]["model"] == "stand-in" and seen[0]["temperature"] == 0.0
    prompt = seen[0]["messages"][-1]["content"]
    assert "Caller: Hi there." in prompt and "Caller: Friday please." in prompt and "Book a delivery." in prompt
    for sid, voice in (("alpha", "DEMO_HIGH"), ("beta", "DEMO_LOW")):
        call = calls[sid]
        assert call["voice"] == voice and len(call["turns"]) == 2  # --max-turns 2 cut beta's third turn
        audio, rate = sf.read(str(out / sid / "conversation.wav"))
        assert rate == 24_000 and audio.shape[1] == 2 and abs(len(audio) / rate - call["seconds"]) < 0.01
        (t1, t2) = call["turns"]
        assert 0.3 <= t1["caller_start"] < t1["caller_end"] <= t2["caller_start"] - 0.3 < t2["caller_end"]
        assert t1["reply_end"] == t2["caller_start"] and t2["reply_end"] == call["seconds"]
        # the caller's channel holds speech inside its turns and silence between them
        user = audio[:, 1]
        gap = user[int(t1["caller_end"] * rate) + 10: int(t2["caller_start"] * rate) - 10]
        assert np.abs(gap).max() < 1e-3 and np.abs(user[int(t1["caller_start"] * rate):]).max() > 0.1
        assert isinstance(t1["agent"], str) and t1["agent"] == t1["agent_text_stream"]
    report = (out / "report.md").read_text()
    assert "| alpha | 4.00 | 3.00 |" in report and "| beta | n/a | n/a |" in report and "1 unparsed" in report


def test_caller_waits_for_the_answer_then_a_pause():
    timing = CallerTiming(lead=0.16, reply_gap=0.4, min_pause=0.0, max_reply=2.0, tail=0.0)
    turn = np.ones(3 * FRAME_SIZE, np.float32)  # a turn of 3 frames
    caller = Caller([turn, turn], timing)
    frames = []
    # the agent says words for 4 frames after the first turn, then is quiet
    agent = [TEXT_PAD] * 5 + [100] * 4 + [TEXT_PAD] * 20
    for token in agent:
        if caller.done:
            break
        frames.append(caller.next_frame().max())
        caller.heard(token)
    assert caller.spans[0] == (2, 5)  # 2 frames of lead-in, then the 3 frames of the turn
    # words in frames 5..8, then 5 quiet frames (0.4 s) before the caller goes on at frame 14
    assert caller.spans[1] == (14, 17) and frames[5:14] == [0] * 9 and frames[14:17] == [1] * 3
    silent = Caller([turn], CallerTiming(lead=0.0, reply_gap=0.4, min_pause=0.0, max_reply=0.8, tail=0.0))
    n = 0
    while not silent.done and n < 100:
        silent.next_frame()
        silent.heard(200)  # an agent that never stops talking: the caller moves on after max_reply
        n += 1
    assert silent.spans == [(0, 3)] and n == 3 + 10


def test_scenario_files():
    shipped = load_scenarios()
    assert len(shipped) >= 5 and len({s.id for s in shipped}) == len(shipped)
    assert all(re.fullmatch(r"(NAT|VAR)[FM]\d", s.voice) and len(s.turns) >= 3 and s.task for s in shipped)
    picked = select(shipped, f"{shipped[2].id},{shipped[0].id}", None, 1)
    assert [s.id for s in picked] == [shipped[0].id, shipped[2].id] and all(len(s.turns) == 1 for s in picked)
    assert picked[1].seed_offset == 2
    with pytest.raises(EvalError, match="unknown scenario 'nope'"):
        select(shipped, "nope", None, None)


def test_bad_inputs_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "x", "text_prompt": "p", "voice": "v", "task": "t", "turns": []}]))
    assert main(["eval", "service", "--scenarios", str(bad), "--out", str(tmp_path / "o"),
                 "--judge-url", "http://127.0.0.1:9/v1"]) == 2
    assert "needs a non-empty 'turns'" in capsys.readouterr().err
    assert main(["eval", "service", "--out", str(tmp_path / "o"), "--judge-url", "ftp://x"]) == 2
    assert "not an http(s) URL" in capsys.readouterr().err
    assert parse_scores("Naturalness: 5\nTask adherence: 2") == {"naturalness": 5, "adherence": 2}
    assert parse_scores("Naturalness: 7\nTask adherence: 2") is None  # out of range
    assert parse_scores("Naturalness: 3") is None


def test_asr_replies_are_gated_by_the_vad():
    pytest.importorskip("silero_vad", reason="silero VAD is part of the eval extra")
    from personaplex.eval.asr import Word
    from personaplex.eval.service import transcribe_replies
    from personaplex.train.synth import EspeakTTS, TTSError

    try:
        tts = EspeakTTS()
    except TTSError as exc:
        pytest.skip(f"espeak-ng is not available: {exc}")
    from personaplex.audio import resample

    utt = tts.synthesize("Your parcel arrives on Friday.", "en-us+f3")
    speech = resample(utt.pcm, utt.sample_rate, 24_000)
    agent = np.concatenate([speech, np.zeros(2 * 24_000, np.float32)])  # a reply, then a silent window

    class StandInAsr:  # hears one word across whatever it is given, as an offline ASR does on silence
        name = "stand-in"

        def transcribe(self, wav16k):
            return [Word("Friday", 0.0, len(wav16k) / 16_000)]

    cut = len(speech) / 24_000
    dialogue = {"turns": [{"reply_start": 0.0, "reply_end": cut}, {"reply_start": cut, "reply_end": cut + 2.0}]}
    transcribe_replies(dialogue, agent, StandInAsr())
    assert [t["agent"] for t in dialogue["turns"]] == ["Friday", ""]


def test_a_long_call_is_cut(checkpoint, one_thread):
    from personaplex.engine import Personas
    from personaplex.eval.service import Scenario, run_calls

    personas = Personas(checkpoint.lm, checkpoint.mimi, checkpoint.tokenizer, checkpoint.files.voices_dir)
    scenario = Scenario("long", "You sell bikes.", "DEMO_LOW", "Sell a bike.", ["Hello."])
    audio = {"long": [np.full(10 * FRAME_SIZE, 0.1, np.float32)]}
    (call,) = run_calls(checkpoint, personas, [scenario], audio, CallerTiming(lead=0.0), max_seconds=0.4)
    assert len(call.tokens) == len(call.agent) == 5 and not call.caller.done  # 0.4 s: 5 frames, mid-turn
