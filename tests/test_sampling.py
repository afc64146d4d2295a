from __future__ import annotations

import pytest
import torch

from personaplex.engine.sampling import SamplingParams, sample, uniform_noise


def _rows(B, temp, k, seed=0):
    return (torch.full((B,), temp), torch.full((B,), k, dtype=torch.long),
            torch.full((B,), seed, dtype=torch.long), torch.arange(B, dtype=torch.long))


def test_noise_is_uniform_and_keyed():
    seeds = torch.tensor([1, 1, 2]); counters = torch.tensor([5, 6, 5])
    u = uniform_noise(seeds, counters, stream=3, vocab=20000)
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert torch.equal(u[0], uniform_noise(seeds[:1], counters[:1], 3, 20000)[0])
    assert not torch.equal(u[0], uniform_noise(seeds[:1], counters[:1], 4, 20000)[0])


def test_samples_follow_softmax_within_topk():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 40000
    temp, k, seed, counter = _rows(n, 0.8, 4)
    tokens = sample(logits.expand(n, -1), temp, k, seed, counter, stream=0)
    freq = torch.bincount(tokens, minlength=6).float() / n
    expected = torch.softmax(logits[:4] / 0.8, dim=0)
    assert freq[4:].sum() == 0  # outside the top 4: never drawn
    assert torch.allclose(freq[:4], expected, atol=0.01)


def test_greedy_rows_and_batch_invariance():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 100, generator=g)
    temp = torch.tensor([0.0, 0.7, 0.7]); k = torch.tensor([25, 1, 25])
    seed = torch.tensor([7, 7, 9]); counter = torch.tensor([0, 0, 3])
    out = sample(logits, temp, k, seed, counter, stream=1)
    assert out[0] == logits[0].argmax() and out[1] == logits[1].argmax()
    alone = sample(logits[2:], temp[2:], k[2:], seed[2:], counter[2:], stream=1)
    assert out[2] == alone[0]  # a row's draw does not depend on its neighbours
    again = sample(logits, temp, k, seed, counter, stream=1)
    assert torch.equal(out, again)


def test_params_validation():
    assert SamplingParams().validate().text_topk == 25
    with pytest.raises(ValueError, match="text_topk"):
        SamplingParams(text_topk=0).validate()
    with pytest.raises(ValueError, match="audio_temperature"):
        SamplingParams(audio_temperature=-1).validate()
