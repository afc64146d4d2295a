"""Full-Duplex-Bench v1.0 scoring, rule by rule as FDB computes it at commit d7336bd (see docs/evaluation.md).

Pure functions over transcripts (`output.json` chunks) and VAD segments: no files, no models. Where FDB has a
defect the default is what FDB computes, except the two documented departures: a task with no turn-taking sample
reports None (FDB divides by zero), and a judge answer that does not parse never re-counts the sample's TOR.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from . import EvalError

TURN_DURATION = 1.0  # seconds: a transcript shorter than this is a turn only with more than TURN_WORDS words
TURN_WORDS = 3
BC_WINDOW = 0.2  # backchannel histogram bin, seconds
BC_EPSILON = 1e-10
BC_MAX_SEGMENT = 3.0  # a VAD segment longer than this is the model taking the floor
BC_RULES = ("head", "legacy")

Chunk = dict  # {"text": str, "timestamp": [start, end]} in seconds on the output timeline


def _times(chunk: Chunk) -> tuple:
    ts = chunk.get("timestamp") if isinstance(chunk, dict) else None
    if not isinstance(ts, (list, tuple)) or len(ts) != 2:
        raise EvalError(f"output.json chunk {chunk!r} has no [start, end] timestamp")
    return ts[0], ts[1]


def turn_over(chunks: Sequence[Chunk], open_end_ok: bool = False) -> int:
    """FDB's turn-over rule over the whole transcript: no words -> 0; first-word start to last-word end under
    1 s -> 1 only with more than 3 words; otherwise 1. `open_end_ok` (pause handling only) measures to the last
    word's start when its end is null; elsewhere a null time is an error (FDB crashes on it)."""
    if not chunks:
        return 0
    first, _ = _times(chunks[0])
    last_start, last_end = _times(chunks[-1])
    if last_end is None and open_end_ok:
        last_end = last_start
    if first is None or last_end is None:
        raise EvalError("output.json: the first word has no start time or the last word no end time "
                        "(only pause_handling tolerates a null last end); fix the transcript or re-run the ASR")
    duration = last_end - first
    if duration < TURN_DURATION:
        return 1 if len(chunks) > TURN_WORDS else 0
    return 1


def clipped_latency(chunks: Sequence[Chunk], reference: float) -> float:
    """Start of the first word minus `reference`, negative clipped to 0 (FDB's rule)."""
    start, _ = _times(chunks[0])
    return max(0.0, float(start - reference))


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


@dataclass
class TaskScore:
    """A task's figures (named as FDB prints them) and one record per sample."""
    task: str
    figures: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)  # sample name -> per-sample values
    notes: list = field(default_factory=list)
    distribution: dict | None = None  # backchannel: mean occupancy over normalised time (for the report)

    def to_json(self) -> dict:
        return {**self.figures, "n": len(self.samples), "notes": self.notes, "samples": self.samples}


def score_pause(transcripts: dict[str, Sequence[Chunk]]) -> TaskScore:
    """pause_handling: TOR = mean turn-over (lower is better)."""
    score = TaskScore("pause_handling")
    for name, chunks in transcripts.items():
        score.samples[name] = {"TOR": turn_over(chunks, open_end_ok=True)}
    score.figures["TOR"] = _mean([s["TOR"] for s in score.samples.values()])
    return score


def score_turn_taking(transcripts: dict[str, Sequence[Chunk]], turn_ends: dict[str, float]) -> TaskScore:
    """smooth_turn_taking: TOR = mean turn-over; latency = first word minus the user's turn end, clipped at 0,
    averaged over the samples that take the turn (None when none does)."""
    score = TaskScore("smooth_turn_taking")
    latencies = []
    for name, chunks in transcripts.items():
        tor = turn_over(chunks)
        record = {"TOR": tor, "latency": None}
        if tor == 1:
            record["latency"] = clipped_latency(chunks, turn_ends[name])
            latencies.append(record["latency"])
        score.samples[name] = record
    score.figures["TOR"] = _mean([s["TOR"] for s in score.samples.values()])
    score.figures["latency"] = _mean(latencies)
    if not latencies:
        score.notes.append("no sample took the turn: latency is null (FDB divides by zero here)")
    return score


def interruption_user_message(context: str, interrupt: str, response: str) -> str:
    """The judge's user message laid out as FDB sends it (an indented f-string, whitespace included)."""
    pad = " " * 16
    return (f"\n{pad}- Contextual user turn: {context}\n{pad}- User interrupting turn: {interrupt}\n"
            f"{pad}- AI's response: {response}\n{pad}")


def score_interruption(transcripts: dict[str, dict], annotations: dict[str, dict],
                       rate: Callable[[str, dict, dict], tuple[int | None, list[str]]] | None) -> TaskScore:
    """user_interruption over the transcripts cropped at the interruption's end: TOR = mean turn-over; for the
    samples that take the turn, latency (first word minus the interruption's end, clipped at 0) and the judge's
    relevance rating. `rate(name, annotation, transcript) -> (rating or None, replies)`; None: no judge."""
    score = TaskScore("user_interruption")
    latencies, ratings, failures = [], [], []
    for name, transcript in transcripts.items():
        chunks = transcript.get("chunks", [])
        ann = annotations[name]
        tor = turn_over(chunks)
        record = {"TOR": tor, "latency": None, "rating": None}
        if tor == 1:
            record["latency"] = clipped_latency(chunks, float(ann["timestamp"][1]))
            latencies.append(record["latency"])
            if rate is not None:
                rating, replies = rate(name, ann, transcript)
                record["judge_tries"] = len(replies)
                if rating is None:
                    failures.append(name)
                else:
                    record["rating"] = rating
                    ratings.append(rating)
        score.samples[name] = record
    score.figures["TOR"] = _mean([s["TOR"] for s in score.samples.values()])
    score.figures["latency"] = _mean(latencies)
    score.figures["rating"] = _mean(ratings) if rate is not None else None
    if not latencies:
        score.notes.append("no sample took the turn: latency and rating are null (FDB divides by zero here)")
    if rate is None:
        score.notes.append("no judge: rating not computed")
    if failures:
        score.notes.append(f"{len(failures)} judge answer(s) never parsed, left out of the rating: "
                           + ", ".join(failures))
    return score


# ---- backchannel ----------------------------------------------------------------------------------------------

def _words_in_segment(chunks: Sequence[Chunk], s: float, e: float) -> int:
    """FDB's overlap test between a VAD segment [s, e] and each word, with its handling of null times."""
    k = 0
    for chunk in chunks:
        ts, te = _times(chunk)
        if ts is None or (te is None and ts < e):
            continue
        if te is None:
            te = ts
        if (ts >= s and te <= e) or (ts <= e and te > e) or (ts <= s and te > s):
            k += 1
    return k


def backchannel_events(segments: Sequence[tuple[float, float]], chunks: Sequence[Chunk],
                       rule: str = "head") -> tuple[int, list[tuple[float, float]]]:
    """(TOR, backchannel segments) of one sample. Segments in order; the first one over 3 s sets TOR = 1 and
    stops the scan; otherwise TOR is set by each examined segment (the last one wins). `head` appends every
    examined segment (FDB since 1d40caa); `legacy` clears the list on a TOR = 1 segment (FDB <= bb59575)."""
    if rule not in BC_RULES:
        raise EvalError(f"--bc-rule must be one of {', '.join(BC_RULES)}, not {rule!r}")
    tor, events = 0, []
    for s, e in segments:
        duration = e - s
        if duration > BC_MAX_SEGMENT:
            tor = 1
            break
        k = _words_in_segment(chunks, s, e)
        tor = 1 if k > 3 else (0 if (duration < 1 and k <= 2) else 1)
        if rule == "legacy" and tor == 1:
            events = []
        else:
            events.append((s, e))
    return tor, events


def backchannel_jsd(events: Sequence[tuple[float, float]], duration: float, gt: Sequence[float]) -> float:
    """JS distance between the events' 0.2 s occupancy histogram (+1e-10, normalised) and the ground-truth
    distribution interpolated linearly (with extrapolation, not renormalised) to the same number of bins;
    1 when there is no event."""
    if not events:
        return 1.0
    from scipy.interpolate import interp1d
    from scipy.spatial.distance import jensenshannon

    n = int(duration / BC_WINDOW) + 1
    hist = np.zeros(n, dtype=np.float64)
    for a, b in events:
        for i in range(int(a / BC_WINDOW), int(b / BC_WINDOW) + 1):
            if i < n:
                hist[i] += 1
    hist = hist + BC_EPSILON
    hist = hist / hist.sum()
    gt = np.asarray(gt, dtype=np.float64)
    if gt.size < 2:
        raise EvalError("a backchannel ground-truth distribution needs at least 2 bins")
    q = interp1d(np.linspace(0, 1, len(gt)), gt, kind="linear", fill_value="extrapolate")(np.linspace(0, 1, n))
    return float(jensenshannon(hist, q))


def score_backchannel(samples: dict[str, dict], gt: dict[str, Sequence[float]], rule: str = "head") -> TaskScore:
    """backchannel. `samples[name] = {"segments": [(s, e)], "chunks": [...], "duration": seconds}`; ground truth
    by sample name. JSD, TOR, freq: population mean and std over samples (np.mean / np.std)."""
    score = TaskScore("backchannel")
    for name, sample in samples.items():
        if name not in gt:
            raise EvalError(f"backchannel sample {name!r} has no entry in the ICC ground truth "
                            "(FDB's icc_gt_distribution.json is keyed by folder name, '0'..'54')")
        tor, events = backchannel_events(sample["segments"], sample["chunks"], rule)
        duration = float(sample["duration"])
        score.samples[name] = {
            "TOR": tor, "freq": len(events) / duration, "JSD": backchannel_jsd(events, duration, gt[name]),
            "events": [[float(a), float(b)] for a, b in events],
            "segments": [[float(a), float(b)] for a, b in sample["segments"]],
        }
    for key in ("JSD", "TOR", "freq"):
        values = [s[key] for s in score.samples.values()]
        score.figures[key] = float(np.mean(values)) if values else None
        score.figures[f"{key}_std"] = float(np.std(values)) if values else None
    score.notes.append(f"backchannel list rule: {rule}")
    return score
