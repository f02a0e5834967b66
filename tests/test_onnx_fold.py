"""ONNX-in folding: each pattern on a small graph built here with random BN parameters, run on
onnxruntime at ORT_DISABLE_ALL before and after; refusals with reasons; a real ResNet export."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.onnx_pass.fold import fold_onnx_proto

RNG = np.random.default_rng(0)
OPSET = 17


def init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def bn_inits(prefix, c, dtype=np.float32):
    return [
        init(f"{prefix}_scale", (RNG.standard_normal(c) * 0.5 + 1).astype(dtype)),
        init(f"{prefix}_bias", (RNG.standard_normal(c) * 0.5).astype(dtype)),
        init(f"{prefix}_mean", (RNG.standard_normal(c) * 0.5).astype(dtype)),
        init(f"{prefix}_var", (RNG.random(c) * 1.5 + 0.25).astype(dtype)),
    ]


def bn_node(x, y, prefix="bn", **attrs):
    return helper.make_node("BatchNormalization", [x, f"{prefix}_scale", f"{prefix}_bias", f"{prefix}_mean", f"{prefix}_var"],
                            [y], name=prefix, epsilon=1e-3, **attrs)


def model(nodes, inits, in_shape, out_name="y", elem=TensorProto.FLOAT, extra_outputs=(), inputs=None, check=True):
    graph = helper.make_graph(
        nodes, "g",
        inputs or [helper.make_tensor_value_info("x", elem, in_shape)],
        [helper.make_tensor_value_info(out_name, elem, None)] + [helper.make_tensor_value_info(o, elem, None) for o in extra_outputs],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(m)  # give the outputs their shapes
    for out, inf in zip(m.graph.output, inferred.graph.output):
        out.CopyFrom(inf)
    if check:
        onnx.checker.check_model(m)
    return m


def run(m, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def fold_and_compare(m, in_shape, expect_folded, dtype=np.float32, tol=1e-5):
    x = RNG.standard_normal(in_shape).astype(dtype)
    before = run(m, {"x": x})
    folded = onnx.ModelProto()
    folded.CopyFrom(m)
    plan = fold_onnx_proto(folded)
    onnx.checker.check_model(folded)
    after = run(folded, {"x": x})
    assert [(f.rule, ", ".join(f.into_type)) for f in plan.folded] == expect_folded, plan
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    for b, a in zip(before, after):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=tol, atol=tol)
    # names and opset kept; nothing dead left behind
    assert [i.name for i in folded.graph.input] == [i.name for i in m.graph.input if i.name not in {t.name for t in m.graph.initializer}]
    assert [o.name for o in folded.graph.output] == [o.name for o in m.graph.output]
    assert folded.opset_import == m.opset_import
    used = {i for n in folded.graph.node for i in n.input}
    assert all(t.name in used for t in folded.graph.initializer)
    assert all(n.op_type != "Constant" or n.output[0] in used for n in folded.graph.node)
    return folded, plan


@pytest.mark.parametrize("group,bias", [(1, True), (1, False), (2, True)])
def test_conv_bn(group, bias):
    w = init("w", RNG.standard_normal((6, 4 // group, 3, 3)).astype(np.float32))
    inputs = ["x", "w"] + (["b"] if bias else [])
    inits = [w] + ([init("b", RNG.standard_normal(6).astype(np.float32))] if bias else []) + bn_inits("bn", 6)
    m = model([helper.make_node("Conv", inputs, ["c"], group=group, pads=[1, 1, 1, 1]), bn_node("c", "y")], inits, [2, 4, 5, 5])
    fold_and_compare(m, [2, 4, 5, 5], [("backward", "Conv")])


@pytest.mark.parametrize("group", [1, 2])
def test_convtranspose_bn(group):
    w = init("w", RNG.standard_normal((4, 6 // group, 3, 3)).astype(np.float32))
    m = model([helper.make_node("ConvTranspose", ["x", "w"], ["c"], group=group, strides=[2, 2]), bn_node("c", "y")],
              [w] + bn_inits("bn", 6), [1, 4, 4, 4])
    fold_and_compare(m, [1, 4, 4, 4], [("backward", "ConvTranspose")])


@pytest.mark.parametrize("trans_b,alpha,beta,c_shape", [(0, 1.0, 1.0, (5,)), (1, 0.5, 2.0, (1, 5)), (1, 1.5, 1.0, None), (0, 1.0, 0.5, (3, 5))])
def test_gemm_bn(trans_b, alpha, beta, c_shape):
    b = RNG.standard_normal((5, 4) if trans_b else (4, 5)).astype(np.float32)
    inits = [init("B", b)] + bn_inits("bn", 5)
    ins = ["x", "B"]
    if c_shape:
        inits.append(init("C", RNG.standard_normal(c_shape).astype(np.float32)))
        ins.append("C")
    m = model([helper.make_node("Gemm", ins, ["g"], alpha=alpha, beta=beta, transB=trans_b), bn_node("g", "y")], inits, [3, 4])
    fold_and_compare(m, [3, 4], [("backward", "Gemm")])


@pytest.mark.parametrize("trans_b,alpha,beta,c_shape", [(0, 1.0, 1.0, None), (1, 0.5, 2.0, (5,)), (0, 1.5, 0.5, (6, 5))])
def test_gemm_reshape_bn_float64(trans_b, alpha, beta, c_shape):
    """Gemm → Reshape to (rows, C) → BN1d → Reshape back, in float64 on onnxruntime (the ``reshape``
    rule takes Gemm as the README says): random statistics, γ and β; equal to 1e-10."""
    b = RNG.standard_normal((5, 4) if trans_b else (4, 5))
    inits = [init("B", b), init("shp", np.array([-1, 5], np.int64)), init("back", np.array([2, 3, 5], np.int64))]
    inits += bn_inits("bn", 5, np.float64)
    ins = ["x", "B"]
    if c_shape:
        inits.append(init("C", RNG.standard_normal(c_shape)))
        ins.append("C")
    nodes = [helper.make_node("Gemm", ins, ["g"], alpha=alpha, beta=beta, transB=trans_b), helper.make_node("Reshape", ["g", "shp"], ["r"]),
             bn_node("r", "n"), helper.make_node("Reshape", ["n", "back"], ["y"])]
    m = model(nodes, inits, [6, 4], elem=TensorProto.DOUBLE)
    folded, _ = fold_and_compare(m, [6, 4], [("reshape", "Gemm")], dtype=np.float64, tol=1e-10)
    gemm = next(n for n in folded.graph.node if n.op_type == "Gemm")
    assert next(a.f for a in gemm.attribute if a.name == "beta") == 1.0


@pytest.mark.parametrize("with_add", [False, True])
def test_matmul_bn(with_add):
    inits = [init("B", RNG.standard_normal((4, 5)).astype(np.float32))] + bn_inits("bn", 5)
    nodes = [helper.make_node("MatMul", ["x", "B"], ["mm"])]
    src = "mm"
    if with_add:
        inits.append(init("bias", RNG.standard_normal(5).astype(np.float32)))
        nodes.append(helper.make_node("Add", ["mm", "bias"], ["a"]))
        src = "a"
    m = model(nodes + [bn_node(src, "y")], inits, [3, 4])
    folded, _ = fold_and_compare(m, [3, 4], [("backward", "MatMul, Add" if with_add else "MatMul")])
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add"]


def test_matmul_3d_is_refused():
    inits = [init("B", RNG.standard_normal((4, 4)).astype(np.float32))] + bn_inits("bn", 2)
    m = model([helper.make_node("MatMul", ["x", "B"], ["mm"]), bn_node("mm", "y")], inits, [3, 2, 4])
    plan = fold_onnx_proto(m)
    assert "rank is 3" in plan.unfolded[0].reason


@pytest.mark.parametrize("group", [1, 2])
def test_forward_bn_conv(group):
    w = init("w", RNG.standard_normal((6, 4 // group, 3, 3)).astype(np.float32))
    m = model([bn_node("x", "n"), helper.make_node("Conv", ["n", "w"], ["y"], group=group, strides=[2, 2])],
              [w] + bn_inits("bn", 4), [2, 4, 7, 7])
    fold_and_compare(m, [2, 4, 7, 7], [("forward", "Conv")])


@pytest.mark.parametrize("trans_b,alpha,beta,has_c", [(0, 1.0, 1.0, True), (1, 0.7, 2.0, True), (1, 1.0, 1.0, False)])
def test_forward_bn_gemm(trans_b, alpha, beta, has_c):
    b = RNG.standard_normal((5, 4) if trans_b else (4, 5)).astype(np.float32)
    inits = [init("B", b)] + bn_inits("bn", 4)
    ins = ["n", "B"]
    if has_c:
        inits.append(init("C", RNG.standard_normal(5).astype(np.float32)))
        ins.append("C")
    m = model([bn_node("x", "n"), helper.make_node("Gemm", ins, ["y"], alpha=alpha, beta=beta, transB=trans_b)], inits, [3, 4])
    fold_and_compare(m, [3, 4], [("forward", "Gemm")])


def test_constant_node_weights_and_dead_constant_removed():
    w = RNG.standard_normal((3, 2, 1, 1)).astype(np.float32)
    const = helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w"))
    m = model([const, helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y")], bn_inits("bn", 3), [1, 2, 3, 3])
    folded, _ = fold_and_compare(m, [1, 2, 3, 3], [("backward", "Conv")])
    assert [n.op_type for n in folded.graph.node] == ["Conv"]


def test_fp16_initializers_fold_in_float64():
    w = init("w", RNG.standard_normal((3, 2, 1, 1)).astype(np.float16))
    m = model([helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y")], [w] + bn_inits("bn", 3, np.float16),
              [1, 2, 3, 3], elem=TensorProto.FLOAT16)
    folded, _ = fold_and_compare(m, [1, 2, 3, 3], [("backward", "Conv")], dtype=np.float16, tol=1e-2)
    assert all(t.data_type == TensorProto.FLOAT16 for t in folded.graph.initializer)
    # the float64 fold, cast once
    s = numpy_helper.to_array(m.graph.initializer[1]).astype(np.float64) / np.sqrt(numpy_helper.to_array(m.graph.initializer[4]).astype(np.float64) + 1e-3)
    new_w = next(numpy_helper.to_array(t) for t in folded.graph.initializer if t.dims == [3, 2, 1, 1])
    np.testing.assert_array_equal(new_w, (numpy_helper.to_array(w).astype(np.float64) * s[:, None, None, None]).astype(np.float16))


def test_shared_initializer_is_copied():
    w = init("w", RNG.standard_normal((3, 3, 1, 1)).astype(np.float32))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c1"]), bn_node("c1", "n"), helper.make_node("Conv", ["n", "w"], ["y"])]
    m = model(nodes, [w] + bn_inits("bn", 3), [1, 3, 3, 3])
    folded, plan = fold_and_compare(m, [1, 3, 3, 3], [("backward", "Conv")])
    second = [n for n in folded.graph.node if n.op_type == "Conv"][1]
    assert second.input[1] == "w"  # the other reader still has the original weights
    assert "w" in {t.name for t in folded.graph.initializer}


def test_bn_output_is_graph_output():
    w = init("w", RNG.standard_normal((3, 2, 1, 1)).astype(np.float32))
    m = model([helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y")], [w] + bn_inits("bn", 3), [1, 2, 3, 3])
    folded, _ = fold_and_compare(m, [1, 2, 3, 3], [("backward", "Conv")])
    assert folded.graph.node[0].output[0] == "y"


# -------------------------------------------------------------------------------------- refusals
def _reason(m):
    plan = fold_onnx_proto(m)
    assert not plan.folded, plan
    return plan.unfolded[0].reason


def test_refuse_activation_between():
    w = init("w", RNG.standard_normal((3, 2, 3, 3)).astype(np.float32))
    w2 = init("w2", RNG.standard_normal((3, 3, 3, 3)).astype(np.float32))
    m = model([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["r"]), bn_node("r", "n"),
               helper.make_node("Conv", ["n", "w2"], ["y"], pads=[1, 1, 1, 1])], [w, w2] + bn_inits("bn", 3), [1, 2, 6, 6])
    reason = _reason(m)
    assert "Relu" in reason and "pads its input" in reason


def test_refuse_producer_with_two_consumers():
    w = init("w", RNG.standard_normal((3, 2, 1, 1)).astype(np.float32))
    m = model([helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "n"), helper.make_node("Add", ["n", "c"], ["y"])],
              [w] + bn_inits("bn", 3), [1, 2, 3, 3])
    assert "'c' has 2 consumers" in _reason(m)


def test_refuse_producer_output_is_graph_output():
    w = init("w", RNG.standard_normal((3, 2, 1, 1)).astype(np.float32))
    m = model([helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y")], [w] + bn_inits("bn", 3), [1, 2, 3, 3], extra_outputs=["c"])
    assert "'c' is a graph output" in _reason(m)


def test_refuse_non_constant_parameters():
    w = init("w", RNG.standard_normal((3, 2, 1, 1)).astype(np.float32))
    inits = [w] + bn_inits("bn", 3)[1:]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3]), helper.make_tensor_value_info("bn_scale", TensorProto.FLOAT, [3])]
    m = model([helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y")], inits, [1, 2, 3, 3], inputs=inputs)
    assert "'bn_scale' is a graph input (overridable at run time)" in _reason(m)


def test_refuse_training_mode():
    w = init("w", RNG.standard_normal((3, 2, 1, 1)).astype(np.float32))
    m = model([helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y", training_mode=1)], [w] + bn_inits("bn", 3), [1, 2, 3, 3], check=False)
    assert "training_mode=1" in _reason(m)


def test_fold_onnx_file_api_and_cli(tmp_path):
    from typer.testing import CliRunner

    from bnfold_cli.app import app

    w = init("w", RNG.standard_normal((3, 2, 1, 1)).astype(np.float32))
    m = model([helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y")], [w] + bn_inits("bn", 3), [1, 2, 3, 3])
    src = tmp_path / "in.onnx"
    onnx.save(m, str(src))
    plan = bnfold.fold_onnx(src, tmp_path / "out.onnx")
    assert len(plan.folded) == 1
    res = CliRunner().invoke(app, ["convert", str(src), "-o", str(tmp_path / "cli.onnx"), "--json", "--providers", "cpu"])
    assert res.exit_code == 0, res.stderr
    import json

    d = json.loads(res.stdout)
    assert d["passed"] and d["export"]["batchnorm_nodes"] == 0 and d["folded"][0]["rule"] == "backward"
    assert {r["graph_optimization"] for r in d["verification"]["runs"]} == {"disable_all", "default"}


@pytest.mark.slow
def test_resnet50_legacy_export_folds_to_zero_bn(tmp_path):
    torch = pytest.importorskip("torch")
    tv = pytest.importorskip("torchvision")
    from conftest import randomize_bn

    net = randomize_bn(tv.models.resnet50()).eval()
    f = io.BytesIO()
    torch.onnx.export(net, (torch.randn(1, 3, 64, 64),), f, dynamo=False, do_constant_folding=False,
                      training=torch.onnx.TrainingMode.EVAL, input_names=["image"], output_names=["logits"])
    src = tmp_path / "resnet50_bn.onnx"
    src.write_bytes(f.getvalue())
    assert sum(n.op_type == "BatchNormalization" for n in onnx.load(str(src)).graph.node) == 53
    rep = bnfold.convert(str(src), None, tmp_path / "folded.onnx", providers="cpu")
    assert rep.passed, rep.verification
    assert rep.export["batchnorm_nodes"] == 0 and len(rep.folded) == 53 and not rep.unfolded
    out = onnx.load(str(tmp_path / "folded.onnx"))
    assert [i.name for i in out.graph.input] == ["image"] and [o.name for o in out.graph.output] == ["logits"]
