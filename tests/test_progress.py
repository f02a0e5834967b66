"""First contact (issue 24 §2, §4, §6): progress lines on stderr as each stage runs (plain where stderr
is not a terminal, off with -q, never on --json's stdout), one line per conversion of a --config run,
providers from this onnxruntime build, and ``module:fn`` specs resolved from the current folder."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
from bnfold_cli.app import app
from conftest import SAMPLE, SAMPLE_SPEC
from typer.testing import CliRunner

from bnfold.progress import SILENT, Reporter, current, reporting

runner = CliRunner()
W, CALIB = str(SAMPLE / "weights.pt"), str(SAMPLE / "calib.npz")
LINE = r"^ *(\d+h)?(\d+m)?\d+(\.\d)?s  \S"  # "   1.2s  stage detail", "  1m02s  …": the elapsed time, then the stage


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _stages(err: str) -> list[str]:
    """The stage word of every progress line of ``err`` (other stderr lines left out)."""
    import re

    return [ln.split()[1] for ln in err.splitlines() if re.match(LINE, ln)]


# ------------------------------------------------------------------ the reporter itself
def test_plain_lines_count_by_tenths_with_rate_and_eta():
    clock, out = Clock(), io.StringIO()
    rep = Reporter(out, live=False, width=80, clock=clock)
    rep.step("load", "mymodel:build")
    count = rep.count("calibrate", 40, "batches")
    for _ in range(40):
        clock.t += 0.5
        count.advance()
    count.done()
    rep.step("verify", "cpu ORT_ENABLE_ALL " + "x" * 100)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert lines[0] == "   0.0s  load mymodel:build"
    assert lines[1] == "   0.0s  calibrate 0/40 batches"
    assert lines[2] == "   2.0s  calibrate 4/40 batches, 2.0/s, ETA 18.0s"
    assert len([ln for ln in lines if "calibrate" in ln]) == 11  # 0/40, then one per tenth, then the last
    assert lines[-2] == "  20.0s  calibrate 40/40 batches, 2.0/s, took 20.0s"
    assert len(lines[-1]) == 79 and lines[-1].endswith("…")  # cut to the width


@pytest.mark.parametrize("step_s, lines_expected", [(0.005, 2), (0.2, 1 + 4 + 1)])
def test_plain_tenths_at_most_one_line_a_second(step_s, lines_expected):
    """A quick loop in a log is its start and its end; a 4.4 s one a line per second at most."""
    clock, out = Clock(), io.StringIO()
    count = Reporter(out, live=False, clock=clock).count("calibrate", 22, "batches")
    for _ in range(22):
        clock.t += step_s
        count.advance()
    count.done()
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("calibrate 0/22 batches") and "22/22 batches" in lines[-1] and "took" in lines[-1]
    assert len(lines) == lines_expected, lines
    shown = [float(ln.split()[0].rstrip("s")) for ln in lines[:-1]]
    assert all(b - a >= 1.0 for a, b in zip(shown, shown[1:]))


def test_unknown_total_prints_at_most_every_few_seconds_and_at_the_end():
    clock, out = Clock(), io.StringIO()
    count = Reporter(out, live=False, clock=clock).count("calibrate", None, "batches")
    for _ in range(100):
        clock.t += 0.25
        count.advance()
    count.done()
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("calibrate 0/? batches") and lines[-1].endswith("100/? batches, 4.0/s, took 25.0s")
    assert len(lines) == 1 + 5 + 1


def test_a_terminal_redraws_one_line_in_place():
    clock, out = Clock(), io.StringIO()
    rep = Reporter(out, live=True, width=60, clock=clock)
    count = rep.count("calibrate", 5, "batches")
    for _ in range(5):
        clock.t += 0.2
        count.advance()
    count.done()
    rep.step("fold")
    text = out.getvalue()
    assert text.count("\n") == 2 and text.count("\r") == 6  # 0/5 to 4/5 redrawn, then the last; ended once
    assert text.endswith("5/5 batches, 5.0/s, took 1.0s\x1b[K\n   1.0s  fold\n")


def test_the_api_is_silent_unless_asked_and_a_run_inside_a_run_shares_the_lines():
    assert current() is SILENT
    out = io.StringIO()
    with reporting(Reporter(out, live=False)) as outer:
        with reporting(True) as inner:
            assert inner is outer
            with reporting(False) as off:  # a conversion of a --config run: its line only
                assert off is SILENT and current() is SILENT
                off.step("fold")
        outer.step("fold")
    assert current() is SILENT and _stages(out.getvalue()) == ["fold"]


# ------------------------------------------------------------------ the CLI, as a user runs it
def _env() -> dict:
    env = {**os.environ, "COLUMNS": "80", "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    env.pop("PYTHONPATH", None)
    return env


def test_a_failing_convert_with_json_shows_each_stage_on_stderr_only(tmp_path):
    """A real process at 80 columns, stderr a pipe (not a terminal): plain progress lines on stderr as
    each stage runs, the JSON report alone on stdout; no provider asked for: this onnxruntime's, no warning."""
    from bnfold.verification.providers import available_providers, default_providers

    res = subprocess.run(["bnfold", "convert", SAMPLE_SPEC, "--input-shape", "1,1,8,8", "--calib", CALIB, "--batch-size", "256",
                          "--atol", "1e-12", "--rtol", "0", "--json", "-o", str(tmp_path / "d.onnx")],
                         capture_output=True, text=True, env=_env(), cwd=tmp_path, check=False)
    assert res.returncode == 1, res.stderr
    rep = json.loads(res.stdout)  # stdout is the JSON and nothing else
    assert rep["passed"] is False
    err = res.stderr
    ver = rep["verification"]
    levels = [f"verify {p} {lv}" for p in ver["providers_run"] for lv in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL")]
    stages = _stages(err)
    calib = stages.count("calibrate")  # its first and last lines, and a tenth's at most once a second between
    head = ["start", "load", "note:", "check", *["calibrate"] * calib, "reference", "fold", "export"]
    assert 2 <= calib <= 7, err
    assert stages[:len(head)] == head and set(stages[len(head):-2]) == {"verify"} and stages[-2:] == ["explain", "done"], err
    assert "calibrate 6/6 batches" in err and all(lv in err for lv in levels) and "note: no weights given" in err
    assert "\r" not in err and all(len(ln) < 80 for ln in err.splitlines())
    gone = [u["provider"] for u in ver["providers_unavailable"]]  # onnxruntime-gpu on a machine without a GPU: cuda
    assert "cpu" in ver["providers_run"] and sorted(ver["providers_run"] + gone) == sorted(default_providers())
    assert ver["providers_available"] == available_providers() and "not run" not in err


def test_quiet_prints_no_progress():
    res = runner.invoke(app, ["inspect", SAMPLE_SPEC, "--input-shape", "1,1,8,8"])
    assert res.exit_code == 0 and _stages(res.stderr) == ["start", "load", "note:"], res.stderr
    res = runner.invoke(app, ["-q", "inspect", SAMPLE_SPEC, "--input-shape", "1,1,8,8"])
    assert res.exit_code == 0 and res.stderr == "", res.stderr


def test_a_config_run_prints_one_line_per_conversion_as_it_finishes(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[defaults]\nmodel = "{SAMPLE_SPEC}"\nweights = "{W}"\nproviders = "cpu"\n'
                   '[[conversion]]\nname = "a"\ninput_shape = "1,1,8,8"\noutput = "a.onnx"\n'
                   '[[conversion]]\nname = "b"\ninput_shape = "1,3,8,8"\noutput = "b.onnx"\n')
    res = runner.invoke(app, ["convert", "--config", str(cfg)])
    assert res.exit_code == 2, res.stderr
    assert _stages(res.stderr) == ["start", "convert", "[1/2]", "[2/2]"], res.stderr  # no stage lines of each conversion
    assert "[1/2] a PASSED" in res.stderr and "[2/2] b ERROR 2 (the model rejected example inputs" in res.stderr
    res = runner.invoke(app, ["convert", "--config", str(cfg), "--skip-unchanged", "--json"])
    assert "[1/2] a skipped (unchanged)" in res.stderr and json.loads(res.stdout)["exit_code"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("opset", [13, 17])
def test_a_torchvision_model_at_opset(opset, tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    monkeypatch.setenv("COLUMNS", "80")
    res = runner.invoke(app, ["convert", "torchvision.models:resnet18", "--input-shape", "1,3,32,32", "--opset", str(opset),
                              "--json", "-o", str(tmp_path / "r18.onnx")])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["export"]["opset"] == opset
    assert f"export opset {opset}" in res.stderr and "verify cpu ORT_ENABLE_ALL" in res.stderr
    assert "\r" not in res.stderr and all(len(ln) < 80 for ln in res.stderr.splitlines())


# ------------------------------------------------------------------ providers from the machine
def test_default_providers_are_the_ones_this_onnxruntime_has():
    import onnxruntime as ort

    from bnfold.report import not_run_lines
    from bnfold.verification.providers import PROVIDERS, default_providers

    have = ort.get_available_providers()
    assert default_providers() == [k for k, s in PROVIDERS.items() if s.ort_name in have and s.by_default]
    assert "cpu" in default_providers() and "tensorrt" not in default_providers()
    gone = [{"provider": "cuda", "reason": "no CUDAExecutionProvider"}]
    assert not_run_lines(gone, {"providers": None}) == []  # a default one: in the report only
    assert not_run_lines(gone, {"providers": ["cpu", "cuda"]}) == ["[yellow]provider cuda not run[/]: no CUDAExecutionProvider"]
    assert len(not_run_lines(gone, {"providers": None, "require_providers": ["cuda"]})) == 1


# ------------------------------------------------------------------ specs resolve as Python does
def test_a_module_spec_resolves_from_the_current_folder(tmp_path):
    """`bnfold convert mymodel:build` from the folder holding mymodel.py, whose factory imports a
    sibling module in its body; a spec that does not resolve says so, with no note before it."""
    (tmp_path / "blocks.py").write_text("from torch import nn\n\ndef block():\n    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())\n")
    (tmp_path / "mymodel.py").write_text(textwrap.dedent("""\
        def build():
            from blocks import block  # lazily, in the body
            return block()
    """))
    res = subprocess.run(["bnfold", "convert", "mymodel:build", "--input-shape", "1,3,8,8", "-o", "m.onnx"],
                         capture_output=True, text=True, env=_env(), cwd=tmp_path, check=False)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "m.onnx").is_file() and "PASSED mymodel:build: 1/1 BatchNorm folded" in res.stdout
    res = runner.invoke(app, ["convert", "nomodel:build", "--input-shape", "1,3,8,8", "-o", str(tmp_path / "n.onnx")])
    assert res.exit_code == 2 and "module 'nomodel' not found" in res.stderr, res.stderr
    assert "no weights given" not in res.stderr


def test_a_file_spec_factory_imports_its_neighbours_lazily(tmp_path, monkeypatch):
    """`bnfold inspect models/lazymodel.py:build` from another folder: the factory imports a module next to
    its file in its body, after the import of the file is over (as `python models/lazymodel.py` allows)."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "lazyblocks.py").write_text("from torch import nn\n\ndef block():\n    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))\n")
    (tmp_path / "models" / "lazymodel.py").write_text("def build():\n    from lazyblocks import block  # lazily, in the body\n    return block()\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "lazyblocks", raising=False)
    res = runner.invoke(app, ["inspect", f"{tmp_path / 'models' / 'lazymodel.py'}:build", "--input-shape", "1,3,8,8"])
    assert res.exit_code == 0, res.stderr
    assert "1" in res.stdout and "lazyblocks" in sys.modules
    monkeypatch.delitem(sys.modules, "lazyblocks", raising=False)
    monkeypatch.delitem(sys.modules, "lazymodel", raising=False)


def test_a_module_spec_from_the_current_folder_in_a_config_is_skipped_when_unchanged(tmp_path, monkeypatch):
    """--skip-unchanged finds the module's source where the conversion imports it from (the current folder)."""
    (tmp_path / "cwdmodel_cfg.py").write_text("from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))\n")
    (tmp_path / "c.toml").write_text('[[conversion]]\nmodel = "cwdmodel_cfg:build"\ninput_shape = "1,3,8,8"\nproviders = "cpu"\noutput = "m.onnx"\n')
    monkeypatch.chdir(tmp_path)
    script_path = [p for p in sys.path if p not in ("", ".") and os.path.abspath(p) != str(tmp_path)]  # as the bnfold script has it
    monkeypatch.setattr(sys, "path", list(script_path))
    res = runner.invoke(app, ["convert", "--config", "c.toml", "--skip-unchanged"])
    assert res.exit_code == 0 and "[1/1] m PASSED" in res.stderr, res.stderr
    monkeypatch.setattr(sys, "path", list(script_path))  # a new run
    monkeypatch.delitem(sys.modules, "cwdmodel_cfg")
    res = runner.invoke(app, ["convert", "--config", "c.toml", "--skip-unchanged"])
    assert res.exit_code == 0 and "[1/1] m skipped (unchanged)" in res.stderr, res.stderr
    monkeypatch.delitem(sys.modules, "cwdmodel_cfg", raising=False)
