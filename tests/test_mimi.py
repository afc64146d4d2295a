"""Mimi codec against the reference implementation (`moshi==0.2.13`) on random weights, CPU.

The reference initialises its codebooks to zero (every code would be 0), so the fixtures give them random
vectors at the latent's scale before anything is compared.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from personaplex.codec import (
    Mimi,
    MimiConfig,
    MimiDecoderState,
    MimiEncoderState,
    mimi_from_released,
    mimi_to_released,
)
from personaplex.checkpoint import load_mimi, save_mimi
from personaplex.opcount import NoHostSync, count_ops

loaders = pytest.importorskip("moshi.models.loaders")
safetensors_torch = pytest.importorskip("safetensors.torch")

FRAME = 1920


def _randomize_codebooks(ref: torch.nn.Module, scale: float) -> None:
    buffers = dict(ref.named_buffers())
    with torch.no_grad():
        for name, buf in buffers.items():
            if name.endswith("embedding_sum"):
                usage = buffers[name.replace("embedding_sum", "cluster_usage")]
                usage.copy_(torch.rand_like(usage) + 0.5)
                buf.copy_(torch.randn_like(buf) * scale * usage[:, None])


def _signal(batch: int, frames: int, seed: int, extra: int = 0) -> torch.Tensor:
    """Noise plus a chirp, amplitude ~0.1-0.4, different for each row."""
    g = torch.Generator().manual_seed(seed)
    n = frames * FRAME + extra
    t = torch.arange(n) / 24_000
    rows = []
    for b in range(batch):
        f0 = 150.0 + 90.0 * b + 40.0 * seed
        chirp = 0.3 * torch.sin(2 * math.pi * (f0 * t + 300.0 * t**2))
        rows.append(chirp + 0.1 * torch.randn(n, generator=g))
    return torch.stack(rows)[:, None, :]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _ref_stream_encode(ref, pcm: torch.Tensor, frames_per_step: int = 1) -> torch.Tensor:
    step = FRAME * frames_per_step
    with torch.no_grad(), ref.streaming(pcm.shape[0]):
        return torch.cat([ref.encode(pcm[..., i : i + step]) for i in range(0, pcm.shape[-1], step)], dim=-1)


def _ref_stream_decode(ref, codes: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), ref.streaming(codes.shape[0]):
        return torch.cat([ref.decode(codes[..., i : i + 1]) for i in range(codes.shape[-1])], dim=-1)


def _stream_encode(mimi: Mimi, pcm: torch.Tensor, state: MimiEncoderState, frames_per_step: int = 1) -> torch.Tensor:
    step = FRAME * frames_per_step
    return torch.cat([mimi.encode_step(pcm[..., i : i + step], state) for i in range(0, pcm.shape[-1], step)], -1)


def _stream_decode(mimi: Mimi, codes: torch.Tensor, state: MimiDecoderState) -> torch.Tensor:
    return torch.cat([mimi.decode_step(codes[..., i : i + 1], state) for i in range(codes.shape[-1])], dim=-1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(reference, ours, path of the reference's weights saved in the released layout)."""
    torch.manual_seed(1234)
    ref = loaders.get_mimi(None, device="cpu")
    _randomize_codebooks(ref, 0.01)
    path = tmp_path_factory.mktemp("mimi") / "tokenizer-random.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    ours = load_mimi(path)
    return ref, ours, path


@pytest.fixture(scope="module")
def pcm() -> torch.Tensor:
    return _signal(1, 4, seed=0)


@pytest.fixture(scope="module")
def ref_codes(models, pcm) -> torch.Tensor:
    ref, _, _ = models
    with torch.no_grad():
        return ref.encode(pcm)


def test_config_defaults_are_the_released_mimi():
    cfg = MimiConfig()
    assert cfg.frame_size == 1920 and cfg.hop_length == 960 and cfg.resample_stride == 2
    assert cfg.to_moshi_dict()["seanet"] == {**loaders._seanet_kwargs, "ratios": [8, 6, 5, 4]}
    assert cfg.to_moshi_dict()["transformer"] == loaders._transformer_kwargs
    assert cfg.to_moshi_dict()["quantizer"] == loaders._quantizer_kwargs
    with pytest.raises(ValueError, match="available: mimi, tiny"):
        MimiConfig.preset("big")


def test_released_names_round_trip(models, tmp_path):
    ref, ours, path = models
    released = safetensors_torch.load_file(str(path))
    assert len(released) == 318
    back = mimi_to_released(mimi_from_released(released))
    assert set(back) == set(released)
    for key, value in released.items():
        assert back[key].shape == value.shape and torch.equal(back[key], value), key

    # Saving ours gives a file the reference loads strictly, with equal values (quantizer buffers included).
    out = tmp_path / "saved.safetensors"
    save_mimi(ours, out)
    saved = safetensors_torch.load_file(str(out))
    ref_state = ref.state_dict()
    assert set(saved) == set(ref_state)
    assert all(saved[k].shape == ref_state[k].shape and torch.equal(saved[k], ref_state[k]) for k in ref_state)
    other = loaders.get_mimi(None, device="cpu")
    other.load_state_dict(saved, strict=True)


def test_legacy_attention_names_load(models):
    _, ours, _ = models
    legacy = mimi_to_released(ours.state_dict(), legacy_attention_names=True)
    assert any(k.endswith("self_attn.in_proj_weight") for k in legacy)
    assert not any(".in_projs." in k or ".out_projs." in k for k in legacy)
    state = mimi_from_released(legacy)
    own = ours.state_dict()
    assert set(state) == set(own) and all(torch.equal(state[k], own[k]) for k in own)
    with pytest.raises(KeyError, match="not a Mimi checkpoint key"):
        mimi_from_released({**legacy, "encoder.model.0.conv.conv.alpha": torch.zeros(1)})


def test_batch_encode_matches_reference(models, pcm, ref_codes):
    ref, ours, _ = models
    codes = ours.encode(pcm)
    assert codes.shape == (1, 8, 4) and codes.dtype == torch.int64
    assert torch.equal(codes, ref_codes)
    assert len(torch.unique(codes)) > 8  # the codebooks are really exercised
    # Whole-signal encode pads to a whole number of frames (ceil), like the reference.
    short = pcm[..., : 2 * FRAME + 700]
    with torch.no_grad():
        expected = ref.encode(short)
    assert expected.shape[-1] == 3
    assert torch.equal(ours.encode(short), expected)


def test_streaming_encode_matches_reference_and_batch(models, pcm, ref_codes):
    ref, ours, _ = models
    ref_stream = _ref_stream_encode(ref, pcm)
    assert torch.equal(ref_stream, ref_codes)  # the reference's own streaming == batch property
    with ours.streaming(1) as stream:
        ours_stream = torch.cat([stream.encode(pcm[..., i : i + FRAME]) for i in range(0, pcm.shape[-1], FRAME)], -1)
        assert torch.equal(ours.encode(pcm), ref_codes)  # the module keeps no state: still whole-signal
    assert torch.equal(ours_stream, ref_stream)
    # Several frames per step give the same codes.
    assert torch.equal(_stream_encode(ours, pcm, ours.init_encoder_state(1), frames_per_step=2), ref_stream)


def test_decode_matches_reference(models, ref_codes):
    ref, ours, _ = models
    with torch.no_grad():
        ref_batch = ref.decode(ref_codes)
    ours_batch = ours.decode(ref_codes)
    assert ours_batch.shape == (1, 1, 4 * FRAME)
    assert _rel(ours_batch, ref_batch) < 1e-4
    ref_stream = _ref_stream_decode(ref, ref_codes)
    stream = ours.stream(1)
    ours_stream = torch.cat([stream.decode(ref_codes[..., i : i + 1]) for i in range(4)], dim=-1)
    assert _rel(ours_stream, ref_stream) < 1e-4
    assert _rel(ours_stream, ours_batch) < 1e-4


def test_batch_of_two_equals_each_item(models):
    _, ours, _ = models
    pcm = _signal(2, 3, seed=1)
    codes = ours.encode(pcm)
    singles = [ours.encode(pcm[i : i + 1]) for i in range(2)]
    assert not torch.equal(singles[0], singles[1])
    assert torch.equal(codes, torch.cat(singles))
    stream = _stream_encode(ours, pcm, ours.init_encoder_state(2))
    assert torch.equal(stream, codes)
    audio = _stream_decode(ours, codes, ours.init_decoder_state(2))
    for i in range(2):
        single = _stream_decode(ours, codes[i : i + 1], ours.init_decoder_state(1))
        assert _rel(audio[i : i + 1], single) < 1e-5


def test_reset_restarts_only_masked_rows(models):
    _, ours, _ = models
    pcm = _signal(2, 4, seed=2)
    enc, dec = ours.init_encoder_state(2), ours.init_decoder_state(2)
    first = _stream_encode(ours, pcm[..., : 2 * FRAME], enc)
    _stream_decode(ours, first, dec)
    mask = torch.tensor([False, True])
    enc.reset(mask)
    dec.reset(mask)
    second = _stream_encode(ours, pcm[..., 2 * FRAME :], enc)
    audio = _stream_decode(ours, second, dec)

    # Row 0 continued as if nothing happened; row 1 behaves like a fresh stream on the last two frames.
    uninterrupted = _stream_encode(ours, pcm[:1], ours.init_encoder_state(1))
    fresh = _stream_encode(ours, pcm[1:, :, 2 * FRAME :], ours.init_encoder_state(1))
    assert torch.equal(second[:1], uninterrupted[..., 2:])
    assert torch.equal(second[1:], fresh)
    fresh_audio = _stream_decode(ours, second[1:], ours.init_decoder_state(1))
    assert _rel(audio[1:], fresh_audio) < 1e-5


def test_snapshot_restore_and_batch_surgery(models):
    _, ours, _ = models
    pcm = _signal(2, 3, seed=3)
    enc = ours.init_encoder_state(2)
    ours.encode_step(pcm[..., :FRAME], enc)
    snap = enc.snapshot()
    after = ours.encode_step(pcm[..., FRAME : 2 * FRAME], enc)
    enc.restore(snap)
    assert torch.equal(ours.encode_step(pcm[..., FRAME : 2 * FRAME], enc), after)

    # Split the batch into rows and merge it back in the other order: each row keeps its own stream.
    rows = [snap.index_select([i]) for i in range(2)]
    swapped = MimiEncoderState.cat([rows[1], rows[0]])
    assert swapped.batch_size == 2
    out = ours.encode_step(pcm[[1, 0], :, FRAME : 2 * FRAME], swapped)
    assert torch.equal(out, after[[1, 0]])
    alone = ours.encode_step(pcm[:1, :, FRAME : 2 * FRAME], rows[0])
    assert torch.equal(alone, after[:1])


@pytest.fixture(scope="module")
def tiny() -> Mimi:
    """The tiny preset with random codebooks: same code paths as the released shape, fast steps."""
    torch.manual_seed(11)
    mimi = Mimi(MimiConfig.preset("tiny")).eval()
    _randomize_codebooks(mimi, 0.03)
    return mimi


def _storage(stream) -> list[tuple[int, tuple[int, ...]]]:
    return [(t.data_ptr(), tuple(t.shape)) for st in (stream.encoder_state, stream.decoder_state) for t, _ in st.tensors()]


def test_state_is_updated_in_place(tiny):
    """Steps and row operations write into the preallocated state: no tensor is replaced or reallocated."""
    ours = tiny
    pcm = _signal(3, 3, seed=8)
    stream, other = ours.stream(3), ours.stream(1)
    before = _storage(stream)
    snap = stream.snapshot()
    for i in range(2):
        stream.decode(stream.encode(pcm[..., i * FRAME : (i + 1) * FRAME]))
    other.decode(other.encode(pcm[:1, :, :FRAME]))
    stream.reset_row(1)
    stream.copy_row(0, stream, 2)
    stream.load_row(2, other)
    stream.reset(torch.tensor([False, True, False]))
    stream.restore(snap)
    assert _storage(stream) == before
    assert len(before) == 2 * 11 + 2 + 2 + 2 * 6 + 4 + 1 + 2 + 2  # conv states, positions, KV caches


def test_row_operations_equal_a_fresh_or_the_source_stream(tiny):
    ours = tiny
    pcm = _signal(3, 4, seed=9)
    frame = lambda x, i: x[..., i * FRAME : (i + 1) * FRAME]  # noqa: E731
    stream = ours.stream(3)
    for i in range(2):
        stream.decode(stream.encode(frame(pcm, i)))
    single = ours.stream(1)  # row 2's signal alone, one frame in
    single.decode(single.encode(frame(pcm[2:], 0)))

    stream.reset_row(0)  # row 0: a fresh stream from frame 2 on
    stream.copy_row(1, stream, 2)  # row 1: continues row 2's stream
    stream.load_row(2, single)  # row 2: continues the batch-1 stream
    x = torch.cat([frame(pcm[:1], 2), frame(pcm[2:], 2), frame(pcm[2:], 1)])
    codes = stream.encode(x)
    audio = stream.decode(codes)
    assert len(torch.unique(codes)) > 4  # the codebooks are exercised ...
    assert _rel(audio[1:2], ours.stream(1).decode(codes[1:2])) > 1e-3  # ... and the state matters

    fresh = ours.stream(1)
    assert torch.equal(codes[:1], fresh.encode(x[:1]))
    assert _rel(audio[:1], fresh.decode(codes[:1])) < 1e-5
    source = ours.stream(1)  # row 2 of the first batch, replayed alone
    for i in range(2):
        source.decode(source.encode(frame(pcm[2:], i)))
    assert torch.equal(codes[1:2], source.encode(x[1:2]))
    assert _rel(audio[1:2], source.decode(codes[1:2])) < 1e-5
    assert torch.equal(codes[2:], single.encode(x[2:]))
    assert _rel(audio[2:], single.decode(codes[2:])) < 1e-5


def test_state_from_inference_mode_is_usable_outside_it(tiny):
    ours = tiny
    pcm = _signal(1, 2, seed=10)
    with torch.inference_mode():
        stream = ours.stream(1)
        first = stream.encode(pcm[..., :FRAME])
        snap = stream.snapshot()
    assert not any(t.is_inference() for t, _ in stream.encoder_state.tensors())
    second = stream.encode(pcm[..., FRAME:])  # stepped outside inference mode, in place
    stream.restore(snap)
    assert torch.equal(stream.encode(pcm[..., FRAME:]), second)
    stream.reset_row(0)
    assert torch.equal(stream.encode(pcm[..., :FRAME]), first)


def test_row_operation_errors(tiny):
    ours = tiny
    stream = ours.stream(2)
    with pytest.raises(IndexError, match=r"row must be an int in \[0, 2\)"):
        stream.reset_row(2)
    with pytest.raises(IndexError, match="src_row"):
        stream.copy_row(0, ours.stream(1), 1)
    with pytest.raises(ValueError, match="use load_row"):
        stream.encoder_state.restore(ours.init_encoder_state(1))
    with pytest.raises(ValueError, match="differ in structure"):
        stream.encoder_state.copy_row(0, ours.init_decoder_state(1), 0)


@pytest.fixture(scope="module")
def meta_mimi() -> Mimi:
    with torch.device("meta"):
        return Mimi(MimiConfig()).eval()


def test_steps_run_on_meta_without_host_sync(meta_mimi):
    """The released shape, built on the meta device: a step reads no value back and has no data-dependent
    shape (the CPU-only range check of codes is skipped), and neither do the row operations."""
    stream = meta_mimi.stream(4)
    pcm = torch.empty(4, 1, 2 * FRAME, device="meta")
    with NoHostSync():
        codes = stream.encode(pcm)
        audio = stream.decode(codes)
        stream.reset_row(1)
        stream.copy_row(0, stream, 3)
        stream.load_row(2, meta_mimi.stream(1))
        stream.reset(torch.tensor([True, False, False, True]))
        audio = stream.decode(stream.encode(pcm[..., :FRAME]))
    assert codes.shape == (4, 8, 2) and codes.dtype == torch.int64 and audio.shape == (4, 1, FRAME)


# Non-view aten operations of one streaming encode + decode of an 80 ms frame at the released shape (see
# personaplex.opcount for what counts; attention is one operation). 395 when written; was ~750.
MAX_OPS_PER_TICK = 400


@pytest.mark.parametrize("batch", [1, 64])
def test_ops_per_tick(meta_mimi, batch):
    stream = meta_mimi.stream(batch)
    pcm = torch.empty(batch, 1, FRAME, device="meta")
    stream.decode(stream.encode(pcm))  # first call: builds the codebook tables and rotary frequencies
    counts = count_ops(lambda: stream.decode(stream.encode(pcm)))
    total = sum(counts.values())
    assert 300 < total <= MAX_OPS_PER_TICK, counts.most_common(12)


def test_errors_say_what_was_expected(models):
    _, ours, _ = models
    with pytest.raises(ValueError, match=r"\(batch, 1, samples\)"):
        ours.encode(torch.zeros(1, FRAME))
    with pytest.raises(ValueError, match="multiple of 1920"):
        ours.encode_step(torch.zeros(1, 1, 1000), ours.init_encoder_state(1))
    with ours.streaming(1) as stream:
        with pytest.raises(ValueError, match="multiple of 1920"):
            stream.encode(torch.zeros(1, 1, FRAME + 1))
        assert ours.encode(torch.zeros(1, 1, FRAME + 1)).shape == (1, 8, 2)  # whole-signal: padded
    with pytest.raises(ValueError, match="positive int"):
        ours.stream(0)
    with pytest.raises(ValueError, match="batch size 2"):
        ours.encode_step(torch.zeros(2, 1, FRAME), ours.init_encoder_state(1))
    with pytest.raises(ValueError, match="integer codes"):
        ours.decode(torch.zeros(1, 8, 2))
    with pytest.raises(ValueError, match=r"codes must be in \[0, 2048\)"):
        ours.decode(torch.full((1, 8, 2), 2048))
    with pytest.raises(ValueError, match="between 1 and 32 codebooks"):
        ours.decode(torch.zeros(1, 33, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="bool mask of shape"):
        ours.init_decoder_state(2).reset(torch.tensor([True]))


def test_attention_window_wraps_like_the_reference():
    """Tiny config with a 6-step window: 10 frames wrap the ring KV cache several times.

    The reference writes a step's keys before attending, so after the window is full the first token of each
    frame sees one past position fewer than in whole-signal mode; streaming must reproduce that exactly.
    """
    cfg = MimiConfig.preset("tiny")
    torch.manual_seed(5)
    ref = loaders.get_mimi(None, mimi_config=cfg.to_moshi_dict(), device="cpu", num_codebooks=cfg.num_codebooks)
    _randomize_codebooks(ref, 0.01)
    ours = Mimi(cfg).eval()
    ours.load_state_dict(mimi_from_released(ref.state_dict()))
    pcm = _signal(1, 10, seed=4)

    ref_stream = _ref_stream_encode(ref, pcm)
    assert torch.equal(_stream_encode(ours, pcm, ours.init_encoder_state(1)), ref_stream)
    with torch.no_grad():
        assert torch.equal(ours.encode(pcm), ref.encode(pcm))

    ref_audio = _ref_stream_decode(ref, ref_stream)
    ours_audio = _stream_decode(ours, ref_stream, ours.init_decoder_state(1))
    with torch.no_grad():
        ref_batch_audio = ref.decode(ref_stream)
    assert _rel(ours_audio, ref_audio) < 1e-5  # streaming semantics are the reference's ...
    assert _rel(ref_audio, ref_batch_audio) > 1e-5  # ... which differ from whole-signal decoding here
    assert _rel(ours.decode(ref_stream), ref_batch_audio) < 1e-5


def test_key_mapping_follows_the_reference_layout_for_other_shapes():
    """Two residual units per stage shift the reference's Sequential indices; the mapping recovers them."""
    cfg = dataclasses.replace(MimiConfig.preset("tiny"), n_residual_layers=2)
    torch.manual_seed(6)
    ref = loaders.get_mimi(None, mimi_config=cfg.to_moshi_dict(), device="cpu", num_codebooks=cfg.num_codebooks)
    _randomize_codebooks(ref, 0.01)
    ours = Mimi(cfg).eval()
    ours.load_state_dict(mimi_from_released(ref.state_dict()), strict=True)
    back = mimi_to_released(ours.state_dict())
    ref_state = ref.state_dict()
    assert set(back) == set(ref_state) and all(torch.equal(back[k], ref_state[k]) for k in ref_state)
    pcm = _signal(1, 2, seed=7)
    with torch.no_grad():
        assert torch.equal(ours.encode(pcm), ref.encode(pcm))
        assert _rel(ours.decode(ref.encode(pcm)), ref.decode(ref.encode(pcm))) < 1e-5
