"""The first ten minutes (issue 24 §1, §3, §7, §8, §9): output that fits 80 columns, the global flags
after the command and honoured by every command, help that answers, --json errors on stdout, and
reports that show themselves in a notebook. The CLI runs as a user runs it: COLUMNS=80, stdout not a
terminal. One conversion (module fixture) feeds most tests; one real process checks the console script."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bnfold_cli.app import app
from conftest import SAMPLE
from typer.testing import CliRunner

import bnfold
from bnfold.report import CheckReport, ConvertReport, relative

runner = CliRunner()
COLS = {"COLUMNS": "80"}
WORD = re.compile(r"PASSED|FAILED|random\(batch=1\)|folded module|onnx cpu opt=(off|all)")


def _fits(text: str, width: int = 80) -> None:
    assert text.strip() and max(len(line) for line in text.splitlines()) <= width, text


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The sample in a folder of its own, the current folder during each test (paths shown relative to it)."""
    d = tmp_path_factory.mktemp("contact")
    for name in ("model.py", "weights.pt", "calib.npz"):
        shutil.copy(SAMPLE / name, d / name)
    return d


@pytest.fixture(autouse=True)
def _in_ws(ws, monkeypatch):
    monkeypatch.chdir(ws)


BASE = ["model.py:build", "-w", "weights.pt", "-s", "1,1,8,8", "--providers", "cpu"]


@pytest.fixture(scope="module")
def passed(ws):
    """A conversion that passes, run with -v: its result (the full tables)."""
    cwd = os.getcwd()
    os.chdir(ws)
    try:
        res = runner.invoke(app, ["convert", *BASE, "-o", "v.onnx", "-v"], env={"COLUMNS": "200"})
    finally:
        os.chdir(cwd)
    assert res.exit_code == 0, res.stderr
    return res


@pytest.fixture(scope="module")
def failed(ws):
    """A conversion whose verification fails (atol 1e-12: below float32 resolution), file kept: (result, report dict)."""
    cwd = os.getcwd()
    os.chdir(ws)
    try:
        res = runner.invoke(app, ["convert", *BASE, "-o", "m.onnx", "--atol", "1e-12", "--rtol", "0", "--keep-failed",
                                  "--report", "r.json"], env=COLS)
    finally:
        os.chdir(cwd)
    assert res.exit_code == 1, res.stderr
    return res, json.loads((ws / "r.json").read_text())


# ------------------------------------------------------------------------------- §1 output that fits
def test_convert_in_a_real_process_fits_80_columns(ws):
    """The console script, COLUMNS=80, stdout a pipe: every line fits, no word is cut, the before → after line."""
    script = Path(sys.executable).parent / "bnfold"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "bnfold"]
    env = {**os.environ, **COLS}
    env.pop("FORCE_COLOR", None)
    r = subprocess.run([*cmd, "convert", *BASE, "-o", "p.onnx"], cwd=ws, env=env, capture_output=True, text=True, timeout=600,
                       stdin=subprocess.DEVNULL, check=False)
    assert r.returncode == 0, r.stderr
    _fits(r.stdout)
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith(("folded module", "onnx cpu"))]
    assert len(rows) == 3 and all(ln.rstrip().endswith("PASSED") and "random(batch=1)" in ln for ln in rows), r.stdout
    assert re.search(r"^before → after: BatchNorm 4 → 0 · nodes \d+ · [\d.]+ kB → [\d.]+ kB · opset \d+", r.stdout, re.MULTILINE)
    assert "PASSED model.py:build: 4/4 BatchNorm folded · wrote p.onnx" in r.stdout  # paths as the user typed them


def test_failure_reasons_go_below_the_compact_table(failed):
    res, _ = failed
    _fits(res.stdout)
    lines = res.stdout.splitlines()
    rows = [i for i, ln in enumerate(lines) if ln.startswith(("folded module", "onnx cpu"))]
    reasons = [i for i, ln in enumerate(lines) if ln.startswith("FAILED folded module")]
    assert len(rows) == 3 and all(lines[i].rstrip().endswith("FAILED") for i in rows)  # the result cell: one word
    assert len(reasons) == 1 and reasons[0] > rows[-1]  # one line per distinct reason, after the table
    text = " ".join(res.stdout.split())
    assert "folded module, onnx cpu opt=off, onnx cpu opt=all on random(batch=1), output 'output'" in text


def test_full_table_with_verbose(passed, failed):
    res, _ = failed
    assert "fp32 noise" in passed.stdout and "ORT_DISABLE_ALL" in passed.stdout and "needs / atol" not in passed.stdout
    assert "fp32 noise" not in res.stdout and "needs / atol" in res.stdout


def test_config_table_fits_with_relative_paths(ws, failed):
    (ws / "bad.py").write_text("import torch\n\nclass M(torch.nn.Module):\n    def forward(self, x):\n"
                               "        raise ValueError('this forward is broken')\n\ndef build():\n    return M()\n")
    (ws / "c.toml").write_text('[defaults]\nproviders = "cpu"\n'
                               '[[conversion]]\nname = "folded-again"\nmodel = "m.onnx"\noutput = "out/a.onnx"\n'
                               '[[conversion]]\nname = "broken"\nmodel = "bad.py:build"\ninput_shape = "1,1,8,8"\noutput = "out/b.onnx"\n')
    res = runner.invoke(app, ["convert", "--config", str(ws / "c.toml")], env=COLS)
    assert res.exit_code == 2, res.stdout + res.stderr
    _fits(res.stdout)
    assert str(ws) not in res.stdout and "out/a.onnx" in res.stdout and "bnfold conversions (c.toml)" in res.stdout
    assert re.search(r"^broken +out/b\.onnx +ERROR 2 +- +- *$", res.stdout, re.MULTILINE), res.stdout
    below = res.stdout.split("FAILED 1 of 2")[0].split("ERROR 2")[1]
    assert "broken: the model rejected" in below and "this forward is broken" in " ".join(below.split())  # below the table
    assert res.stdout.rstrip().endswith("FAILED 1 of 2 conversions (broken)")
    quiet = runner.invoke(app, ["convert", "--config", "c.toml", "-q"], env=COLS)
    assert quiet.stdout == "FAILED 1 of 2 conversions (broken)\n"


def test_relative_keeps_what_is_outside_the_current_folder(ws):
    assert relative(str(ws / "model.py") + ":build") == "model.py:build"
    assert relative("/elsewhere/m.onnx") == "/elsewhere/m.onnx" and relative("pkg.mod:fn") == "pkg.mod:fn"


# ------------------------------------------------------------------------ §3 verbosity everywhere
@pytest.mark.parametrize("where", ["after", "before"])
def test_quiet_before_or_after_every_command(where, passed):
    def run(command, *args):
        argv = [command, *args, "-q"] if where == "after" else ["-q", command, *args]
        return runner.invoke(app, argv, env=COLS)

    v = run("verify", *BASE, "v.onnx")
    assert v.exit_code == 0 and v.stdout == "PASSED v.onnx\n", v.stdout + v.stderr
    i = run("inspect", "model.py:build", "-s", "1,1,8,8")
    assert i.exit_code == 0 and i.stdout == "4/4 BatchNorm layers foldable (tracer: fx)\n", i.stdout
    c = run("calibrate", "model.py:build", "-w", "weights.pt", "--calib", "calib.npz", "-b", "64", "-o", "cal.pt")
    assert c.exit_code == 0 and c.stdout == "wrote cal.pt\n", c.stdout


def test_verbose_and_debug_after_the_command():
    res = runner.invoke(app, ["inspect", "nothere.py:build", "-s", "1,1,8,8", "--debug", "-v"])
    assert res.exit_code == 2 and "Traceback" in res.stderr


# ------------------------------------------------------------------------------- §7 help that answers
def test_help_shows_defaults_right_texts_and_examples():
    text = {c: runner.invoke(app, [c, "--help"], env=COLS).stdout for c in ("convert", "verify", "calibrate", "inspect")}
    flat = {c: " ".join(t.split()) for c, t in text.items()}
    for t in text.values():
        _fits(t)
        assert "<str>" not in t and "{" not in t.split("\n", 1)[0], t  # usage: MODEL, not {MODEL}
        assert "-q, --quiet" in t and "-v, --verbose" in t and "--debug" in t
    assert "Usage: bnfold verify [OPTIONS] MODEL ONNX" in text["verify"] and "Usage: bnfold convert [OPTIONS] [MODEL]" in text["convert"]
    assert "[default: 0]" in flat["convert"] and "(default: those this onnxruntime build" in flat["verify"] and "[default: 1]" in flat["convert"]
    assert "[default: paper]" in flat["calibrate"] and "[default: verify]" in flat["convert"]
    assert "bnfold convert --config " in text["convert"] and "bnfold convert digits.onnx -o folded.onnx" in text["convert"]
    assert "bnfold verify digits.onnx folded.onnx" in text["verify"] and "bnfold inspect digits.onnx" in text["inspect"]
    assert "samples join" not in flat["calibrate"] and "Without it a whole array is one batch" in flat["calibrate"]
    assert "convert and verify check it at batch 1 and 4" in flat["verify"]


def test_one_batch_without_batch_size_is_a_warning():
    res = runner.invoke(app, ["calibrate", "model.py:build", "-w", "weights.pt", "--calib", "calib.npz", "-o", "cal1.pt"], env=COLS)
    assert res.exit_code == 0, res.stderr
    assert "without --batch-size the whole calibration array is one batch" in " ".join(res.stderr.split())


def test_atol_below_float32_resolution_says_so(failed):
    _, rep = failed
    problems = {o["problem"] for r in rep["verification"]["runs"] for o in r["outputs"]}
    assert problems and all("below float32 resolution" in p and "ill-conditioned" not in p for p in problems)
    assert not any("ill-conditioned" in n for n in rep["verification"]["notes"])


# -------------------------------------------------------------------- §8 machine-readable on failure
@pytest.mark.parametrize("argv, code", [
    (["convert", "nothere.py:build", "-o", "x.onnx", "-s", "1,1,8,8"], 2),
    (["verify", "model.py:build", "nothere.onnx", "-s", "1,1,8,8"], 2),
    (["convert", "model.py:build", "-s", "1,1,8,8", "-o", "j.onnx", "--min-top1", "2"], 2),
    (["inspect", "model.py:build", "-s", "1,1,8,8"], 3),  # a model error (below)
])
def test_json_error_is_one_object_on_stdout(argv, code, monkeypatch):
    def cannot_trace(*a, **kw):
        raise bnfold.ModelError("the model cannot be traced", "make it traceable")

    monkeypatch.setattr(bnfold, "inspect_spec", cannot_trace)
    res = runner.invoke(app, [*argv, "--json"])
    assert res.exit_code == code, res.stderr
    obj = json.loads(res.stdout)
    assert obj["exit_code"] == code and obj["error"] and "fix" in obj
    assert [ln for ln in res.stderr.splitlines() if ln.startswith("bnfold: error: ")]  # the human line stays on stderr


def test_json_usage_error_in_a_real_process():
    r = subprocess.run([sys.executable, "-m", "bnfold", "verify", "--json", "--no-such-flag", "a", "b"], capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 2 and "No such option" in r.stderr
    obj = json.loads(r.stdout)
    assert obj["exit_code"] == 2 and "--no-such-flag" in obj["error"] and "bnfold verify --help" in obj["fix"]


# --------------------------------------------------------------------------- §9 reports in a notebook
def test_reports_have_a_short_repr_html_and_print_what_the_cli_prints(failed):
    res, d = failed
    rep = ConvertReport.from_dict(d)
    assert repr(rep) == "<ConvertReport FAILED model.py:build → m.onnx: 4/4 BatchNorm folded, max abs 7.63e-06>"
    out = io.StringIO()
    rep.print(file=out, width=80)
    assert out.getvalue() == res.stdout  # what the CLI printed at COLUMNS=80
    assert "<pre" in rep._repr_html_() and "needs / atol" in rep._repr_html_()


def test_verify_and_check_reports_show_themselves(passed):
    check = bnfold.check_artifact("model.py:build", "v.onnx", weights="weights.pt", input_shape=[1, 1, 8, 8], providers="cpu")
    assert isinstance(check, CheckReport) and repr(check) == "<CheckReport PASSED v.onnx against model.py:build>"
    vr = check.verification
    assert re.fullmatch(r"<VerifyReport PASSED: 2 runs on cpu, 0 failed, max abs \S+>", repr(vr)), repr(vr)
    out = io.StringIO()
    vr.print(file=out)
    assert out.getvalue().rstrip().endswith("PASSED") and "needs / atol" in out.getvalue()
    full = io.StringIO()
    check.print(verbose=True, file=full)
    assert "fp32 noise" in full.getvalue() and "<pre" in vr._repr_html_() and "<pre" in check._repr_html_()
