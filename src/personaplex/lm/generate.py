"""One incremental model step: read one column of the delayed token grid, write the next one.

`step_frame` is the single place where the temporal transformer, the text head and the depformer chain run
for generation. Token choice is delegated to a sampling function so that greedy, temperature/top-k and
per-conversation random generators all share this code; tokens "provided" for a position (forced, >= 0)
replace the sample there, in the text stream and inside the depformer's chain.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .model import LMModel, LMState

# Sampling function: (logits (B, V) in the model dtype, stream index k: 0 text, 1.. audio codebooks) -> tokens (B,)
SampleFn = Callable[[torch.Tensor, int], torch.Tensor]

NOT_FORCED = -2  # in `forced`: this position is sampled


class FrameOutput(NamedTuple):
    tokens: torch.Tensor  # (B, 1 + dep_q): text token then the depformer's codebooks, for the next column
    text_logits: torch.Tensor | None  # (B, text_card), when asked for
    audio_logits: torch.Tensor | None  # (B, dep_q, card), when asked for


def greedy(logits: torch.Tensor, k: int) -> torch.Tensor:
    return logits.argmax(dim=-1)


@torch.no_grad()
def step_frame(lm: LMModel, state: LMState, column: torch.Tensor, sample: SampleFn = greedy,
               forced: torch.Tensor | None = None, return_logits: bool = False,
               num_codebooks: int | None = None, active: torch.Tensor | None = None,
               slid: bool | None = None) -> FrameOutput:
    """Advance every conversation of `state` by one frame: fixed shapes, in place, no host synchronisation
    (so it can be captured in a CUDA graph).

    column: (B, 1 + n_q) tokens of the current grid column (delayed layout; initial tokens at the start;
        every id >= 0).
    forced: optional (B, 1 + dep_q) tokens to impose (NOT_FORCED where the model samples).
    num_codebooks: run only the first depformer steps (e.g. 8 agent codebooks of a dep_q=16 model; the
        user's codebooks are known from the microphone and never needed at inference).
    active, slid: see `Transformer.step` (batch padding rows; the pinned-prompt rotation).
    """
    c = lm.config
    B, K = column.shape
    if K != c.num_streams:
        raise ValueError(f"expected a token column (B, {c.num_streams}), got {tuple(column.shape)}")
    steps = c.dep_q if num_codebooks is None else num_codebooks
    hidden = lm.out_norm(lm.transformer.step(lm.embed_column(column), state.kv, active, slid))  # (B, dim)
    text_logits = lm.text_linear(hidden)
    token = _choose(text_logits, 0, sample, forced)
    tokens = [token]
    audio_logits = []
    for k in range(steps):
        logits = lm.depformer_step(hidden, k, token, state.dep)
        if return_logits:
            audio_logits.append(logits)
        token = _choose(logits, k + 1, sample, forced)
        tokens.append(token)
    return FrameOutput(
        torch.stack(tokens, dim=1),
        text_logits if return_logits else None,
        torch.stack(audio_logits, dim=1) if return_logits else None,
    )


def _choose(logits: torch.Tensor, k: int, sample: SampleFn, forced: torch.Tensor | None) -> torch.Tensor:
    token = sample(logits, k)
    if forced is not None:
        token = torch.where(forced[:, k] >= 0, forced[:, k], token)
    return token
