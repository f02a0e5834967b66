"""ONNX files written the way users write them — torch's legacy exporter with and without constant
folding, the dynamo exporter with and without its optimiser, several opsets, external data — folded
by bnfold and compared (float64 PyTorch reference) with onnxoptimizer's fuse_bn_into_conv and with
onnxruntime's own fusion on the same file."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from bnfold.onnx_pass.io import bn_count
from bnfold.onnx_pass.fold import fold_onnx_proto
from conftest import randomize_bn


class Zoo(nn.Module):
    """One BN for each pattern: backward Conv, after-activation forward, concat, ConvTranspose
    (groups), Linear → BN1d, and one that no rule folds (after an Add with the input)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.bn2, self.conv2 = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1)
        self.conv3a, self.conv3b, self.bn3 = nn.Conv2d(8, 4, 1, bias=False), nn.Conv2d(8, 4, 3, padding=1), nn.BatchNorm2d(8)
        self.up, self.bn4 = nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2), nn.BatchNorm2d(6)
        self.fc, self.bn5 = nn.Linear(6, 5), nn.BatchNorm1d(5)
        self.bn6 = nn.BatchNorm2d(8)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.conv2(self.bn2(y))
        y = self.bn3(torch.cat([self.conv3a(y), self.conv3b(y)], 1))
        y = self.bn6(y + y.mean((2, 3), keepdim=True))
        y = torch.relu(self.bn4(self.up(y)))
        return self.bn5(self.fc(y.mean((2, 3))))


FOLDABLE = 5  # bn6 stays everywhere


def _export(net, x, way: str, opset: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if way.startswith("legacy"):
            f = io.BytesIO()
            torch.onnx.export(net, (x,), f, dynamo=False, do_constant_folding=way == "legacy-cf", opset_version=opset,
                              training=torch.onnx.TrainingMode.EVAL, input_names=["x"], output_names=["y"])
            return onnx.load_from_string(f.getvalue())
        return torch.onnx.export(net, (x,), dynamo=True, optimize=way == "dynamo-opt", opset_version=opset, verbose=False, report=False).model_proto


def _run(model, x, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0].astype(np.float64)


def _relerr(a, ref) -> float:
    """Norm-wise relative error over the batch, in float64 (one sample's max-abs is float32 noise)."""
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def zoo():
    torch.manual_seed(0)
    net = randomize_bn(Zoo()).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        ref = net.double()(x.double()).numpy()
    return net.float(), x, ref


WAYS = [("legacy-nocf", 13), ("legacy-nocf", 17), ("legacy-cf", 17), ("dynamo-noopt", 18), ("dynamo-noopt", 21), ("dynamo-opt", 20)]


@pytest.mark.parametrize("way,opset", WAYS, ids=[f"{w}-{o}" for w, o in WAYS])
def test_user_written_files_fold_at_least_as_well_as_onnxoptimizer(zoo, way, opset):
    onnxoptimizer = pytest.importorskip("onnxoptimizer")
    net, x, ref = zoo
    m = _export(net, x, way, opset)
    n0 = bn_count(m)
    xs = x.numpy()
    ours = onnx.ModelProto()
    ours.CopyFrom(m)
    plan = fold_onnx_proto(ours)
    onnx.checker.check_model(ours)
    assert bn_count(ours) == len(plan.unfolded) == n0 - len(plan.folded)
    if way != "dynamo-opt" and way != "legacy-cf":  # the exporter folded nothing itself
        assert n0 == 6 and len(plan.folded) == FOLDABLE, plan
    else:  # every BN the exporter left behind a foldable neighbour is folded; bn6 stays
        assert bn_count(ours) == 1, plan
    assert all(u.reason for u in plan.unfolded)
    err_ours = _relerr(_run(ours, xs), ref)
    err_onnxopt = _relerr(_run(onnxoptimizer.optimize(m, ["fuse_bn_into_conv"]), xs), ref)
    err_ort = _relerr(_run(m, xs, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC), ref)
    err_raw = _relerr(_run(m, xs), ref)
    # the float64 fold is no worse than the float32 fusions (10% slack for another BLAS)
    print(f"{way}-{opset}: bnfold {err_ours:.3e} onnxoptimizer {err_onnxopt:.3e} onnxruntime {err_ort:.3e} unfolded {err_raw:.3e}")
    assert err_ours <= 1.1 * min(err_onnxopt, err_ort), (err_ours, err_onnxopt, err_ort, err_raw)


def test_external_data_file_in_and_out(zoo, tmp_path, monkeypatch):
    """A model saved with its tensors in an external data file (small threshold) folds, and the output
    goes through one external data file as well (the 2 GB limit lowered so a small model takes that path)."""
    import bnfold
    import bnfold.onnx_pass.io

    monkeypatch.setattr(bnfold.onnx_pass.io, "PROTO_LIMIT", 1000)
    net, x, ref = zoo
    m = _export(net, x, "legacy-nocf", 17)
    src = tmp_path / "ext.onnx"
    onnx.save_model(m, str(src), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=64)
    assert (tmp_path / "ext.onnx.data").is_file()
    plan = bnfold.fold_onnx(src, tmp_path / "out.onnx")
    assert len(plan.folded) == FOLDABLE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data", "out.onnx", "out.onnx.data"]
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert np.abs(_run(out, x.numpy()) - ref).max() < 1e-4
