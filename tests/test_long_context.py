"""Conversations longer than the context window: the pinned prompt keeps conditioning the model, exactly as
a fresh run of [prompt, latest frames] would; without pinning (the released behaviour) it is forgotten."""

from __future__ import annotations

import dataclasses

import torch

from personaplex.config import get_preset
from personaplex.lm import LMModel
from personaplex.lm.transformer import KVCache

CONTEXT, PROMPT = 16, 5


def _model(layers=2):
    cfg = dataclasses.replace(get_preset("tiny"), context=CONTEXT, num_layers=layers)
    lm = LMModel(cfg)
    lm.init_weights(torch.Generator().manual_seed(0))
    return lm.eval()


def _embeds(lm, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n, lm.config.dim, generator=g)


def _prompt_cache(lm, prompt, pin, batch=1):
    c = lm.config
    tmp = KVCache.empty(c.num_layers, 1, c.num_heads, prompt.shape[1], c.dim // c.num_heads)
    lm.temporal(prompt, tmp)
    cache = lm.init_state(batch).kv
    for row in range(batch):
        cache.load_prefix_(row, tmp.keys[:, 0], tmp.values[:, 0], pin=pin)
    return cache


@torch.no_grad()
def test_pinned_prompt_equals_fresh_run_of_prompt_and_latest_frames():
    # One layer: a frame's keys depend on itself only, so the window's content is exactly comparable with a
    # fresh run (deeper, cached keys also carry what earlier frames saw, as in any sliding window).
    lm = _model(layers=1)
    prompt, talk = _embeds(lm, PROMPT, 1), _embeds(lm, 40, 2)  # 40 frames: the window slides 2.5 times
    cache = _prompt_cache(lm, prompt, pin=True)
    for t in range(talk.shape[1]):
        out = lm.temporal(talk[:, t:t + 1], cache)
        kept = CONTEXT - PROMPT  # frames of talk that share the window with the prompt
        window = torch.cat([prompt, talk[:, max(0, t + 1 - kept): t + 1]], dim=1)
        fresh = lm.temporal(window)[:, -1:]  # positions restart at 0: only relative distances matter
        assert torch.allclose(out, fresh, atol=1e-5), t
    assert cache.pos.item() == PROMPT + 40


@torch.no_grad()
def test_prompt_still_conditions_after_the_window_wrapped():
    lm = _model()
    talk = _embeds(lm, 3 * CONTEXT, 3)
    outputs = {}
    for pin in (False, True):
        for seed in (10, 11):  # two different personas, the same conversation
            cache = _prompt_cache(lm, _embeds(lm, PROMPT, seed), pin=pin)
            outs = [lm.temporal(talk[:, t:t + 1], cache) for t in range(talk.shape[1])]
            outputs[pin, seed] = torch.cat(outs, dim=1)
    late = slice(2 * CONTEXT, None)  # long after the prompt left a plain window
    released = (outputs[False, 10][:, late] - outputs[False, 11][:, late]).abs().max()
    pinned = (outputs[True, 10][:, late] - outputs[True, 11][:, late]).abs().max()
    assert released < 1e-6  # plain sliding window: the persona is forgotten
    assert pinned > 1e-2  # pinned: still conditioned on it
    early = slice(0, CONTEXT - PROMPT)  # before the window slides, pinning changes nothing
    assert torch.allclose(outputs[True, 10][:, early], outputs[False, 10][:, early], atol=1e-6)


@torch.no_grad()
def test_pinned_and_plain_rows_share_a_batch():
    lm = _model()
    prompt, talk = _embeds(lm, PROMPT, 1), _embeds(lm, 30, 2).expand(2, -1, -1)
    cache = _prompt_cache(lm, prompt, pin=True, batch=2)
    cache.pinned[1] = cache.pinned_cpu[1] = 0  # row 1: released behaviour
    alone = {pin: _prompt_cache(lm, prompt, pin=pin) for pin in (True, False)}
    for t in range(30):
        both = lm.temporal(talk[:, t:t + 1], cache)
        assert torch.allclose(both[0], lm.temporal(talk[:1, t:t + 1], alone[True])[0], atol=1e-5)
        assert torch.allclose(both[1], lm.temporal(talk[:1, t:t + 1], alone[False])[0], atol=1e-5)
