"""Full-Duplex-Bench's folder layout: which folders are samples, and reading their files with clear errors.

One folder per sample under the root: `input.wav`, the task's annotation, `output.wav` (agent only, mono, the
input's length) and `output.json` (`{"text", "chunks": [{"text", "timestamp": [start, end]}]}`).
"""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

from . import EvalError

log = logging.getLogger("personaplex.eval.fdb")

TASKS = ("pause_handling", "backchannel", "smooth_turn_taking", "user_interruption")
ANNOTATION = {"pause_handling": "pause.json", "smooth_turn_taking": "turn_taking.json",
              "user_interruption": "interrupt.json", "backchannel": None}
# The prompts the released model is evaluated with (PersonaPlex's documentation, as FDB's README records it).
TASK_PROMPTS = {
    "user_interruption": "You are a wise and friendly teacher. Answer questions or provide advice in a clear and "
                         "engaging way.",
    "pause_handling": "You enjoy having a good conversation.",
    "backchannel": "You enjoy having a good conversation.",
    "smooth_turn_taking": "You enjoy having a good conversation.",
}
FDB_EVAL_DIR = Path("v1_v1.5") / "evaluation"


def sample_dirs(root: Path, task: str) -> list[Path]:
    """The sample folders of `root`, sorted by name (numerically where names are numbers). Backchannel takes
    only folders named by a number, as FDB does (the name is the ground-truth key)."""
    if task not in TASKS:
        raise EvalError(f"--task must be one of {', '.join(TASKS)}, not {task!r}")
    root = Path(root)
    if not root.is_dir():
        raise EvalError(f"--root {root} is not a folder (expected one folder per sample)")
    dirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if task == "backchannel":
        skipped = [p.name for p in dirs if not p.name.isdigit()]
        if skipped:
            log.warning("backchannel: skipping %d folder(s) not named by a number (FDB does): %s",
                        len(skipped), ", ".join(sorted(skipped)[:5]))
        dirs = [p for p in dirs if p.name.isdigit()]
    if not dirs:
        raise EvalError(f"no sample folders under {root} for {task}")
    return sorted(dirs, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))


def read_json(path: Path):
    if not path.is_file():
        raise EvalError(f"{path} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise EvalError(f"{path} is not valid JSON ({exc})") from None


def read_annotation(folder: Path, task: str) -> dict:
    """The task's annotation's first entry (FDB reads only `[0]`)."""
    name = ANNOTATION[task]
    data = read_json(folder / name)
    if not isinstance(data, list) or not data or not isinstance(data[0], dict) or "timestamp" not in data[0]:
        raise EvalError(f"{folder / name}: expected a list whose first entry has a \"timestamp\"")
    ts = data[0]["timestamp"]
    if task == "user_interruption":
        if not (isinstance(ts, list) and len(ts) == 2) or "interrupt" not in data[0] or "context" not in data[0]:
            raise EvalError(f"{folder / name}: expected [{{\"context\", \"interrupt\", \"timestamp\": [start, end]}}]")
    elif task == "smooth_turn_taking" and not (isinstance(ts, list) and ts and isinstance(ts[0], (int, float))):
        raise EvalError(f"{folder / name}: expected [{{\"timestamp\": [user_turn_end, ...]}}]")
    return data[0]


def read_transcript(folder: Path) -> dict:
    data = read_json(folder / "output.json")
    if not isinstance(data, dict) or not isinstance(data.get("chunks"), list):
        raise EvalError(f"{folder / 'output.json'}: expected {{\"text\": ..., \"chunks\": [...]}}")
    for chunk in data["chunks"]:
        if not isinstance(chunk, dict) or not isinstance(chunk.get("timestamp"), list) \
                or len(chunk["timestamp"]) != 2:
            raise EvalError(f"{folder / 'output.json'}: chunk {chunk!r} needs \"timestamp\": [start, end]")
    data.setdefault("text", " ".join(str(c.get("text", "")) for c in data["chunks"]))
    return data


def write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)


def load_icc_gt(icc_gt: str | None, fdb_dir: str | None) -> dict:
    """FDB's backchannel ground truth (`icc_gt_distribution.json`, CC BY-NC 4.0, not shipped here): from
    --icc-gt FILE or a Full-Duplex-Bench checkout (--fdb-dir)."""
    if icc_gt:
        path = Path(icc_gt)
    elif fdb_dir:
        path = Path(fdb_dir) / FDB_EVAL_DIR / "icc_gt_distribution.json"
    else:
        raise EvalError("backchannel needs FDB's ground truth: pass --icc-gt icc_gt_distribution.json or "
                        "--fdb-dir with a Full-Duplex-Bench checkout")
    data = read_json(path)
    if not isinstance(data, dict):
        raise EvalError(f"{path}: expected {{sample name: [probabilities]}}")
    return data


def load_judge_prompt(judge_prompt: str | None, fdb_dir: str | None) -> str:
    """The user-interruption judge's system prompt: a text file (--judge-prompt), or read out of FDB's own
    `eval_user_interruption.py` in a checkout (--fdb-dir); it is FDB's text (CC BY-NC 4.0), not shipped here."""
    if judge_prompt:
        path = Path(judge_prompt)
        if not path.is_file():
            raise EvalError(f"--judge-prompt {path} is missing")
        return path.read_text(encoding="utf-8")
    if not fdb_dir:
        raise EvalError("the user_interruption judge needs FDB's prompt: pass --fdb-dir with a Full-Duplex-Bench "
                        "checkout or --judge-prompt FILE (or --no-judge)")
    path = Path(fdb_dir) / FDB_EVAL_DIR / "eval_user_interruption.py"
    if not path.is_file():
        raise EvalError(f"{path} is missing: --fdb-dir must be a Full-Duplex-Bench checkout")
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "system_msg"
                                                for t in node.targets):
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                return node.value.value
    raise EvalError(f"{path}: no `system_msg = \"...\"` string found; pass --judge-prompt FILE")
