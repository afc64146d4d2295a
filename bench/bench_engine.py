"""Conversation engine: time to first audio for a new conversation, and step throughput.

    .venv/bin/python bench/bench_engine.py [--checkpoint DIR] [--batch 1 8] [--frames 25]

Time to first audio = from "a caller arrives with (voice, text prompt)" to the first 80 ms of agent audio:
  cached   the persona's prompt state is in the cache: join + one step
  prefill  the prompt runs as one batched prefill (first caller of a persona)
  stepped  the released way: every prompt frame is a full model step (depformer included), then one step
Throughput: frames per second of `BatchEngine.step` (Mimi encode + LM step + Mimi decode for every
conversation of the batch); real time needs 12.5 frames/s per conversation.
Defaults to the `--demo` checkpoint (tiny LM, full-size Mimi).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from personaplex.checkpoint import load_checkpoint
from personaplex.demo import demo_checkpoint_dir
from personaplex.engine import BatchEngine, Personas, SamplingParams, build_persona, prompt_frames
from personaplex.lm import step_frame

PROMPT = ("You work for SwiftPlex Appliances, which sells and repairs home appliances, and your name is Ana. "
          "Help customers book repairs, check order status and answer warranty questions.")


def _median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--voice", default="DEMO_LOW")
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    ckpt = load_checkpoint(args.checkpoint or demo_checkpoint_dir(), device=args.device)
    lm, mimi = ckpt.lm, ckpt.mimi
    personas = Personas(lm, mimi, ckpt.tokenizer, ckpt.files.voices_dir)
    _, voice = personas.voice(args.voice)
    ids = ckpt.tokenizer.system_prompt_ids(PROMPT)
    frame = torch.randn(1, 1920) * 0.05
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}; "
          f"LM {lm.num_parameters() / 1e6:.1f} M params, prompt {prompt_frames(voice, ids, lm.config).shape[1]} frames")

    engine = BatchEngine(lm, mimi, max_batch=1)  # a running server's engine: allocated once

    def first_audio(persona):
        conv = engine.join(persona, SamplingParams(seed=0))
        engine.step(frame)
        engine.leave(conv)

    cached = build_persona(lm, voice, ids)
    first_audio(cached)  # warm-up
    t_cached = _median_ms(lambda: first_audio(cached), args.repeat)
    t_prefill = _median_ms(lambda: first_audio(build_persona(lm, voice, ids)), args.repeat)

    def stepped():
        frames = prompt_frames(voice, ids, lm.config)
        grid = lm.delay(frames[None])
        state = lm.init_state(1)
        with torch.no_grad():
            for s in range(frames.shape[1]):
                step_frame(lm, state, grid[:, :, s], forced=grid[:, : 1 + lm.config.dep_q, s + 1])
        first_audio(cached)  # plus the first conversation step, as above

    t_stepped = _median_ms(stepped, args.repeat)
    print("\ntime to first audio (median of %d)" % args.repeat)
    print(f"  cached persona   {t_cached:8.1f} ms")
    print(f"  prefill          {t_prefill:8.1f} ms   ({t_prefill / t_cached:.1f}x cached)")
    print(f"  stepped prompt   {t_stepped:8.1f} ms   ({t_stepped / t_cached:.1f}x cached, "
          f"{t_stepped / t_prefill:.1f}x prefill)")

    print("\nstep throughput")
    print(f"  {'batch':>5} {'ms/step':>9} {'frames/s':>9} {'real-time conversations':>24}")
    for batch in args.batch:
        engine = BatchEngine(lm, mimi, max_batch=batch)
        for i in range(batch):
            engine.join(cached, SamplingParams(seed=i))
        user = torch.randn(batch, 1920) * 0.05
        for _ in range(3):
            engine.step(user)
        ms = _median_ms(lambda: engine.step(user), args.frames)
        fps = batch * 1000 / ms
        print(f"  {batch:>5} {ms:>9.1f} {fps:>9.1f} {'yes' if ms <= 80 else 'no':>24}")


if __name__ == "__main__":
    main()
