"""Loss masks and weights, step-wide normalisation, LoRA (swap, merge, file), and `forward(prefix_embeddings)`."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from personaplex.config import TEXT_EPAD, TEXT_PAD, get_preset
from personaplex.lm import LMModel
from personaplex.lm.layers import ZERO_TOKEN
from personaplex.train.lora import (LoRAConfig, LoRAError, LoRALinear, apply_lora, apply_lora_file, lora_state_dict,
                                    merge_lora, save_lora_file)
from personaplex.train.loss import LossConfig, denominators, loss_parts, metrics, step_loss, target_weights
from personaplex.train.sample import Batch, TrainingSample, collate


@pytest.fixture(scope="module")
def lm():
    model = LMModel(get_preset("tiny"))
    model.init_weights(torch.Generator().manual_seed(0))
    return model


def _samples(lengths=(20, 14), prompt=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        codes = torch.randint(4, 500, (17, n), generator=g)
        codes[0, ::3] = TEXT_PAD
        codes[0, 1::5] = TEXT_EPAD
        out.append(TrainingSample(codes, prompt))
    return out


def test_weights_mask_prompt_padding_delays_and_user_streams(lm):
    c = lm.config
    batch = collate(_samples())
    text_w, audio_w = target_weights(batch, c, LossConfig())
    assert text_w.shape == (2, 1, 20) and audio_w.shape == (2, c.dep_q, 20)
    assert (text_w[:, :, :6] == 0).all() and (audio_w[:, :, :6] == 0).all()  # prompt
    assert (text_w[1, :, 14:] == 0).all() and (audio_w[1, :, 14:] == 0).all()  # after the second sample's end
    codes = batch.codes[0, 0]
    live = torch.arange(20) >= 6
    assert torch.equal(text_w[0, 0][live & (codes == TEXT_PAD)].unique(), torch.tensor([0.3]))
    assert torch.equal(text_w[0, 0][live & (codes == TEXT_EPAD)].unique(), torch.tensor([0.3]))
    assert torch.equal(text_w[0, 0][live & (codes > 3)].unique(), torch.tensor([1.0]))
    assert (audio_w[0, 0, 6:] == 1.0).all()  # semantic: delay 0, every frame
    assert (audio_w[0, 1:8, 6:19] == 0.02).all() and (audio_w[0, 1:8, 19] == 0).all()  # acoustic: not the last
    assert (audio_w[:, 8:] == 0).all()  # user codebooks stay out by default
    _, with_user = target_weights(batch, c, LossConfig(predict_user=True, epad_weight=0.5))
    assert (with_user[0, 8, 6:] == 1.0).all() and (with_user[0, 9:, 6:19] == 0.02).all()
    # Every weighted position is one the model predicts (its own masks), and the loss is finite.
    with torch.no_grad():
        out = lm(batch.codes)
    assert not ((text_w > 0) & ~out.text_mask).any() and not ((audio_w > 0) & ~out.audio_mask).any()
    parts = loss_parts(out, batch, text_w, audio_w, c)
    assert torch.isfinite(parts.text_num) and torch.isfinite(parts.audio_num)
    m = metrics(parts.stats)
    assert m["loss"] == pytest.approx(m["text"] + m["audio"]) and m["frames"] == 34


def test_padding_does_not_change_a_samples_loss(lm):
    """A sample alone or padded next to a longer one: same sums (padding never reaches a real position)."""
    c = lm.config
    long, short = _samples((24, 15))
    alone, padded = collate([short]), collate([long, short])
    with torch.no_grad():
        a = loss_parts(lm(alone.codes), alone, *target_weights(alone, c, LossConfig()), c)
        both = loss_parts(lm(padded.codes), padded, *target_weights(padded, c, LossConfig()), c)
        first = collate([long])
        b = loss_parts(lm(first.codes), first, *target_weights(first, c, LossConfig()), c)
    assert torch.allclose(a.stats + b.stats, both.stats, rtol=1e-5)


def test_step_loss_is_the_same_however_the_batch_is_split(lm):
    c = lm.config
    samples = _samples((18, 16, 20, 12), seed=3)
    model = LMModel(c)
    model.load_state_dict(lm.state_dict())

    def grads(groups):
        model.zero_grad()
        batches = [collate([samples[i] for i in g]) for g in groups]
        weights = [target_weights(b, c, LossConfig()) for b in batches]
        totals = denominators(weights)
        total = 0.0
        for b, (tw, aw) in zip(batches, weights):
            loss = step_loss(loss_parts(model(b.codes), b, tw, aw, c), totals)
            loss.backward()
            total += loss.item()
        return total, model.text_linear.weight.grad.clone()

    whole, g_whole = grads([[0, 1, 2, 3]])
    split, g_split = grads([[0], [1, 2], [3]])
    assert split == pytest.approx(whole, rel=1e-5)
    assert torch.allclose(g_split, g_whole, rtol=1e-4, atol=1e-7)


# -- LoRA -----------------------------------------------------------------------------------------------------
def test_lora_starts_at_the_base_model_and_merges_exactly(lm, tmp_path):
    codes = collate(_samples((16,))).codes
    model = LMModel(lm.config)
    model.load_state_dict(lm.state_dict())
    with torch.no_grad():
        before = model(codes).text_logits
    names = apply_lora(model, LoRAConfig(rank=4, alpha=8, targets="temporal"))
    assert len(names) == 4 * lm.config.num_layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{leaf}" for n in names for leaf in ("lora_a", "lora_b")}
    assert "transformer.layers.0.self_attn.in_proj.weight" in model.state_dict()  # base names kept
    with torch.no_grad():
        assert torch.equal(model(codes).text_logits, before)  # B = 0: exactly the base model
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(0, 0.05)
        adapted = model(codes).text_logits
    assert not torch.allclose(adapted, before)
    path = save_lora_file(tmp_path / "lora.safetensors", model, LoRAConfig(rank=4, alpha=8, targets="temporal"))
    state = lora_state_dict(model)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(lm.state_dict())
    with torch.no_grad():
        assert torch.allclose(model(codes).text_logits, adapted, atol=1e-4, rtol=1e-4)
    fresh = LMModel(lm.config)
    fresh.load_state_dict(lm.state_dict())
    apply_lora_file(fresh, path)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    assert len(state) == 2 * len(names)


def test_lora_targets(lm):
    model = LMModel(lm.config)
    assert len(apply_lora(model, LoRAConfig(targets="attention"))) == 2 * lm.config.num_layers
    model = LMModel(lm.config)
    every = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert apply_lora(model, LoRAConfig(targets="all")) == every
    with pytest.raises(LoRAError, match="match no linear layer"):
        apply_lora(LMModel(lm.config), LoRAConfig(targets="nothing.*"))


# -- prefix embeddings (LMModel.forward) ----------------------------------------------------------------------
def test_prefix_embeddings_replace_the_first_columns(lm):
    codes = collate(_samples((12,))).codes
    grid = lm.delay(codes)
    with torch.no_grad():
        plain = lm(codes)
        own = lm.embed(grid[:, :, :5])  # the tokens' own embeddings: nothing changes
        same = lm(codes, prefix_embeddings=own)
        kept = lm(codes, prefix_embeddings=torch.full((1, 5, lm.config.dim), float("nan")))  # NaN: keep tokens
        other = lm(codes, prefix_embeddings=torch.randn(1, 5, lm.config.dim))
    assert torch.allclose(same.text_logits[plain.text_mask], plain.text_logits[plain.text_mask], atol=1e-5)
    assert torch.equal(kept.text_logits[plain.text_mask], plain.text_logits[plain.text_mask])
    assert not torch.allclose(other.text_logits[0, 0, 6:], plain.text_logits[0, 0, 6:])
    with pytest.raises(ValueError, match="prefix_embeddings"):
        lm(codes, prefix_embeddings=torch.zeros(1, 5, lm.config.dim + 1))


def test_batch_mixes_voices_of_different_lengths():
    """collate NaN-fills the prefix of samples with fewer (or no) voice embeddings."""
    a, b = _samples((10, 12))
    a = dataclasses.replace(a, prefix=torch.ones(3, 64))
    batch = collate([a, b])
    assert batch.prefix.shape == (2, 3, 64)
    assert (batch.prefix[0] == 1).all() and torch.isnan(batch.prefix[1]).all()
    assert batch.codes[0, :, 10:].eq(ZERO_TOKEN).all() and isinstance(batch, Batch)
