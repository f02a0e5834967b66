"""Each ONNX rule and each refusal on a model written in the ONNX text format, in float64, with random
BN statistics, γ and β: the folded model must compute what the original computes (onnx's reference
evaluator, float64, 1e-10), and every refusal must say why."""

from __future__ import annotations


import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

import bnfold
from bnfold.onnx_pass.io import bn_count
from bnfold.onnx_pass.fold import fold_onnx_proto

RNG = np.random.default_rng(15)


def bn_params(prefix: str, c: int, dtype=np.float64) -> dict[str, np.ndarray]:
    return {
        f"{prefix}_g": (RNG.standard_normal(c) * 0.5 + 1).astype(dtype),
        f"{prefix}_b": (RNG.standard_normal(c) * 0.5).astype(dtype),
        f"{prefix}_m": (RNG.standard_normal(c) * 0.5).astype(dtype),
        f"{prefix}_v": (RNG.random(c) * 1.5 + 0.25).astype(dtype),
    }


def bn(x: str, y: str, p: str = "bn", attrs: str = "<epsilon = 0.001>") -> str:
    return f"{y} = BatchNormalization {attrs} ({x}, {p}_g, {p}_b, {p}_m, {p}_v)"


def text_model(signature: str, body: list[str], consts: dict[str, np.ndarray], opset: int = 17, functions: str = "",
               extra_opsets: str = "", inputs_as_initializers: bool = False) -> onnx.ModelProto:
    text = (f'<ir_version: 8, opset_import: ["" : {opset}{extra_opsets}]>\n{signature} {{\n  ' + "\n  ".join(body) + "\n}\n" + functions)
    m = onnx.parser.parse_model(text)
    for name, arr in consts.items():
        m.graph.initializer.append(numpy_helper.from_array(np.asarray(arr), name))
    return m


def w(*shape) -> np.ndarray:
    return RNG.standard_normal(shape)


def entry(f) -> tuple[str, list[str]]:
    return f.rule, list(f.into_type)


def fold_check(m, feeds, expect, *, n_left: int = 0):
    """Fold a copy; same outputs in float64 (reference evaluator); the plan is ``expect``."""
    onnx.checker.check_model(m)
    before = ReferenceEvaluator(m).run(None, feeds)
    folded = onnx.ModelProto()
    folded.CopyFrom(m)
    plan = fold_onnx_proto(folded)
    onnx.checker.check_model(folded)
    assert [entry(f) for f in plan.folded] == expect, plan
    assert bn_count(folded) == n_left == len(plan.unfolded), plan
    after = ReferenceEvaluator(folded).run(None, feeds)
    for a, b in zip(after, before):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
    assert [o.name for o in folded.graph.output] == [o.name for o in m.graph.output]
    return folded, plan


def reason_of(m) -> str:
    plan = fold_onnx_proto(m)
    assert not plan.folded, plan
    assert len(plan.unfolded) == 1
    return plan.unfolded[0].reason


X4 = {"x": RNG.standard_normal((2, 4, 5, 5))}


# ------------------------------------------------------------------------------- constant chains
def test_legacy_dedup_identity_weights_and_shared_bn_params():
    """torch's legacy exporter without constant folding: equal tensors behind Identity nodes, one
    tensor shared by two BN layers. Both fold; the shared tensor itself is never edited."""
    p = bn_params("bn", 6)
    consts = {"w1": w(6, 4, 3, 3), "w2": w(6, 6, 1, 1), **p}
    body = ["g1 = Identity (bn_g)", "v1 = Identity (bn_v)",
            "c1 = Conv <pads = [1, 1, 1, 1]> (x, w1)", "n1 = BatchNormalization <epsilon = 0.001> (c1, g1, bn_b, bn_m, v1)",
            "r = Relu (n1)", "c2 = Conv (r, w2)", "y = BatchNormalization <epsilon = 0.001> (c2, bn_g, bn_b, bn_m, bn_v)"]
    m = text_model("agraph (double[2,4,5,5] x) => (double[2,6,5,5] y)", body, consts)
    folded, _ = fold_check(m, X4, [("backward", ["Conv"]), ("backward", ["Conv"])])
    assert not {"bn_g", "bn_v"} & {t.name for t in folded.graph.initializer}  # nothing reads them any more
    m2 = text_model("agraph (double[2,4,5,5] x) => (double[2,6,5,5] y, double[6] keep)", body + ["keep = Identity (bn_g)"], consts)
    folded2, _ = fold_check(m2, X4, [("backward", ["Conv"]), ("backward", ["Conv"])])
    kept = {t.name: numpy_helper.to_array(t) for t in folded2.graph.initializer}
    np.testing.assert_array_equal(kept["bn_g"], p["bn_g"])  # shared tensor copied, not rewritten


def test_dynamo_zero_bias_as_expand_of_constant():
    """torch.onnx.export(dynamo=True, optimize=False) feeds a zero conv bias through Expand/CastLike/Shape."""
    body = ["zero = Constant <value = double {0}> ()", "z = CastLike (zero, x)", "shp = Shape <start = 0, end = 1> (w)",
            "bias = Expand (z, shp)", "c = Conv (x, w, bias)", bn("c", "y")]
    m = text_model("agraph (double[2,4,5,5] x) => (double[2,6,5,5] y)", body, {"w": w(6, 4, 1, 1), **bn_params("bn", 6)})
    fold_check(m, X4, [("backward", ["Conv"])])


def test_cast_reshape_unsqueeze_chains():
    """Weights stored as float32 and Cast to double; a bias made by Reshape/Unsqueeze of constants."""
    body = ["wd = Cast <to = 11> (w32)", "ax = Constant <value = int64[1] {0}> ()", "b1 = Unsqueeze (b0, ax)",
            "sh = Constant <value = int64[1] {6}> ()", "b = Reshape (b1, sh)", "c = Conv (x, wd, b)", bn("c", "y")]
    consts = {"w32": w(6, 4, 3, 3).astype(np.float32), "b0": np.asarray(w(6)).reshape(6), **bn_params("bn", 6)}
    m = text_model("agraph (double[2,4,5,5] x) => (double[2,6,3,3] y)", body, consts)
    fold_check(m, X4, [("backward", ["Conv"])])


# ---------------------------------------------------------------------------------------- rules
def test_convtranspose():  # groups > 1: tests/test_onnx_fold.py (onnxruntime; the reference evaluator has no grouped ConvTranspose)
    group = 1
    body = [f"c = ConvTranspose <group = {group}, strides = [2, 2]> (x, w, b)", bn("c", "y")]
    m = text_model("agraph (double[2,4,5,5] x) => (double[2,6,11,11] y)", body, {"w": w(4, 6 // group, 3, 3), "b": w(6), **bn_params("bn", 6)})
    fold_check(m, X4, [("backward", ["ConvTranspose"])])


@pytest.mark.parametrize("trans_a,trans_b,alpha,beta,c", [(0, 0, 1.0, 1.0, None), (1, 1, 0.5, 2.0, (5,)), (0, 1, 1.5, 0.25, (3, 5)), (1, 0, 2.0, 1.0, (1, 5))])
def test_gemm_backward(trans_a, trans_b, alpha, beta, c):
    ins = "x, B" + (", C" if c else "")
    body = [f"g = Gemm <alpha = {alpha}, beta = {beta}, transA = {trans_a}, transB = {trans_b}> ({ins})", bn("g", "y")]
    consts = {"B": w(5, 4) if trans_b else w(4, 5), **bn_params("bn", 5), **({"C": w(*c)} if c else {})}
    xs = (4, 3) if trans_a else (3, 4)
    m = text_model(f"agraph (double[{xs[0]},{xs[1]}] x) => (double[3,5] y)", body, consts)
    fold_check(m, {"x": RNG.standard_normal(xs)}, [("backward", ["Gemm"])])


@pytest.mark.parametrize("trans_b,alpha,beta,c", [(0, 1.0, 1.0, True), (1, 0.7, 2.0, True), (1, 1.0, 1.0, False)])
def test_gemm_forward(trans_b, alpha, beta, c):
    ins = "n, B" + (", C" if c else "")
    body = [bn("x", "n"), f"y = Gemm <alpha = {alpha}, beta = {beta}, transB = {trans_b}> ({ins})"]
    consts = {"B": w(5, 4) if trans_b else w(4, 5), **bn_params("bn", 4), **({"C": w(5)} if c else {})}
    m = text_model("agraph (double[3,4] x) => (double[3,5] y)", body, consts)
    fold_check(m, {"x": RNG.standard_normal((3, 4))}, [("forward", ["Gemm"])])


def test_matmul_forward_and_backward():
    body = [bn("x", "n", "bn1"), "h = MatMul (n, B1)", "a = Add (h, bias)", bn("a", "k", "bn2"), "y = MatMul (k, B2)"]
    consts = {"B1": w(4, 5), "bias": w(5), "B2": w(5, 3), **bn_params("bn1", 4), **bn_params("bn2", 5)}
    m = text_model("agraph (double[3,4] x) => (double[3,3] y)", body, consts)
    # the first fold gives h an Add of its own, so the second BN is folded forward into the next MatMul
    fold_check(m, {"x": RNG.standard_normal((3, 4))}, [("forward", ["MatMul"]), ("forward", ["MatMul"])])
    m = text_model("agraph (double[3,4] x) => (double[3,5] y)", ["h = MatMul (x, B1)", "a = Add (bias, h)", bn("a", "y", "bn2")], consts)
    fold_check(m, {"x": RNG.standard_normal((3, 4))}, [("backward", ["MatMul", "Add"])])


def test_bn_after_activation_into_unpadded_conv():
    body = ["c = Conv <pads = [1, 1, 1, 1]> (x, w1)", "r = Relu (c)", bn("r", "n"), "y = Conv <group = 2, strides = [2, 2]> (n, w2, b2)"]
    consts = {"w1": w(6, 4, 3, 3), "w2": w(4, 3, 3, 3), "b2": w(4), **bn_params("bn", 6)}
    m = text_model("agraph (double[2,4,5,5] x) => (double[2,4,2,2] y)", body, consts)
    fold_check(m, X4, [("forward", ["Conv"])])


def test_forward_into_pointwise_conv_with_same_padding():
    body = [bn("x", "n", "bn"), "y = Conv <auto_pad = \"SAME_UPPER\", strides = [2, 2]> (n, w1)"]
    m = text_model("agraph (double[2,4,5,5] x) => (double[2,3,3,3] y)", body, {"w1": w(3, 4, 1, 1), **bn_params("bn", 4)})
    fold_check(m, X4, [("forward", ["Conv"])])


def test_concat_of_convs():
    body = ["c1 = Conv (x, w1, b1)", "c2 = Conv <pads = [1, 1, 1, 1]> (x, w2)", "k = Concat <axis = 1> (c1, c2)", bn("k", "y")]
    consts = {"w1": w(2, 4, 1, 1), "b1": w(2), "w2": w(3, 4, 3, 3), **bn_params("bn", 5)}
    m = text_model("agraph (double[2,4,5,5] x) => (double[2,5,5,5] y)", body, consts)
    fold_check(m, X4, [("concat", ["Conv", "Conv"])])


def test_add_of_two_convs():
    """Convs on two inputs: the BN after their Add folds into both (they cannot merge)."""
    body = ["c1 = Conv (x, w1, b1)", "c2 = Conv <pads = [1, 1, 1, 1]> (x2, w2)", "a = Add (c1, c2)", bn("a", "y")]
    consts = {"w1": w(3, 4, 1, 1), "b1": w(3), "w2": w(3, 4, 3, 3), **bn_params("bn", 3)}
    m = text_model("agraph (double[2,4,5,5] x, double[2,4,5,5] x2) => (double[2,3,5,5] y)", body, consts)
    folded, _ = fold_check(m, {**X4, "x2": RNG.standard_normal((2, 4, 5, 5))}, [("add-of-convs", ["Conv", "Conv"])])
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Conv", "Add"]


def test_add_of_two_convs_on_one_input_merges_them():
    """On the same input, the two convs become one (the 1×1 kernel at the 3×3 centre) and the BN folds into it."""
    body = ["c1 = Conv (x, w1, b1)", "c2 = Conv <pads = [1, 1, 1, 1]> (x, w2)", "a = Add (c1, c2)", bn("a", "y")]
    consts = {"w1": w(3, 4, 1, 1), "b1": w(3), "w2": w(3, 4, 3, 3), **bn_params("bn", 3)}
    m = text_model("agraph (double[2,4,5,5] x) => (double[2,3,5,5] y)", body, consts)
    folded, _ = fold_check(m, X4, [("add-of-convs", ["Conv"])])
    assert [n.op_type for n in folded.graph.node] == ["Conv"]


def test_bn_inside_if_branches_with_outer_weights():
    then = "then_branch = g1 () => (double[2,6,5,5] t) { c = Conv <pads = [1, 1, 1, 1]> (x, w1)\n " + bn("c", "t") + " }"
    other = "else_branch = g2 () => (double[2,6,5,5] e) { d = Conv <pads = [1, 1, 1, 1]> (x, w1)\n " + bn("d", "e", "bn2") + " }"
    body = [f"y = If <{then}, {other}> (cond)"]
    m = text_model("agraph (double[2,4,5,5] x, bool cond) => (double[2,6,5,5] y)", body, {"w1": w(6, 4, 3, 3), **bn_params("bn", 6), **bn_params("bn2", 6)})
    for c in (True, False):
        fold_check(m, {**X4, "cond": np.asarray(c)}, [("backward", ["Conv"]), ("backward", ["Conv"])])


def test_bn_inside_a_local_function():
    consts = bn_params("bn", 6)
    fconsts = [f"{k} = Constant <value = double[6] {{{', '.join(repr(float(v)) for v in a)}}}> ()" for k, a in consts.items()]
    wv = ", ".join(repr(float(v)) for v in np.asarray(w(6, 4, 1, 1)).ravel())
    fn = ('<domain: "local", opset_import: ["" : 17]>\nblk (a) => (b) {\n  ' + "\n  ".join(
        fconsts + [f"wf = Constant <value = double[6,4,1,1] {{{wv}}}> ()", "c = Conv (a, wf)", bn("c", "b")]) + "\n}\n")
    m = text_model("agraph (double[2,4,5,5] x) => (double[2,6,5,5] y)", ["y = local.blk (x)"], {}, functions=fn, extra_opsets=', "local" : 1')
    fold_check(m, X4, [("backward", ["Conv"])])


def test_fp16_and_odd_epsilon():
    """fp16 weights fold in float64 and are cast once; a negative epsilon is fine while var + ε > 0."""
    p = bn_params("bn", 3, np.float16)
    body = ["c = Conv (x, w)", bn("c", "y", attrs="<epsilon = -0.01>")]
    m = text_model("agraph (float16[1,2,3,3] x) => (float16[1,3,3,3] y)", body, {"w": w(3, 2, 1, 1).astype(np.float16), **p})
    folded = onnx.ModelProto()
    folded.CopyFrom(m)
    plan = fold_onnx_proto(folded)
    assert len(plan.folded) == 1
    new_w = next(numpy_helper.to_array(t) for t in folded.graph.initializer if t.dims == [3, 2, 1, 1])
    eps = float(np.float32(-0.01))
    s = p["bn_g"].astype(np.float64) / np.sqrt(p["bn_v"].astype(np.float64) + eps)
    w16 = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "w")).astype(np.float64)
    np.testing.assert_array_equal(new_w, (w16 * s[:, None, None, None]).astype(np.float16))


def test_opset9_bn_with_one_output_folds_five_outputs_is_training():
    import onnxruntime as ort  # the reference evaluator runs opset-9 BN in training mode (momentum default)

    body = ["c = Conv (x, w)", "y = BatchNormalization <epsilon = 0.001> (c, bn_g, bn_b, bn_m, bn_v)"]
    consts = {k: v.astype(np.float32) for k, v in {"w": w(6, 4, 1, 1), **bn_params("bn", 6)}.items()}
    m = text_model("agraph (float[2,4,5,5] x) => (float[2,6,5,5] y)", body, consts, opset=9)
    folded = onnx.ModelProto()
    folded.CopyFrom(m)
    assert len(fold_onnx_proto(folded).folded) == 1 and bn_count(folded) == 0
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = {"x": X4["x"].astype(np.float32)}
    a, b = (ort.InferenceSession(p.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, x)[0] for p in (m, folded))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    body[1] = "y, rm, rv, sm, sv = BatchNormalization <epsilon = 0.001> (c, bn_g, bn_b, bn_m, bn_v)"
    m = text_model("agraph (double[2,4,5,5] x) => (double[2,6,5,5] y)", body, {"w": w(6, 4, 1, 1), **bn_params("bn", 6)}, opset=9)
    assert "with 5 outputs runs in training mode" in reason_of(m)


# ------------------------------------------------------------------------------------- refusals
CONV_BN = ["c = Conv (x, w)"]
SIG = "agraph (double[2,4,5,5] x) => (double[2,6,5,5] y)"


def _conv_bn(body_bn=None, sig=SIG, opset=17, consts=None, extra=()):
    body = CONV_BN + [body_bn or bn("c", "y")] + list(extra)
    return text_model(sig, body, consts or {"w": w(6, 4, 1, 1), **bn_params("bn", 6)}, opset=opset)


def test_refuse_weight_that_is_a_graph_input_even_with_an_initializer():
    m = _conv_bn(sig="agraph (double[2,4,5,5] x, double[6,4,1,1] w) => (double[2,6,5,5] y)")
    assert "'w' is a graph input (overridable at run time)" in reason_of(m)


def test_refuse_bn_parameter_graph_input():
    m = _conv_bn(sig="agraph (double[2,4,5,5] x, double[6] bn_m) => (double[2,6,5,5] y)",
                 consts={"w": w(6, 4, 1, 1), **{k: v for k, v in bn_params("bn", 6).items() if k != "bn_m"}})
    assert "mean: 'bn_m' is a graph input" in reason_of(m)


def test_refuse_training_mode_and_used_statistics():
    m = _conv_bn(bn("c", "y", attrs="<training_mode = 1>"))
    assert "training_mode=1" in reason_of(m)
    m = _conv_bn("y, rm, rv = BatchNormalization <training_mode = 1> (c, bn_g, bn_b, bn_m, bn_v)", sig="agraph (double[2,4,5,5] x) => (double[2,6,5,5] y, double[6] rm)")
    assert "training_mode=1" in reason_of(m)


def test_refuse_old_opset_modes():
    m = _conv_bn(bn("c", "y", attrs="<spatial = 0>"), opset=8)
    assert "spatial=0" in reason_of(m)
    m = _conv_bn(bn("c", "y", attrs="<is_test = 0>"), opset=6)
    assert "is_test=1" in reason_of(m)


def test_refuse_non_positive_variance_plus_epsilon():
    p = bn_params("bn", 6)
    p["bn_v"] = np.maximum(p["bn_v"], 0.75)  # only channel 2 at or below -epsilon, whatever the shared RNG drew before
    p["bn_v"][2] = 0.0
    m = _conv_bn(bn("c", "y", attrs="<epsilon = -0.5>"), consts={"w": w(6, 4, 1, 1), **p})
    assert "channel 2 has var + epsilon" in reason_of(m)


def test_refuse_shared_producer_and_graph_output():
    m = _conv_bn(sig="agraph (double[2,4,5,5] x) => (double[2,6,5,5] y, double[2,6,5,5] z)", extra=["z = Relu (c)"])
    assert "'c' has 2 consumers" in reason_of(m)
    m = _conv_bn(sig="agraph (double[2,4,5,5] x) => (double[2,6,5,5] y, double[2,6,5,5] c)")
    assert "'c' is a graph output" in reason_of(m)


def test_refuse_padded_forward_and_transposed_gemm():
    body = ["r = Relu (x)", bn("r", "n", "bn"), "y = Conv <pads = [1, 1, 1, 1]> (n, w2)"]
    m = text_model("agraph (double[2,4,5,5] x) => (double[2,3,5,5] y)", body, {"w2": w(3, 4, 3, 3), **bn_params("bn", 4)})
    r = reason_of(m)
    assert "Relu" in r and "pads its input" in r
    body = [bn("x", "n", "bn"), "y = Gemm <transA = 1> (n, B)"]
    m = text_model("agraph (double[4,3] x) => (double[3,5] y)", body, {"B": w(4, 5), **bn_params("bn", 4)})
    assert "transA=1" in reason_of(m)


def test_refuse_weight_computed_at_run_time_and_channel_mismatch():
    m = text_model(SIG, ["wr = Relu (w)", "c = Conv (x, wr)", bn("c", "y")], {"w": w(6, 4, 1, 1), **bn_params("bn", 6)})
    assert "computed by Relu" in reason_of(m)
    body = ["c = Conv (x, w)", "k = Concat <axis = 1> (c, x)", bn("k", "y")]
    m = text_model("agraph (double[2,4,5,5] x) => (double[2,10,5,5] y)", body, {"w": w(6, 4, 1, 1), **bn_params("bn", 10)})
    assert "Concat" in reason_of(m) and "graph input" in reason_of(m)


def test_matmul_3d_output_refused():
    body = ["h = MatMul (x, B)", bn("h", "y", "bn")]
    m = text_model("agraph (double[3,2,4] x) => (double[3,2,2] y)", body, {"B": w(4, 2), **bn_params("bn", 2)})
    assert "rank is 3" in reason_of(m)


# ------------------------------------------------------------------------------------ public API
def test_fold_onnx_accepts_path_proto_and_ir_model_without_changing_them(tmp_path):
    import onnx_ir as ir

    m = _conv_bn()
    before = m.SerializeToString()
    src = tmp_path / "m.onnx"
    onnx.save(m, str(src))
    for k, s in enumerate([src, m, ir.serde.deserialize_model(m)]):
        plan = bnfold.fold_onnx(s, tmp_path / f"out{k}.onnx")
        assert len(plan.folded) == 1
        out = onnx.load(str(tmp_path / f"out{k}.onnx"))
        assert bn_count(out) == 0
    assert m.SerializeToString() == before
    assert bn_count(ir.serde.serialize_model(s)) == 1  # the ir.Model passed in still has its BN


def test_ir_version_3_initializers_listed_as_inputs_are_constants():
    """IR < 4 requires every initializer among the graph inputs (old model-zoo files, torch's legacy
    exporter at opset 7/8): there the listing is the format's, so they fold and are listed again."""
    import onnxruntime as ort  # the reference evaluator cannot run opset-8 BN

    consts = {k: v.astype(np.float32) for k, v in {"w": w(6, 4, 1, 1), **bn_params("bn", 6)}.items()}
    sig = "agraph (float[2,4,5,5] x, " + ", ".join(f"float[{','.join(map(str, a.shape))}] {k}" for k, a in consts.items()) + ") => (float[2,6,5,5] y)"
    m = text_model(sig, CONV_BN + [bn("c", "y")], consts, opset=8)
    m.ir_version = 3
    onnx.checker.check_model(m)
    folded = onnx.ModelProto()
    folded.CopyFrom(m)
    assert len(fold_onnx_proto(folded).folded) == 1 and bn_count(folded) == 0
    onnx.checker.check_model(folded)
    inits = {t.name for t in folded.graph.initializer}
    assert inits and inits <= {i.name for i in folded.graph.input} and folded.graph.input[0].name == "x"
    x = {"x": X4["x"].astype(np.float32)}
    a, b = (ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0] for p in (m, folded))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    m.ir_version = 7  # the same listing in a newer file means "overridable": refused
    assert "'bn_g' is a graph input (overridable at run time)" in reason_of(m)


@pytest.mark.parametrize("with_add", [False, True])
def test_reshape_linear_tokens_to_bn1d(with_add):
    """Linear on (N, T, C) exported as MatMul (+ Add), reshaped to (N·T, C) for BN1d, reshaped back."""
    body = ["h = MatMul (x, B)"] + (["a = Add (h, bias)"] if with_add else []) + [
        "shp = Constant <value = int64[2] {-1, 5}> ()", f"r = Reshape ({'a' if with_add else 'h'}, shp)", bn("r", "n"),
        "back = Constant <value = int64[3] {2, 3, 5}> ()", "y = Reshape (n, back)"]
    consts = {"B": w(4, 5), "bias": w(5), **bn_params("bn", 5)}
    m = text_model("agraph (double[2,3,4] x) => (double[2,3,5] y)", body, consts)
    fold_check(m, {"x": RNG.standard_normal((2, 3, 4))}, [("reshape", ["MatMul", "Add"] if with_add else ["MatMul"])])


@pytest.mark.parametrize("trans_a,trans_b,alpha,beta,c", [(0, 0, 1.0, 1.0, None), (1, 1, 0.5, 2.0, (5,)), (0, 1, 1.5, 0.25, (6, 5)),
                                                      (1, 0, 2.0, 0.75, (1, 5))])
def test_reshape_gemm_rows_to_bn1d(trans_a, trans_b, alpha, beta, c):
    """Gemm → Reshape to (rows, C) → BN1d → Reshape back (the README's ``reshape`` rule on Gemm):
    B's columns and C take (s, t), β becomes 1."""
    ins = "x, B" + (", C" if c else "")
    body = [f"g = Gemm <alpha = {alpha}, beta = {beta}, transA = {trans_a}, transB = {trans_b}> ({ins})",
            "shp = Constant <value = int64[2] {-1, 5}> ()", "r = Reshape (g, shp)", bn("r", "n"),
            "back = Constant <value = int64[3] {2, 3, 5}> ()", "y = Reshape (n, back)"]
    consts = {"B": w(5, 4) if trans_b else w(4, 5), **bn_params("bn", 5), **({"C": w(*c)} if c else {})}
    xs = (4, 6) if trans_a else (6, 4)
    m = text_model(f"agraph (double[{xs[0]},{xs[1]}] x) => (double[2,3,5] y)", body, consts)
    folded, _ = fold_check(m, {"x": RNG.standard_normal(xs)}, [("reshape", ["Gemm"])])
    assert [n.op_type for n in folded.graph.node if n.op_type != "Constant"] == ["Gemm", "Reshape", "Reshape"]


def test_reshape_of_gemm_refusals():
    """A Reshape that splits each Gemm row over several BN rows (6 outputs → (·, 3)) is no per-channel
    map; a Gemm whose B is a graph input can change at run time."""
    body = ["g = Gemm (x, B)", "shp = Constant <value = int64[2] {-1, 3}> ()", "r = Reshape (g, shp)", bn("r", "y")]
    m = text_model("agraph (double[2,4] x) => (double[4,3] y)", body, {"B": w(4, 6), **bn_params("bn", 3)})
    onnx.checker.check_model(m, full_check=True)
    assert "Reshape 'r' input: Gemm 'g' has 6 outputs, BN 3 channels" in reason_of(m)
    body[0] = "g = Gemm (x, B3)"
    m = text_model("agraph (double[2,4] x, double[4,3] B3) => (double[2,3] y)", body, bn_params("bn", 3))
    assert "Reshape 'r' input: Gemm 'g' B: 'B3' is a graph input (overridable at run time)" in reason_of(m)


def test_reshape_that_moves_the_channel_axis_is_refused():
    body = ["h = MatMul (x, B)", "shp = Constant <value = int64[2] {6, -1}> ()", "r = Reshape (h, shp)", bn("r", "y")]
    m = text_model("agraph (double[2,3,4] x) => (double[6,6] y)", body, {"B": w(4, 6), **bn_params("bn", 6)})
    onnx.checker.check_model(m, full_check=True)
    assert "channel axis last" in reason_of(m)


def test_bn_inside_a_loop_body():
    """A Loop body (a subgraph with its own inputs) reading outer weights: the BN in it folds; new
    weights live in the body as Constant nodes."""
    body_g = ("body = g (int64 i, bool cin, double[2,4,5,5] acc) => (bool cout, double[2,4,5,5] acc2) {\n"
              " cout = Identity (cin)\n c = Conv (acc, w)\n " + bn("c", "acc2") + "\n}")
    body = ["n = Constant <value = int64 {3}> ()", "t = Constant <value = bool {1}> ()", f"y = Loop <{body_g}> (n, t, x)"]
    m = text_model("agraph (double[2,4,5,5] x) => (double[2,4,5,5] y)", body, {"w": w(4, 4, 1, 1) * 0.5, **bn_params("bn", 4)})
    folded, plan = fold_check(m, X4, [("backward", ["Conv"])])
    assert plan.folded[0].bn == "y/body/acc2"  # named by the Loop node, its attribute and the BN


def test_function_attribute_set_by_the_caller_is_a_refusal():
    consts = bn_params("bn", 6)
    fconsts = [f"{k} = Constant <value = double[6] {{{', '.join(repr(float(v)) for v in a)}}}> ()" for k, a in consts.items()]
    wv = ", ".join(repr(float(v)) for v in np.asarray(w(6, 4, 1, 1)).ravel())
    fn = ('<domain: "local", opset_import: ["" : 17]>\nblk <eps> (a) => (b) {\n  ' + "\n  ".join(
        fconsts + [f"wf = Constant <value = double[6,4,1,1] {{{wv}}}> ()", "c = Conv (a, wf)",
                   "b = BatchNormalization <epsilon: float = @eps> (c, bn_g, bn_b, bn_m, bn_v)"]) + "\n}\n")
    m = text_model("agraph (double[2,4,5,5] x) => (double[2,6,5,5] y)", ["y = local.blk <eps = 0.001> (x)"], {}, functions=fn,
                   extra_opsets=', "local" : 1')
    assert "set by the function's caller" in reason_of(m)


def test_rule_that_cannot_read_the_graph_is_a_refusal_with_its_reason():
    """A rule that fails on an odd graph (a Concat axis set by the function's caller) refuses with
    that rule's reason; the BN stays, nothing crashes."""
    consts = bn_params("bn", 6)
    fconsts = [f"{k} = Constant <value = double[6] {{{', '.join(repr(float(v)) for v in a)}}}> ()" for k, a in consts.items()]
    wv = ", ".join(repr(float(v)) for v in np.asarray(w(3, 4, 1, 1)).ravel())
    fn = ('<domain: "local", opset_import: ["" : 17]>\nblk <ax> (a) => (b) {\n  ' + "\n  ".join(
        fconsts + [f"wf = Constant <value = double[3,4,1,1] {{{wv}}}> ()", "c1 = Conv (a, wf)", "c2 = Conv (a, wf)",
                   "k = Concat <axis: int = @ax> (c1, c2)", bn("k", "b")]) + "\n}\n")
    m = text_model("agraph (double[2,4,5,5] x) => (double[2,6,5,5] y)", ["y = local.blk <ax = 1> (x)"], {}, functions=fn,
                   extra_opsets=', "local" : 1')
    r = reason_of(m)
    assert r.startswith("backward: BackwardConcat could not read the graph here (ValueError: attribute 'axis' of Concat"), r
    assert "set by the function's caller" in r and "; forward: " in r
