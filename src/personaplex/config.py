"""Typed model configurations and the named presets of the released checkpoints.

`LMConfig` defaults are the PersonaPlex-7B model. `moshi-7b` is Kyutai's Moshiko (dep_q 8) and `tiny` is a
small model with the PersonaPlex stream layout (17 streams, dep_q 16) for tests and the `--demo` checkpoint.
A Moshi-style flat `config.json` (the reference's key names) converts with `LMConfig.from_moshi_dict`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

# Special text ids of the SentencePiece vocabulary, as used in the text stream.
TEXT_EPAD = 0  # end of padding: the frame before a word starts
TEXT_BOS = 1
TEXT_EOS = 2
TEXT_PAD = 3

SAMPLE_RATE = 24_000
FRAME_RATE = 12.5
FRAME_SIZE = 1920  # samples per 80 ms frame at 24 kHz


@dataclass
class LMConfig:
    """The temporal transformer, the depth transformer (depformer) and the token streams."""

    dim: int = 4096
    num_heads: int = 32
    num_layers: int = 32
    hidden_scale: float = 4.125  # FFN size = hidden_scale * dim; gated hidden = 2/3 of it
    context: int = 3000  # attention window of the temporal transformer, in frames
    max_period: float = 10_000.0  # RoPE
    norm_eps: float = 1e-8
    text_card: int = 32_000
    card: int = 2048
    n_q: int = 16  # audio streams in the input (agent + user)
    dep_q: int = 16  # streams the depformer predicts
    delays: list[int] = field(default_factory=lambda: [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1])
    existing_text_padding_id: int = TEXT_PAD
    depformer_dim: int = 1024
    depformer_num_heads: int = 16
    depformer_num_layers: int = 6
    depformer_dim_feedforward: int = 4224
    depformer_multi_linear: bool = True
    depformer_weights_per_step: bool = True

    def __post_init__(self) -> None:
        self.delays = list(self.delays)
        if len(self.delays) != self.num_streams:
            raise ConfigError(f"delays has {len(self.delays)} entries, expected n_q + 1 = {self.num_streams}")
        if self.dim % self.num_heads or self.depformer_dim % self.depformer_num_heads:
            raise ConfigError("dim must be a multiple of num_heads (temporal and depformer)")
        if not 0 < self.dep_q <= self.n_q:
            raise ConfigError(f"dep_q must be in 1..n_q, got {self.dep_q}")
        if not (self.depformer_multi_linear and self.depformer_weights_per_step):
            raise ConfigError("only depformer_multi_linear and depformer_weights_per_step models are supported")

    # -- derived sizes -------------------------------------------------------------------------------------
    @property
    def num_streams(self) -> int:
        """Token streams per frame: 1 text + n_q audio."""
        return self.n_q + 1

    @property
    def hidden_dim(self) -> int:
        """Width of the gated FFN of the temporal transformer (the gate is the first half of linear_in)."""
        return _gated_hidden(self.dim, int(self.hidden_scale * self.dim))

    @property
    def depformer_hidden_dim(self) -> int:
        return _gated_hidden(self.depformer_dim, self.depformer_dim_feedforward)

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def audio_codebooks(self) -> int:
        """Codebooks of one audio channel (agent or user): 8 for both released models."""
        return self.n_q // 2

    # -- conversions -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_moshi_dict(self) -> dict[str, Any]:
        """The flat `config.json` of Moshi-family repositories (the reference's LMModel kwargs)."""
        return {
            "dim": self.dim,
            "text_card": self.text_card,
            "existing_text_padding_id": self.existing_text_padding_id,
            "n_q": self.n_q,
            "dep_q": self.dep_q,
            "card": self.card,
            "num_heads": self.num_heads,
            "num_layers": self.num_layers,
            "hidden_scale": self.hidden_scale,
            "causal": True,
            "layer_scale": None,
            "context": self.context,
            "max_period": self.max_period,
            "gating": "silu",
            "norm": "rms_norm_f32",
            "positional_embedding": "rope",
            "depformer_dim": self.depformer_dim,
            "depformer_dim_feedforward": self.depformer_dim_feedforward,
            "depformer_num_heads": self.depformer_num_heads,
            "depformer_num_layers": self.depformer_num_layers,
            "depformer_layer_scale": None,
            "depformer_multi_linear": self.depformer_multi_linear,
            "depformer_context": self.dep_q,
            "depformer_max_period": self.max_period,
            "depformer_gating": "silu",
            "depformer_pos_emb": "none",
            "depformer_weights_per_step": self.depformer_weights_per_step,
            "delays": list(self.delays),
        }

    @classmethod
    def from_moshi_dict(cls, raw: dict[str, Any]) -> "LMConfig":
        """Read a Moshi-style flat config. Keys that only concern loading (file names, model ids, generation
        defaults) are ignored; settings this implementation does not support raise a clear error."""
        unsupported = {
            "gating": "silu",
            "norm": "rms_norm_f32",
            "positional_embedding": "rope",
            "depformer_pos_emb": "none",
            "depformer_gating": "silu",
        }
        for key, supported in unsupported.items():
            if key in raw and raw[key] != supported:
                raise ConfigError(f"config.json: {key}={raw[key]!r} is not supported (only {supported!r})")
        for key in ("layer_scale", "depformer_layer_scale", "conditioners", "fuser", "cross_attention"):
            if raw.get(key):
                raise ConfigError(f"config.json: {key}={raw[key]!r} is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in names}
        if "depformer_dim_feedforward" not in raw and "depformer_dim" in raw:
            kwargs["depformer_dim_feedforward"] = int(raw.get("hidden_scale", 4.125) * raw["depformer_dim"])
        return cls(**kwargs)


def _gated_hidden(dim: int, dim_feedforward: int) -> int:
    # Same rule as the released models: a gated FFN keeps ~the parameters of a plain one.
    return (21 * dim) // 8 if dim_feedforward == 4 * dim else (2 * dim_feedforward) // 3


PRESETS: dict[str, LMConfig] = {
    "personaplex-7b": LMConfig(),
    "moshi-7b": LMConfig(dep_q=8),
    "tiny": LMConfig(
        dim=64,
        num_heads=4,
        num_layers=2,
        context=1000,  # room for a demo persona prompt: up to 500 frames of voice + text
        text_card=512,  # the demo tokenizer's vocabulary; card stays 2048 so real Mimi codes fit
        depformer_dim=32,
        depformer_num_heads=2,
        depformer_num_layers=2,
        depformer_dim_feedforward=int(4.125 * 32),
    ),
}


def get_preset(name: str) -> LMConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; available: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], delays=list(PRESETS[name].delays))


def resolve_config(config: "LMConfig | str | dict | Path | None", default: str = "personaplex-7b") -> LMConfig:
    """Accept a config object, a preset name, a Moshi-style dict, or a path to a `config.json`."""
    if config is None:
        return get_preset(default)
    if isinstance(config, LMConfig):
        return config
    if isinstance(config, dict):
        return LMConfig.from_moshi_dict(config)
    if isinstance(config, Path) or (isinstance(config, str) and config.endswith(".json")):
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}: pass a preset ({', '.join(PRESETS)}) or a config.json")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        return LMConfig.from_moshi_dict(raw)
    return get_preset(config)
