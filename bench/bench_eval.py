"""Generation throughput of `personaplex eval fdb`: samples per minute at batch 1 and batch 8.

Runs the generation step (the same `generate()` the command uses) over N synthetic FDB samples of S seconds
(speech-like input at 16 kHz, as FDB's inputs), once per batch size, on the demo checkpoint by default (tiny
LM with random weights, full-size Mimi) or on --checkpoint. Prints one line per batch size and a markdown row.

    .venv/bin/python bench/bench_eval.py                  # demo model, 8 samples of 2 s, batch 1 and 8
    .venv/bin/python bench/bench_eval.py --checkpoint DIR --device cuda --samples 32 --seconds 20
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def make_samples(root: Path, count: int, seconds: float) -> list[Path]:
    import soundfile as sf

    from personaplex.audio import voiced_signal

    folders = []
    for i in range(count):
        folder = root / str(i)
        folder.mkdir(parents=True)
        sf.write(str(folder / "input.wav"), voiced_signal(seconds, seed=i, rate=16_000), 16_000)
        folders.append(folder)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the demo checkpoint)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)

    import torch

    from personaplex.checkpoint import load_checkpoint
    from personaplex.demo import demo_checkpoint_dir
    from personaplex.eval.fdb_data import TASK_PROMPTS
    from personaplex.eval.fdb_generate import generate

    if args.threads:
        torch.set_num_threads(args.threads)
    source = args.checkpoint or demo_checkpoint_dir()
    ckpt = load_checkpoint(source, device=args.device)
    print(f"checkpoint {source} on {args.device}; {cpu_name()}, {torch.get_num_threads()} threads; "
          f"{args.samples} samples of {args.seconds:g} s")
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            folders = make_samples(Path(tmp), args.samples, args.seconds)
            started = time.perf_counter()
            written = generate(ckpt, folders, TASK_PROMPTS["pause_handling"], None, seed=0, batch=batch,
                               progress=False)
            seconds = time.perf_counter() - started
        assert written == args.samples
        per_minute = written / seconds * 60
        audio_rt = written * args.seconds / seconds
        rows.append((batch, per_minute, audio_rt, seconds))
        print(f"batch {batch}: {written} samples in {seconds:.1f} s = {per_minute:.1f} samples/min "
              f"({audio_rt:.2f} s of input audio per second)")
    print("| batch | samples/min | audio s per s | wall s |")
    for batch, per_minute, audio_rt, seconds in rows:
        print(f"| {batch} | {per_minute:.1f} | {audio_rt:.2f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
