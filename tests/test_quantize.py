"""int8 / fp8 weight-only quantisation while loading (torchao): coverage, exactness of the blockwise int8,
memory of the full 7B layout, peak RSS and logits on a reduced-depth checkpoint of the real widths, and a
quantised conversation in the engine, `offline` and the server."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")

from conftest import speech_like  # noqa: E402
from personaplex import quantize as quant  # noqa: E402
from personaplex.checkpoint import load_checkpoint, load_lm, save_lm, write_random_lm  # noqa: E402
from personaplex.cli import main  # noqa: E402
from personaplex.config import get_preset  # noqa: E402
from personaplex.errors import CheckpointError  # noqa: E402
from personaplex.lm import LMModel  # noqa: E402
from personaplex.quantize import QuantizeError, precision, quantize_weight, weight_bytes  # noqa: E402

# Reduced depth at the real widths (dim 4096, FFN 11264, depformer 1024 / 2816): 2 of the 32 temporal layers,
# one depformer layer of 2 steps, and smaller vocabularies (text 4000, audio 256) so the file is 1 GB.
REDUCED = dataclasses.replace(get_preset("personaplex-7b"), num_layers=2, depformer_num_layers=1, dep_q=2,
                              text_card=4000, card=256)
# int8 against bf16 logits on the same random weights, relative (Frobenius) error. Measured at the real widths
# (REDUCED, bf16 activations): text 0.026, audio 0.036, where bf16 itself is 0.010 / 0.013 from an fp32
# computation of the same weights; the tiny model (fp32 activations): 0.018 / 0.020.
INT8_LOGIT_REL_ERROR = 0.05


def _codes(cfg, T=6, seed=5):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, cfg.card, (1, cfg.num_streams, T), generator=g)
    codes[:, 0] = torch.randint(0, cfg.text_card, (1, T), generator=g)
    return codes


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().nan_to_num(), b.float().nan_to_num()
    return float((a - b).norm() / b.norm())


# -- small checks ---------------------------------------------------------------------------------------------
def test_blockwise_int8_equals_torchao_int8_weight_only(monkeypatch):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    monkeypatch.setattr(quant, "_BLOCK_ELEMENTS", 3 * 96)  # 3 rows per block: many blocks, a ragged last one
    w = torch.randn(50, 96, generator=torch.Generator().manual_seed(0))
    ours = quantize_weight(w.to(torch.bfloat16), "int8", "cpu", torch.float32)
    lin = nn.Linear(96, 50, bias=False)
    lin.weight = nn.Parameter(w.to(torch.bfloat16).float())
    quantize_(lin, Int8WeightOnlyConfig(set_inductor_config=False))
    theirs = lin.weight
    assert quant.weight_format(ours) == "int8"
    for leaf in ("qdata", "scale", "zero_point"):
        assert torch.equal(getattr(ours, leaf), getattr(theirs, leaf)), leaf
    x = torch.randn(4, 96)
    assert torch.equal(nn.functional.linear(x, ours), lin(x))


def test_int8_load_quantises_every_linear_and_nothing_else(demo_dir):
    lm = load_lm(demo_dir, device="cpu", quantize="int8")
    c = lm.config
    formats = {name: quant.weight_format(p) for name, p in lm.named_parameters()}
    int8 = sorted(n for n, f in formats.items() if f == "int8")
    expected = (4 * c.num_layers + 1 + c.dep_q + 4 * c.depformer_num_layers * c.dep_q + c.dep_q)
    assert len(int8) == expected
    assert all(n.endswith(".weight") and "emb" not in n and "norm" not in n for n in int8)
    others = {f for n, f in formats.items() if n not in int8}
    assert others == {"float32"}  # embeddings and norms keep the load dtype
    assert precision(lm) == "int8 weights (torchao weight-only, per-row scales), float32 activations"
    reference = load_lm(demo_dir, device="cpu")
    codes = _codes(c)
    with torch.no_grad():
        q, r = lm(codes), reference(codes)
    assert _rel(q.text_logits, r.text_logits) < INT8_LOGIT_REL_ERROR
    assert _rel(q.audio_logits, r.audio_logits) < INT8_LOGIT_REL_ERROR
    with pytest.raises(CheckpointError, match="quantised model cannot be saved"):
        save_lm(lm, demo_dir / "never")


def test_full_7b_layout_int8_takes_about_half_the_bf16_bytes(monkeypatch):
    """On the meta device (shapes only): the real 7B's int8 weights plus bf16 embeddings and norms."""
    monkeypatch.setattr(quant, "_BLOCK_ELEMENTS", 1 << 40)  # meta tensors take no memory: one block each
    with torch.device("meta"):
        lm = LMModel(get_preset("personaplex-7b"), dtype=torch.bfloat16)
    bf16 = weight_bytes(lm)
    assert abs(bf16 - 16.7e9) < 0.1e9
    by_shape = {}  # the int8 layout depends only on the shape: quantise one weight of each (7 shapes)
    for name in quant.quantized_module_names(lm):
        module = lm.get_submodule(name)
        shape = tuple(module.weight.shape)
        if shape not in by_shape:
            by_shape[shape] = quantize_weight(module.weight, "int8", "meta", torch.bfloat16)
        module.weight = nn.Parameter(by_shape[shape].detach(), requires_grad=False)  # a parameter of its own
    assert len(list(lm.parameters())) == len(list(lm.named_parameters(remove_duplicate=False)))
    ratio = weight_bytes(lm) / bf16
    assert 0.50 < ratio < 0.55, ratio  # 0.52: 8.04 B int8 weights + 0.33 B bf16 embedding rows


def test_fp8_needs_a_capable_gpu_and_unknown_modes_are_refused(demo_dir, tmp_path, capsys):
    with pytest.raises(QuantizeError, match=r"fp8 needs a GPU with compute capability >= 8\.9"):
        load_lm(demo_dir, device="cpu", quantize="fp8")
    with pytest.raises(QuantizeError, match="unknown quantisation 'int4'"):
        load_lm(demo_dir, device="cpu", quantize="int4")
    code = main(["info", "--checkpoint", str(demo_dir), "--device", "cpu", "--quantize", "fp8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "fp8 needs a GPU with compute capability >= 8.9" in err[0]
    # The fp8 layout itself (torchao's float8 weight-only) is what a capable GPU would get; it computes here too.
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    q = quantize_weight(w.to(torch.bfloat16), "fp8", "cpu", torch.bfloat16)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    assert quant.weight_format(q) == "fp8"
    assert _rel(nn.functional.linear(x, q), nn.functional.linear(x, w.to(torch.bfloat16))) < 0.06


# -- reduced depth, real widths: memory and logits --------------------------------------------------------------
_CHILD = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(2)
    from personaplex.checkpoint import load_lm
    from personaplex.quantize import _torchao, precision, weight_bytes
    _torchao()  # imported before the baseline: its import is not part of the load

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    path, out, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    before = status("VmRSS:")
    lm = load_lm(path, device="cpu", dtype=torch.bfloat16, quantize="int8")
    peak, after = status("VmHWM:"), status("VmRSS:")
    c = lm.config
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, c.card, (1, c.num_streams, 6), generator=g)
    codes[:, 0] = torch.randint(0, c.text_card, (1, 6), generator=g)
    with torch.no_grad():
        o = lm(codes)
    torch.save({"text": o.text_logits, "audio": o.audio_logits}, out)
    print(json.dumps({"before": before, "peak": peak, "after": after, "weight_bytes": weight_bytes(lm),
                      "precision": precision(lm)}))
""")


@pytest.fixture(scope="module")
def reduced_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("reduced-7b")
    write_random_lm(directory, REDUCED, seed=0)
    return directory


def test_reduced_depth_int8_memory_and_logits(reduced_dir, tmp_path):
    out = tmp_path / "int8.pt"
    run = subprocess.run([sys.executable, "-c", _CHILD, str(reduced_dir), str(out), "5"], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    m = json.loads(run.stdout.strip().splitlines()[-1])
    assert m["precision"].startswith("int8 weights")
    # The largest tensor of the file in bf16 (the temporal FFN's linear_in, 22528 x 4096).
    largest = 2 * REDUCED.hidden_dim * 2 * REDUCED.dim
    growth = m["peak"] - m["before"]
    assert growth <= m["weight_bytes"] + largest + 64 * 2**20, m  # never a bf16 copy of the model
    assert m["after"] - m["before"] >= 0.9 * m["weight_bytes"], m  # the measurement sees the model

    ref = load_lm(reduced_dir, device="cpu", dtype=torch.bfloat16)
    bf16_bytes = weight_bytes(ref)
    assert m["weight_bytes"] <= 0.6 * bf16_bytes, (m["weight_bytes"], bf16_bytes)  # measured 0.54
    with torch.no_grad():
        r = ref(_codes(REDUCED, seed=5))
    del ref
    q = torch.load(out)
    assert _rel(q["text"], r.text_logits) < INT8_LOGIT_REL_ERROR
    assert _rel(q["audio"], r.audio_logits) < INT8_LOGIT_REL_ERROR


# -- a quantised conversation: engine, offline, server ----------------------------------------------------------
@pytest.fixture(scope="module")
def int8_checkpoint(demo_dir):
    return load_checkpoint(demo_dir, device="cpu", quantize="int8")


def test_quantised_conversation_in_the_engine(int8_checkpoint):
    from personaplex.engine import BatchEngine, Personas, SamplingParams

    ckpt = int8_checkpoint
    personas = Personas(ckpt.lm, ckpt.mimi, ckpt.tokenizer, ckpt.files.voices_dir)
    engine = BatchEngine(ckpt.lm, ckpt.mimi, max_batch=2)
    conv = engine.join(personas.get("DEMO_LOW", "You are Sam."), SamplingParams(seed=3))
    frames = torch.from_numpy(speech_like(0.24, 2)).view(-1, 1920)
    results = [engine.step(frames[i:i + 1])[0] for i in range(frames.shape[0])]
    engine.leave(conv)
    assert len(results) == 3
    assert all(r.pcm.shape == (1920,) and torch.isfinite(r.pcm).all() for r in results)
    assert all(r.audio_codes.shape == (8,) and 0 <= int(r.audio_codes.min()) for r in results)


def test_quantised_offline_and_info(demo_dir, tmp_path, capsys):
    import soundfile as sf

    wav = tmp_path / "user.wav"
    sf.write(wav, speech_like(0.24), 24000)
    code = main(["offline", "--checkpoint", str(demo_dir), "--device", "cpu", "--quantize", "int8",
                 "--input-wav", str(wav), "--output-wav", str(tmp_path / "a.wav"), "--output-text",
                 str(tmp_path / "a.json"), "--no-progress", "--seed", "1"])
    assert code == 0
    assert len(sf.read(tmp_path / "a.wav")[0]) == 5760
    assert main(["info", "--checkpoint", str(demo_dir), "--device", "cpu", "--quantize", "int8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    weights = [line for line in lines if line.startswith("weights:")]
    assert weights and "int8 weights (torchao weight-only, per-row scales), float32 activations" in weights[0]
    assert "GiB" in weights[0]


def test_quantised_conversation_in_the_server(int8_checkpoint):
    from personaplex.engine import Personas
    from test_server import Client, chat_url, serving

    ckpt = int8_checkpoint
    personas = Personas(ckpt.lm, ckpt.mimi, ckpt.tokenizer, ckpt.files.voices_dir)

    async def run():
        async with serving(ckpt, personas, max_conversations=1) as (server, base, http):
            async with http.get(f"{base}/api/info") as resp:
                info = await resp.json()
            async with http.ws_connect(chat_url(base, voice_prompt="DEMO_LOW.wav", seed=1)) as ws:
                client = Client(ws)
                await client.handshake()
                await client.stream(8)
            return info, client

    info, client = asyncio.run(run())
    weights = info["model"]["weights"]
    assert weights["precision"].startswith("int8 weights") and weights["weight_bytes"] == weight_bytes(ckpt.lm)
    assert not client.errors and len(client.audio) >= 8
