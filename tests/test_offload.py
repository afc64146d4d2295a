"""`--offload`: temporal layers kept in host memory and streamed in ahead of use. On CPU the same path runs
(pinning skipped, the copy a host copy): logits and generated tokens identical to the plain model, at most two
blocks' weights "on the device" at once, and every block fetched once per pass."""

from __future__ import annotations

import torch

from personaplex.checkpoint import load_checkpoint, load_lm
from personaplex.lm import step_frame
from personaplex.offload import offload_of
from personaplex.quantize import weights_info


def _codes(cfg, T=5, seed=2):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, cfg.card, (1, cfg.num_streams, T), generator=g)
    codes[:, 0] = torch.randint(0, cfg.text_card, (1, T), generator=g)
    return codes


def test_offloaded_logits_and_steps_are_identical(demo_dir):
    plain = load_lm(demo_dir, device="cpu")
    offloaded = load_lm(demo_dir, device="cpu", offload=True)
    streamer = offload_of(offloaded)
    layers = len(offloaded.transformer.layers)
    assert streamer is not None and streamer.resident == 0
    # At rest, every temporal weight is the host copy (not a device one).
    hosts = {id(p) for slot in streamer.slots for _, _, p in slot.params}
    assert {id(p) for p in offloaded.transformer.parameters()} == hosts

    codes = _codes(plain.config)
    with torch.no_grad():
        a, b = plain(codes), offloaded(codes)
    assert torch.equal(a.text_logits.nan_to_num(), b.text_logits.nan_to_num())
    assert torch.equal(a.audio_logits.nan_to_num(), b.audio_logits.nan_to_num())
    assert streamer.max_resident <= 2
    assert streamer.fetches == layers + 1  # each block once, and the first again for the next pass

    # The single-frame step (Block.step, called directly) streams too, and generates the same tokens.
    states = [lm.init_state(1) for lm in (plain, offloaded)]
    column = torch.tensor([plain.initial_token_ids])
    for _ in range(4):
        outs = [step_frame(lm, s, column, return_logits=True, num_codebooks=8)
                for lm, s in zip((plain, offloaded), states)]
        assert torch.equal(outs[0].tokens, outs[1].tokens)
        assert torch.equal(outs[0].text_logits, outs[1].text_logits)
        column = torch.cat([outs[0].tokens[:, :9], torch.zeros(1, 8, dtype=torch.long)], dim=1)
    assert streamer.max_resident <= 2 and streamer.resident == 1  # between frames: the prefetched first block
    assert streamer.fetches == layers + 1 + 4 * layers  # one pass over the blocks per frame


def test_offload_with_int8_and_what_it_streams(demo_dir):
    ckpt = load_checkpoint(demo_dir, device="cpu", quantize="int8", offload=True)
    info = weights_info(ckpt.lm)
    streamer = offload_of(ckpt.lm)
    assert info["precision"].startswith("int8 weights")
    assert info["offloaded_bytes"] == streamer.streamed_bytes() > 0
    c = ckpt.lm.config
    d, h = c.dim, c.hidden_dim
    weights = 4 * d * d + 3 * h * d  # int8: one byte each (in_proj, out_proj, linear_in, linear_out)
    rows = (3 * d + d + 2 * h + d) * 5  # an fp32 scale and an int8 zero point per output row
    norms = 2 * d * 4  # fp32
    assert streamer.streamed_bytes() == c.num_layers * (weights + rows + norms)
    plain = load_lm(demo_dir, device="cpu", quantize="int8")
    codes = _codes(c)
    with torch.no_grad():
        assert torch.equal(ckpt.lm(codes).audio_logits.nan_to_num(), plain(codes).audio_logits.nan_to_num())
