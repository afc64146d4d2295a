"""Activation checkpointing is applied from outside the model (train/parallel.py): same loss and gradients,
same state-dict names, and a run checkpoint written with it reloads without it (and back)."""

from __future__ import annotations

import copy

import torch

from personaplex.config import get_preset
from personaplex.lm import LMModel
from personaplex.train.parallel import Dist, checkpoint_activations, load_model_state, save_run_state


def _model() -> LMModel:
    torch.manual_seed(0)
    lm = LMModel(get_preset("tiny"))
    lm.init_weights()
    return lm.train()


def _loss(lm: LMModel, codes: torch.Tensor) -> torch.Tensor:
    out = lm(codes)
    text = out.text_logits[out.text_mask].float()
    audio = out.audio_logits[out.audio_mask].float()
    return text.square().mean() + audio.square().mean()


def test_checkpointed_blocks_give_the_same_gradients_and_names(tmp_path):
    plain = _model()
    wrapped = checkpoint_activations(copy.deepcopy(plain))
    assert type(wrapped.transformer.layers[0]).__name__ == "CheckpointWrapper"
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    c = plain.config
    codes = torch.randint(0, c.card, (2, c.num_streams, 12), generator=torch.Generator().manual_seed(1))
    codes[:, 0] %= c.text_card
    a, b = _loss(plain, codes), _loss(wrapped, codes)
    a.backward()
    b.backward()
    assert torch.equal(a, b)
    grads = {n: p.grad for n, p in plain.named_parameters()}
    for name, p in wrapped.named_parameters():
        torch.testing.assert_close(p.grad, grads[name.replace("_checkpoint_wrapped_module.", "")],
                                   rtol=0, atol=1e-6)
    # A run checkpoint saved with checkpointing loads into a model without it, and the other way round.
    save_run_state(tmp_path / "ckpt", wrapped, torch.optim.SGD(wrapped.parameters()), {"step": 0}, Dist())
    fresh = _model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    load_model_state(tmp_path / "ckpt", fresh)
    assert all(torch.equal(x, y) for x, y in zip(fresh.state_dict().values(), plain.state_dict().values()))
    save_run_state(tmp_path / "ckpt2", plain, torch.optim.SGD(plain.parameters()), {"step": 0}, Dist())
    load_model_state(tmp_path / "ckpt2", checkpoint_activations(_model()))
