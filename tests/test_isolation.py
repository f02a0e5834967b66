"""Trust rule "a death is not a verdict": user code and runtimes that kill their process (os._exit, a
segfault, SIGKILL) become one line naming what died, exit 3, nothing half-written; in --config each
conversion's line tells the truth and SIGTERM starts nothing new (bnfold.edges.isolate).

These need real processes: each test is one `bnfold` subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from bnfold_cli.app import app
from conftest import SAMPLE
from typer.testing import CliRunner

from bnfold.edges.isolate import Task, death_error

USER = textwrap.dedent("""
    import os, time
    import numpy as np
    from torch import nn

    def ok():
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

    def factory_exits():
        os._exit(0)

    def data_exits():
        os._exit(0)

    def batches():
        return [np.random.rand(4, 1, 8, 8).astype("float32") for _ in range(2)]

    class Dies(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)
        def forward(self, x):
            os._exit(0)

    def forward_exits():
        return Dies()

    def killed():
        os.kill(os.getpid(), 9)

    def slow():
        open(os.environ["BNFOLD_TEST_MARKER"] + str(os.getpid()), "w").close()
        time.sleep(60)
        return ok()
""")


@pytest.fixture
def ws(tmp_path):
    (tmp_path / "u.py").write_text(USER)
    return tmp_path


def _bnfold(*args, env=None, wait=True, cwd=None):
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    p = subprocess.Popen([sys.executable, "-m", "bnfold", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=e, cwd=cwd)
    if not wait:
        return p
    out, err = p.communicate(timeout=300)
    return p.returncode, out, err


def _hidden(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_a_runtime_crash_is_one_line_naming_runtime_provider_and_level(ws):
    """onnxruntime segfaulting (the private test hook kills the child with SIGSEGV as the session at
    ORT_ENABLE_ALL starts) is exit 3 and one line; nothing is written, no staging folder is left."""
    (ws / "m.onnx").write_bytes(b"old")
    code, out, err = _bnfold("convert", f"{ws / 'u.py'}:ok", "-s", "1,1,8,8", "-o", ws / "m.onnx", "--providers", "cpu",
                             "--report", ws / "r.json", env={"BNFOLD_TEST_CRASH": "onnxruntime CPUExecutionProvider ORT_ENABLE_ALL"})
    lines = [ln for ln in err.splitlines() if ln.startswith("bnfold: error:")]
    assert code == 3 and len(lines) == 1 and out == "", err
    assert (f"onnxruntime crashed (SIGSEGV) running {ws / 'm.onnx'} on CPUExecutionProvider at ORT_ENABLE_ALL; "
            "nothing was written") in lines[0]
    assert ".bnfold-" not in lines[0] and "Traceback" not in err
    assert (ws / "m.onnx").read_bytes() == b"old" and not (ws / "r.json").exists() and not _hidden(ws)


@pytest.mark.parametrize("jobs", [1, 2])
def test_config_deaths_fail_their_own_conversion_and_siblings_tell_the_truth(ws, jobs):
    """os._exit in a factory, a data function and a forward, and a SIGKILL: each its own exit-3 line
    naming the stage; the sibling that passed is written with its manifest and says so; the death
    of the last conversion does not end the batch with exit 0 and no summary."""
    u = ws / "u.py"
    tables = [("good", f"{SAMPLE / 'model.py'}:build", f'weights = "{SAMPLE / "weights.pt"}"'),
              ("factory", f"{u}:factory_exits", ""), ("data", f"{u}:ok", f'calib = "{u}:data_exits"'),
              ("forward", f"{u}:forward_exits", ""), ("killed", f"{u}:killed", "")]
    body = '[defaults]\nproviders = "cpu"\ninput_shape = "1,1,8,8"\n' + "".join(
        f'[[conversion]]\nname = "{n}"\nmodel = "{m}"\noutput = "{n}.onnx"\n{extra}\n' for n, m, extra in tables)
    (ws / "c.toml").write_text(body)
    code, out, err = _bnfold("convert", "--config", ws / "c.toml", "--jobs", jobs, "--json", "--report", ws / "s.json")
    assert code == 3, err
    summary = json.loads(out)
    assert json.loads((ws / "s.json").read_text()) == summary
    by = {c["name"]: c for c in summary["conversions"]}
    assert by["good"]["exit_code"] == 0 and by["good"]["error"] is None
    assert (ws / "good.onnx").is_file() and (ws / "good.onnx.manifest.json").is_file()
    expect = {"factory": f"model factory '{u}:factory_exits' ended the process with exit status 0",
              "data": f"data function '{u}:data_exits' ended the process with exit status 0",
              "forward": "the model's forward ended the process with exit status 0",
              "killed": f"model factory '{u}:killed' died (SIGKILL)"}
    for name, text in expect.items():
        c = by[name]
        assert c["exit_code"] == 3 and "worker process" in c["error"] and text in c["error"], c
        assert "nothing was written" in c["error"] and not (ws / f"{name}.onnx").exists()
    assert not _hidden(ws)


def test_sigterm_to_a_batch_starts_nothing_new_and_names_what_was_written(ws):
    """--jobs 2 over a quick conversion and three slow ones: SIGTERM once two slow ones run (the quick
    one is written by then); the third slow one never starts, the running ones unwind, exit 130, and
    the message lists exactly the quick conversion's files."""
    body = '[defaults]\nproviders = "cpu"\ninput_shape = "1,1,8,8"\n'
    body += f'[[conversion]]\nmodel = "{SAMPLE / "model.py"}:build"\nweights = "{SAMPLE / "weights.pt"}"\noutput = "good.onnx"\n'
    body += "".join(f'[[conversion]]\nmodel = "{ws / "u.py"}:slow"\noutput = "{n}.onnx"\n' for n in "abc")
    (ws / "c.toml").write_text(body)
    marker = ws / "started-"
    p = _bnfold("convert", "--config", ws / "c.toml", "--jobs", 2, env={"BNFOLD_TEST_MARKER": str(marker)}, wait=False)
    deadline = time.time() + 240
    while len(list(ws.glob("started-*"))) < 2 and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    msg = next(ln for ln in err.splitlines() if ln.startswith("bnfold: interrupted"))
    assert f"written before the interruption: {ws / 'good.onnx'}, {ws / 'good.onnx.manifest.json'}; nothing else" in msg, msg
    assert len(list(ws.glob("started-*"))) == 2  # the queued conversion never started
    assert sorted(p.name for p in ws.glob("*.onnx")) == ["good.onnx"] and not _hidden(ws)


@pytest.mark.parametrize("exitcode, stage, text", [
    (-11, ("onnxruntime CUDAExecutionProvider ORT_DISABLE_ALL m.onnx", ("onnxruntime", "CUDAExecutionProvider", "ORT_DISABLE_ALL", "/o/m.onnx")),
     "onnxruntime crashed (SIGSEGV) running /o/m.onnx on CUDAExecutionProvider at ORT_DISABLE_ALL; nothing was written"),
    (7, ("data function 'd.py:f'", None), "data function 'd.py:f' ended the process with exit status 7 (os._exit or a native exit)"),
    (-9, None, "the process running bnfold died (SIGKILL) outside user code; nothing was written"),
])
def test_death_messages(exitcode, stage, text):
    err = death_error(Task(print, exitcode=exitcode, stage=stage))
    assert err.exit_code == 3 and text in str(err) and "\n" not in str(err)


# ------------------------------------------------------------------ usage errors are not model errors (exit 2)
def test_more_input_shapes_than_forward_takes_is_a_usage_error(ws):
    res = CliRunner().invoke(app, ["convert", f"{ws / 'u.py'}:ok", "-s", "1,1,8,8", "-s", "1,1,8,8", "-o", str(ws / "m.onnx")])
    assert res.exit_code == 2, res.stderr
    assert "--input-shape is given 2 times, but the model's forward() takes 1 input" in res.stderr
    assert not (ws / "m.onnx").exists()


def test_torchrun_with_fewer_batches_than_ranks_is_a_usage_error(ws, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # every rank checks this before joining the process group
    res = CliRunner().invoke(app, ["calibrate", f"{SAMPLE / 'model.py'}:build", "--weights", str(SAMPLE / "weights.pt"),
                                   "--calib", str(SAMPLE / "calib.npz"), "--batch-size", "100000", "-o", str(ws / "c.pt")])
    assert res.exit_code == 2, res.stderr
    assert "fewer batches (1) than ranks (2)" in res.stderr and not (ws / "c.pt").exists()
