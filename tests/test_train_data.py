"""Training data: words -> text stream, conversation JSON, preparation into shards (errors, resume), and the
training sample against the layout the inference engine builds for the same prompt and audio."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import speech_like
from personaplex.audio import read_audio, write_wav
from personaplex.config import TEXT_EPAD as E
from personaplex.config import TEXT_PAD as P
from personaplex.engine import (BatchEngine, Personas, SamplingParams, build_persona, load_voice_file, prompt_frames,
                                save_voice_file)
from personaplex.lm import step_frame
from personaplex.train.data import PreparedDataset, SampleError, align_words, read_conversation, start_frame
from personaplex.train.prepare import prepare_dataset
from personaplex.train.sample import Item, build_sample, chunk_items, collate

PROMPT = "You are Sam from Acme."


pytestmark = pytest.mark.usefixtures("one_thread")


# -- words -> text stream -------------------------------------------------------------------------------------
def test_words_are_laid_one_token_per_frame_with_epad_before():
    words = [([100, 101], 0.0), ([102], 0.4), ([103, 104, 105], 0.5)]
    text, dropped = align_words(words, 12)
    # word 0 at frame 0 (nothing before it), word 1 at floor(0.4*12.5)=5 with EPAD on 4, word 2 at frame 6:
    # frame 5 holds a token, so no EPAD there.
    assert text == [100, 101, P, P, E, 102, 103, 104, 105, P, P, P] and dropped == 0
    assert start_frame(0.08) == 1 and start_frame(0.0799) == 0 and start_frame(1.0) == 12


def test_overlapping_words_truncate_or_shift():
    words = [([100, 101, 102, 103], 0.0), ([104], 0.16), ([105], 0.8)]
    text, dropped = align_words(words, 12, "truncate")
    assert text[:5] == [100, 101, 104, P, P] and dropped == 2  # the rest of word 0 gives way at frame 2
    assert text[9:11] == [E, 105]
    text, dropped = align_words(words, 12, "shift")
    assert text[:5] == [100, 101, 102, 103, 104] and dropped == 0  # word 1 pushed to frame 4, no EPAD
    text, dropped = align_words([([100, 101, 102], 0.8)], 12)
    assert text[-2:] == [100, 101] and dropped == 1  # past the last frame


def _conversation(folder, name, seconds=2.0, rate=24_000, words=None, voice="DEMO_LOW", prompt=PROMPT,
                  channels=2, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    agent, user = speech_like(seconds, seed, rate), speech_like(seconds, seed + 1, rate) * 0.5
    audio = np.stack([agent, user]) if channels == 2 else agent
    write_wav(folder / f"{name}.wav", audio, rate)
    words = words if words is not None else [{"word": "Hello", "start": 0.5, "end": 0.8},
                                             {"word": "there.", "start": 0.85, "end": 1.2}]
    data = {"text_prompt": prompt, "voice_prompt": voice, "agent": words,
            "user": [{"word": "hi", "start": 1.3, "end": 1.5}]}
    (folder / f"{name}.json").write_text(json.dumps(data))
    return folder / f"{name}.json"


def test_conversation_json_and_moshi_alignments(tmp_path):
    path = _conversation(tmp_path, "a")
    spec = read_conversation(path, tmp_path)
    assert spec.id == "a" and spec.audio_path.name == "a.wav" and spec.voice_prompt == "DEMO_LOW"
    assert [w.text for w in spec.agent_words] == ["Hello", "there."] and len(spec.user_words) == 1
    (tmp_path / "a.json").write_text(json.dumps({"alignments": [["Hi", [0.2, 0.4], "SPEAKER_MAIN"],
                                                                ["yo", [0.1, 0.2], "SPEAKER_1"]]}))
    spec = read_conversation(path, tmp_path)
    assert [w.text for w in spec.agent_words] == ["Hi"] and [w.text for w in spec.user_words] == ["yo"]
    for bad, message in (("{", "not readable JSON"), ('{"agent": [{"word": "x", "start": 2, "end": 1}]}', "bad times"),
                         ('{"text_prompt": "x"}', "no word timestamps")):
        (tmp_path / "a.json").write_text(bad)
        with pytest.raises(SampleError, match=message):
            read_conversation(path, tmp_path)


# -- preparation ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prepared(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    src = root / "conversations"
    _conversation(src, "good1", rate=16_000)  # any rate: resampled to 24 kHz like a wav given to the engine
    _conversation(src / "sub", "good2", seconds=1.5, prompt="", voice=None, seed=4)
    _conversation(src, "mono", channels=1)
    _conversation(src, "late_words", words=[{"word": "late", "start": 9.0, "end": 9.5}])
    _conversation(src, "no_voice", voice="NOBODY")
    (src / "broken.json").write_text("{not json")
    (src / "broken.wav").write_bytes(b"")
    out = root / "shards"
    lm, mimi, tok = checkpoint.lm, checkpoint.mimi, checkpoint.tokenizer
    report = prepare_dataset(src, out, mimi, tok, lm.config, checkpoint.files.voices_dir, shard_size=1,
                             progress=False)
    return src, out, report


def test_bad_conversations_are_listed_skipped_and_counted(prepared):
    src, out, report = prepared
    assert sorted(report.prepared) == ["good1", "sub/good2"]
    reasons = dict(report.failed)
    assert set(reasons) == {"mono", "late_words", "no_voice", "broken"}
    assert "stereo" in reasons["mono"] and "starts at 9.00 s" in reasons["late_words"]
    assert "NOBODY" in reasons["no_voice"] and "available: DEMO_HIGH, DEMO_LOW" in reasons["no_voice"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert {f["id"] for f in manifest["failed"]} == set(reasons)
    assert len(manifest["shards"]) == 2  # shard_size=1


def test_preparation_resumes(prepared, checkpoint):
    src, out, _ = prepared
    _conversation(src, "good3", seconds=1.5, seed=7)
    lm = checkpoint.lm
    again = prepare_dataset(src, out, checkpoint.mimi, checkpoint.tokenizer, lm.config, checkpoint.files.voices_dir,
                            progress=False)
    assert again.skipped == 2 and again.prepared == ["good3"] and len(again.failed) == 4
    assert len(PreparedDataset(out)) == 3


def _engine_user_codes(lm, mimi, persona, user: np.ndarray, monkeypatch) -> torch.Tensor:
    """Run the user audio through the inference engine and record the Mimi codes it computes."""
    seen = []
    real = mimi.encode_step

    def recording(pcm, state):
        codes = real(pcm, state)
        seen.append(codes[0, :8, 0].clone())
        return codes

    monkeypatch.setattr(mimi, "encode_step", recording)
    engine = BatchEngine(lm, mimi, max_batch=1)
    engine.join(persona, SamplingParams(greedy=True))
    frames = -(-len(user) // 1920)
    padded = np.zeros(frames * 1920, np.float32)
    padded[: len(user)] = user
    for i in range(frames):
        engine.step(torch.from_numpy(padded[i * 1920:(i + 1) * 1920]).view(1, -1))
    monkeypatch.setattr(mimi, "encode_step", real)
    return torch.stack(seen, dim=1)  # (8, T)


def test_training_sample_is_the_engine_layout(prepared, checkpoint, monkeypatch):
    src, out, _ = prepared
    lm, mimi, tok = checkpoint.lm, checkpoint.mimi, checkpoint.tokenizer
    dataset = PreparedDataset(out)
    index = [r.id for r in dataset.records].index("good1")
    (item,) = [i for i in chunk_items(dataset, lm.config.context) if i.conversation == index]
    sample = build_sample(dataset, item, lm.config)

    personas = Personas(lm, mimi, tok, checkpoint.files.voices_dir)
    persona = personas.get("DEMO_LOW", PROMPT)
    _, voice = personas.voice("DEMO_LOW")
    prompt = prompt_frames(voice, tok.system_prompt_ids(PROMPT), lm.config)
    user = _engine_user_codes(lm, mimi, persona, read_audio(src / "good1.wav", channel="right"), monkeypatch)
    agent_audio = read_audio(src / "good1.wav", channel="left")
    state = mimi.init_encoder_state(1)
    agent = torch.cat([mimi.encode_step(torch.from_numpy(np.pad(agent_audio, (0, -len(agent_audio) % 1920))[
        i * 1920:(i + 1) * 1920]).view(1, 1, -1), state) for i in range(user.shape[1])], dim=2)[0, :8]
    T = user.shape[1]
    text = torch.full((T,), P)
    hello, there = tok.encode("Hello"), tok.encode("there.")
    assert len(hello) <= 3  # so that "Hello" ends before the frame ahead of "there."
    text[5] = E  # "Hello" at floor(0.5 * 12.5) = 6, EPAD before it
    text[6:6 + len(hello)] = torch.tensor(hello)
    text[9] = E  # "there." at floor(0.85 * 12.5) = 10
    text[10:10 + len(there)] = torch.tensor(there)
    expected = torch.cat([prompt, torch.cat([text.view(1, T), agent, user], dim=0)], dim=1)
    assert sample.prompt_frames == prompt.shape[1] and sample.prefix is None
    assert torch.equal(sample.codes, expected)
    # The engine continues from grid column N of exactly this sequence.
    grid = lm.delay(sample.codes[None])[0]
    assert torch.equal(persona.next_column, grid[:, prompt.shape[1]])


def test_released_voice_file_feeds_its_embeddings(checkpoint, tmp_path):
    """A .pt voice: the sample carries its embeddings, and forward(prefix_embeddings=…) reads the conversation's
    first frame exactly like the engine does after `build_persona`."""
    lm, mimi, tok = checkpoint.lm, checkpoint.mimi, checkpoint.tokenizer
    personas = Personas(lm, mimi, tok, checkpoint.files.voices_dir)
    _, audio_voice = personas.voice("DEMO_HIGH")
    save_voice_file(tmp_path / "voices" / "MINE.pt", audio_voice, lm)
    src = tmp_path / "src"
    _conversation(src, "c", seconds=1.5, voice="../voices/MINE.pt")
    report = prepare_dataset(src, tmp_path / "out", mimi, tok, lm.config, progress=False)
    assert report.prepared == ["c"], report.failed
    dataset = PreparedDataset(tmp_path / "out")
    sample = build_sample(dataset, Item(0, 0, dataset.records[0].frames), lm.config)
    voice = load_voice_file(tmp_path / "voices" / "MINE.pt", lm)
    assert torch.equal(sample.prefix, voice.embeddings.float())
    ids = tok.system_prompt_ids(PROMPT)
    assert torch.equal(sample.codes[:, : sample.prompt_frames], prompt_frames(voice, ids, lm.config))
    batch = collate([sample])
    with torch.no_grad():
        out = lm(batch.codes, prefix_embeddings=batch.prefix)
        persona = build_persona(lm, voice, ids)
        state = lm.init_state(1)
        state.kv.load_prefix_(0, persona.keys, persona.values, pin=False)
        step = step_frame(lm, state, persona.next_column[None], return_logits=True)
    n = sample.prompt_frames
    assert torch.allclose(out.text_logits[0, 0, n], step.text_logits[0], atol=1e-4, rtol=1e-4)
