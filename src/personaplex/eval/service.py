"""`personaplex eval service`: customer-service calls, judged on naturalness and task adherence (0-5).

    personaplex eval service --checkpoint DIR --out runs/service --judge-url https://api.openai.com/v1
    personaplex eval service --demo --out /tmp/service --judge-url http://127.0.0.1:8000/v1 --limit 2

A ServiceDuplexBench-style run. Each scenario (a small set ships in `eval/data/service_scenarios.json`;
`--scenarios FILE` for others) gives the agent a persona (text prompt and voice) and a caller: scripted turns
spoken by espeak-ng (`--tts`; `personaplex synth`'s backends). The calls run full duplex on `BatchEngine`, many
at once (`--batch`): the caller's audio stream starts with `--lead` seconds of silence and speaks each turn
after a natural pause: once the agent has answered and then been quiet for `--reply-gap` seconds, or after
`--max-reply` seconds without that. Whether the agent talks is read from its text stream (the inner monologue,
which runs with its speech).

The agent's replies (what it said from the end of one caller turn to the start of the next, so words said
over the caller count) are its text stream decoded (`--asr text`, default: no ASR model), or an ASR of its
audio through `personaplex.eval.asr` (`--asr whisper --asr-model DIR`, `pocketsphinx`, `parakeet`). The judge
(any OpenAI-compatible endpoint, answers cached by prompt hash under OUT/judge_cache) reads the persona, what a
good agent does in the scenario and the dialogue, and rates both scales; an answer that does not parse is
asked again (`--judge-tries`) and, failing that, recorded as unparsed and left out of the means.

Out: OUT/<id>/conversation.wav (agent left, caller right, 24 kHz) and dialogue.json, OUT/results.json
(per-scenario scores, means), OUT/report.md. A scenario whose dialogue.json exists is not run again
(`--overwrite` to redo); judging re-runs for free from the cache.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from ..config import FRAME_SIZE, SAMPLE_RATE, TEXT_EPAD, TEXT_PAD
from . import EvalError

log = logging.getLogger("personaplex.eval.service")

FRAME_SECONDS = FRAME_SIZE / SAMPLE_RATE
ASR_CHOICES = ("text", "whisper", "pocketsphinx", "parakeet")
DEFAULT_JUDGE_MODEL = "gpt-4o"
LABELS = {"naturalness": "Naturalness", "adherence": "Task adherence"}


# -- scenarios --------------------------------------------------------------------------------------------------
@dataclass
class Scenario:
    id: str
    text_prompt: str
    voice: str
    task: str
    turns: list[str]
    caller_voice: str | None = None
    seed_offset: int = 0  # its place in the file: call seeds stay the same whatever subset runs


def load_scenarios(path: str | Path | None = None) -> list[Scenario]:
    """The scenarios of a JSON file ({"scenarios": [...]} or a list); None: the ones shipped with the package."""
    if path is None:
        text = resources.files("personaplex.eval").joinpath("data/service_scenarios.json").read_text("utf-8")
        where = "service_scenarios.json"
    else:
        where = str(path)
        try:
            text = Path(path).read_text("utf-8")
        except OSError as exc:
            raise EvalError(f"--scenarios {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise EvalError(f"{where}: not valid JSON ({exc})") from None
    items = raw.get("scenarios") if isinstance(raw, dict) else raw
    if not isinstance(items, list) or not items:
        raise EvalError(f"{where}: expected a non-empty list of scenarios (or {{\"scenarios\": [...]}})")
    scenarios = []
    for i, item in enumerate(items):
        def need(key: str, kind=str):
            value = item.get(key) if isinstance(item, dict) else None
            if not isinstance(value, kind) or not value:
                raise EvalError(f"{where}: scenario {i} needs a non-empty {key!r}")
            return value

        sid, turns = need("id"), need("turns", list)
        if "/" in sid or sid.startswith(".") or len(sid) > 80:
            raise EvalError(f"{where}: scenario id {sid!r} must be a plain file name")
        if not all(isinstance(t, str) and t.strip() for t in turns):
            raise EvalError(f"{where}: scenario {sid!r}: every turn must be non-empty text")
        scenarios.append(Scenario(sid, need("text_prompt"), need("voice"), need("task"), [t.strip() for t in turns],
                                  item.get("caller_voice"), i))
    ids = [s.id for s in scenarios]
    if len(set(ids)) != len(ids):
        raise EvalError(f"{where}: scenario ids must be unique")
    return scenarios


# -- the caller --------------------------------------------------------------------------------------------------
@dataclass
class CallerTiming:
    lead: float = 0.5  # silence before the first turn
    reply_gap: float = 0.8  # agent quiet this long after answering: the caller goes on
    min_pause: float = 0.3  # the caller never starts sooner than this after its last turn
    max_reply: float = 8.0  # the caller goes on after this long without a finished answer
    tail: float = 0.5  # the call goes on this long after the last answer

    def validate(self) -> "CallerTiming":
        if min(self.reply_gap, self.max_reply) <= 0 or min(self.lead, self.min_pause, self.tail) < 0:
            raise EvalError("--reply-gap and --max-reply must be positive, --lead non-negative")
        return self


class Caller:
    """The caller's side of one call: a frame of audio per step, decided from the agent's text stream."""

    def __init__(self, turns: list[np.ndarray], timing: CallerTiming) -> None:
        self.turns, self.timing = turns, timing
        self.frame = 0  # frames produced so far
        self.turn = -1  # the turn being spoken or answered; -1: lead-in
        self.audio = np.zeros(0, np.float32)  # what is left of the current turn
        self.wait = int(round(timing.lead / FRAME_SECONDS))  # lead-in frames left
        self.waited = 0
        self.answered = False
        self.quiet = 0
        self.done = False
        self.spans: list[tuple[int, int]] = []  # (first, last + 1) frame of each caller turn

    def next_frame(self) -> np.ndarray:
        out = np.zeros(FRAME_SIZE, np.float32)
        if self.wait > 0:  # the lead-in
            self.wait -= 1
        else:
            if self.turn < 0:
                self._start_turn()
            if self.audio.size:
                piece, self.audio = self.audio[:FRAME_SIZE], self.audio[FRAME_SIZE:]
                out[: piece.size] = piece
                if self.audio.size == 0:
                    self.spans[-1] = (self.spans[-1][0], self.frame + 1)
        self.frame += 1
        return out

    def heard(self, text_token: int) -> None:
        """The agent's text token of the frame just produced: speaking unless PAD / EPAD."""
        if self.done or self.wait > 0 or self.turn < 0 or self.audio.size or self.frame <= self.spans[-1][1]:
            return  # lead-in, or the caller still talking (its turn's last frame included)
        t = self.timing
        self.waited += 1
        if text_token in (TEXT_PAD, TEXT_EPAD):
            self.quiet += 1
        else:
            self.answered, self.quiet = True, 0
        finished = self.answered and self.quiet * FRAME_SECONDS >= t.reply_gap
        if self.waited * FRAME_SECONDS >= t.min_pause and (finished or self.waited * FRAME_SECONDS >= t.max_reply):
            if self.turn + 1 < len(self.turns):
                self._start_turn()
            elif self.quiet * FRAME_SECONDS >= t.tail or self.waited * FRAME_SECONDS >= t.max_reply + t.tail:
                self.done = True

    def _start_turn(self) -> None:
        self.turn += 1
        self.audio = self.turns[self.turn]
        self.spans.append((self.frame, self.frame))  # the turn's first frame is the next one produced
        self.waited, self.answered, self.quiet = 0, False, 0


def speak_turns(scenarios: list[Scenario], tts_spec: str) -> dict[str, list[np.ndarray]]:
    """Every caller turn as 24 kHz audio (peak 0.5), by scenario id."""
    from ..audio import resample
    from ..train.synth import load_tts

    tts = load_tts(tts_spec)
    out = {}
    for s in scenarios:
        lines = []
        for text in s.turns:
            utt = tts.synthesize(text, s.caller_voice)
            pcm = resample(np.asarray(utt.pcm, np.float32), utt.sample_rate, SAMPLE_RATE)
            peak = float(np.abs(pcm).max()) if pcm.size else 0.0
            lines.append((pcm * (0.5 / peak) if peak > 0 else pcm).astype(np.float32))
        out[s.id] = lines
    return out


# -- running the calls ---------------------------------------------------------------------------------------------
@dataclass
class Call:
    scenario: Scenario
    caller: Caller
    user: list[np.ndarray] = field(default_factory=list)
    agent: list[np.ndarray] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


def run_calls(ckpt, personas, scenarios: list[Scenario], audio: dict[str, list[np.ndarray]], timing: CallerTiming,
              batch: int = 8, seed: int = 0, voice: str | None = None, params=None, progress: bool = False,
              max_seconds: float = 120.0) -> list[Call]:
    """Every scenario as one full-duplex call, up to `batch` at a time on one `BatchEngine` (a finished call
    leaves and the next joins). A call is cut at `max_seconds`."""
    import torch
    from tqdm import tqdm

    from ..engine import BatchEngine, SamplingParams

    engine = BatchEngine(ckpt.lm, ckpt.mimi, max_batch=max(1, min(batch, len(scenarios))))
    waiting = [Call(s, Caller(audio[s.id], timing)) for s in scenarios]
    finished: list[Call] = []
    live: dict[int, Call] = {}  # conversation id -> call
    limit = int(max_seconds / FRAME_SECONDS)
    bar = tqdm(total=len(scenarios), unit="call", desc="service calls", disable=not progress)
    try:
        while waiting or live:
            while waiting and engine.active < engine.max_batch:
                call = waiting.pop(0)
                s = call.scenario
                persona = personas.get(voice or s.voice, s.text_prompt)
                base = params or SamplingParams()
                conv = engine.join(persona, SamplingParams(**{**asdict(base), "seed": seed + s.seed_offset}))
                live[conv.id] = call
            convs = engine.conversations
            frames = [live[c.id].caller.next_frame() for c in convs]
            results = engine.step(torch.from_numpy(np.stack(frames)))
            for conv, frame, result in zip(convs, frames, results):
                call = live[conv.id]
                call.user.append(frame)
                call.agent.append(result.pcm.numpy().copy())
                call.tokens.append(int(result.text_token))
                call.caller.heard(int(result.text_token))
                if call.caller.done or len(call.tokens) >= limit:
                    if not call.caller.done:
                        log.warning("%s: cut at %.0f s", call.scenario.id, max_seconds)
                    engine.leave(conv)
                    finished.append(live.pop(conv.id))
                    bar.update(1)
    finally:
        bar.close()
        engine.clear()
    order = {s.id: i for i, s in enumerate(scenarios)}
    return sorted(finished, key=lambda c: order[c.scenario.id])


def dialogue_of(call: Call, tokenizer) -> dict:
    """The turns of a finished call: each caller line with its span, and the agent's reply window after it
    (from the end of the turn to the start of the next) with the agent's text-stream words there."""
    spans = call.caller.spans
    turns = []
    for i, (start, end) in enumerate(spans):
        reply_end = spans[i + 1][0] if i + 1 < len(spans) else len(call.tokens)
        turns.append({"caller": call.scenario.turns[i], "caller_start": round(start * FRAME_SECONDS, 3),
                      "caller_end": round(end * FRAME_SECONDS, 3), "reply_start": round(end * FRAME_SECONDS, 3),
                      "reply_end": round(reply_end * FRAME_SECONDS, 3),
                      "agent_text_stream": tokenizer.decode(call.tokens[end:reply_end]).strip()})
    return {"id": call.scenario.id, "seconds": round(len(call.tokens) * FRAME_SECONDS, 3),
            "turns_spoken": len(spans), "turns": turns}


def transcribe_replies(dialogue: dict, agent: np.ndarray, asr, vad_gate: bool = True) -> None:
    """Fill each turn's "agent" with what `asr` hears in its reply window of the agent's audio, keeping only
    words that overlap silero VAD speech (as `eval fdb` does: offline ASRs invent words in silence)."""
    from .asr import gate_words
    from .vad import VAD_RATE, speech_seconds, to_16k

    for turn in dialogue["turns"]:
        a, b = int(turn["reply_start"] * SAMPLE_RATE), int(turn["reply_end"] * SAMPLE_RATE)
        wav16k = to_16k(agent[a:b], SAMPLE_RATE) if b > a else np.zeros(0, np.float32)
        words = asr.transcribe(wav16k) if wav16k.size else []
        if vad_gate and words:
            words = gate_words(words, speech_seconds(wav16k, VAD_RATE))
        turn["agent"] = " ".join(w.text.strip() for w in words).strip()


# -- judging -----------------------------------------------------------------------------------------------------
JUDGE_SYSTEM = "You are a strict, careful evaluator of spoken customer-service conversations."
JUDGE_PROMPT = (
    "Below is a phone call between a caller and an AI customer-service agent. The call was full duplex (either "
    "side could talk at any time); the agent's words are {source}, so expect small transcription errors, and an "
    "empty reply means the agent said nothing.\n\n"
    "The agent's instructions:\n\"\"\"{text_prompt}\"\"\"\n\n"
    "What a good agent does in this call:\n{task}\n\n"
    "The call:\n{dialogue}\n\n"
    "Rate the agent on two scales, each an integer from 0 to 5:\n"
    "- Naturalness: does it speak like a fluent, natural human service agent: coherent, well-formed sentences, "
    "polite, concise enough for speech, answering when addressed? 0: no speech or gibberish; 5: fully natural.\n"
    "- Task adherence: does it stay in its role, use the information of its instructions correctly and do what "
    "the call needs, without inventing facts? 0: ignores its role and the caller; 5: does everything a good agent "
    "does.\n\n"
    "Answer in exactly this format:\nAnalysis: <two or three sentences>\nNaturalness: <0-5>\nTask adherence: <0-5>")


def judge_prompt(scenario: Scenario, dialogue: dict, source: str) -> str:
    lines = []
    for turn in dialogue["turns"]:
        lines.append(f"Caller: {turn['caller']}")
        lines.append(f"Agent: {turn.get('agent') or '(silence)'}")
    return JUDGE_PROMPT.format(source=source, text_prompt=scenario.text_prompt, task=scenario.task,
                               dialogue="\n".join(lines))


def parse_scores(reply: str) -> dict | None:
    """{"naturalness", "adherence"} when the reply has both "Naturalness: N" and "Task adherence: N" in 0-5."""
    from .judge import parse_labeled_score

    scores = {key: parse_labeled_score(reply, label, 0, 5) for key, label in LABELS.items()}
    return scores if all(v is not None for v in scores.values()) else None


def judge_call(judge, scenario: Scenario, dialogue: dict, source: str, tries: int = 3) -> dict:
    from .judge import judge_parsed

    messages = [{"role": "system", "content": JUDGE_SYSTEM},
                {"role": "user", "content": judge_prompt(scenario, dialogue, source)}]
    parsed, replies = judge_parsed(judge, messages, parse_scores, tries)
    out = {"replies": replies, "parsed": parsed is not None}
    out.update(parsed or {"naturalness": None, "adherence": None})
    return out


def summarize(rows: list[dict]) -> dict:
    judged = [r for r in rows if r["judge"]["parsed"]]
    means = {key: (float(np.mean([r["judge"][key] for r in judged])) if judged else None) for key in LABELS}
    return {**means, "scenarios": len(rows), "judged": len(judged), "unparsed": len(rows) - len(judged)}


def report_section(result: dict) -> str:
    def fmt(v):
        return "n/a" if v is None else f"{v:.2f}"

    lines = ["## Service agent (ServiceDuplexBench-style)", "",
             f"Judge `{result['judge_model']}`, replies from {result['reply_source']}; "
             f"{result['judged']} of {result['scenarios']} calls judged"
             + (f", {result['unparsed']} unparsed answers left out" if result["unparsed"] else "") + ".", "",
             f"**Naturalness {fmt(result['naturalness'])} / 5, task adherence {fmt(result['adherence'])} / 5** "
             "(the released model card reports 4.40 / 5 on ServiceDuplexBench, a different scenario set).", "",
             "| scenario | naturalness | task adherence | seconds |", "|---|---|---|---|"]
    for row in result["calls"]:
        j = row["judge"]
        lines.append(f"| {row['id']} | {fmt(j['naturalness'])} | {fmt(j['adherence'])} | {row['seconds']:.1f} |")
    if result.get("demo"):
        lines += ["", "DEMO checkpoint: random weights, so these scores rate noise; they test the pipeline only."]
    return "\n".join(lines) + "\n"


# -- command line ------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import add_checkpoint_args
    from .judge import add_judge_arguments

    io = parser.add_argument_group("scenarios and output")
    io.add_argument("--out", required=True, help="output folder (calls, results.json, report.md)")
    io.add_argument("--scenarios", default=None, help="scenario JSON (default: the set shipped with the package)")
    io.add_argument("--only", default=None, help="comma-separated scenario ids to run")
    io.add_argument("--limit", type=int, default=None, help="run the first N scenarios")
    io.add_argument("--max-turns", type=int, default=None, help="caller turns per call at most")
    io.add_argument("--overwrite", action="store_true", help="run calls again even where dialogue.json exists")
    call = parser.add_argument_group("calls")
    call.add_argument("--batch", type=int, default=8, help="calls stepped together (default 8)")
    call.add_argument("--seed", type=int, default=0, help="seed of the first scenario; each gets seed + its index")
    call.add_argument("--voice", default=None, help="one agent voice for every scenario instead of their own")
    call.add_argument("--tts", default="espeak", help="caller TTS: espeak (default), tones, or package.module:Class")
    d = CallerTiming()
    call.add_argument("--lead", type=float, default=d.lead, help=f"silence before the first turn (default {d.lead})")
    call.add_argument("--reply-gap", type=float, default=d.reply_gap,
                      help=f"agent quiet this long after answering: the caller goes on (default {d.reply_gap} s)")
    call.add_argument("--max-reply", type=float, default=d.max_reply,
                      help=f"the caller goes on after this long anyway (default {d.max_reply} s)")
    call.add_argument("--max-seconds", type=float, default=120.0, help="a call is cut at this length")
    asr = parser.add_argument_group("agent replies")
    asr.add_argument("--asr", choices=ASR_CHOICES, default="text",
                     help="text: the agent's own text stream (default, no ASR); or an ASR of its audio")
    asr.add_argument("--asr-model", default=None, help="ASR model folder or id (whisper, parakeet)")
    add_judge_arguments(parser, default_model=DEFAULT_JUDGE_MODEL, default_temperature=0.0)
    parser.add_argument("--judge-tries", type=int, default=3, help="asks per call until the answer parses")
    add_checkpoint_args(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def select(scenarios: list[Scenario], only: str | None, limit: int | None, max_turns: int | None) -> list[Scenario]:
    if only:
        wanted = [w.strip() for w in only.split(",") if w.strip()]
        known = {s.id for s in scenarios}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise EvalError(f"--only: unknown scenario {unknown[0]!r}; known: {', '.join(sorted(known))}")
        scenarios = [s for s in scenarios if s.id in wanted]
    if limit is not None:
        if limit < 1:
            raise EvalError("--limit must be at least 1")
        scenarios = scenarios[:limit]
    if max_turns is not None:
        if max_turns < 1:
            raise EvalError("--max-turns must be at least 1")
        scenarios = [Scenario(**{**asdict(s), "turns": s.turns[:max_turns]}) for s in scenarios]
    return scenarios


def generate(args: argparse.Namespace, scenarios: list[Scenario], out: Path, timing: CallerTiming) -> None:
    """Run the calls of `scenarios` and write each one's conversation.wav and dialogue.json."""
    from ..audio import write_wav
    from ..cli import open_checkpoint
    from ..engine import Personas
    from ..errors import VoiceNotFoundError

    ckpt = open_checkpoint(args)
    personas = Personas(ckpt.lm, ckpt.mimi, ckpt.tokenizer, ckpt.files.voices_dir, allow_paths=True)
    for s in scenarios:
        try:
            personas.voice_path(args.voice or s.voice)
        except VoiceNotFoundError as exc:
            raise EvalError(f"scenario {s.id}: {exc}; or pass --voice NAME to give every scenario one voice") from None
    audio = speak_turns(scenarios, args.tts)
    calls = run_calls(ckpt, personas, scenarios, audio, timing, batch=args.batch, seed=args.seed, voice=args.voice,
                      progress=not args.no_progress, max_seconds=args.max_seconds)
    for call in calls:
        folder = out / call.scenario.id
        stereo = np.stack([np.concatenate(call.agent), np.concatenate(call.user)])  # (2, T): agent left
        write_wav(folder / "conversation.wav", stereo, SAMPLE_RATE)
        dialogue = dialogue_of(call, ckpt.tokenizer)
        dialogue.update(voice=args.voice or call.scenario.voice, seed=args.seed + call.scenario.seed_offset,
                        checkpoint=str(ckpt.files.source), demo=bool(args.demo), tts=args.tts)
        tmp = folder / "dialogue.json.tmp"
        tmp.write_text(json.dumps(dialogue, indent=1, ensure_ascii=False) + "\n")
        tmp.replace(folder / "dialogue.json")  # written last: its presence means the call is complete


def run(args: argparse.Namespace) -> int:
    from .judge import Judge, config_from_args

    if args.batch < 1 or args.max_seconds <= 0 or args.judge_tries < 1:
        raise EvalError("--batch and --judge-tries must be at least 1, --max-seconds positive")
    timing = CallerTiming(lead=args.lead, reply_gap=args.reply_gap, max_reply=args.max_reply).validate()
    scenarios = select(load_scenarios(args.scenarios), args.only, args.limit, args.max_turns)
    from ..cli import output_dir

    out = output_dir(args.out, "--out")
    judge = Judge(config_from_args(args, out / "judge_cache"))  # bad judge flags fail before any model work
    backend = None
    if args.asr != "text":
        from .asr import make_backend

        backend = make_backend(args.asr, args.asr_model, args.device or "cpu")
    todo = [s for s in scenarios if args.overwrite or not (out / s.id / "dialogue.json").is_file()]
    if todo:
        generate(args, todo, out, timing)
    if len(todo) < len(scenarios):
        log.info("%d of %d calls were already there (--overwrite to run them again)",
                 len(scenarios) - len(todo), len(scenarios))
    source = ("the agent's own text stream (its inner monologue, not an ASR of its audio)" if backend is None
              else f"an automatic transcription ({args.asr}) of its audio")
    rows, demo = [], bool(args.demo)
    for s in scenarios:
        dialogue = json.loads((out / s.id / "dialogue.json").read_text())
        demo = demo or bool(dialogue.get("demo"))
        if backend is None:
            for turn in dialogue["turns"]:
                turn["agent"] = turn["agent_text_stream"]
        else:
            from ..audio import read_audio

            transcribe_replies(dialogue, read_audio(out / s.id / "conversation.wav", channel="left"), backend)
        verdict = judge_call(judge, s, dialogue, source, args.judge_tries)
        rows.append({"id": s.id, "voice": dialogue.get("voice"), "seconds": dialogue["seconds"],
                     "turns": dialogue["turns"], "judge": verdict})
    result = {"judge_model": args.judge_model, "reply_source": source, "asr": args.asr, "demo": demo,
              **summarize(rows), "calls": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    (out / "report.md").write_text(report_section(result))
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    print(f"service: naturalness {fmt(result['naturalness'])} / 5, task adherence {fmt(result['adherence'])} / 5 "
          f"over {result['judged']} of {result['scenarios']} calls"
          + (f" ({result['unparsed']} unparsed)" if result["unparsed"] else "")
          + f"; judge sent {judge.sent}, cached {judge.cache_hits}; wrote {out / 'results.json'}")
    return 0 if result["judged"] else 1
