"""The LM against the reference (moshi 0.2.13) on random weights, and its incremental paths against its
teacher-forced forward."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from personaplex.adapter import lm_from_released, lm_to_released
from personaplex.config import get_preset
from personaplex.lm import NOT_FORCED, LMModel, step_frame

moshi_lm = pytest.importorskip("moshi.models.lm")


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    defined = ~torch.isnan(ref)
    assert torch.equal(defined, ~torch.isnan(ours)), "undefined (NaN) positions differ"
    return ((ours[defined] - ref[defined]).abs().max() / ref[defined].abs().max()).item()


def _config(dep_q: int, context: int = 8):
    return dataclasses.replace(get_preset("tiny"), dep_q=dep_q, context=context)


def _pair(cfg, seed=0):
    """A reference model with random weights and ours loaded from its state in the released layout."""
    torch.manual_seed(seed)
    ref = moshi_lm.LMModel(device="cpu", dtype=torch.float32, **cfg.to_moshi_dict()).eval()
    # The reference leaves some weights at PyTorch defaults; randomise everything so no path is trivial.
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "alpha" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, p.shape[-1] ** -0.5)
    released = lm_to_released(lm_from_released(ref.state_dict()))
    ours = LMModel(cfg).eval()
    ours.load_state_dict(lm_from_released(released), strict=True)
    return ref, ours, released


def _codes(cfg, B, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, cfg.card, (B, cfg.num_streams, T), generator=g)
    codes[:, 0] = torch.randint(0, cfg.text_card, (B, T), generator=g)
    return codes


@pytest.mark.parametrize("dep_q", [16, 8], ids=["personaplex", "moshiko"])
def test_teacher_forced_logits_match_reference(dep_q):
    cfg = _config(dep_q)
    ref, ours, _ = _pair(cfg)
    codes = _codes(cfg, B=2, T=21)  # longer than the context (8): the window applies
    codes[0, 4, 3] = -1  # a missing token embeds to zero and carries no loss
    with torch.no_grad():
        r, o = ref(codes), ours(codes)
    assert o.text_logits.shape == (2, 1, 21, cfg.text_card)
    assert o.audio_logits.shape == (2, dep_q, 21, cfg.card)
    assert _rel(o.text_logits, r.text_logits) < 1e-4
    assert _rel(o.audio_logits, r.logits) < 1e-4
    assert torch.equal(o.audio_mask, r.mask) and torch.equal(o.text_mask, r.text_mask)
    assert not o.audio_mask[0, 3, 3]


def test_saved_layout_loads_in_reference():
    cfg = _config(16)
    ref, ours, released = _pair(cfg)
    saved = lm_to_released(ours.state_dict())
    assert set(saved) == set(released)
    assert any(k.endswith("self_attn.in_proj_weight") for k in saved)
    fresh = moshi_lm.LMModel(device="cpu", dtype=torch.float32, **cfg.to_moshi_dict())
    fresh.load_state_dict(saved, strict=True)
    for key, value in ref.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_released_preset_names_and_shapes():
    """personaplex-7b built on the meta device has exactly the released tensors (475)."""
    cfg = get_preset("personaplex-7b")
    ref = moshi_lm.LMModel(device="meta", dtype=torch.bfloat16, **cfg.to_moshi_dict())
    # The released files use the legacy fused names; the reference's load hook maps them back.
    expected = {k: tuple(v.shape) for k, v in _legacy_names(ref.state_dict()).items()}
    with torch.device("meta"):
        ours = LMModel(cfg, dtype=torch.bfloat16)
    got = {k: tuple(v.shape) for k, v in lm_to_released(ours.state_dict()).items()}
    assert len(expected) == 475
    assert got == expected
    moshiko = get_preset("moshi-7b")
    with torch.device("meta"):
        assert len(lm_to_released(LMModel(moshiko).state_dict())) == 355


def _legacy_names(state):
    """Reference state dict -> legacy layout, written independently of our adapter."""
    out, grouped = {}, {}
    for key, value in state.items():
        if ".self_attn.in_projs." in key or ".self_attn.out_projs." in key:
            prefix, rest = key.split(".self_attn.")
            kind = "in_proj_weight" if rest.startswith("in_projs") else "out_proj.weight"
            grouped.setdefault(f"{prefix}.self_attn.{kind}", []).append(value)
        else:
            out[key] = value
    for key, parts in grouped.items():
        out[key] = torch.empty((sum(p.shape[0] for p in parts), parts[0].shape[1]), device="meta")
    return out


def _grid_logits(lm, codes):
    """Teacher-forced logits on the delayed grid (before undelaying): text (B, T, V), audio (B, dep_q, T, V)."""
    grid = lm.delay(codes)
    hidden = lm.temporal(lm.embed(grid[:, :, :-1]))
    return lm.text_linear(hidden), lm.depformer_all(hidden, grid[:, : 1 + lm.config.dep_q, 1:]), grid


@pytest.mark.parametrize("dep_q", [16, 8])
def test_incremental_steps_equal_teacher_forced(dep_q):
    cfg = _config(dep_q)
    _, lm, _ = _pair(cfg)
    codes = _codes(cfg, B=2, T=20)  # wraps the ring cache (context 8) twice
    with torch.no_grad():
        text_ref, audio_ref, grid = _grid_logits(lm, codes)
        state = lm.init_state(2)
        for t in range(20):
            out = step_frame(lm, state, grid[:, :, t], forced=grid[:, : 1 + dep_q, t + 1], return_logits=True)
            assert torch.equal(out.tokens, grid[:, : 1 + dep_q, t + 1])
            assert _rel(out.text_logits, text_ref[:, t]) < 1e-4
            assert _rel(out.audio_logits, audio_ref[:, :, t]) < 1e-4
    assert state.kv.pos.tolist() == [20, 20]


def test_chunked_prefill_equals_teacher_forced():
    cfg = _config(16)
    _, lm, _ = _pair(cfg)
    codes = _codes(cfg, B=2, T=23)
    with torch.no_grad():
        grid = lm.delay(codes)[:, :, :-1]
        full = lm.temporal(lm.embed(grid))
        cache = lm.init_state(2).kv
        chunks = [lm.temporal(lm.embed(grid[:, :, a:b]), cache) for a, b in [(0, 5), (5, 6), (6, 19), (19, 23)]]
    assert _rel(torch.cat(chunks, 1), full) < 1e-4


def test_batched_steps_equal_solo_runs_and_reset():
    cfg = _config(16)
    _, lm, _ = _pair(cfg)
    codes = _codes(cfg, B=3, T=12)
    with torch.no_grad():
        grid = lm.delay(codes)
        solo = []
        for b in range(3):
            state = lm.init_state(1)
            solo.append(torch.stack([step_frame(lm, state, grid[b:b + 1, :, t]).tokens[0] for t in range(12)]))
        state = lm.init_state(3)
        batched = []
        for t in range(12):
            if t == 6:  # conversation 1 restarts mid-way: its row starts over, the others are untouched
                state.kv.reset(torch.tensor([False, True, False]))
            column = grid[:, :, t].clone()
            if t >= 6:
                column[1] = grid[1, :, t - 6]
            batched.append(step_frame(lm, state, column).tokens)
        batched = torch.stack(batched, 1)  # (B, T, 1 + dep_q)
    assert torch.equal(batched[0], solo[0]) and torch.equal(batched[2], solo[2])
    assert torch.equal(batched[1, :6], solo[1][:6]) and torch.equal(batched[1, 6:], solo[1][:6])


def test_forced_tokens_feed_the_depformer_chain():
    cfg = _config(16)
    _, lm, _ = _pair(cfg)
    column = torch.tensor([lm.initial_token_ids])
    forced = torch.full((1, 17), NOT_FORCED)
    forced[0, 0] = 5
    with torch.no_grad():
        a = step_frame(lm, lm.init_state(1), column, forced=forced, return_logits=True)
        forced[0, 0] = 6
        b = step_frame(lm, lm.init_state(1), column, forced=forced, return_logits=True)
    assert a.tokens[0, 0] == 5 and b.tokens[0, 0] == 6
    assert torch.equal(a.text_logits, b.text_logits)
    assert not torch.allclose(a.audio_logits[:, 0], b.audio_logits[:, 0])


def test_snapshot_restore_replays_identically():
    cfg = _config(16)
    _, lm, _ = _pair(cfg)
    grid = lm.delay(_codes(cfg, B=1, T=10))
    with torch.no_grad():
        state = lm.init_state(1)
        for t in range(5):
            step_frame(lm, state, grid[:, :, t])
        saved = state.kv.snapshot()
        first = [step_frame(lm, state, grid[:, :, t]).tokens for t in range(5, 10)]
        state.kv.restore(saved)
        second = [step_frame(lm, state, grid[:, :, t]).tokens for t in range(5, 10)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
