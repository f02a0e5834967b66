"""Export: one checked file, reproducible bytes across runs and folders, atomic under SIGINT/SIGTERM."""

from __future__ import annotations

import shutil
import signal
import subprocess
import textwrap
import time

import onnx
import pytest
import torch
from torch import nn

import bnfold
from bnfold.onnx_pass.export import export_proto
from conftest import SAMPLE, file_hash, randomize_bn


def test_export_writes_one_checked_file_without_metadata(tmp_path):
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())).eval()
    path = bnfold.export(bnfold.fold(model), (torch.randn(1, 3, 8, 8),), tmp_path / "m.onnx", opset=18)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    assert [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] == [18]
    assert all(len(n.metadata_props) == 0 for n in m.graph.node)
    assert str(tmp_path) not in path.read_bytes().decode("latin-1")
    assert "/work" not in path.read_bytes().decode("latin-1") and "site-packages" not in path.read_bytes().decode("latin-1")


def test_our_folding_visible_with_exporter_optimiser_off():
    # the dynamo exporter's optimiser folds Conv→BN by itself: with it off, only our fold removes BN
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    x = (torch.randn(1, 3, 6, 6),)
    raw = export_proto(model, x, optimize=False)
    folded = export_proto(bnfold.fold(model), x, optimize=False)
    assert any(n.op_type == "BatchNormalization" for n in raw.graph.node)
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)


def test_dynamic_batch_export(tmp_path):
    import onnxruntime as ort

    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    path = bnfold.export(model, (torch.randn(2, 3, 6, 6),), tmp_path / "d.onnx", dynamic_batch=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        x = torch.randn(n, 3, 6, 6)
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), model(x).detach(), rtol=1e-4, atol=1e-5)


def _convert(cwd, spec_dir, out):
    cmd = ["bnfold", "convert", f"{spec_dir / 'model.py'}:build", "--weights", str(spec_dir / "weights.pt"),
           "--input-shape", "1,1,8,8", "--calib", str(spec_dir / "calib.npz"), "--batch-size", "64", "-o", str(out), "-q"]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return out.read_bytes()


def test_reproducible_bytes_across_runs_and_folders(tmp_path):
    a, b = tmp_path / "a" / "deep" / "folder", tmp_path / "b"
    for d in (a, b):
        shutil.copytree(SAMPLE, d)
    first = _convert(a, a, a / "m.onnx")
    again = _convert(a, a, a / "m2.onnx")
    other = _convert(b, b, b / "m.onnx")
    assert first == again == other
    assert b"folder" not in first and str(tmp_path).encode() not in first


SLOW_MODEL = textwrap.dedent("""
    import os, time, torch
    from torch import nn
    class Slow(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.bn = nn.BatchNorm2d(2)
        def forward(self, x):
            if torch.compiler.is_exporting():
                open(os.environ["MARKER"], "w").close()
                time.sleep(120)
            return self.bn(self.conv(x))
    def build():
        return Slow()
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_export_leaves_no_file(tmp_path, sig):
    (tmp_path / "slow.py").write_text(SLOW_MODEL)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    marker = tmp_path / "exporting"
    env = {**__import__("os").environ, "MARKER": str(marker)}
    # as from a terminal: Ctrl-C's default action (a shell running the suite in the background hands
    # its children SIGINT ignored, and Python then installs no KeyboardInterrupt handler)
    p = subprocess.Popen(["bnfold", "convert", f"{tmp_path / 'slow.py'}:build", "--input-shape", "1,1,6,6",
                          "-o", str(out_dir / "m.onnx"), "--report", str(out_dir / "r.json")],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), p.communicate()[1] if p.poll() is not None else "export never started"
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0
    assert "interrupted" in err
    assert list(out_dir.iterdir()) == []


def test_user_files_never_modified(tmp_path):
    before = {p.name: file_hash(p) for p in SAMPLE.iterdir() if p.is_file()}
    _convert(tmp_path, SAMPLE, tmp_path / "m.onnx")
    assert {p.name: file_hash(p) for p in SAMPLE.iterdir() if p.is_file()} == before


def test_external_data_path(tmp_path, monkeypatch):
    """Models past the protobuf limit go through one external data file named after the output
    (the limit is lowered here so a small model takes that path)."""
    import bnfold.onnx_pass.io

    monkeypatch.setattr(bnfold.onnx_pass.io, "PROTO_LIMIT", 1000)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3))).eval()
    x = (torch.randn(1, 3, 8, 8),)
    rep = bnfold.convert(model, x, tmp_path / "m.onnx", providers="cpu")
    assert rep.passed and rep.export["external_data"] == "m.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    onnx.checker.check_model(str(tmp_path / "m.onnx"))
    loc = {e.value for t in onnx.load(str(tmp_path / "m.onnx"), load_external_data=False).graph.initializer for e in t.external_data if e.key == "location"}
    assert loc == {"m.onnx.data"}
    # ONNX in, ONNX out through external data as well
    plan = bnfold.fold_onnx(tmp_path / "m.onnx", tmp_path / "again.onnx")
    assert (tmp_path / "again.onnx.data").is_file() and plan.bn_count == 0
    # a failed verification keeps neither file
    bad = bnfold.convert(model, x, tmp_path / "f.onnx", providers="cpu", atol=0.0, rtol=0.0)
    assert not bad.passed and not (tmp_path / "f.onnx").exists() and not (tmp_path / "f.onnx.data").exists()


def test_export_leaves_the_model_in_train_mode():
    from conftest import state_hash

    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model.train()
    before = state_hash(model)
    export_proto(model, (torch.randn(1, 3, 6, 6),))
    assert model.training and model[1].training  # exported in eval mode, flags restored
    assert state_hash(model) == before


# ---------------------------------------------------------------- the second fold pass (export_folded)
class _FunctionalConv(nn.Module):
    """A convolution the PyTorch rules cannot see (no Conv module): only the ONNX pass folds its BN."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))

    def forward(self, x):
        return torch.nn.functional.conv2d(x, self.weight, padding=1)


class _TwoPass(nn.Module):
    def __init__(self):
        super().__init__()
        self.fconv, self.bn_onnx = _FunctionalConv(), nn.BatchNorm2d(4)
        self.conv, self.bn_torch = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.bn_left = nn.BatchNorm2d(4)

    def forward(self, x):
        y = torch.relu(self.bn_onnx(self.fconv(x)))
        y = self.bn_torch(self.conv(y))
        return self.bn_left(y + x[:, :1])


def _stage(d):
    return d.get("pass", d.get("stage", "?"))


@pytest.mark.parametrize("route", ["dynamo", "torchscript"])
def test_export_folded_attributes_every_bn_and_counts_match_the_file(route, monkeypatch):
    """Both exporters: every BN named after its module, the ONNX pass's folds named by the module
    they went into. The TorchScript route is the one below opset 18 when the dynamo exporter fails."""
    from bnfold.errors import ExportError
    from bnfold.onnx_pass import export as export_mod
    from bnfold.onnx_pass.export import export_folded
    from bnfold.torch_pass.fold import fold_with_plan
    from bnfold.onnx_pass.io import bn_count, opset_of

    opset = None
    if route == "torchscript":
        def dynamo_fails(*a, **k):
            raise ExportError("torch.onnx.export failed: no converter", None)

        monkeypatch.setattr(export_mod, "_dynamo_ir", dynamo_fails)
        opset = 13
    torch.manual_seed(0)
    model = randomize_bn(_TwoPass()).eval()
    x = (torch.randn(1, 3, 6, 6),)
    folded, plan = fold_with_plan(model, x)
    proto, plan2, exporter = export_folded(folded, x, plan=plan, opset=opset)
    assert exporter == route and (opset is None or opset_of(proto) == opset)
    d = plan2.to_dict()
    by_bn = {f["bn"]: f for f in d["folded"]}
    assert set(by_bn) == {"bn_onnx", "bn_torch"} and [u["bn"] for u in d["unfolded"]] == ["bn_left"]
    assert by_bn["bn_onnx"]["into"] == ["fconv"] and by_bn["bn_onnx"]["rule"] == "backward"
    if "pass" in by_bn["bn_onnx"]:  # the contract's dataclass (folding.py)
        assert _stage(by_bn["bn_onnx"]) == "onnx" and _stage(by_bn["bn_torch"]) == "pytorch"
    reason = d["unfolded"][0]["reason"]
    assert "PyTorch pass:" in reason and "ONNX pass:" in reason and "Add" in reason
    assert bn_count(proto) == len(d["unfolded"]) == 1
    assert all(len(n.metadata_props) == 0 for n in proto.graph.node)  # read, then stripped
    import onnxruntime as ort

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x[0].numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got).double(), model.double()(x[0].double()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("opset", [7, 11, 13, 17, 18, 21])
def test_export_folded_honours_opset(opset):
    import onnxruntime as ort

    from bnfold.onnx_pass.export import export_folded
    from bnfold.onnx_pass.io import opset_of

    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))).eval()
    x = torch.randn(1, 3, 6, 6)
    proto, plan, exporter = export_folded(model, (x,), opset=opset)
    assert opset_of(proto) == opset and plan.bn_count == 1
    assert exporter == "dynamo" if opset >= 18 else exporter in ("dynamo", "torchscript")
    onnx.checker.check_model(proto, full_check=True)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("opset", [0, 6, 10_000, "18"])
def test_export_folded_bad_opset_is_bad_input(opset):
    from bnfold.errors import BadInputError
    from bnfold.onnx_pass.export import export_folded

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(BadInputError, match="opset"):
        export_folded(model, (torch.randn(1, 3, 6, 6),), opset=opset)


def test_the_exporters_table_built_once_equals_its_own():
    """bnfold builds the dynamo exporter's ATen → ONNX table without compiling each function's source
    (issue 26): the same table as ``ONNXRegistry.from_torchlib``, entry for entry; each export gets a
    copy (a custom function added to one never reaches the next), and the exporter's own method is
    back after the block."""
    from torch.onnx._internal.exporter import _registration as reg

    from bnfold.onnx_pass import export as ex

    def entries(table):
        return {k: [(m.onnx_function, m.fx_target, m.is_complex, m.is_custom, m.opset_introduced, str(m.signature))
                    for m in v] for k, v in table.functions.items()}

    stock = reg.ONNXRegistry.from_torchlib(18)
    ours = ex._build_registry(18)
    assert entries(ours) == entries(stock) and len(stock.functions) > 100
    method = reg.ONNXRegistry.__dict__["from_torchlib"]
    with ex._shared_registry():
        a = reg.ONNXRegistry().from_torchlib(opset_version=18)
        a.functions.clear()  # what a custom translation table could do to its copy
        b = reg.ONNXRegistry().from_torchlib(opset_version=18)
    assert entries(b) == entries(stock) and a is not b
    assert reg.ONNXRegistry.__dict__["from_torchlib"] is method
    outer = ex._shared_registry()  # overlapping blocks (exports in two threads): the exporter's method is back after the last
    outer.__enter__()
    with ex._shared_registry():
        assert reg.ONNXRegistry.__dict__["from_torchlib"] is not method
    assert reg.ONNXRegistry.__dict__["from_torchlib"] is not method
    outer.__exit__(None, None, None)
    assert reg.ONNXRegistry.__dict__["from_torchlib"] is method


def test_an_export_with_the_shared_table_gives_the_same_file():
    """The same model exported with the exporter's own table and with bnfold's: the same graph."""
    import io

    from bnfold.onnx_pass import export as ex

    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2)))
    x = torch.randn(1, 3, 6, 6)
    model(x)
    plain = torch.onnx.export(model.eval(), (x,), dynamo=True).model_proto
    with ex._shared_registry():
        shared = torch.onnx.export(model.eval(), (x,), dynamo=True).model_proto
    strip = lambda p: [(n.op_type, list(n.input), list(n.output)) for n in p.graph.node]  # noqa: E731
    assert strip(plain) == strip(shared) and len(plain.graph.node) > 0
