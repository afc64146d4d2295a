"""`personaplex eval fdb-timing`: Full-Duplex-Bench v1.5 overlap timing, as FDB's `get_timing.py` computes it.

For every folder with `input.wav` (user) and `output.wav` (model): silero VAD at 16 kHz (defaults, segments in
samples / 16000, no rounding), segments merged across gaps of at most 0.6 s (user) and 0.5 s (model), then
- `latency_stop_list`: the overlaps of user and model speech (two-pointer walk; the shortest interval per
  millisecond end time; rounded to 3 decimals), i.e. how long the model kept talking over the user;
- `latency_resp_list`: per user segment, the first model start strictly after its end (per model start the
  latest user end wins), i.e. response gaps.
FDB stops there (it has no aggregator); the means of `end - start` per list are ours and labelled so.
Audio is resampled with soxr, not torchaudio's sinc filter (FDB's), so a non-16 kHz file can differ slightly.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import EvalError

USER_MERGE_GAP = 0.6
MODEL_MERGE_GAP = 0.5
OUT_FILENAME = "latency_intervals.json"


def merge(segments: list[tuple[float, float]], gap: float) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for s, e in sorted(segments):
        if merged and s - merged[-1][1] <= gap:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def stop_intervals(user, model) -> list[list[float]]:
    found, i, j = [], 0, 0
    while i < len(user) and j < len(model):
        (us, ue), (ms, me) = user[i], model[j]
        s, e = max(us, ms), min(ue, me)
        if e > s:
            found.append((s, e))
        if ue < me:
            i += 1
        else:
            j += 1
    shortest: dict[int, tuple[float, float]] = {}
    for s, e in found:
        key = int(round(e * 1000))
        if key not in shortest or e - s < shortest[key][1] - shortest[key][0]:
            shortest[key] = (s, e)
    return [[round(s, 3), round(e, 3)] for s, e in sorted(shortest.values(), key=lambda iv: iv[1])]


def response_intervals(user, model) -> list[list[float]]:
    starts = [s for s, _ in model]
    best: dict[int, list[float]] = {}
    for _, ue in user:
        nxt = next((s for s in starts if s > ue), None)
        if nxt is None:
            continue
        key = int(round(nxt * 1000))
        candidate = [round(ue, 3), round(nxt, 3)]
        if key not in best or candidate[0] > best[key][0]:
            best[key] = candidate
    return [iv for _, iv in sorted(best.items(), key=lambda kv: kv[1][1])]


def folder_timing(folder: Path) -> dict:
    from ..audio import read_audio
    from .vad import speech_seconds

    def segments(name: str, gap: float):
        wav = read_audio(folder / name, sample_rate=16_000)
        return merge(speech_seconds(wav, 16_000), gap)

    user, model = segments("input.wav", USER_MERGE_GAP), segments("output.wav", MODEL_MERGE_GAP)
    return {"latency_stop_list": stop_intervals(user, model), "latency_resp_list": response_intervals(user, model)}


def _mean_length(intervals: list[list[float]]) -> float | None:
    return sum(e - s for s, e in intervals) / len(intervals) if intervals else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="folder of sample folders with input.wav and output.wav")
    parser.add_argument("--out", required=True, help="where timing.json goes")
    parser.add_argument("--write-per-folder", action="store_true",
                        help=f"also write {OUT_FILENAME} into each sample folder, as FDB does")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .fdb_data import write_json_atomic

    root = Path(args.root)
    if not root.is_dir():
        raise EvalError(f"--root {root} is not a folder")
    folders = [p for p in sorted(root.iterdir()) if (p / "input.wav").is_file() and (p / "output.wav").is_file()]
    if not folders:
        raise EvalError(f"no folder under {root} has both input.wav and output.wav")
    samples = {}
    for folder in tqdm(folders, desc="timing", disable=args.no_progress):
        samples[folder.name] = folder_timing(folder)
        if args.write_per_folder:
            write_json_atomic(folder / OUT_FILENAME, samples[folder.name])
    stops = [iv for s in samples.values() for iv in s["latency_stop_list"]]
    resps = [iv for s in samples.values() for iv in s["latency_resp_list"]]
    result = {"means (ours; FDB has no aggregator)": {
        "stop_latency": _mean_length(stops), "response_latency": _mean_length(resps),
        "stop_intervals": len(stops), "response_intervals": len(resps)}, "samples": samples}
    out = Path(args.out)
    write_json_atomic(out / "timing.json", result)
    means = result["means (ours; FDB has no aggregator)"]
    fmt = lambda v: "null" if v is None else f"{v:.3f} s"  # noqa: E731
    print(f"fdb-timing: {len(folders)} samples; mean stop latency {fmt(means['stop_latency'])} over "
          f"{len(stops)} overlaps, mean response latency {fmt(means['response_latency'])} over {len(resps)} gaps")
    print(f"wrote {out / 'timing.json'}")
    return 0
