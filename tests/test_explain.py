"""A verdict that explains itself (issue 25 §1, §3): folds corrupted on purpose at a known layer
(a scaled weight, a wrong bias, a wrong epsilon) in several architectures, through ``convert`` and
``check_artifact``; the explanation must name the corrupted layer. Top-1/top-5 agreement and the
``min_top1`` tolerance form. Small inputs keep the exports quick."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import bnfold
import bnfold.pipeline as pipeline
from bnfold.errors import BadInputError
from bnfold.torch_pass.fold import fold_with_plan as real_fold
from bnfold.onnx_pass.fold import fold_onnx_proto as real_fold_onnx
from bnfold.verification.compare import Tolerance, compare, divergence, topk_agreement
from bnfold.verification.explain import Explanation, explain
from conftest import randomize_bn


def small_cnn() -> nn.Module:
    torch.manual_seed(1)
    return randomize_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )).eval()


def corrupt_after_fold(monkeypatch, module: str, how):
    """convert's fold, then ``how(folded module at path)``: a fold gone wrong at one known layer."""

    def fold(model, example, **kw):
        folded, plan = real_fold(model, example, **kw)
        with torch.no_grad():
            how(folded.get_submodule(module))
        return folded, plan

    monkeypatch.setattr(pipeline, "fold_with_plan", fold)


def scale_weight(m):
    m.weight.mul_(1.02)


def shift_bias(m):
    m.bias.add_(0.05 * m.bias.abs().mean() + 0.01)


def first(rep) -> dict:
    exp = rep.verification["explanation"] if isinstance(rep.verification, dict) else rep.verification.explanation
    assert exp is not None and exp["status"] == "diverged", exp
    return exp["first"]


# ------------------------------------------------------------------------- corrupted folds, named
@pytest.mark.parametrize("opset", [None, 13])  # the dynamo exporter (names from a fresh export), TorchScript (node names)
def test_small_cnn_scaled_weight_is_named(monkeypatch, tmp_path, opset):
    corrupt_after_fold(monkeypatch, "3", scale_weight)
    rep = bnfold.convert(small_cnn(), torch.randn(2, 3, 16, 16), tmp_path / "m.onnx", providers=["cpu"], opset=opset)
    assert rep.export["exporter"] == ("dynamo" if opset is None else "torchscript")
    assert not rep.passed and not (tmp_path / "m.onnx").exists()
    f = first(rep)
    assert f["module"] == "3" and f["folded"] == ["4"] and f["op_type"] == "Conv"
    assert f["max_abs_error_float64"] > f["limit"] > 0
    exp = rep.explain()
    assert exp["message"].startswith("diverges first at `3` (ONNX node `")
    assert "everything before it matches (2 places compared before it" in exp["message"]
    before = exp["points"][: exp["points"].index(exp["first"])]
    assert before and not any(p["diverged"] for p in before) and [p["module"] for p in before][:2] == ["0", "2"]
    assert "explain" in rep.timings


def test_the_explanation_and_agreement_are_shown(monkeypatch, tmp_path):
    from rich.console import Console

    from bnfold.report import render_convert, render_verify

    corrupt_after_fold(monkeypatch, "6", shift_bias)
    model, x = small_cnn(), torch.randn(2, 3, 16, 16)
    rep = bnfold.convert(model, x, tmp_path / "m.onnx", providers=["cpu"], keep_failed=True)
    assert first(rep)["module"] == "6"
    console = Console(record=True, width=400, no_color=True)
    render_convert(rep.to_dict(), console)
    text = console.export_text()
    assert "top-1" in text and "explanation: diverges first at `6` (ONNX node `" in text  # the compact table: top-1
    console = Console(record=True, width=400, no_color=True)
    render_convert(rep.to_dict(), console, verbose=True)
    assert "top-1/5" in console.export_text()  # the full table (-v): top-1/top-5
    check = bnfold.check_artifact(model, tmp_path / "m.onnx", x, providers=["cpu"])
    console = Console(record=True, width=400, no_color=True)
    render_verify(check.to_dict(), console)
    assert "explanation: diverges first at `6` (ONNX node `" in console.export_text()


def test_resnet18_wrong_bias_in_the_file_is_named(tmp_path):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = randomize_bn(tv.models.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    out = tmp_path / "r18.onnx"
    rep = bnfold.convert(model, x, out, providers=["cpu"])
    assert rep.passed and rep.verification["explanation"] is None  # passed and not asked: no cost
    proto = onnx.load(str(out))
    hit = [i for i in proto.graph.initializer if i.name == "layer3.1.conv2.bias"]
    assert hit, [i.name for i in proto.graph.initializer][:10]
    b = numpy_helper.to_array(hit[0])
    hit[0].CopyFrom(numpy_helper.from_array((b + 0.05 * np.abs(b).mean() + 0.01).astype(b.dtype), hit[0].name))
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    check = bnfold.check_artifact(model, bad, x, providers=["cpu"])
    assert not check.passed
    f = first(check)
    assert f["module"] == "layer3.1.conv2" and f["folded"] == ["layer3.1.bn2"]
    assert check.to_dict()["verification"]["explanation"]["first"]["module"] == "layer3.1.conv2"


def test_mobilenet_v3_wrong_epsilon_is_named(monkeypatch, tmp_path):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = randomize_bn(tv.models.mobilenet_v3_small(num_classes=10)).eval()

    def fold(m, example, **kw):  # the fold reads a wrong epsilon for one BN
        m.get_submodule("features.4.block.1.1").eps = 0.3
        return real_fold(m, example, **kw)

    monkeypatch.setattr(pipeline, "fold_with_plan", fold)
    # asked for: this random network damps the error below atol at its output (the run may pass), but
    # at the layer itself it is far beyond the float32 noise
    rep = bnfold.convert(model, torch.randn(2, 3, 32, 32), tmp_path / "m.onnx", providers=["cpu"], explain=True)
    f = first(rep)
    assert f["module"] == "features.4.block.1.0" and f["folded"] == ["features.4.block.1.1"]


def test_timm_batchnormact_scaled_weight_is_named(monkeypatch, tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10)).eval()
    names = {n: type(m).__name__ for n, m in model.named_modules()}
    assert names["blocks.2.0.bn1"] == "BatchNormAct2d"
    corrupt_after_fold(monkeypatch, "blocks.2.0.conv_pw", scale_weight)
    rep = bnfold.convert(model, torch.randn(2, 3, 32, 32), tmp_path / "m.onnx", providers=["cpu"])
    assert not rep.passed
    f = first(rep)
    assert f["module"] == "blocks.2.0.conv_pw" and f["folded"] == ["blocks.2.0.bn1"]


# ------------------------------------------------------------------------------------ ONNX in
def _onnx_cnn(path):
    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "x"
    chans = [3, 8, 8, 8]
    for i in range(1, 4):
        cin, cout = chans[i - 1], chans[i]
        inits += [numpy_helper.from_array((rng.standard_normal((cout, cin, 3, 3)) * 0.3).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array((rng.standard_normal(cout) * 0.5 + 1).astype(np.float32), f"g{i}"),
                  numpy_helper.from_array((rng.standard_normal(cout) * 0.5).astype(np.float32), f"be{i}"),
                  numpy_helper.from_array((rng.standard_normal(cout) * 0.5).astype(np.float32), f"m{i}"),
                  numpy_helper.from_array((rng.random(cout) * 1.5 + 0.25).astype(np.float32), f"v{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("BatchNormalization", [f"c{i}", f"g{i}", f"be{i}", f"m{i}", f"v{i}"], [f"b{i}"], name=f"bn{i}", epsilon=1e-5),
                  helper.make_node("Relu", [f"b{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    inits.append(numpy_helper.from_array((rng.standard_normal((8, 5))).astype(np.float32), "fc"))
    nodes += [helper.make_node("GlobalAveragePool", [x], ["p"], name="pool"), helper.make_node("Flatten", ["p"], ["f"], name="flat"),
              helper.make_node("MatMul", ["f", "fc"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def test_onnx_in_wrong_epsilon_is_named(monkeypatch, tmp_path):
    src = _onnx_cnn(tmp_path / "cnn.onnx")

    def fold(proto, *a, **kw):  # the fold reads a wrong epsilon for bn2
        for n in proto.graph.node:
            if n.name == "bn2":
                n.attribute[0].f = 0.3
        return real_fold_onnx(proto, *a, **kw)

    monkeypatch.setattr(pipeline, "fold_onnx_proto", fold)
    rep = bnfold.convert(str(src), None, tmp_path / "out.onnx", providers=["cpu"])
    assert not rep.passed
    f = first(rep)
    assert f["onnx_node"] == "conv2" and f["value"] == "b2" and f["original_node"] == "BatchNormalization `bn2`"
    assert rep.verification["explanation"]["reference"] == "onnx"
    assert "diverges first at ONNX node `conv2`" in rep.verification["explanation"]["message"]


def test_onnx_in_correct_fold_matches(tmp_path):
    src = _onnx_cnn(tmp_path / "cnn.onnx")
    rep = bnfold.convert(str(src), None, tmp_path / "out.onnx", providers=["cpu"], explain=True)
    assert rep.passed
    exp = rep.verification["explanation"]
    assert exp["status"] == "matches" and len(exp["points"]) >= 6, exp


# ------------------------------------------------------------------------- correct folds match
def test_correct_fold_matches_when_asked_and_later(tmp_path):
    model = small_cnn()
    x = torch.randn(2, 3, 16, 16)
    rep = bnfold.convert(model, x, tmp_path / "m.onnx", providers=["cpu"], explain=True)
    assert rep.passed and rep.verification["explanation"]["status"] == "matches"
    # a passing run without explain: report.explain() computes it on the written file
    rep2 = bnfold.convert(model, x, tmp_path / "n.onnx", providers=["cpu"])
    assert rep2.verification["explanation"] is None
    exp = rep2.explain()
    assert exp["status"] == "matches" and exp is rep2.verification["explanation"]
    assert json.loads(json.dumps(rep2.to_dict()))["verification"]["explanation"]["status"] == "matches"
    check = bnfold.check_artifact(model, tmp_path / "n.onnx", x, providers=["cpu"])
    assert check.passed and check.verification.explanation is None
    assert check.explain()["status"] == "matches"


def test_explain_api_direct_and_round_trip(tmp_path):
    model = small_cnn()
    x = torch.randn(2, 3, 16, 16)
    bnfold.export(model, x, tmp_path / "m.onnx")
    exp = explain(model, tmp_path / "m.onnx", x)
    assert exp.status == "matches" and exp.floor == "float64" and exp.reference == "pytorch"
    assert all(p.noise_floor is not None and p.max_abs_error_float64 <= p.limit for p in exp.points)
    assert Explanation.from_dict(json.loads(json.dumps(exp.to_dict()))) == exp


def test_unexplainable_is_unavailable_not_an_error(tmp_path):
    exp = explain(small_cnn(), tmp_path / "missing.onnx", torch.randn(1, 3, 8, 8))
    assert exp.status == "unavailable" and exp.message.startswith("no explanation:")


# ---------------------------------------------------------------------------------- divergence
def test_divergence_uses_the_places_own_floor():
    rng = np.random.default_rng(0)
    t64 = rng.standard_normal((4, 50))
    ref = t64.astype(np.float32)
    floor = np.abs(ref - t64).max()
    ok = divergence(ref, (t64 + 2 * floor).astype(np.float32), t64)
    assert not ok["beyond"] and ok["noise_floor"] == pytest.approx(floor)
    bad = divergence(ref, (t64 * 1.001).astype(np.float32), t64)
    assert bad["beyond"] and bad["max_abs_error_float64"] > bad["limit"]
    assert divergence(ref, ref * np.float32(1.01))["beyond"] and not divergence(ref, ref)["beyond"]  # no float64: default tolerance
    assert divergence(ref, np.full_like(ref, np.nan), t64)["beyond"]


# ------------------------------------------------------------------------------ agreement (§3)
def test_topk_agreement():
    ref = np.array([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [0, 0, 9, 0, 0, 0], [1, 2, 3, 4, 6, 5]], np.float32)
    got = ref.copy()
    got[0, 4] = 7  # argmax moves; the reference's class is still in the top 5
    got[1, 0] = -9  # argmax moves and the reference's class leaves the top 5
    assert topk_agreement(ref, got) == (0.5, 0.75)
    assert topk_agreement(ref[:, :3], got[:, :3])[1] is None  # fewer than 5 classes: no top-5
    assert topk_agreement(ref[None], got[None]) == (None, None)  # not (batch, classes)
    c = compare("logits", ref, ref)
    assert (c.top1, c.top5, c.min_top1) == (1.0, 1.0, None)
    assert compare("x", ref[None], ref[None]).top1 is None


def test_min_top1_judges_on_agreement():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((8, 10)).astype(np.float32)
    near = ref + np.float32(0.01)  # beyond atol, same argmax everywhere
    assert not compare("logits", ref, near)
    ok = compare("logits", ref, near, min_top1=0.99)
    assert ok and ok.verdict == "agreement" and ok.top1 == 1.0 and ok.problem is None
    flipped = ref.copy()
    flipped[0] = -flipped[0]
    low = compare("logits", ref, flipped, min_top1={"logits": 0.99})
    assert not low and "top-1 agreement 0.875 is below min_top1 0.99" in low.problem
    # a plain number leaves outputs that are not logits as they were; a named one must be logits
    assert compare("feat", ref[None], ref[None], min_top1=0.9).verdict == "tolerance"
    named = compare("feat", ref[None], ref[None], min_top1={"feat": 0.9})
    assert not named and "not shaped (batch, classes)" in named.problem
    with pytest.raises(BadInputError, match="between 0 and 1"):
        Tolerance(min_top1=1.5)
    with pytest.raises(BadInputError, match="names output 'nope'"):
        Tolerance(min_top1={"nope": 0.9}).check_names(["output"])


def test_min_top1_through_convert_and_json(tmp_path):
    model = small_cnn()
    x = torch.randn(4, 3, 16, 16)
    rep = bnfold.convert(model, x, tmp_path / "m.onnx", providers=["cpu"], min_top1=0.75)
    assert rep.passed
    outs = [o for r in rep.verification["runs"] for o in r["outputs"]]
    assert all(o["top1"] == 1.0 and o["top5"] == 1.0 and o["min_top1"] == 0.75 and o["verdict"] == "agreement" for o in outs)
    with pytest.raises(BadInputError):
        bnfold.convert(model, x, tmp_path / "n.onnx", providers=["cpu"], min_top1=2)


# ------------------------------------------------------------------------------------ the CLI
def test_cli_verify_explain_and_min_top1(tmp_path):
    from typer.testing import CliRunner

    from bnfold_cli.app import app
    from conftest import SAMPLE, SAMPLE_SPEC

    weights, out = str(SAMPLE / "weights.pt"), tmp_path / "digits.onnx"
    common = ["--weights", weights, "--input-shape", "2,1,8,8", "--providers", "cpu"]
    runner = CliRunner()
    r = runner.invoke(app, ["convert", SAMPLE_SPEC, *common, "--min-top1", "0.999", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    outs = [o for run in json.loads(r.stdout)["verification"]["runs"] for o in run["outputs"]]
    assert all(o["min_top1"] == 0.999 and o["top1"] == 1.0 and o["verdict"] == "agreement" for o in outs)
    r = runner.invoke(app, ["verify", SAMPLE_SPEC, str(out), *common, "--explain", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["verification"]["explanation"]["status"] == "matches"
    r = runner.invoke(app, ["verify", SAMPLE_SPEC, str(out), *common, "--min-top1", "1.5"])
    assert r.exit_code == 2 and "--min-top1" in r.output and "between 0 and 1" in r.output
