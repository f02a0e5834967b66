"""The CLI is a thin skin over bnfold.options: help on every option, no markup damage, no heavy
imports for --help, and the same spellings in every command."""

from __future__ import annotations

import re
import subprocess
import sys

from typer.testing import CliRunner

from bnfold_cli.app import app
from conftest import SAMPLE, SAMPLE_SPEC

runner = CliRunner()


def test_help_is_light_and_complete():
    code = "import sys, bnfold_cli.app; assert not [m for m in ('torch', 'onnx', 'onnxruntime', 'numpy') if m in sys.modules], sorted(sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
    for command in ("convert", "verify", "calibrate", "inspect"):
        res = runner.invoke(app, [command, "--help"])
        assert res.exit_code == 0
        assert "<bool>" not in res.stdout and re.search(r"Examples:\n\n\s+(# .*\n\s+)?bnfold " + command, res.stdout)
    text = runner.invoke(app, ["convert", "--help"]).stdout
    assert "[[conversion]]" in text and "--verify / --no-verify" in text and "--overwrite / --no-overwrite" in text


def test_inspect_and_verify_share_the_option_spellings(tmp_path):
    res = runner.invoke(app, ["inspect", SAMPLE_SPEC, "--weights", str(SAMPLE / "weights.pt"), "--input-shape", "1x1x8x8", "--json"])
    assert res.exit_code == 0, res.stderr
    res = runner.invoke(app, ["inspect", SAMPLE_SPEC, "--input-shape", "1,1,0,8"])
    assert res.exit_code == 2 and "--input-shape" in res.stderr
    res = runner.invoke(app, ["verify", SAMPLE_SPEC, str(tmp_path / "x.onnx"), "--opset", "18"])
    assert res.exit_code == 2  # no such option for verify: usage error
    res = runner.invoke(app, ["convert", SAMPLE_SPEC, "-o", str(tmp_path / "a.onnx"), "--input-shape", "1,1,8,8", "--jobs", "2"])
    assert res.exit_code == 2 and "--jobs applies to --config runs only" in res.stderr
