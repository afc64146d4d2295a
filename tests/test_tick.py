"""The engine tick as a GPU would run it, checked on the CPU and the meta device: fixed-shape state (the same
storage every tick, whatever joins and leaves), buckets with padding rows, no host synchronisation, the 7B
shape stepping on meta, a conversation past the window changing nothing for the others, exact sampling noise."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import speech_like
from personaplex.codec.mimi import Mimi, MimiConfig
from personaplex.config import get_preset
from personaplex.engine import BatchEngine, SamplingParams, build_persona
from personaplex.engine.batch import buckets_for
from personaplex.engine.sampling import FrameSampler, gumbel, sample, uniform_from_bits
from personaplex.lm import LMModel
from personaplex.opcount import NoHostSync

CONTEXT = 40  # a window a test can pass in a few dozen frames
TEXT = [5, 6, 7, 8]  # a 4-token text prompt: 6 + 4 + 6 = 16 prompt frames


def _small(device=None):
    """A tiny LM with a short window and a small Mimi of the real frame layout (2048 codes, 8 codebooks)."""
    cfg = dataclasses.replace(get_preset("tiny"), context=CONTEXT)
    mimi_cfg = dataclasses.replace(MimiConfig.preset("tiny"), codebook_size=2048, total_codebooks=8,
                                   num_codebooks=8)
    with torch.device(device or "cpu"):
        lm, mimi = LMModel(cfg).eval(), Mimi(mimi_cfg).eval()
    if device is None:
        lm.init_weights(torch.Generator().manual_seed(0))
    return lm, mimi


@pytest.fixture(scope="module")
def small():
    return _small()


def _frames(n, seed):
    return torch.from_numpy(speech_like(n * 0.08, seed)).view(n, 1920)


def _tensors(engine):
    """Every tensor a tick may touch, by name."""
    found = {"pcm_in": engine._pcm_in, "pcm_out": engine._pcm_out, "frame_out": engine._frame_out}
    kv = engine.state.kv
    for i, t in enumerate(kv._tensors()):
        found[f"kv{i}"] = t
    for f in dataclasses.fields(engine.rows):
        found[f"rows.{f.name}"] = getattr(engine.rows, f.name)
    for side, state in (("enc", engine.enc), ("dec", engine.dec)):
        for i, (t, _) in enumerate(state.tensors()):
            found[f"{side}{i}"] = t
    found["dep.keys"], found["dep.values"] = engine.state.dep.keys, engine.state.dep.values
    return found


def test_buckets():
    assert buckets_for(64) == [1, 2, 4, 8, 16, 32, 64]
    assert buckets_for(6) == [1, 2, 4, 6] and buckets_for(1) == [1]


def test_state_storage_never_changes(small):
    lm, mimi = small
    persona = build_persona(lm, None, TEXT)
    engine = BatchEngine(lm, mimi, max_batch=4)
    before = {name: (t.data_ptr(), t.shape) for name, t in _tensors(engine).items()}
    convs = [engine.join(persona, SamplingParams(seed=i)) for i in range(3)]
    engine.step(_frames(3, 0))
    engine.leave(convs[0])
    engine.step(_frames(2, 1))
    engine.join(persona, SamplingParams(seed=9))
    engine.step(_frames(3, 2))
    engine.clear()
    after = {name: (t.data_ptr(), t.shape) for name, t in _tensors(engine).items()}
    assert before == after  # a CUDA graph captured once keeps reading and writing the right memory


def test_padding_rows_do_not_advance(small):
    lm, mimi = small
    engine = BatchEngine(lm, mimi, max_batch=4)
    persona = build_persona(lm, None, TEXT)
    for i in range(3):
        engine.join(persona, SamplingParams(seed=i))
    kv = engine.state.kv
    pos = kv.pos_cpu.clone()
    engine.step(_frames(3, 0))  # bucket 4: row 3 is padding
    assert kv.pos_cpu.tolist() == [pos[0] + 1, pos[1] + 1, pos[2] + 1, 0]
    assert kv.pos.tolist() == kv.pos_cpu.tolist() and engine.rows.counter[3] == 0


def test_a_row_past_the_window_changes_nothing_for_the_others(small):
    lm, mimi = small
    persona = build_persona(lm, None, TEXT)
    n_long, n_short, start = 70, 20, 40
    users = [_frames(n_long, 1), _frames(n_short, 2)]
    params = [SamplingParams(seed=3), SamplingParams(seed=4)]

    def solo(i, n):
        engine = BatchEngine(lm, mimi, max_batch=1)
        engine.join(persona, params[i])
        return [engine.step(users[i][t:t + 1])[0] for t in range(n)]

    alone = [solo(0, n_long), solo(1, n_short)]
    engine = BatchEngine(lm, mimi, max_batch=2)
    a = engine.join(persona, params[0])
    got, b, slid_ticks = [[], []], None, 0
    for tick in range(n_long):
        if tick == start:
            b = engine.join(persona, params[1])
        live = [0] + ([1] if b is not None and b.active else [])
        slid_ticks += engine.state.kv.any_slid(CONTEXT) and len(live) == 2
        for i, result in zip(live, engine.step(torch.stack([users[i][len(got[i])] for i in live]))):
            got[i].append(result)
        if b is not None and b.active and len(got[1]) == n_short:
            engine.leave(b)
    assert a.pinned and slid_ticks >= 10  # the other conversation shared ticks with a row past the window
    for mine, ref in zip(got, alone):
        assert [r.text_token for r in mine] == [r.text_token for r in ref]
        assert all(torch.equal(x.audio_codes, y.audio_codes) for x, y in zip(mine, ref))
        assert all(torch.allclose(x.pcm, y.pcm, atol=1e-5) for x, y in zip(mine, ref))


def test_tick_has_no_host_sync_on_meta():
    lm, mimi = _small("meta")
    persona = build_persona(lm, None, TEXT)
    engine = BatchEngine(lm, mimi, max_batch=4)
    for i in range(3):
        engine.join(persona, SamplingParams(seed=i, text_topk=7))
    engine.state.kv.pos_cpu[1] = CONTEXT + 5  # host mirror: row 1 is past the window
    views = engine._views[4]
    for slid in (False, True):
        with NoHostSync():
            engine._tick(views, slid, engine.graph_kmax())
    assert len(engine.step(torch.zeros(3, 1920))) == 3


def test_the_7b_shape_steps_on_meta():
    with torch.device("meta"):
        lm = LMModel(get_preset("personaplex-7b"), dtype=torch.bfloat16)
        mimi = Mimi(MimiConfig())
    engine = BatchEngine(lm, mimi, max_batch=2)
    engine.join(build_persona(lm, None, TEXT), SamplingParams())
    with NoHostSync():
        engine._tick(engine._views[1], False, engine.graph_kmax())
    results = engine.step(torch.zeros(1, 1920))
    assert results[0].pcm.shape == (1920,) and results[0].audio_codes.shape == (8,)


def test_cuda_graphs_need_cuda(small):
    lm, mimi = small
    with pytest.raises(ValueError, match="CUDA"):
        BatchEngine(lm, mimi, max_batch=2, cuda_graphs=True)


def test_uniform_noise_strictly_inside_for_every_bit_pattern():
    extremes = torch.tensor([0, 1, (1 << 23) - 2, (1 << 23) - 1])
    u = uniform_from_bits(extremes)
    assert u.dtype == torch.float32 and bool((u > 0).all()) and bool((u < 1).all())
    assert u[0].item() == 2.0 ** -24 and u[-1].item() == 1 - 2.0 ** -24  # exact, no rounding to 0 or 1
    keys = torch.tensor([0, -1, 1 << 62, -(1 << 63)])
    g = gumbel(keys, torch.arange(50_000).expand(4, -1))
    assert bool(torch.isfinite(g).all())


def test_frame_sampler_draws_what_sample_draws():
    g = torch.Generator().manual_seed(0)
    B, streams = 5, 8
    temperature = torch.tensor([[0.7, 0.8], [0.0, 0.8], [1.2, 0.0], [0.7, 0.8], [0.5, 1.5]])
    topk = torch.tensor([[25, 250], [25, 250], [1, 3], [40, 1], [3, 2048]])
    seed, counter = torch.arange(B) * 7919, torch.arange(B) + 3
    sampler = FrameSampler(temperature, topk, seed, counter, (64, 2048), streams, 2048)
    text = torch.randn(B, 512, generator=g)
    assert torch.equal(sampler(text, 0), sample(text, temperature[:, 0], topk[:, 0], seed, counter, 0, kmax=64))
    for k in range(1, streams + 1):
        logits = torch.randn(B, 2048, generator=g)
        expected = sample(logits, temperature[:, 1], topk[:, 1], seed, counter, k)
        assert torch.equal(sampler(logits, k), expected), k
    greedy = sampler(text, 0)[1]
    assert greedy == text[1].argmax()  # temperature 0: the most likely token
