"""Trust rules 1, 2, 4, 5, 6 (GUIDE.md) through scenarios the one-shot catalogue cannot express:
the environment failing mid-write, interruptions, batch runs, and the units that enforce the rules."""

from __future__ import annotations

import errno
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bnfold.edges import files as _io
from bnfold.edges.jsonio import dumps, loads_strict
from bnfold.errors import DataError, ModelSpecError, OutputPathError
from bnfold.edges.usercode import guard_iter, run_user, stdout_to_stderr
from bnfold_cli.app import app
from conftest import SAMPLE
from test_bad_inputs import snapshot

runner = CliRunner()

FACTORIES = textwrap.dedent("""
    import os, sys, time
    import torch
    from torch import nn

    def bn_model():
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

    def wide():
        return nn.Sequential(nn.Conv2d(1, 64, 3), nn.BatchNorm2d(64), nn.ReLU())

    def printer():
        print("PRINTED BY THE FACTORY")
        sys.stdout.flush()
        os.write(1, b"WRITTEN TO FD 1 BY THE FACTORY\\n")
        return bn_model()

    class Loud(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)
        def forward(self, x):
            print("PRINTED BY FORWARD")
            return self.bn(self.conv(x))

    def loud():
        return Loud()

    class Quits(nn.Module):
        def forward(self, x):
            sys.exit(0)

    def quits_in_forward():
        return Quits()

    def meta_full():
        with torch.device("meta"):
            return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))

    def f64():
        return bn_model().double()

    def interrupt():
        raise KeyboardInterrupt

    def hard_exit():
        os._exit(7)

    def slow():
        open(os.environ["BNFOLD_TEST_MARKER"], "w").close()
        time.sleep(60)
        return bn_model()
""")


@pytest.fixture
def ws(tmp_path):
    """A folder with the sample model, weights and data copied in, a factory file and old outputs."""
    for name in ("model.py", "weights.pt", "calib.npz"):
        shutil.copy(SAMPLE / name, tmp_path / name)
    (tmp_path / "f.py").write_text(FACTORIES)
    torch.save(torch.randn(16, 1, 8, 8, requires_grad=True), tmp_path / "grad.pt")
    torch.save(torch.randn(16, 1, 8, 8).to(torch.bfloat16), tmp_path / "bf16.pt")
    return tmp_path


def spec(ws):
    return f"{ws / 'model.py'}:build"


def ok_args(ws, out="m.onnx", *extra):
    return ["convert", spec(ws), "--weights", str(ws / "weights.pt"), "-s", "1,1,8,8", "-o", str(ws / out), "--providers", "cpu", *extra]


def one_error(res) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("bnfold: error:")]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert ".bnfold-" not in lines[0] and "staging" not in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------ trust rules "environment errors are bad input", "outputs commit together": failing writes
class _Full(io.RawIOBase):
    def __init__(self, err):
        self.err = err

    def writable(self):
        return True

    def write(self, b):
        raise OSError(self.err, os.strerror(self.err))


def fail_writes(monkeypatch, name: str, err: int = errno.ENOSPC):
    """Every file opened for writing whose name contains ``name`` fails like a full disk (or ``err``)."""
    real = io.open

    def fake_open(file, mode="r", *a, **kw):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax") and name in os.path.basename(os.fspath(file)):
            real(file, mode, *a, **kw).close()  # the file exists (created), then the disk is full
            raw = _Full(err)
            return io.TextIOWrapper(io.BufferedWriter(raw)) if "b" not in mode else io.BufferedWriter(raw)
        return real(file, mode, *a, **kw)

    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr("builtins.open", fake_open)


WRITES = {
    # case: (command builder, name of the file whose write fails, outputs the command would write)
    "convert: the ONNX file": (lambda ws: ok_args(ws, "m.onnx", "--report", str(ws / "r.json")), "m.onnx", ["m.onnx", "r.json"]),
    "convert: the report": (lambda ws: ok_args(ws, "m.onnx", "--report", str(ws / "r.json")), "r.json", ["m.onnx", "r.json"]),
    "calibrate: the state_dict": (lambda ws: ["calibrate", spec(ws), "--weights", str(ws / "weights.pt"), "--calib", str(ws / "calib.npz"),
                                              "-o", str(ws / "cal.pt"), "--report", str(ws / "cal.json")], "cal.pt", ["cal.pt", "cal.json"]),
    "calibrate: the report": (lambda ws: ["calibrate", spec(ws), "--weights", str(ws / "weights.pt"), "--calib", str(ws / "calib.npz"),
                                          "-o", str(ws / "cal.pt"), "--report", str(ws / "cal.json")], "cal.json", ["cal.pt", "cal.json"]),
    "verify: the report": (lambda ws: ["verify", spec(ws), str(ws / "m.onnx"), "--weights", str(ws / "weights.pt"), "-s", "1,1,8,8",
                                       "--providers", "cpu", "--report", str(ws / "v.json")], "v.json", ["v.json"]),
}


@pytest.mark.parametrize("case", list(WRITES))
def test_disk_full_at_each_write_is_bad_input_and_all_or_nothing(case, ws, monkeypatch):
    build, failing, outputs = WRITES[case]
    if case.startswith("verify"):
        assert runner.invoke(app, ok_args(ws, "m.onnx", "-q")).exit_code == 0
    for name in outputs:  # older results that must survive untouched
        if not (ws / name).exists():
            (ws / name).write_bytes(b"old " + name.encode())
    before = snapshot(ws)
    fail_writes(monkeypatch, failing)
    res = runner.invoke(app, build(ws))
    monkeypatch.undo()
    assert res.exit_code == 2, (res.exit_code, res.stderr)
    line = one_error(res)
    assert "No space left on device (ENOSPC)" in line and failing in line, line
    assert snapshot(ws) == before  # nothing new (no staging folder), nothing replaced


@pytest.mark.parametrize("err, text", [(errno.ENAMETOOLONG, "ENAMETOOLONG"), (errno.EROFS, "read-only"),
                                       (errno.EACCES, "EACCES"), (errno.EDQUOT, "quota")])
def test_environment_errors_while_writing_name_the_path(err, text, ws, monkeypatch):
    (ws / "m.onnx").write_bytes(b"old")
    before = snapshot(ws)
    fail_writes(monkeypatch, "r.json", err)
    res = runner.invoke(app, ok_args(ws, "m.onnx", "--report", str(ws / "r.json")))
    monkeypatch.undo()
    assert res.exit_code == 2
    line = one_error(res)
    assert text in line and str(ws / "r.json") in line, line
    assert snapshot(ws) == before


def test_batch_manifest_write_failure_takes_its_conversion_back(ws, monkeypatch):
    (ws / "cfg.toml").write_text(textwrap.dedent(f"""
        [defaults]
        providers = "cpu"
        [[conversion]]
        model = "model.py:build"
        weights = "weights.pt"
        input_shape = "1,1,8,8"
        output = "a.onnx"
        report = "a.json"
    """))
    before = snapshot(ws)
    fail_writes(monkeypatch, "a.onnx.manifest")
    res = runner.invoke(app, ["convert", "--config", str(ws / "cfg.toml"), "--json"])
    monkeypatch.undo()
    assert res.exit_code == 2, res.stderr
    summary = json.loads(res.stdout)
    assert "ENOSPC" in summary["conversions"][0]["error"]
    assert snapshot(ws) == before  # not a.onnx without its manifest, not a.json


def test_external_data_and_model_are_one_result(ws, monkeypatch):
    import bnfold.onnx_pass.io

    monkeypatch.setattr(bnfold.onnx_pass.io, "PROTO_LIMIT", 100)  # every conversion writes external data
    args = ["convert", f"{ws / 'f.py'}:wide", "-s", "1,1,8,8", "-o", str(ws / "m.onnx"), "--providers", "cpu"]
    assert runner.invoke(app, [*args, "-q"]).exit_code == 0
    assert (ws / "m.onnx.data").stat().st_size > 0
    before = snapshot(ws)
    res = runner.invoke(app, [*args, "--atol", "0", "--rtol", "0", "--seed", "3"])  # fails: neither file replaced
    assert res.exit_code == 1
    assert snapshot(ws) == before
    import onnx.external_data_helper

    def full(tensor, base_path):  # onnx writes external data through os.open/os.fdopen
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(onnx.external_data_helper, "save_external_data", full)
    import onnx_ir

    def full_ir(model, base_dir, relative_path, **kw):  # convert writes external data straight from the IR
        with open(os.path.join(base_dir, relative_path), "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(onnx_ir.external_data, "unload_from_model", full_ir)
    res = runner.invoke(app, [*args, "--seed", "4"])
    assert res.exit_code == 2 and "m.onnx" in one_error(res) and "ENOSPC" in one_error(res)
    assert snapshot(ws) == before


def test_long_output_name_converts_without_leftovers(ws):
    name = "n" * 245 + ".onnx"  # valid: 250 bytes; staging names must not grow past 255
    res = runner.invoke(app, ok_args(ws, name, "-q"))
    assert res.exit_code == 0, res.stderr
    assert (ws / name).is_file()
    assert not [p for p in ws.iterdir() if p.name.startswith(".")]


def test_step_summary_in_a_missing_folder_is_a_warning(ws, monkeypatch):
    (ws / "cfg.toml").write_text('[[conversion]]\nmodel = "model.py:build"\nweights = "weights.pt"\n'
                                 'input_shape = "1,1,8,8"\noutput = "a.onnx"\nproviders = "cpu"\n')
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(ws / "missing" / "summary.md"))
    res = runner.invoke(app, ["convert", "--config", str(ws / "cfg.toml"), "-q"])
    assert res.exit_code == 0, res.stderr
    assert "bnfold: warning: cannot write GITHUB_STEP_SUMMARY" in res.stderr and "bnfold: error" not in res.stderr
    assert (ws / "a.onnx").is_file()


def test_step_summary_on_stdout_leaves_the_json_alone(ws):
    """GITHUB_STEP_SUMMARY=/dev/stdout with --json: stdout carries only the JSON asked for; the summary is
    not appended to it (a warning on stderr says so)."""
    import json
    import os
    import subprocess

    (ws / "cfg.toml").write_text('[[conversion]]\nmodel = "model.py:build"\nweights = "weights.pt"\n'
                                 'input_shape = "1,1,8,8"\noutput = "a.onnx"\nproviders = "cpu"\n')
    with open(ws / "out.json", "w") as out:
        res = subprocess.run(["bnfold", "convert", "--config", str(ws / "cfg.toml"), "--json"], stdout=out, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "GITHUB_STEP_SUMMARY": "/dev/stdout"}, cwd=ws)
    assert res.returncode == 0, res.stderr
    assert json.loads((ws / "out.json").read_text())["conversions"][0]["exit_code"] == 0
    assert "GITHUB_STEP_SUMMARY '/dev/stdout' is this process's standard output" in res.stderr


# ------------------------------------------------------------------ trust rule "outputs commit together": true messages
def test_failed_verification_keeps_and_names_the_older_output(ws):
    (ws / "m.onnx").write_bytes(b"old model")
    res = runner.invoke(app, ok_args(ws, "m.onnx", "--atol", "0", "--rtol", "0", "--json", "--report", str(ws / "r.json")))
    assert res.exit_code == 1, res.stderr
    d = loads_strict(res.stdout)
    assert not d["passed"] and d["export"]["path"] is None
    assert any("was NOT replaced" in n and "older one" in n for n in d["notes"]), d["notes"]
    assert (ws / "m.onnx").read_bytes() == b"old model"
    assert loads_strict((ws / "r.json").read_text())["passed"] is False


def test_interrupt_while_writing_the_report_leaves_everything_as_it_was(ws, monkeypatch):
    import bnfold.pipeline

    (ws / "m.onnx").write_bytes(b"old model")
    before = snapshot(ws)

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(bnfold.pipeline, "write_report", interrupted)
    res = runner.invoke(app, ok_args(ws, "m.onnx", "--report", str(ws / "r.json")))
    assert res.exit_code == 130
    assert "bnfold: interrupted; no output was written" in res.stderr
    assert snapshot(ws) == before


def test_interrupt_in_a_batch_names_what_earlier_conversions_wrote(ws):
    (ws / "cfg.toml").write_text(textwrap.dedent("""
        [defaults]
        providers = "cpu"
        input_shape = "1,1,8,8"
        [[conversion]]
        model = "model.py:build"
        weights = "weights.pt"
        output = "a.onnx"
        [[conversion]]
        model = "f.py:interrupt"
        output = "b.onnx"
    """))
    res = runner.invoke(app, ["convert", "--config", str(ws / "cfg.toml"), "-q"])
    assert res.exit_code == 130
    msg = [ln for ln in res.stderr.splitlines() if "interrupted" in ln][0]
    assert str(ws / "a.onnx") in msg and "a.onnx.manifest.json" in msg and "b.onnx" not in msg, msg
    assert not (ws / "b.onnx").exists()


def _bnfold(*args, env=None, **kw):
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "bnfold", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=e, **kw)


def test_sigterm_exits_130_and_says_nothing_was_written(ws):
    marker = ws / "started"
    (ws / "m.onnx").write_bytes(b"old model")
    before = snapshot(ws)
    p = _bnfold("convert", f"{ws / 'f.py'}:slow", "-s", "1,1,8,8", "-o", str(ws / "m.onnx"), env={"BNFOLD_TEST_MARKER": str(marker)})
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "bnfold: interrupted; no output was written" in err
    marker.unlink()
    assert snapshot(ws) == before


def test_json_stdout_is_only_json_when_user_code_prints(ws):
    p = _bnfold("convert", f"{ws / 'f.py'}:printer", "-s", "1,1,8,8", "-o", str(ws / "m.onnx"), "--providers", "cpu", "--json")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert loads_strict(out)["passed"] is True
    assert "PRINTED BY THE FACTORY" in err and "WRITTEN TO FD 1 BY THE FACTORY" in err


def test_a_factory_that_hard_exits_leaves_no_partial_files(ws):
    (ws / "cfg.toml").write_text(textwrap.dedent("""
        [defaults]
        providers = "cpu"
        input_shape = "1,1,8,8"
        [[conversion]]
        model = "model.py:build"
        weights = "weights.pt"
        output = "a.onnx"
        [[conversion]]
        model = "f.py:hard_exit"
        output = "b.onnx"
    """))
    p = _bnfold("convert", "--config", str(ws / "cfg.toml"), "-j", "2", "--json", "--report", str(ws / "summary.json"))
    out, err = p.communicate(timeout=240)
    assert p.returncode != 0
    summary = json.loads((ws / "summary.json").read_text())
    b = summary["conversions"][1]
    assert b["exit_code"] != 0 and "worker process" in b["error"], b
    assert not (ws / "b.onnx").exists()
    assert not [x for x in ws.iterdir() if x.name.startswith(".")]  # no staging folders or temp files
    if (ws / "a.onnx").exists():  # written whole, with its manifest, or not at all
        import onnx

        onnx.load(str(ws / "a.onnx"))
        assert (ws / "a.onnx.manifest.json").is_file()


# ------------------------------------------------------------------ trust rules "exit codes are bnfold's", "stdout carries only what was asked for": user code, streams
def test_json_stdout_is_only_json_when_forward_prints(ws):
    res = runner.invoke(app, ["convert", f"{ws / 'f.py'}:loud", "-s", "1,1,8,8", "-o", str(ws / "m.onnx"), "--providers", "cpu", "--json"])
    assert res.exit_code == 0, res.stderr
    assert loads_strict(res.stdout)["passed"] is True and "PRINTED BY FORWARD" in res.stderr


def test_forward_calling_sys_exit_is_an_error_not_an_exit(ws):
    res = runner.invoke(app, ["convert", f"{ws / 'f.py'}:quits_in_forward", "-s", "1,1,8,8", "-o", str(ws / "m.onnx")])
    assert res.exit_code in (2, 3)
    assert "sys.exit(0)" in one_error(res)
    assert not (ws / "m.onnx").exists()


def test_batch_goes_on_after_a_factory_exits(ws):
    (ws / "g.py").write_text("import sys\ndef bye():\n    sys.exit(0)\n")
    (ws / "cfg.toml").write_text(textwrap.dedent("""
        [defaults]
        providers = "cpu"
        input_shape = "1,1,8,8"
        [[conversion]]
        model = "g.py:bye"
        output = "a.onnx"
        [[conversion]]
        model = "model.py:build"
        weights = "weights.pt"
        output = "b.onnx"
    """))
    res = runner.invoke(app, ["convert", "--config", str(ws / "cfg.toml"), "--json", "--report", str(ws / "s.json")])
    assert res.exit_code == 3, res.stderr
    summary = loads_strict(res.stdout)
    a, b = summary["conversions"]
    assert a["exit_code"] == 3 and "called sys.exit(0)" in a["error"]
    assert b["exit_code"] == 0 and (ws / "b.onnx").is_file() and (ws / "s.json").is_file()


@pytest.mark.parametrize("body, message", [
    ('output = "a.onnx"\n[[conversion]]\nmodel = "model.py:build"\nweights = "weights.pt"\noutput = "b.onnx"\nreport = "a.onnx"',
     "are the same file"),
    ('output = "cfg.toml"', "same file as the config file"),
    ('output = "a.onnx"\n[[conversion]]\nmodel = "model.py:build"\nweights = "weights.pt"\noutput = "a_link.onnx"', "a.onnx"),
    ('output = "a.onnx"\n[[conversion]]\nmodel = "model.py:build"\nweights = "a.onnx"\noutput = "b.onnx"', "would overwrite its input"),
    ('output = "fifo"', "FIFO"),
    ('output = "out/"', "is a folder"),
])
def test_config_collisions_refused_before_any_work(body, message, ws):
    (ws / "a.onnx").write_bytes(b"old")
    os.symlink(ws / "a.onnx", ws / "a_link.onnx")
    os.mkfifo(ws / "fifo")
    (ws / "out").mkdir()
    (ws / "cfg.toml").write_text('[defaults]\ninput_shape = "1,1,8,8"\nproviders = "cpu"\n'
                                 '[[conversion]]\nmodel = "model.py:build"\nweights = "weights.pt"\n' + body + "\n")
    before = snapshot(ws)
    res = runner.invoke(app, ["convert", "--config", str(ws / "cfg.toml")])
    assert res.exit_code == 2, res.stderr
    assert message in one_error(res)
    assert snapshot(ws) == before


def test_trust_pickle_loads_a_plain_pickle_without_warnings(ws):
    import pickle

    with open(ws / "plain.pkl", "wb") as fh:
        pickle.dump(dict(torch.load(ws / "weights.pt", weights_only=True)), fh)
    res = runner.invoke(app, ["convert", spec(ws), "--weights", str(ws / "plain.pkl"), "--trust-pickle", "-s", "1,1,8,8",
                              "-o", str(ws / "m.onnx"), "--providers", "cpu", "-q"])
    assert res.exit_code == 0, res.stderr
    assert "Warning" not in res.stderr


def test_meta_device_model_takes_its_weights(ws):
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)).state_dict(), ws / "mw.pt")
    res = runner.invoke(app, ["convert", f"{ws / 'f.py'}:meta_full", "--weights", str(ws / "mw.pt"), "-s", "1,1,8,8",
                              "-o", str(ws / "m.onnx"), "--providers", "cpu", "-q"])
    assert res.exit_code == 0, res.stderr
    assert "Warning" not in res.stderr


@pytest.mark.parametrize("data", ["grad.pt", "bf16.pt"])
def test_pt_calibration_tensor_with_grad_or_bfloat16(data, ws):
    res = runner.invoke(app, ok_args(ws, "m.onnx", "--calib", str(ws / data), "-q"))
    assert res.exit_code == 0, res.stderr


def test_float64_model_names_the_cause(ws):
    res = runner.invoke(app, ["convert", f"{ws / 'f.py'}:f64", "-s", "1,1,8,8", "-o", str(ws / "m.onnx"), "--providers", "cpu"])
    assert res.exit_code == 2
    line = one_error(res)
    assert "float64" in line and f"'{ws / 'm.onnx'}'" in line, line
    assert not (ws / "m.onnx").exists()


def test_missing_external_data_is_named(ws):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.rand(4, 1, 3, 3).astype(np.float32), "W")
    g = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], [w])
    onnx.save_model(helper.make_model(g), str(ws / "ext.onnx"), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    (ws / "ext.onnx.data").unlink()
    res = runner.invoke(app, ["convert", str(ws / "ext.onnx"), "-o", str(ws / "m.onnx")])
    assert res.exit_code == 2
    assert "external data file" in one_error(res) and "is missing" in one_error(res)


def test_fresh_batchnorm_report_is_strict_json(ws):
    res = runner.invoke(app, ["calibrate", f"{ws / 'f.py'}:bn_model", "--calib", str(ws / "calib.npz"), "-o", str(ws / "c.pt"),
                              "--report", str(ws / "c.json"), "--json"])
    assert res.exit_code == 0, res.stderr
    for text in (res.stdout, (ws / "c.json").read_text()):
        assert "Infinity" not in text and "NaN" not in text
        loads_strict(text)


# ------------------------------------------------------------------ the units
@pytest.mark.parametrize("exc, shown", [
    (SystemExit(0), "called sys.exit(0)"), (SystemExit(3), "called sys.exit(3)"), (SystemExit(None), "called sys.exit()"),
    (SystemExit("msg"), "SystemExit: msg"), (GeneratorExit(), "raised GeneratorExit"), (ValueError("bad\nmore"), "raised ValueError: bad"),
])
def test_run_user_turns_any_escape_into_one_line(exc, shown):
    def fn():
        raise exc

    with pytest.raises(ModelSpecError) as info:
        run_user(fn, what="model factory 'x.py:build'")
    assert shown in str(info.value) and "\n" not in str(info.value) and "x.py:build" in str(info.value)


def test_run_user_lets_interrupts_and_bnfold_errors_through():
    def interrupt():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_user(interrupt, what="f")
    with pytest.raises(OutputPathError):
        run_user(lambda: (_ for _ in ()).throw(OutputPathError("x")), what="f")


def test_guard_iter_guards_each_step():
    def gen():
        yield 1
        sys.exit(5)

    it = guard_iter(gen(), what="iterating the data")
    assert next(it) == 1
    with pytest.raises(DataError, match=r"iterating the data called sys.exit\(5\)"):
        next(it)


def test_stdout_to_stderr_redirects_fd_1(capfd):
    with stdout_to_stderr():
        print("py")
        sys.stdout.flush()
        os.write(1, b"fd\n")
    print("after")
    out, err = capfd.readouterr()
    assert out == "after\n" and "py" in err and "fd" in err


def test_output_set_is_all_or_nothing(tmp_path):
    (tmp_path / "a").write_text("old a")
    with pytest.raises(RuntimeError):
        with _io.OutputSet():
            _io.write_text_atomic(tmp_path / "a", "new a")
            with _io.OutputSet():  # nested: commits with the outer set
                _io.write_text_atomic(tmp_path / "b", "new b")
            assert (tmp_path / "a").read_text() == "old a" and not (tmp_path / "b").exists()
            raise RuntimeError("later failure")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"] and (tmp_path / "a").read_text() == "old a"
    with _io.OutputSet() as outs:
        _io.write_text_atomic(tmp_path / "a", "new a")
        _io.write_text_atomic(tmp_path / "b", "new b")
        staged = outs.reserve(tmp_path / "c")
        staged.write_text("c")
        outs.discard(tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"] and (tmp_path / "a").read_text() == "new a"
    assert outs.committed == [tmp_path / "a", tmp_path / "b"]


def test_output_set_errors_name_final_paths(tmp_path):
    with pytest.raises(OutputPathError) as info:
        with _io.OutputSet() as outs:
            staged = outs.reserve(tmp_path / "m.onnx")
            raise OutputPathError(f"cannot use '{staged}'")
    assert str(info.value) == f"cannot use '{tmp_path / 'm.onnx'}'"


def test_temp_names_fit_name_max():
    assert len(_io.temp_name("x" * 255, ".staging.onnx.tmp")) <= 255


def test_strict_json():
    text = dumps({"a": math.inf, "b": [math.nan, -math.inf, 1.5], "c": np.float32("nan"), "d": torch.tensor([1.0, math.inf]),
                  "e": np.int64(3)})
    assert loads_strict(text) == {"a": None, "b": [None, None, 1.5], "c": None, "d": [1.0, None], "e": 3}


def test_staging_left_by_a_killed_process_is_swept(tmp_path):
    # liveness is the staging folder's lock (tests/test_trust_inputs.py kills a real owner): a lock
    # file nobody holds is what a killed process leaves; a held one is a live owner's, whatever its pid
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / (_io._staging_prefix(dead.pid) + "abc")
    alive = tmp_path / (_io._staging_prefix(dead.pid) + "def")
    for d in (stale, alive):
        d.mkdir()
        (d / "m.onnx").write_bytes(b"staged by a process that was killed")
    (stale / _io.STAGING_LOCK).touch()
    held = _io._hold_lock(alive)
    try:
        with _io.OutputSet():
            _io.write_text_atomic(tmp_path / "r.json", "{}")
        assert not stale.exists() and alive.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "r.json"])
    finally:
        os.close(held)
