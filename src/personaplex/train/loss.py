"""The training loss: masked, weighted cross-entropy on the text stream and the predicted audio codebooks.

    loss = Σ w·CE(text) / Σ w(text)  +  Σ w·CE(audio) / Σ w(audio)

Weights (the PersonaPlex recipe): text tokens 1, padding text (PAD, and EPAD unless set apart) 0.3; the
semantic codebook 1, acoustic codebooks 0.02. No loss on the prompt, on padding after a sample's end, on the
last `delay` frames of a sample (a delayed stream's last tokens are predicted one step after the sample) or
on the user's codebooks: dep_q=16 models predict them, but inference never uses those predictions, so they
stay out unless `predict_user` is set.

Both sums are normalised by totals over the whole optimiser step (every micro-batch on every rank),
computed from the targets before the forward pass: a step's loss and gradient are then the same however
the batch is split across processes or accumulation steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..config import TEXT_EPAD, TEXT_PAD, LMConfig
from ..lm import LMOutput
from ..lm.layers import ZERO_TOKEN
from .sample import Batch

# Entries of `LossParts.stats` (summed over micro-batches and ranks, then turned into `metrics`).
STATS = ("text_num", "text_den", "audio_num", "audio_den", "semantic_ce", "semantic_n", "acoustic_ce",
         "acoustic_n", "text_correct", "text_n", "audio_correct", "audio_n", "frames")


@dataclass
class LossConfig:
    text_pad_weight: float = 0.3  # PAD text tokens
    epad_weight: float | None = None  # EPAD text tokens (None: same as text_pad_weight)
    semantic_weight: float = 1.0  # codebook 0 of each predicted channel
    acoustic_weight: float = 0.02  # codebooks 1..7
    predict_user: bool = False  # also learn the user's codebooks (dep_q=16 models)


class LossParts(NamedTuple):
    text_num: torch.Tensor  # Σ w·CE over text positions (carries the gradient)
    audio_num: torch.Tensor  # Σ w·CE over audio positions (carries the gradient)
    stats: torch.Tensor  # (len(STATS),) float64, no gradient


def target_weights(batch: Batch, config: LMConfig, lc: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-target loss weights: text (B, 1, T) and audio (B, dep_q, T); 0 means no loss."""
    codes = batch.codes
    B, K, T = codes.shape
    t = torch.arange(T, device=codes.device).view(1, T)
    live = (t >= batch.prompt_frames.view(B, 1)) & batch.counted.view(B, 1)  # (B, T)

    def in_range(k: int) -> torch.Tensor:  # the prediction of stream k at t exists and t holds a token
        return live & (t < batch.lengths.view(B, 1) - config.delays[k]) & (codes[:, k] != ZERO_TOKEN)

    text = codes[:, 0]
    epad = lc.text_pad_weight if lc.epad_weight is None else lc.epad_weight
    w = torch.where(text == TEXT_PAD, lc.text_pad_weight, torch.where(text == TEXT_EPAD, epad, 1.0))
    text_w = (w * in_range(0)).unsqueeze(1).float()
    audio_w = torch.zeros(B, config.dep_q, T, device=codes.device)
    per_channel = config.audio_codebooks
    for q in range(config.dep_q):
        if q >= per_channel and not lc.predict_user:
            continue
        weight = lc.semantic_weight if q % per_channel == 0 else lc.acoustic_weight
        audio_w[:, q] = weight * in_range(1 + q)
    return text_w, audio_w


def loss_parts(out: LMOutput, batch: Batch, text_w: torch.Tensor, audio_w: torch.Tensor,
               config: LMConfig) -> LossParts:
    """Weighted CE sums of one micro-batch, and the statistics the logs show (agent channel only)."""
    codes = batch.codes
    stats = torch.zeros(len(STATS), dtype=torch.float64, device=codes.device)
    s = dict(zip(STATS, range(len(STATS))))

    sel = text_w > 0  # (B, 1, T)
    if bool((sel & ~out.text_mask).any()):
        raise RuntimeError("loss weights on text positions the model does not predict (internal error)")
    target = codes[:, :1][sel]
    logits = out.text_logits[sel].float()  # (N, text_card)
    ce = F.cross_entropy(logits, target, reduction="none")
    text_num = (ce * text_w[sel]).sum()
    with torch.no_grad():
        stats[s["text_num"]] = text_num.detach().double()
        stats[s["text_den"]] = text_w.sum().double()
        stats[s["text_correct"]] = (logits.argmax(-1) == target).sum().double()
        stats[s["text_n"]] = sel.sum().double()

    sel = audio_w > 0  # (B, dep_q, T)
    if bool((sel & ~out.audio_mask).any()):
        raise RuntimeError("loss weights on audio positions the model does not predict (internal error)")
    target = codes[:, 1:1 + config.dep_q][sel]
    logits = out.audio_logits[sel].float()  # (N, card)
    ce = F.cross_entropy(logits, target, reduction="none")
    audio_num = (ce * audio_w[sel]).sum()
    with torch.no_grad():
        stats[s["audio_num"]] = audio_num.detach().double()
        stats[s["audio_den"]] = audio_w.sum().double()
        q = torch.arange(config.dep_q, device=codes.device).view(1, -1, 1).expand_as(sel)[sel]
        agent = q < config.audio_codebooks
        semantic, acoustic = agent & (q == 0), agent & (q > 0)
        stats[s["semantic_ce"]], stats[s["semantic_n"]] = ce[semantic].sum().double(), semantic.sum().double()
        stats[s["acoustic_ce"]], stats[s["acoustic_n"]] = ce[acoustic].sum().double(), acoustic.sum().double()
        stats[s["audio_correct"]] = (logits.argmax(-1) == target)[agent].sum().double()
        stats[s["audio_n"]] = agent.sum().double()
        stats[s["frames"]] = float(batch.frames)
    return LossParts(text_num, audio_num, stats)


def denominators(weights: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """(2,) float64: total text and audio weight of one step's micro-batches on this rank."""
    total = torch.zeros(2, dtype=torch.float64, device=weights[0][0].device)
    for text_w, audio_w in weights:
        total[0] += text_w.sum().double()
        total[1] += audio_w.sum().double()
    return total


def step_loss(parts: LossParts, totals: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """This micro-batch's share of the step loss: each sum over the step-wide (all ranks) total."""
    text = parts.text_num / totals[0].clamp(min=1e-12).to(parts.text_num.dtype)
    audio = parts.audio_num / totals[1].clamp(min=1e-12).to(parts.audio_num.dtype)
    return (text + audio) * scale


def metrics(stats: torch.Tensor) -> dict[str, float]:
    """Readable figures from summed `stats`: the loss and its parts, mean CE per stream, accuracies."""
    s = {name: float(v) for name, v in zip(STATS, stats.tolist())}
    div = lambda a, b: a / b if b > 0 else float("nan")  # noqa: E731
    text, audio = div(s["text_num"], s["text_den"]), div(s["audio_num"], s["audio_den"])
    return {
        "loss": (text if s["text_den"] > 0 else 0.0) + (audio if s["audio_den"] > 0 else 0.0),
        "text": text,
        "audio": audio,
        "semantic": div(s["semantic_ce"], s["semantic_n"]),
        "acoustic": div(s["acoustic_ce"], s["acoustic_n"]),
        "text_acc": div(s["text_correct"], s["text_n"]),
        "audio_acc": div(s["audio_correct"], s["audio_n"]),
        "frames": s["frames"],
    }
