"""Every command of the README and docs/*.md that carries `--demo` runs as written, from a fresh checkout.

Commands are taken from fenced code blocks (a trailing backslash continues a line). A block whose first line
is `# demo-recipe` is run whole, in order, in one empty folder (with `docs/` of this checkout beside it, as
in a clone); any other command with `--demo` must either be in such a block or be listed in `EXCLUDED` with
the reason it cannot run here. So a new `--demo` command in the docs fails this test until it is classified.
The demo checkpoint is the one the test session builds (seeded into `$PERSONAPLEX_CACHE`), so nothing is
downloaded. Running the recipes takes minutes (the training recipe: ~7 min on a loaded 2-core machine), so
they are `slow`: `scripts/test.sh -m slow tests/test_docs.py` runs them; the classification check always runs.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = "# demo-recipe"

# command prefix -> why it is not run here (each must still appear in the docs: stale entries fail too).
EXCLUDED = {
    "personaplex serve --demo --static": "needs the released web client's build (client/dist); the --static flag "
                                         "is tested in tests/test_server_guard.py",
    "personaplex serve --demo": "a server runs until stopped; tests/test_haproxy.py and tests/test_server.py start "
                                "`serve --demo` and talk to it",
}
SYNOPSIS = re.compile(r"\[--|\|--|DIR\b|\.\.\.")  # usage lines ([--flag], A|B, placeholders), not commands


def code_blocks(path: Path) -> list[list[str]]:
    """The commands of each fenced code block of a Markdown file (continuation lines joined)."""
    blocks, current, inside = [], [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            if inside:
                blocks.append(current)
            current, inside = [], not inside
            continue
        if inside:
            current.append(line)
    commands = []
    for block in blocks:
        joined, pending = [], ""
        for line in block:
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1].strip() + " "
                continue
            joined.append((pending + line.strip()).strip())
            pending = ""
        commands.append(joined)
    return commands


def _commands(line: str) -> str:
    return line.split(" #")[0].strip() if not line.startswith("#") else ""


def recipes() -> list[tuple[str, list[str]]]:
    found = []
    for path in DOCS:
        for block in code_blocks(path):
            if block and block[0].strip().startswith(MARKER):
                found.append((f"{path.relative_to(ROOT)}:{len(found)}", [c for c in map(_commands, block) if c]))
    return found


def loose_demo_commands() -> list[tuple[str, str]]:
    """(file, command) of every `--demo` command outside the recipes."""
    found = []
    for path in DOCS:
        for block in code_blocks(path):
            if block and block[0].strip().startswith(MARKER):
                continue
            for command in map(_commands, block):
                if "--demo" in command.split() and command.startswith(("personaplex ", ".venv/bin/personaplex ")):
                    found.append((str(path.relative_to(ROOT)), command))
    return found


def test_every_demo_command_is_run_or_excluded_with_a_reason():
    assert recipes(), "no `# demo-recipe` block in README.md or docs/"
    unclassified, used = [], set()
    for where, command in loose_demo_commands():
        if SYNOPSIS.search(command):
            continue
        prefix = next((p for p in EXCLUDED if command.startswith(p)), None)
        if prefix is None:
            unclassified.append(f"{where}: {command}")
        used.add(prefix)
    assert not unclassified, "put these in a `# demo-recipe` block or in EXCLUDED: " + "; ".join(unclassified)
    assert used >= set(EXCLUDED), f"EXCLUDED entries no longer in the docs: {set(EXCLUDED) - used}"


@pytest.fixture(scope="module")
def demo_cache(demo_dir, tmp_path_factory):
    """A $PERSONAPLEX_CACHE in which `--demo` finds the session's demo checkpoint, with the released voice names
    the docs use (as the real demo build has them)."""
    import shutil

    from personaplex.demo import DEMO_VERSION, RELEASED_VOICE_ALIASES

    cache = tmp_path_factory.mktemp("docs-cache")
    target = cache / f"demo-v{DEMO_VERSION}"
    target.mkdir()
    for item in demo_dir.iterdir():
        (target / item.name).symlink_to(item) if item.name != "voices" else None
    voices = target / "voices"
    shutil.copytree(demo_dir / "voices", voices)
    for alias, name in RELEASED_VOICE_ALIASES.items():
        if not (voices / f"{alias}.wav").exists():
            (voices / f"{alias}.wav").symlink_to(voices / f"{name}.wav")
    return cache


def _run(command: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    argv = shlex.split(command)
    if argv[0] in ("personaplex", ".venv/bin/personaplex"):
        argv = [sys.executable, "-m", "personaplex.cli", *argv[1:]]  # the checkout's package, as .venv/bin's
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("where,commands", recipes(), ids=[w for w, _ in recipes()])
def test_demo_recipe_runs_verbatim(where, commands, demo_cache, tmp_path):
    (tmp_path / "docs").symlink_to(ROOT / "docs")  # a clone has docs/examples beside the commands
    env = {**os.environ, "PERSONAPLEX_CACHE": str(demo_cache), "OMP_NUM_THREADS": "2",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    for command in commands:
        done = _run(command, tmp_path, env)
        assert done.returncode == 0, f"{where}: `{command}` exited {done.returncode}:\n{done.stderr[-3000:]}"
    outputs = [c for c in commands if "--output-wav" in c]
    for command in outputs:
        wav = shlex.split(command)[shlex.split(command).index("--output-wav") + 1]
        assert (tmp_path / wav).stat().st_size > 44, command
