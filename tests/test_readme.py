"""Every README command is real: the test extracts the README's ```bash and ```python blocks (and the
``$ bnfold …`` lines of its ```text blocks) generically and runs them, as written, from a fresh folder
holding a copy of samples/ (a fresh clone: no out/ folder). `.ci/run` runs the README's test command."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys

import pytest
import typer.main

from conftest import ROOT

README = (ROOT / "README.md").read_text()

def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def readme_commands() -> list[str]:
    """bnfold/torchrun command lines of the README, in order (install and test steps left out)."""
    cmds = []
    for block in _blocks("bash"):
        for line in block.strip().splitlines():
            line = line.strip()
            if "pip install" in line and "&& bnfold " in line:
                line = "bnfold " + line.split("&& bnfold ", 1)[1]
            if line.startswith(("bnfold ", "torchrun ", "python -m bnfold ")):
                cmds.append(line)
    for block in _blocks("text"):
        cmds += [ln[2:].strip() for ln in block.splitlines() if ln.startswith("$ bnfold ")]
    return cmds


def readme_python() -> list[str]:
    return _blocks("python")


def _argv(cmd: str) -> list[str]:
    args = shlex.split(cmd)
    if args[0] == "bnfold":
        return [sys.executable, "-m", "bnfold", *args[1:]]
    if args[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *args[1:]]
    if args[:3] == ["python", "-m", "bnfold"]:
        return [sys.executable, *args[1:]]
    raise AssertionError(cmd)


@pytest.fixture
def fresh(tmp_path):
    shutil.copytree(ROOT / "samples", tmp_path / "samples")
    return tmp_path


def test_exactly_two_setup_commands_and_ci_uses_the_second():
    setup = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", setup, flags=re.S)
    assert len(blocks) == 2 and all(b.strip().count("\n") == 0 for b in blocks)
    ci = subprocess.run(["awk", "/<!-- test-command/{found=1; next} found && /^python3 /{print; exit}", "README.md"],
                        cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert ci == blocks[1].strip() and "pytest" in ci
    assert "bnfold convert samples/digits" in blocks[0]


def test_readme_commands_are_found():
    cmds = readme_commands()
    assert any("--config samples/ci/conversions.toml" in c for c in cmds)
    assert any(c.startswith("bnfold convert samples/digits") and "--calib" in c for c in cmds)
    assert readme_python()


@pytest.mark.slow
def test_every_readme_command_runs_from_a_fresh_folder(fresh):
    """In README order; then the example of `bnfold verify --help` against the first command's file."""
    from bnfold_cli.app import app

    epilog = typer.main.get_command(app).commands["verify"].epilog
    example = re.search(r"Example: (bnfold verify [^(]*)", epilog).group(1).strip()
    assert not (fresh / "out").exists()
    cmds = readme_commands()
    first = cmds.index(next(c for c in cmds if c.startswith("bnfold convert samples/digits") and "--calib" in c))
    cmds.insert(first + 1, example)  # verify --help's example checks the file the README's first command made
    for cmd in cmds:
        r = subprocess.run(_argv(cmd), cwd=fresh, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-2000:])
        assert "\x1b[" not in r.stdout  # no colour codes when the output is not a terminal
    assert (fresh / "digits.onnx").is_file() and (fresh / "digits.report.json").is_file()
    assert (fresh / "out" / "summary.json").is_file()


def test_every_readme_python_block_runs_from_a_fresh_folder(fresh):
    for block in readme_python():
        r = subprocess.run([sys.executable, "-c", block], cwd=fresh, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (block[:200], r.stderr[-2000:])
    assert (fresh / "report.json").is_file() and (fresh / "folded.onnx").is_file()
