"""The README's commands are real: the sample conversion runs as written, and .ci/run runs the
README's test command."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess

from conftest import ROOT


def _bash_blocks():
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_exactly_two_setup_commands_and_ci_uses_the_second():
    setup = (ROOT / "README.md").read_text().split("## Set up", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", setup, flags=re.S)
    assert len(blocks) == 2 and all(b.strip().count("\n") == 0 for b in blocks)
    ci = subprocess.run(["awk", "/<!-- test-command/{found=1; next} found && /^python3 /{print; exit}", "README.md"],
                        cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert ci == blocks[1].strip() and "pytest" in ci
    assert "bnfold convert samples/digits" in blocks[0]


def test_sample_command_runs_as_written(tmp_path):
    first = next(b for b in _bash_blocks() if "bnfold convert samples/digits" in b)
    cmd = first.strip().split("&& bnfold ", 1)[1]
    shutil.copytree(ROOT / "samples", tmp_path / "samples")
    r = subprocess.run(["bnfold", *shlex.split(cmd)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "digits.onnx").is_file() and (tmp_path / "digits.report.json").is_file()
    assert "\x1b[" not in r.stdout  # no colour codes when the output is not a terminal
