"""The opsets people deploy to (issue 24 §5): 7 to onnx's newest. From 18 the dynamo exporter writes
the file; below, when it cannot convert down, the TorchScript exporter does and bnfold's ONNX pass
folds what is left. The report names the exporter; an opset outside the range is refused before
any work."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

import bnfold
from bnfold.errors import BadInputError, ExportError
from bnfold.onnx_pass import export as export_mod
from conftest import SAMPLE, SAMPLE_SPEC, randomize_bn


def _bnfold(*args, cwd=None, timeout=600):
    """The CLI as a user runs it: its console script, 80 columns, output to pipes (not a terminal)."""
    script = Path(sys.executable).parent / "bnfold"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "bnfold"]
    env = {**os.environ, "COLUMNS": "80"}
    env.pop("FORCE_COLOR", None)
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _opset(path) -> int:
    return next(o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))


def _bn_nodes(path) -> int:
    return sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path), load_external_data=False).graph.node)


# ------------------------------------------------------------------ the CLI on torchvision models
@pytest.mark.slow
@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_cli_writes_low_opsets_with_the_torchscript_exporter(name, opset, tmp_path):
    pytest.importorskip("torchvision")
    out, report = tmp_path / f"{name}-{opset}.onnx", tmp_path / "r.json"
    r = _bnfold("convert", f"torchvision.models:{name}", "--input-shape", "1,3,64,64", "--opset", str(opset),
                "-o", str(out), "--report", str(report), "--providers", "cpu")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "Warning" not in r.stderr, r.stderr  # the exporters' chatter stays quiet
    assert re.search(rf"BatchNorm \d+ → 0 · nodes \d+ · .* · opset {opset}$", r.stdout, re.MULTILINE), r.stdout  # the before → after line
    assert max(map(len, r.stdout.splitlines())) <= 80, r.stdout  # the compact default fits 80 columns
    assert _opset(out) == opset and _bn_nodes(out) == 0
    onnx.checker.check_model(str(out), full_check=True)
    d = json.loads(report.read_text())
    assert d["passed"] and d["export"]["exporter"] == "torchscript" and d["export"]["opset"] == opset
    assert d["export"]["batchnorm_nodes"] == 0 and not d["unfolded"]


def test_cli_native_opset_still_uses_dynamo(tmp_path):
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    r = _bnfold("convert", SAMPLE_SPEC, "--weights", str(SAMPLE / "weights.pt"), "--input-shape", "1,1,8,8", "--opset", "20",
                "-o", str(out), "--report", str(report), "--providers", "cpu")
    assert r.returncode == 0, r.stderr
    d = json.loads(report.read_text())
    assert d["passed"] and d["export"]["exporter"] == "dynamo" and _opset(out) == 20 == d["export"]["opset"]


CALIB = textwrap.dedent("""
    import os, torch
    def batches():
        open(os.environ["CALIB_MARKER"], "w").close()
        print("calibration data read")
        return [torch.randn(4, 1, 8, 8)]
""")


@pytest.mark.parametrize("opset", ["6", "99"])
def test_cli_opset_outside_the_range_is_refused_before_calibrating(opset, tmp_path):
    (tmp_path / "calib.py").write_text(CALIB)
    marker = tmp_path / "calibrated"
    os.environ["CALIB_MARKER"] = str(marker)
    try:
        r = _bnfold("convert", SAMPLE_SPEC, "--weights", str(SAMPLE / "weights.pt"), "--input-shape", "1,1,8,8",
                    "--calib", f"{tmp_path / 'calib.py'}:batches", "--opset", opset, "-o", str(tmp_path / "m.onnx"))
    finally:
        del os.environ["CALIB_MARKER"]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("bnfold: error:")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr
    assert "--opset" in errors[0] and "from 7 to" in errors[0]
    assert not marker.exists() and "calibration data read" not in r.stdout  # the data function never ran
    assert not (tmp_path / "m.onnx").exists()


def test_api_opset_outside_the_range_names_the_range(tmp_path):
    lo, hi = export_mod.opset_range()
    with pytest.raises(BadInputError, match=f"opset= 6 is outside the opsets bnfold writes \\({lo}..{hi}\\)"):
        bnfold.convert(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), torch.randn(1, 1, 6, 6), tmp_path / "m.onnx", opset=6)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ which exporter runs
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, image):
        y = torch.relu(self.bn(self.conv(image)))
        return self.head(y.mean(dim=(2, 3)))  # a ReduceMean: the dynamo exporter cannot convert it below 18


def _spy(monkeypatch, dynamo):
    calls = []
    real_ts = export_mod._torchscript_ir

    def ts(*a, **k):
        calls.append("torchscript")
        return real_ts(*a, **k)

    def dy(*a, **k):
        calls.append("dynamo")
        return dynamo(*a, **k)

    monkeypatch.setattr(export_mod, "_dynamo_ir", dy)
    monkeypatch.setattr(export_mod, "_torchscript_ir", ts)
    return calls


def test_native_opsets_never_fall_back(monkeypatch):
    def fails(*a, **k):
        raise ExportError("torch.onnx.export failed: boom", None)

    calls = _spy(monkeypatch, fails)
    for opset in (None, 18):
        with pytest.raises(ExportError, match="boom"):
            export_mod.export_folded(_Net().eval(), (torch.randn(1, 3, 6, 6),), opset=opset)
    assert calls == ["dynamo", "dynamo"]


def test_low_opset_falls_back_when_dynamo_writes_another(monkeypatch):
    calls = _spy(monkeypatch, export_mod._dynamo_ir)
    model = randomize_bn(_Net()).eval()
    proto, plan, exporter = export_mod.export_folded(model, (torch.randn(1, 3, 6, 6),), opset=13)
    assert calls == ["dynamo", "torchscript"] and exporter == "torchscript"
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [13]
    assert [f["bn"] for f in plan.to_dict()["folded"]] == ["bn"] and plan.to_dict()["folded"][0]["into"] == ["conv"]


def test_both_exporters_failing_names_both(monkeypatch):
    def fails(*a, **k):
        raise ExportError("torch.onnx.export failed: dynamo says no", None)

    _spy(monkeypatch, fails)

    class Sampler(nn.Module):
        def forward(self, x, grid):
            return nn.functional.grid_sample(x, grid, align_corners=False)  # GridSample is opset 16+

    with pytest.raises(ExportError) as info:
        export_mod.export_folded(Sampler(), (torch.randn(1, 1, 4, 4), torch.rand(1, 2, 2, 2)), opset=13)
    text = str(info.value)
    assert "no exporter wrote opset 13" in text and "dynamo says no" in text and "TorchScript" in text


def test_torchscript_route_keeps_dynamic_batch_and_input_names(tmp_path):
    import onnxruntime as ort

    model = randomize_bn(_Net()).eval()
    path = bnfold.export(model, (torch.randn(2, 3, 6, 6),), tmp_path / "d.onnx", opset=11, dynamic_batch=True)
    assert _opset(path) == 11 and _bn_nodes(path) == 0
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"]  # forward()'s name, as the dynamo exporter writes it
    for n in (1, 5):
        x = torch.randn(n, 3, 6, 6)
        got = sess.run(None, {"image": x.numpy()})[0]
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("opset", [7, 8])
def test_ir3_opsets_keep_initializers_as_inputs_and_run(opset, tmp_path):
    """Opsets 7-8 are IR version 3: every initializer must also be a graph input."""
    import onnxruntime as ort

    model = randomize_bn(_Net()).eval()
    x = torch.randn(1, 3, 6, 6)
    rep = bnfold.convert(model, x, tmp_path / "m.onnx", opset=opset, providers="cpu")
    assert rep.passed and rep.export["opset"] == opset and rep.export["batchnorm_nodes"] == 0
    m = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(m, full_check=True)
    assert {i.name for i in m.graph.initializer} <= {i.name for i in m.graph.input}
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-5)


def test_torchscript_route_keeps_stdout_for_the_report(monkeypatch, capfd):
    """The TorchScript exporter dumps its graph to the process's stdout (from C++) when it fails:
    none of it reaches stdout, where a --json report goes. What the model prints still does."""
    def fails(*a, **k):
        raise ExportError("torch.onnx.export failed: dynamo says no", None)

    _spy(monkeypatch, fails)

    class Sampler(nn.Module):
        def forward(self, x, grid):
            print("forward ran")
            return nn.functional.grid_sample(x, grid, align_corners=False)

    with pytest.raises(ExportError, match="grid_sampler"):
        export_mod.export_folded(Sampler(), (torch.randn(1, 1, 4, 4), torch.rand(1, 2, 2, 2)), opset=13)
    out = capfd.readouterr().out
    assert "graph" not in out and "aten::" not in out
    proto, _, exporter = export_mod.export_folded(Sampler(), (torch.randn(1, 1, 4, 4), torch.rand(1, 2, 2, 2)), opset=16)
    assert exporter == "torchscript" and "forward ran" in capfd.readouterr().out
