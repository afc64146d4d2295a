"""The multistream language model: token embeddings, temporal transformer, text head, depformer.

Streams per frame (PersonaPlex): k=0 text, k=1..8 agent audio, k=9..16 user audio. The model reads the
delayed token grid; `forward` takes un-delayed codes (B, K, T) and returns logits aligned with them, as the
reference's `LMModel.forward` does. Generation uses the same pieces one frame at a time with `LMState`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LMConfig
from .depformer import Depformer, DepformerCache
from .layers import ZERO_TOKEN, Embedding, RMSNorm
from .transformer import KVCache, Transformer


class LMOutput(NamedTuple):
    text_logits: torch.Tensor  # (B, 1, T, text_card); NaN where undefined
    audio_logits: torch.Tensor  # (B, dep_q, T, card); NaN where undefined (delays)
    text_mask: torch.Tensor  # (B, 1, T) positions carrying a prediction
    audio_mask: torch.Tensor  # (B, dep_q, T)


@dataclass
class LMState:
    """Per-conversation model state for generation (batch-first): the temporal KV cache and the depformer's
    scratch cache for the frame being generated."""

    kv: KVCache
    dep: DepformerCache

    @property
    def batch_size(self) -> int:
        return self.kv.batch_size


class LMModel(nn.Module):
    def __init__(self, config: LMConfig, device=None, dtype=None):
        super().__init__()
        c = self.config = config
        kw = {"device": device, "dtype": dtype}
        self.emb = nn.ModuleList(Embedding(c.card + 1, c.dim, **kw) for _ in range(c.n_q))
        self.text_emb = Embedding(c.text_card + 1, c.dim, **kw)
        self.transformer = Transformer(c.dim, c.num_heads, c.num_layers, c.hidden_dim, c.context, c.max_period,
                                       c.norm_eps, **kw)
        self.out_norm = RMSNorm(c.dim, c.norm_eps, **kw)
        self.text_linear = nn.Linear(c.dim, c.text_card, bias=False, **kw)
        self.depformer_in = nn.ModuleList(nn.Linear(c.dim, c.depformer_dim, bias=False, **kw) for _ in range(c.dep_q))
        self.depformer_text_emb = Embedding(c.text_card + 1, c.depformer_dim, **kw)
        self.depformer_emb = nn.ModuleList(Embedding(c.card + 1, c.depformer_dim, **kw) for _ in range(c.dep_q - 1))
        self.depformer = Depformer(c.depformer_dim, c.depformer_num_heads, c.depformer_num_layers,
                                   c.depformer_hidden_dim, c.dep_q, c.norm_eps, **kw)
        self.linears = nn.ModuleList(nn.Linear(c.depformer_dim, c.card, bias=False, **kw) for _ in range(c.dep_q))

    # -- ids ------------------------------------------------------------------------------------------------
    @property
    def initial_token_ids(self) -> list[int]:
        """The token fed for every stream before its first real token (the extra embedding row)."""
        c = self.config
        return [c.text_card] + [c.card] * c.n_q

    @property
    def device(self) -> torch.device:
        return self.text_emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_emb.weight.dtype

    # -- pieces ---------------------------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Summed input embeddings of a delayed token grid: (B, K, T) -> (B, T, dim)."""
        x = self.text_emb(tokens[:, 0])
        for k, emb in enumerate(self.emb):
            x = x + emb(tokens[:, k + 1])
        return x

    def embed_column(self, column: torch.Tensor) -> torch.Tensor:
        """Summed input embeddings of one grid column (B, K) -> (B, dim), for generation: every token must be a
        real or initial id (>= 0; `ZERO_TOKEN` is for training), which spares the zero-token masks."""
        x = F.embedding(column[:, 0], self.text_emb.weight)
        for k, emb in enumerate(self.emb):  # added one by one, in the reference's order
            x = x + F.embedding(column[:, k + 1], emb.weight)
        return x

    def temporal(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Temporal transformer and final norm: (B, T, dim) -> (B, T, dim)."""
        return self.out_norm(self.transformer(x, cache))

    def depformer_input(self, hidden: torch.Tensor, k: int, prev_token: torch.Tensor) -> torch.Tensor:
        """Input of depformer step k: projection of the temporal output plus the previous token's embedding
        (the text token for k=0, audio codebook k-1 otherwise)."""
        token_emb = self.depformer_text_emb if k == 0 else self.depformer_emb[k - 1]
        return self.depformer_in[k](hidden) + token_emb(prev_token)

    def depformer_step(self, hidden: torch.Tensor, k: int, prev_token: torch.Tensor,
                       cache: DepformerCache) -> torch.Tensor:
        """Logits of codebook k for one frame: hidden (B, dim), prev_token (B,) -> (B, card). Generation only:
        prev_token is a real id (>= 0), so its embedding is a plain lookup."""
        table = self.depformer_text_emb if k == 0 else self.depformer_emb[k - 1]
        x = self.depformer_in[k](hidden) + F.embedding(prev_token, table.weight)
        return self.linears[k](self.depformer.step(x, k, cache))

    def depformer_all(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Teacher-forced depformer over all frames: hidden (B, T, dim), targets (B, 1+dep_q, T) are the
        tokens of the frame being predicted (stream order) -> logits (B, dep_q, T, card)."""
        B, T, _ = hidden.shape
        dep_q = self.config.dep_q
        steps = [self.depformer_input(hidden, k, targets[:, k]) for k in range(dep_q)]
        x = torch.stack(steps, dim=2).view(B * T, dep_q, -1)  # (B·T, dep_q, D)
        x = self.depformer(x).view(B, T, dep_q, -1)
        return torch.stack([self.linears[k](x[:, :, k]) for k in range(dep_q)], dim=1)

    # -- teacher forcing ------------------------------------------------------------------------------------
    def delay(self, codes: torch.Tensor) -> torch.Tensor:
        """Un-delayed codes (B, K, T) -> model input grid (B, K, T+1): the initial tokens in front, stream k
        shifted right by delays[k] (initial tokens fill the gap)."""
        B, K, T = codes.shape
        initial = torch.tensor(self.initial_token_ids, device=codes.device).view(1, K, 1)
        grid = initial.expand(B, K, T + 1).clone()
        for k, d in enumerate(self.config.delays):
            grid[:, k, 1 + d:] = codes[:, k, :T - d]
        return grid

    def forward(self, codes: torch.Tensor, prefix_embeddings: torch.Tensor | None = None) -> LMOutput:
        """Teacher-forced logits for un-delayed codes (B, 1+n_q, T), aligned with the codes.

        prefix_embeddings: optional (B, E, dim) summed input embeddings used instead of those of the tokens in
        grid columns 0..E-1 (a released `.pt` voice prompt gives its voice steps this way, as `build_persona`
        does); NaN entries keep the tokens' embeddings, so one batch can mix voices of different lengths.
        """
        c = self.config
        B, K, T = codes.shape
        if K != c.num_streams:
            raise ValueError(f"expected codes with {c.num_streams} streams, got shape {tuple(codes.shape)}")
        grid = self.delay(codes)
        x = self.embed(grid[:, :, :-1])  # (B, T, dim)
        if prefix_embeddings is not None:
            e = prefix_embeddings.shape[1]
            if prefix_embeddings.shape[0] != B or prefix_embeddings.shape[2] != c.dim or e > T:
                raise ValueError(f"prefix_embeddings must be (B={B}, E<={T}, {c.dim}), "
                                 f"got {tuple(prefix_embeddings.shape)}")
            prefix = prefix_embeddings.to(device=x.device, dtype=x.dtype)
            x = torch.cat([torch.where(torch.isnan(prefix), x[:, :e], prefix), x[:, e:]], dim=1)
        hidden = self.temporal(x)
        text_logits = self.text_linear(hidden)  # (B, T, text_card)
        audio_logits = self.depformer_all(hidden, grid[:, : 1 + c.dep_q, 1:])  # (B, dep_q, T, card)
        # Undo the delays: position t of stream k was predicted at grid step t + delay.
        audio_logits, audio_mask = _undelay(audio_logits, c.delays[1:1 + c.dep_q])
        text_logits, text_mask = _undelay(text_logits[:, None], c.delays[:1])
        audio_mask = audio_mask & (codes[:, 1:1 + c.dep_q] != ZERO_TOKEN)
        text_mask = text_mask & (codes[:, :1] != ZERO_TOKEN)
        return LMOutput(text_logits, audio_logits, text_mask, audio_mask)

    # -- generation state -----------------------------------------------------------------------------------
    def init_state(self, batch_size: int, pinned_capacity: int | None = None) -> LMState:
        """Generation state for `batch_size` conversations; `pinned_capacity`: prompt frames a row can pin
        (default min(context / 2, 512); 0 when prompts are never pinned)."""
        return LMState(self.transformer.init_cache(batch_size, device=self.device, dtype=self.dtype,
                                                   pinned_capacity=pinned_capacity),
                       self.depformer.init_cache(batch_size, device=self.device, dtype=self.dtype))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random weights for tests and the demo model (truncated normal, std 1/sqrt(fan_in))."""
        for name, p in self.named_parameters():
            if name.endswith("alpha"):
                p.fill_(1.0)
                continue
            fan_in = p.shape[-1]
            std = 1 / math.sqrt(fan_in)
            w = torch.empty(p.shape, dtype=torch.float32)
            nn.init.trunc_normal_(w, std=std, a=-3 * std, b=3 * std, generator=generator)
            p.copy_(w)


def _undelay(logits: torch.Tensor, delays: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K, T, V) on the delayed grid -> aligned with the codes; the last `delay` steps are undefined."""
    B, K, T, V = logits.shape
    source = torch.arange(T, device=logits.device)[None, :] + torch.tensor(delays, device=logits.device)[:, None]
    valid = source < T  # (K, T)
    # One gather (its backward one scatter) rather than a slice copy per stream; the index is a broadcast view.
    index = source.clamp(max=T - 1).view(1, K, T, 1).expand(B, K, T, V)
    out = logits.gather(2, index).masked_fill(~valid.view(1, K, T, 1), float("nan"))
    return out, valid.expand(B, K, T).clone()
