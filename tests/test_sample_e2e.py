"""The digits sample end to end, through the CLI (CliRunner and a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import torch
from typer.testing import CliRunner

from bnfold_cli.app import app
from conftest import SAMPLE, SAMPLE_SPEC

runner = CliRunner()
BASE = [SAMPLE_SPEC, "--weights", str(SAMPLE / "weights.pt"), "--input-shape", "1,1,8,8"]


def _predict(path, x):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def test_convert_sample_end_to_end(tmp_path, sample_model):
    out, rep = tmp_path / "digits.onnx", tmp_path / "report.json"
    res = runner.invoke(app, ["convert", *BASE, "-o", str(out), "--report", str(rep)])
    assert res.exit_code == 0, res.output + str(res.exception)
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    assert not (tmp_path / "digits.onnx.data").exists()
    d = json.loads(rep.read_text())
    for key in ("passed", "folded", "unfolded", "verification", "export", "calibration", "providers_unavailable", "versions"):
        assert key in d
    assert d["passed"] is True and len(d["folded"]) == 4 and d["unfolded"] == []
    runs = d["verification"]["runs"]
    levels = {(r["provider"], r["graph_optimization"]) for r in runs if r["target"] == "onnx"}
    assert {("cpu", "disable_all"), ("cpu", "default")} <= levels
    assert all(r["passed"] and r["max_abs_error"] < 1e-4 and "max_rel_error" in r for r in runs)
    assert d["export"]["sha256"] and d["export"]["opset"]
    # held-out accuracy identical before and after folding: the same predictions, image by image
    test = np.load(SAMPLE / "test.npz")
    x, y = test["x"], test["y"]
    with torch.no_grad():
        ref = sample_model(torch.from_numpy(x)).numpy()
    got = _predict(out, x)
    assert (ref.argmax(1) == got.argmax(1)).all()
    assert (got.argmax(1) == y).mean() == (ref.argmax(1) == y).mean() > 0.95
    assert np.abs(ref - got).max() < 1e-4


def test_convert_with_calibration_and_dynamic_batch(tmp_path):
    out = tmp_path / "digits.onnx"
    res = runner.invoke(app, ["convert", *BASE, "--calib", str(SAMPLE / "calib.npz"), "--batch-size", "64",
                              "--dynamic-batch", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["calibration"]["estimator"] == "paper" and d["calibration"]["batches"] == 22
    assert d["calibration"]["samples"] == 1347
    assert all(layer["mean_change"] is not None for layer in d["calibration"]["layers"])
    inputs = {r["inputs"] for r in d["verification"]["runs"]}
    assert {"random(batch=1)", "random(batch=4)", "calibration[:4]"} <= inputs
    x = np.load(SAMPLE / "test.npz")["x"][:7]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.run(None, {sess.get_inputs()[0].name: x})[0].shape == (7, 10)


def test_inspect_lists_every_bn():
    res = runner.invoke(app, ["inspect", *BASE, "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert {(f["bn"], f["rule"], f["into"][0]) for f in d["folded"]} == {
        ("bn1", "backward", "conv1"), ("bn2", "backward", "conv2"), ("bn3", "forward", "conv3"), ("bn4", "backward", "fc1")}
    table = runner.invoke(app, ["inspect", *BASE])
    assert "folded forward" in table.stdout and "4/4 BatchNorm layers foldable" in table.stdout


def test_calibrate_command(tmp_path):
    out = tmp_path / "cal.pt"
    res = runner.invoke(app, ["calibrate", SAMPLE_SPEC, "--weights", str(SAMPLE / "weights.pt"), "--calib",
                              str(SAMPLE / "calib.npz"), "--batch-size", "64", "-o", str(out), "--estimator", "pooled"])
    assert res.exit_code == 0, res.output
    sd = torch.load(out, weights_only=True)
    orig = torch.load(SAMPLE / "weights.pt", weights_only=True)
    assert not torch.equal(sd["bn1.running_var"], orig["bn1.running_var"])
    assert torch.equal(sd["conv1.weight"], orig["conv1.weight"])


def test_verify_command_pass_and_corrupted_fail(tmp_path):
    out = tmp_path / "digits.onnx"
    assert runner.invoke(app, ["convert", *BASE, "-o", str(out), "-q"]).exit_code == 0
    ok = runner.invoke(app, ["verify", SAMPLE_SPEC, str(out), "--weights", str(SAMPLE / "weights.pt"), "--input-shape", "1,1,8,8"])
    assert ok.exit_code == 0, ok.output
    assert "PASSED" in ok.stdout
    # perturb one weight of the file
    m = onnx.load(str(out))
    init = max(m.graph.initializer, key=lambda t: len(t.raw_data))
    arr = onnx.numpy_helper.to_array(init).copy()
    arr.flat[0] += 0.5
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    bad = tmp_path / "corrupt.onnx"
    onnx.save(m, str(bad))
    rep = tmp_path / "verify.json"
    res = runner.invoke(app, ["verify", SAMPLE_SPEC, str(bad), "--weights", str(SAMPLE / "weights.pt"),
                              "--input-shape", "1,1,8,8", "--calib", str(SAMPLE / "calib.npz"), "--report", str(rep)])
    assert res.exit_code == 1, res.output
    assert "FAILED" in res.stdout
    d = json.loads(rep.read_text())
    assert d["passed"] is False and d["schema_version"] == 1
    failed = [o for r in d["verification"]["runs"] for o in r["outputs"] if not o["passed"]]
    assert failed and all(o["max_abs_error"] > 1e-3 and "exceeds atol" in o["problem"] for o in failed)
    assert all(o["required_atol"] >= o["max_abs_error"] - o["rtol"] * 100 for o in failed)


def test_real_subprocess_and_python_m(tmp_path):
    out = tmp_path / "digits.onnx"
    r = subprocess.run(["bnfold", "convert", *BASE, "-o", str(out), "--providers", "cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "PASSED" in r.stdout and out.is_file()
    r = subprocess.run([sys.executable, "-m", "bnfold", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip().startswith("bnfold ")


def test_help_is_fast_and_has_examples():
    import time

    t = time.perf_counter()
    r = subprocess.run(["bnfold", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and time.perf_counter() - t < 5
    # --help must not import torch
    r = subprocess.run([sys.executable, "-c", "import sys; from bnfold_cli.app import app; import bnfold; assert 'torch' not in sys.modules"], timeout=60)
    assert r.returncode == 0
    for cmd in ("convert", "calibrate", "verify", "inspect"):
        h = runner.invoke(app, [cmd, "--help"], env={"COLUMNS": "200"})
        assert h.exit_code == 0 and "Examples:" in h.stdout and f"bnfold {cmd} " in h.stdout, cmd
