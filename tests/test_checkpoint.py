"""Loading and saving the LM in the released layout: round trips, config.json, clear errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from personaplex.adapter import lm_to_released
from personaplex.checkpoint import load_lm, save_lm
from personaplex.config import LMConfig, get_preset, resolve_config
from personaplex.errors import CheckpointError
from personaplex.lm import LMModel


def _tiny_model(seed=0, **overrides) -> LMModel:
    cfg = dataclasses.replace(get_preset("tiny"), **overrides)
    lm = LMModel(cfg)
    lm.init_weights(torch.Generator().manual_seed(seed))
    return lm.eval()


def _codes(cfg, T=6):
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, cfg.card, (1, cfg.num_streams, T), generator=g)
    codes[:, 0] = torch.randint(0, cfg.text_card, (1, T), generator=g)
    return codes


def test_save_then_load_round_trip(tmp_path):
    lm = _tiny_model()
    save_lm(lm, tmp_path, dtype=None)
    assert (tmp_path / "model.safetensors").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["dep_q"] == 16
    loaded = load_lm(tmp_path, device="cpu")  # config.json is found beside the weights
    assert loaded.config == lm.config
    for key, value in lm.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    codes = _codes(lm.config)
    with torch.no_grad():
        assert torch.equal(loaded(codes).audio_logits.nan_to_num(), lm(codes).audio_logits.nan_to_num())


def test_saved_file_uses_released_names_and_bf16(tmp_path):
    lm = _tiny_model()
    save_lm(lm, tmp_path)  # default: bf16 like the released file
    state = load_file(str(tmp_path / "model.safetensors"))
    assert "transformer.layers.0.self_attn.in_proj_weight" in state
    assert "depformer.layers.1.gating.15.linear_out.weight" in state
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    loaded = load_lm(tmp_path / "model.safetensors", device="cpu", dtype=torch.float32)
    assert loaded.dtype == torch.float32
    ref = lm.state_dict()["text_emb.weight"].to(torch.bfloat16).float()
    assert torch.equal(loaded.state_dict()["text_emb.weight"], ref)


def test_load_is_built_on_meta_and_assigned(tmp_path):
    lm = _tiny_model()
    save_lm(lm, tmp_path, dtype=None)
    loaded = load_lm(tmp_path, device="cpu")
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    assert not any(p.is_meta for p in loaded.parameters())


def test_missing_tensor_is_named(tmp_path):
    state = lm_to_released(_tiny_model().state_dict())
    del state["depformer.layers.1.self_attn.out_proj.weight"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing tensor 'depformer\.layers\.1\.self_attn"):
        load_lm(tmp_path / "model.safetensors", config="tiny", device="cpu")


def test_config_mismatch_names_first_misshaped_tensor(tmp_path):
    save_lm(_tiny_model(), tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"tensor 'emb\.0\.weight' has shape \[2049, 64\], the model expects \[2049, 4096\]"):
        with torch.device("meta"):  # the 7B preset is never materialised: the header check fails first
            load_lm(tmp_path, device="meta")


def test_corrupt_and_truncated_files(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_lm(bad, config="tiny", device="cpu")
    save_lm(_tiny_model(), tmp_path / "good", dtype=None)
    data = (tmp_path / "good" / "model.safetensors").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_lm(bad, config="tiny", device="cpu")


def test_missing_directory_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_lm(tmp_path, config="tiny", device="cpu")


def test_moshi_config_json_and_presets(tmp_path):
    moshiko = get_preset("moshi-7b")
    path = tmp_path / "config.json"
    raw = moshiko.to_moshi_dict() | {"model_type": "moshi", "lm_gen_config": {"temp": 0.8}, "mimi_name": "x"}
    path.write_text(json.dumps(raw))
    assert resolve_config(path) == moshiko
    assert resolve_config("moshi-7b").dep_q == 8
    assert resolve_config(None).dep_q == 16
    with pytest.raises(ValueError, match="unknown model preset 'nope'; available: personaplex-7b"):
        resolve_config("nope")
    with pytest.raises(ValueError, match="gating='gelu' is not supported"):
        LMConfig.from_moshi_dict(raw | {"gating": "gelu"})
    with pytest.raises(ValueError, match="delays has 3 entries"):
        LMConfig(delays=[0, 1, 1])
