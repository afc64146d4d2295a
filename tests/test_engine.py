"""Conversations on a tiny checkpoint in the released layout: prompt layout, prompt cache, greedy decoding
against a teacher-forced recomputation and against the reference generator, batching, seeds, voice files."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import speech_like
from personaplex.config import TEXT_PAD
from personaplex.engine import (SILENCE_TOKENS, SINE_TOKENS, BatchEngine, Personas, SamplingParams, build_persona,
                                load_voice_file, prompt_frames, save_voice_file)
from personaplex.lm import NOT_FORCED, step_frame

PROMPT = "You work for Acme Appliances and your name is Sam."


@pytest.fixture(scope="module")
def personas(checkpoint):
    return Personas(checkpoint.lm, checkpoint.mimi, checkpoint.tokenizer, checkpoint.files.voices_dir,
                    allow_paths=True)


def _user_frames(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(speech_like(n * 0.08, seed)).view(n, 1920)


def _run(engine, conv_persona, frames, params):
    conv = engine.join(conv_persona, params)
    out = [engine.step(frames[i:i + 1])[0] for i in range(frames.shape[0])]
    engine.leave(conv)
    return out


def test_prompt_layout_matches_the_table(checkpoint, personas):
    lm = checkpoint.lm
    _, voice = personas.voice("DEMO_LOW")
    ids = checkpoint.tokenizer.system_prompt_ids(PROMPT)
    frames = prompt_frames(voice, ids, lm.config)
    F, T = voice.num_frames, len(ids)
    assert frames.shape == (17, (F - 1) + 6 + T + 6)
    sil, sine = torch.tensor(SILENCE_TOKENS), torch.tensor(SINE_TOKENS)
    assert torch.equal(frames[1:9, : F - 1], voice.codes[:, 1:])  # voice frames 1..F-1 on the agent channel
    assert (frames[0, : F - 1] == TEXT_PAD).all()
    assert (frames[9:, :] == sine[:, None]).all()  # user channel: SINE throughout
    text = frames[:, F - 1 + 6: F - 1 + 6 + T]
    assert text[0].tolist() == ids and (text[1:9] == sil[:, None]).all()
    for start in (F - 1, F - 1 + 6 + T):
        block = frames[:, start: start + 6]
        assert (block[0] == TEXT_PAD).all() and (block[1:9] == sil[:, None]).all()
    tok = checkpoint.tokenizer
    assert tok.decode(ids).startswith("<system>") and tok.decode(ids).endswith("<system>")
    assert prompt_frames(voice, [], lm.config).shape[1] == (F - 1) + 12  # empty prompt: the text phase is skipped


def test_prefill_equals_stepping_the_prompt(checkpoint, personas):
    """The cached persona (one batched prefill) equals the released way: one forced step per frame."""
    lm = checkpoint.lm
    _, voice = personas.voice("DEMO_HIGH")
    ids = checkpoint.tokenizer.system_prompt_ids(PROMPT)
    persona = build_persona(lm, voice, ids)
    frames = prompt_frames(voice, ids, lm.config)
    grid = lm.delay(frames[None])[0]
    state = lm.init_state(1)
    with torch.no_grad():
        for s in range(frames.shape[1]):
            forced = grid[None, : 1 + lm.config.dep_q, s + 1]
            out = step_frame(lm, state, grid[None, :, s], forced=forced)
            assert torch.equal(out.tokens, forced)
    n = persona.length
    assert state.kv.pos.item() == n
    rel = (state.kv.keys[:, 0, :, :n] - persona.keys).abs().max() / persona.keys.abs().max()
    assert rel < 1e-5
    assert torch.equal(persona.next_column, grid[:, n])


def test_greedy_conversation_equals_teacher_forced_recomputation(checkpoint, personas):
    lm, mimi = checkpoint.lm, checkpoint.mimi
    persona = personas.get("DEMO_LOW", PROMPT)
    engine = BatchEngine(lm, mimi, max_batch=2)
    user = _user_frames(12)
    out = _run(engine, persona, user, SamplingParams(greedy=True))
    _, voice = personas.voice("DEMO_LOW")
    prompt = prompt_frames(voice, checkpoint.tokenizer.system_prompt_ids(PROMPT), lm.config)
    user_codes = mimi.encode(user.reshape(1, 1, -1))[0, :8]  # (8, 12): batch == streaming codes
    talk = torch.cat([torch.tensor([[r.text_token] for r in out]).T, torch.stack([r.audio_codes for r in out], 1),
                      user_codes], dim=0)
    codes = torch.cat([prompt, talk], dim=1)[None]  # (1, 17, N + 12)
    with torch.no_grad():
        logits = lm(codes)
    n = prompt.shape[1]
    text = logits.text_logits[0, 0, n:].argmax(-1)
    audio = logits.audio_logits[0, :8, n:].argmax(-1)
    assert text.tolist() == talk[0].tolist()
    # The last frame's acoustic codebooks are predicted one grid step later than the forward covers.
    assert torch.equal(audio[:, :-1], talk[1:9, :-1]) and torch.equal(audio[0], talk[1])


def test_cached_persona_start_equals_running_the_prompt(checkpoint, personas):
    lm, mimi = checkpoint.lm, checkpoint.mimi
    user = _user_frames(6, seed=3)
    params = SamplingParams(seed=11)
    cached = personas.get("DEMO_HIGH", PROMPT)
    again = personas.get("DEMO_HIGH", PROMPT)
    assert again is cached  # second conversation: no prompt work at all
    _, voice = personas.voice("DEMO_HIGH")
    fresh = build_persona(lm, voice, checkpoint.tokenizer.system_prompt_ids(PROMPT))
    a = _run(BatchEngine(lm, mimi, 1), cached, user, params)
    b = _run(BatchEngine(lm, mimi, 1), fresh, user, params)
    assert [r.text_token for r in a] == [r.text_token for r in b]
    assert all(torch.equal(x.audio_codes, y.audio_codes) for x, y in zip(a, b))


def test_batched_conversations_equal_solo_runs(checkpoint, personas):
    lm, mimi = checkpoint.lm, checkpoint.mimi
    specs = [("DEMO_LOW", PROMPT, 1), ("DEMO_HIGH", "You are a casual friend.", 2), ("DEMO_LOW", "", 3)]
    users = [_user_frames(8, seed=s) for s in range(3)]
    solo = [_run(BatchEngine(lm, mimi, 1), personas.get(v, p), users[i], SamplingParams(seed=s))
            for i, (v, p, s) in enumerate(specs)]
    engine = BatchEngine(lm, mimi, max_batch=3)
    convs, got, starts = [None] * 3, [[], [], []], [0, 2, 3]  # conversations join at different frames
    for tick in range(11):
        for i, start in enumerate(starts):
            if tick == start:
                convs[i] = engine.join(personas.get(specs[i][0], specs[i][1]), SamplingParams(seed=specs[i][2]))
        active = [i for i in range(3) if convs[i] is not None and convs[i].active]
        by_row = sorted(active, key=lambda i: convs[i].row)
        frames = torch.stack([users[i][len(got[i])] for i in by_row])
        for i, result in zip(by_row, engine.step(frames)):
            got[i].append(result)
            if len(got[i]) == 8:
                engine.leave(convs[i])  # conversation 0 leaves first: the last row moves into its place
    for i in range(3):
        assert [r.text_token for r in got[i]] == [r.text_token for r in solo[i]]
        assert all(torch.equal(x.audio_codes, y.audio_codes) for x, y in zip(got[i], solo[i]))
        assert all(torch.allclose(x.pcm, y.pcm, atol=1e-5) for x, y in zip(got[i], solo[i]))


def test_same_seed_same_bytes(checkpoint, personas):
    lm, mimi = checkpoint.lm, checkpoint.mimi
    persona = personas.get("DEMO_LOW", PROMPT)
    user = _user_frames(5, seed=7)
    a = _run(BatchEngine(lm, mimi, 1), persona, user, SamplingParams(seed=5))
    b = _run(BatchEngine(lm, mimi, 1), persona, user, SamplingParams(seed=5))
    c = _run(BatchEngine(lm, mimi, 1), persona, user, SamplingParams(seed=6))
    pcm = lambda rs: torch.cat([r.pcm for r in rs]).numpy().tobytes()  # noqa: E731
    assert pcm(a) == pcm(b)
    assert [r.audio_codes.tolist() for r in a] != [r.audio_codes.tolist() for r in c]


def test_engine_timing_matches_the_reference_generator(checkpoint):
    """Moshi-shaped model (dep_q 8), no persona: our call c equals moshi LMGen's call c+1 (greedy)."""
    moshi_lm = pytest.importorskip("moshi.models.lm")
    from personaplex.adapter import lm_to_released
    from personaplex.lm import LMModel

    cfg = dataclasses.replace(checkpoint.lm.config, dep_q=8)
    lm = LMModel(cfg)
    lm.init_weights(torch.Generator().manual_seed(5))
    lm.eval()
    mimi = checkpoint.mimi
    user = _user_frames(8, seed=4)
    ours = _run(BatchEngine(lm, mimi, 1), build_persona(lm, None, [], bare=True), user, SamplingParams(greedy=True))
    ref = moshi_lm.LMModel(device="cpu", dtype=torch.float32, **cfg.to_moshi_dict()).eval()
    ref.load_state_dict(lm_to_released(lm.state_dict()))
    gen = moshi_lm.LMGen(ref, use_sampling=False)
    codes = mimi.encode(user.reshape(1, 1, -1))[:, :8]  # (1, 8, 8)
    feed = torch.cat([torch.zeros_like(codes[:, :, :1]), codes], dim=2)  # the reference drops its first frame
    with gen.streaming(1), torch.no_grad():
        outs = [gen.step(feed[:, :, i:i + 1]) for i in range(feed.shape[2])]
    assert outs[0] is None
    for c, result in enumerate(ours):
        expected = outs[c + 1][0, :, 0]
        assert result.text_token == expected[0].item()
        assert result.audio_codes.tolist() == expected[1:9].tolist()


def test_voice_file_round_trip(checkpoint, personas, tmp_path):
    lm = checkpoint.lm
    _, voice = personas.voice("DEMO_LOW")
    path = save_voice_file(tmp_path / "MYVOICE.pt", voice, lm)
    data = torch.load(path, weights_only=True)
    assert data["embeddings"].shape == (voice.num_frames - 1, 1, 1, lm.config.dim)
    assert data["embeddings"].dtype == torch.bfloat16 and data["cache"].shape == (1, 17, 4)
    loaded = load_voice_file(path, lm)
    ids = checkpoint.tokenizer.system_prompt_ids(PROMPT)
    from_audio, from_file = build_persona(lm, voice, ids), build_persona(lm, loaded, ids)
    assert torch.equal(from_audio.next_column, from_file.next_column)
    assert torch.equal(from_audio.forced_after, from_file.forced_after)
    rel = (from_audio.keys - from_file.keys).abs().max() / from_audio.keys.abs().max()
    assert rel < 2e-2  # the file stores bf16 embeddings, as released
    assert personas.voice(str(path))[1].embeddings is not None  # a path works where paths are allowed
    assert NOT_FORCED not in from_file.next_column.tolist()


def test_personas_cache_query_and_bare_models(checkpoint, personas):
    lm = checkpoint.lm
    text = "You are a patient tutor named Bo."
    assert not personas.cached("DEMO_HIGH", text)
    persona = personas.get("DEMO_HIGH", text)
    assert personas.cached("DEMO_HIGH", text) and personas.cached("DEMO_HIGH.wav", text)
    assert personas.get("DEMO_HIGH", text) is persona
    from personaplex.lm import LMModel

    moshi_like = LMModel(dataclasses.replace(lm.config, dep_q=8))
    moshi_like.init_weights(torch.Generator().manual_seed(0))
    bare = Personas(moshi_like, checkpoint.mimi, checkpoint.tokenizer, checkpoint.files.voices_dir)
    assert bare.bare and bare.get("DEMO_LOW", PROMPT).length == 0  # Moshi models take no persona prompt


def test_clear_empties_the_batch(checkpoint, personas):
    engine = BatchEngine(checkpoint.lm, checkpoint.mimi, max_batch=2)
    persona = personas.get("DEMO_LOW", PROMPT)
    convs = [engine.join(persona, SamplingParams(seed=i)) for i in range(2)]
    engine.step(torch.zeros(2, 1920))
    engine.clear()
    assert engine.active == 0 and not any(c.active for c in convs)
    assert engine.step(torch.zeros(0, 1920)) == []
    again = engine.join(persona, SamplingParams(seed=0))
    assert again.row == 0 and len(engine.step(torch.zeros(1, 1920))) == 1


def test_a_failed_join_leaves_the_batch_as_it_was(checkpoint, personas, monkeypatch):
    engine = BatchEngine(checkpoint.lm, checkpoint.mimi, max_batch=2)
    persona = personas.get("DEMO_LOW", PROMPT)
    first = engine.join(persona, SamplingParams(seed=1))

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(engine, "_prime", out_of_memory)
    with pytest.raises(RuntimeError, match="simulated"):
        engine.join(persona, SamplingParams(seed=2))
    monkeypatch.undo()
    assert engine.active == 1 and first.row == 0
    kv = engine.state.kv  # the half-joined row is fresh again
    assert not engine.rows.active_cpu[1] and kv.pos_cpu[1] == 0 and kv.pinned_cpu[1] == 0
    assert bool((kv.slot_pos[1] == -1).all())
    assert len(engine.step(torch.zeros(1, 1920))) == 1
    other = BatchEngine(checkpoint.lm, checkpoint.mimi, max_batch=1).join(persona)
    assert other.id != first.id  # ids are unique across engines (a server may rebuild its engine)


def test_persona_cache_is_bounded_in_frames(checkpoint):
    from personaplex.engine import PersonaCache

    lm = checkpoint.lm
    cache = PersonaCache(capacity=16, max_frames=40)
    for i in range(4):
        cache.get(i, lambda i=i: build_persona(lm, None, list(range(10, 10 + i + 1))))  # 12 + i + 1 frames
    assert cache.frames <= 40 and 3 in cache and 0 not in cache
