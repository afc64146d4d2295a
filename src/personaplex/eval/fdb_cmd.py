"""`personaplex eval fdb`: one Full-Duplex-Bench v1.0 task over FDB's folder layout, every step resumable.

1. generate `output.wav` where it is missing (the model on `input.wav`, `--batch` samples at once);
2. transcribe into `output.json` where it is missing (`--asr`, words gated by silero VAD);
3. score with FDB's rules (fdb_score.py), the user-interruption judge through the cached judge client;
4. write OUT/results.json (merged with the other tasks already there) and OUT/report.md with its plots.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from . import EvalError
from .asr import ASR_CHOICES
from .fdb_data import TASK_PROMPTS, TASKS
from .fdb_score import BC_RULES
from .vad import BC_RATE_MODES

log = logging.getLogger("personaplex.eval.fdb")
DISTRIBUTION_BINS = 50


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import add_checkpoint_args
    from .judge import add_judge_arguments

    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--root", required=True, help="the task's folder: one folder per sample (FDB's layout)")
    parser.add_argument("--out", required=True, help="where results.json, report.md and plots go")
    parser.add_argument("--limit", type=int, default=None, help="only the first N samples (by folder name)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    gen = parser.add_argument_group("generation (only where a sample has no output.wav)")
    gen.add_argument("--batch", type=int, default=8, help="conversations run at once (default 8)")
    gen.add_argument("--voice", default=None, help="voice prompt name or file (default: NATF2 when available)")
    gen.add_argument("--text-prompt", default=None,
                     help="role prompt (default: the one the released model is evaluated with for the task)")
    gen.add_argument("--seed", type=int, default=0, help="base seed; each sample's seed derives from it and "
                                                         "its folder name (default 0)")
    gen.add_argument("--greedy", action="store_true", help="argmax decoding")
    gen.add_argument("--no-generate", action="store_true", help="fail instead of generating missing outputs")
    add_checkpoint_args(parser)
    asr = parser.add_argument_group("transcription (only where a sample has no output.json)")
    asr.add_argument("--asr", default="whisper", choices=ASR_CHOICES,
                     help="existing: use the output.json files already there; whisper (faster-whisper, default); "
                          "parakeet (NeMo, FDB's choice); pocketsphinx (ships its model; timing only)")
    asr.add_argument("--asr-model", default=None,
                     help="whisper: a local CTranslate2 folder or hub id (default 'base'); parakeet: a .nemo file "
                          "or model name (default nvidia/parakeet-tdt-0.6b-v2)")
    asr.add_argument("--asr-device", default="cpu", help="device of the ASR model (default cpu)")
    asr.add_argument("--no-vad-gate", action="store_true", help="keep ASR words outside VAD speech")
    score = parser.add_argument_group("scoring")
    score.add_argument("--bc-vad-rate", default="resample16k", choices=BC_RATE_MODES,
                       help="backchannel VAD input: resample16k (default; FDB after PR #12) or native (FDB <= "
                            "d7336bd: a 24 kHz file read as 16 kHz, all times x1.5)")
    score.add_argument("--bc-rule", default="head", choices=BC_RULES,
                       help="backchannel list rule: head (FDB since 1d40caa, default) or legacy (the paper era: a "
                            "TOR=1 segment clears the list)")
    score.add_argument("--fdb-dir", default=None,
                       help="a Full-Duplex-Bench checkout: the ICC ground truth and the judge prompt are read "
                            "from it (both CC BY-NC 4.0, so not shipped here)")
    score.add_argument("--icc-gt", default=None, help="icc_gt_distribution.json (instead of --fdb-dir)")
    score.add_argument("--judge-prompt", default=None, help="the judge's system prompt file (instead of --fdb-dir)")
    score.add_argument("--no-judge", action="store_true", help="user_interruption without the relevance rating")
    score.add_argument("--judge-tries", type=int, default=3,
                       help="asks per sample until the answer parses (default 3; FDB loops forever)")
    add_judge_arguments(parser)


def _progress(args) -> bool:
    return not args.no_progress


def step_generate(args, folders: list[Path]) -> int:
    missing = [f for f in folders if not (f / "output.wav").is_file()]
    if not missing:
        return 0
    if args.no_generate:
        raise EvalError(f"{len(missing)} sample(s) have no output.wav (e.g. {missing[0]}) and --no-generate is set")
    for folder in missing:
        if not (folder / "input.wav").is_file():
            raise EvalError(f"{folder} has neither output.wav nor input.wav to generate it from")
    from ..cli import open_checkpoint
    from ..engine import SamplingParams
    from .fdb_generate import generate, input_frames

    if args.batch < 1:
        raise EvalError("--batch must be at least 1")
    input_frames(missing)  # a bad input.wav fails before the checkpoint loads
    ckpt = open_checkpoint(args)
    prompt = args.text_prompt if args.text_prompt is not None else TASK_PROMPTS[args.task]
    return generate(ckpt, missing, prompt, args.voice, args.seed, batch=args.batch,
                    sampling=SamplingParams(greedy=args.greedy), progress=_progress(args))


def _read_output(folder: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    path = folder / "output.wav"
    try:
        wav, rate = sf.read(str(path), dtype="float32")
    except Exception as exc:  # soundfile raises its own error types for bad files
        raise EvalError(f"cannot read {path}: {exc}") from None
    if wav.ndim == 2:
        wav = wav.mean(axis=1)  # FDB's ASR averages channels
    return wav, rate


def step_transcribe(args, folders: list[Path], annotations: dict) -> int:
    from tqdm import tqdm

    from .asr import make_backend, transcribe_output
    from .fdb_data import write_json_atomic

    missing = [f for f in folders if not (f / "output.json").is_file()]
    if not missing:
        return 0
    if args.asr == "existing":
        raise EvalError(f"--asr existing, but {len(missing)} sample(s) have no output.json (e.g. {missing[0]}); "
                        "choose an ASR (--asr whisper|parakeet|pocketsphinx)")
    backend = make_backend(args.asr, args.asr_model, args.asr_device)
    for folder in tqdm(missing, desc=f"transcribe ({args.asr})", disable=not _progress(args)):
        wav, rate = _read_output(folder)
        offset = float(annotations[folder.name]["timestamp"][1]) if args.task == "user_interruption" else 0.0
        write_json_atomic(folder / "output.json", transcribe_output(backend, wav, rate, offset,
                                                                    vad_gate=not args.no_vad_gate))
    return len(missing)


def _rater(args, out: Path):
    from .fdb_score import interruption_user_message
    from .judge import Judge, config_from_args, judge_parsed, parse_fdb_rating

    if args.no_judge:
        return None, None
    from .fdb_data import load_judge_prompt

    system = load_judge_prompt(args.judge_prompt, args.fdb_dir)
    judge = Judge(config_from_args(args, default_cache=out / "judge_cache"))

    def rate(name: str, annotation: dict, transcript: dict):
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": interruption_user_message(
                        annotation["context"], annotation["interrupt"], transcript["text"])}]
        parsed, replies = judge_parsed(judge, messages, parse_fdb_rating, tries=args.judge_tries)
        return (parsed["rating"] if parsed else None), replies

    return rate, judge


def _distribution(samples: dict, gt: dict) -> dict:
    """Mean occupancy of the predicted backchannels and of the ground truth over normalised time (report)."""
    grid = np.linspace(0, 1, DISTRIBUTION_BINS)
    pred, truth = np.zeros(DISTRIBUTION_BINS), np.zeros(DISTRIBUTION_BINS)
    for name, s in samples.items():
        g = np.asarray(gt[name], dtype=np.float64)
        truth += np.interp(grid, np.linspace(0, 1, len(g)), g / max(g.sum(), 1e-12))
        hist = np.zeros(DISTRIBUTION_BINS)
        for a, b in s["events"]:
            lo = int(a / s["duration"] * (DISTRIBUTION_BINS - 1))
            hi = int(b / s["duration"] * (DISTRIBUTION_BINS - 1))
            hist[max(0, lo):min(DISTRIBUTION_BINS, hi + 1)] += 1
        pred += hist / hist.sum() if hist.sum() > 0 else hist
    n = max(1, len(samples))
    return {"pred": (pred / n).tolist(), "gt": (truth / n).tolist()}


def step_score(args, folders: list[Path], annotations: dict, rater=(None, None)):
    from . import fdb_score
    from .fdb_data import load_icc_gt, read_transcript

    transcripts = {f.name: read_transcript(f) for f in folders}
    task = args.task
    rate, judge = rater
    if task == "pause_handling":
        score = fdb_score.score_pause({n: t["chunks"] for n, t in transcripts.items()})
    elif task == "smooth_turn_taking":
        score = fdb_score.score_turn_taking({n: t["chunks"] for n, t in transcripts.items()},
                                            {n: float(a["timestamp"][0]) for n, a in annotations.items()})
    elif task == "user_interruption":
        score = fdb_score.score_interruption(transcripts, annotations, rate)
    else:
        from tqdm import tqdm

        from .vad import backchannel_segments

        gt = load_icc_gt(args.icc_gt, args.fdb_dir)
        samples = {}
        for folder in tqdm(folders, desc="backchannel VAD", disable=not _progress(args)):
            wav, rate_hz = _read_output(folder)
            samples[folder.name] = {"segments": backchannel_segments(wav, rate_hz, args.bc_vad_rate),
                                    "chunks": transcripts[folder.name]["chunks"], "duration": len(wav) / rate_hz}
        score = fdb_score.score_backchannel(samples, gt, rule=args.bc_rule)
        for name, s in score.samples.items():
            s["duration"] = samples[name]["duration"]
        score.notes.append(f"backchannel VAD input: {args.bc_vad_rate}")
        score.distribution = _distribution(score.samples, gt)
    return score, judge


def run(args: argparse.Namespace) -> int:
    import json

    from .fdb_data import read_annotation, sample_dirs, write_json_atomic

    out = Path(args.out)
    folders = sample_dirs(Path(args.root), args.task)
    if args.limit is not None:
        if args.limit < 1:
            raise EvalError("--limit must be at least 1")
        folders = folders[: args.limit]
    annotations = {}
    if args.task in ("smooth_turn_taking", "user_interruption"):
        annotations = {f.name: read_annotation(f, args.task) for f in folders}  # fail before any compute
    rater = _rater(args, out) if args.task == "user_interruption" else (None, None)  # a bad key fails now
    if args.task == "backchannel":
        from .fdb_data import load_icc_gt
        load_icc_gt(args.icc_gt, args.fdb_dir)
    generated = step_generate(args, folders)
    transcribed = step_transcribe(args, folders, annotations)
    score, judge = step_score(args, folders, annotations, rater)
    entry = score.to_json()
    entry["settings"] = {"root": str(Path(args.root).resolve()), "asr": args.asr, "vad_gate": not args.no_vad_gate,
                         "bc_vad_rate": args.bc_vad_rate, "bc_rule": args.bc_rule, "generated": generated,
                         "transcribed": transcribed}
    if score.distribution is not None:
        entry["distribution"] = score.distribution
    if judge is not None:
        entry["settings"].update(judge_model=judge.config.model, judge_sent=judge.sent,
                                 judge_cache_hits=judge.cache_hits)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results[args.task] = entry
    write_json_atomic(results_path, results)
    figures = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in score.figures.items())
    print(f"{args.task}: {len(folders)} samples ({generated} generated, {transcribed} transcribed): {figures}")
    for note in score.notes:
        print(f"  note: {note}")
    from .report import write_report

    report = write_report(out, results)
    print(f"wrote {results_path} and {report}")
    return 0
