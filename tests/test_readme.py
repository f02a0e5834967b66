"""Every README command is real: the test extracts the README's ```bash and ```python blocks (and the
``$ bnfold …`` lines of its ```text blocks) generically and runs them, as written, from a fresh folder
holding a copy of samples/ (a fresh clone: no out/ folder). `.ci/run` runs the README's test command.

The extraction below is shared with tests/test_docs.py, which runs it on every page of docs/."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import typer.main
import yaml

from conftest import ROOT

README = (ROOT / "README.md").read_text()

# ---------------------------------------------------------------------------------------- extraction
# A fenced block starts with ``` and its language at the start of a line and ends with ``` alone on a line.
FENCE = re.compile(r"^```([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
# what each language means: run (bash: its command lines; text: its `$ …` lines; python: the block),
# or read only (parsed, so that a JSON, TOML or YAML block is at least well-formed)
LANGUAGES = {"bash", "text", "python", "json", "toml", "yaml"}
RUN = ("bnfold ", "python -m bnfold ", "torchrun ", "python ")  # command lines the tests run
INSTALL = ("python3 -m venv ", ". .venv/bin/activate", "pip ", "python -m pip ")  # shown, not run (no index here)


def blocks(text: str, lang: str | None = None) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, in order; only those of ``lang`` when given."""
    return [(lg, body) for lg, body in FENCE.findall(text) if lang is None or lg == lang]


def _bash_command(line: str) -> str | None:
    """The command a ```bash line runs in the tests, or None for an install line. Anything else is an error:
    a documented command the tests would silently skip."""
    line = line.strip()
    if line.startswith("python3 -m venv ") and "&& bnfold " in line:  # install, then run: the bnfold part runs
        return "bnfold " + line.split("&& bnfold ", 1)[1]
    if line.startswith(INSTALL):
        return None
    if line.startswith(RUN):
        return line
    raise ValueError(f"a ```bash line the tests neither run nor know as an install step: {line!r}")


def steps(text: str) -> list[tuple[str, str]]:
    """What a page runs, in page order: ("cmd", command line) and ("python", block)."""
    out: list[tuple[str, str]] = []
    for lang, body in blocks(text):
        if lang not in LANGUAGES:
            raise ValueError(f"a fenced block in ```{lang or '(no language)'}: use one of {sorted(LANGUAGES)}")
        if lang == "bash":
            for line in body.strip().splitlines():
                if line.strip() and not line.strip().startswith("#") and (cmd := _bash_command(line)):
                    out.append(("cmd", cmd))
        elif lang == "text":
            for line in body.splitlines():
                if line.startswith("$ "):
                    if not line[2:].startswith(RUN):
                        raise ValueError(f"a ```text line that looks like a command but is not run: {line!r}")
                    out.append(("cmd", line[2:].strip()))
        elif lang == "python":
            out.append(("python", body))
        elif lang == "json":
            json.loads(body.replace("…", ""))  # shortened values end with …
        elif lang == "toml":
            import tomllib  # Python 3.11+, as bnfold's --config

            tomllib.loads(body)
        elif lang == "yaml":
            yaml.safe_load(body)
    return out


def commands(text: str) -> list[str]:
    return [s for kind, s in steps(text) if kind == "cmd"]


def python_blocks(text: str) -> list[str]:
    return [s for kind, s in steps(text) if kind == "python"]


def argv(cmd: str) -> list[str]:
    args = shlex.split(cmd, comments=True)
    if args[0] == "bnfold":
        return [sys.executable, "-m", "bnfold", *args[1:]]
    if args[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *args[1:]]
    if args[0] == "python":
        return [sys.executable, *args[1:]]
    raise AssertionError(cmd)


def run_command(cmd: str, cwd) -> subprocess.CompletedProcess:
    r = subprocess.run(argv(cmd), cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-2000:])
    assert "\x1b[" not in r.stdout  # no colour codes when the output is not a terminal
    return r


def run_python(block: str, cwd) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-c", block], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (block[:200], r.stdout[-2000:], r.stderr[-2000:])
    return r


@pytest.fixture
def fresh(tmp_path):
    shutil.copytree(ROOT / "samples", tmp_path / "samples")
    return tmp_path


# -------------------------------------------------------------------------------------------- tests
def test_exactly_two_setup_commands_and_ci_uses_the_second():
    setup = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", setup, flags=re.S)
    assert len(blocks) == 2 and all(b.strip().count("\n") == 0 for b in blocks)
    ci = subprocess.run(["awk", "/<!-- test-command/{found=1; next} found && /^python3 /{print; exit}", "README.md"],
                        cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert ci == blocks[1].strip() and "pytest" in ci
    assert "bnfold convert samples/digits" in blocks[0]


def test_every_readme_block_is_run_or_marked_for_reading():
    steps(README)  # raises on an untagged block, an unknown language or a command line that would not run


def test_readme_commands_are_found():
    cmds = commands(README)
    assert any("--config samples/ci/conversions.toml" in c for c in cmds)
    assert any(c.startswith("bnfold convert samples/digits") and "--calib" in c for c in cmds)
    assert python_blocks(README)


@pytest.mark.slow
def test_every_readme_command_runs_from_a_fresh_folder(fresh):
    """In README order; then the example of `bnfold verify --help` against the first command's file."""
    from bnfold_cli.app import app

    epilog = typer.main.get_command(app).commands["verify"].epilog
    example = re.search(r"^\s*(bnfold verify [^\\\n]*(?:\\\n[^\\\n]*)*)", epilog, re.MULTILINE).group(1).replace("\\\n", " ")
    example = " ".join(example.split())
    assert not (fresh / "out").exists()
    cmds = commands(README)
    first = cmds.index(next(c for c in cmds if c.startswith("bnfold convert samples/digits") and "--calib" in c))
    cmds.insert(first + 1, example)  # verify --help's example checks the file the README's first command made
    for cmd in cmds:
        run_command(cmd, fresh)
    assert (fresh / "digits.onnx").is_file() and (fresh / "digits.report.json").is_file()
    assert (fresh / "out" / "summary.json").is_file()


def test_every_readme_python_block_runs_from_a_fresh_folder(fresh):
    for block in python_blocks(README):
        run_python(block, fresh)
    assert (fresh / "report.json").is_file() and (fresh / "folded.onnx").is_file()
