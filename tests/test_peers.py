"""Cases the peers' own BatchNorm-fusion tests fold (onnxoptimizer, onnxruntime, OnnxSlim, PyTorch's
fusion utilities), built as tiny models: bnfold folds them too, exactly, or refuses with the reason;
and the folded PyTorch module behaves like the original (flags, hooks, torch.backends)."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

import bnfold
from bnfold.errors import BadInputError
from bnfold.onnx_pass.fold import fold_onnx_proto
from bnfold.onnx_pass.io import bn_count
from bnfold.verification.runners import TorchRunner


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.randn(c, generator=g) * 0.5 + 1)
                m.bias.data.copy_(torch.randn(c, generator=g) * 0.5)
    return model.eval()


def remaining_bn(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# ------------------------------------------------------------------------- §5 the folded module
@pytest.mark.parametrize("conv_bias", [True, False])
def test_fold_keeps_requires_grad_per_parameter(conv_bias):
    """torch.nn.utils.fusion keeps the weight's and the bias's own flags; bnfold does too (a layer
    without a bias: the fused bias takes the BN's β flag)."""
    model = randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3, bias=conv_bias), nn.BatchNorm2d(4)))
    model[0].weight.requires_grad_(False)
    if conv_bias:
        model[0].bias.requires_grad_(True)
    else:
        model[1].bias.requires_grad_(True)
    folded = bnfold.fold(model)
    assert remaining_bn(folded) == []
    assert folded[0].weight.requires_grad is False
    assert folded[0].bias.requires_grad is True
    model[1].bias.requires_grad_(False)
    if not conv_bias:
        assert bnfold.fold(model)[0].bias.requires_grad is False


def test_fold_warns_about_hooks_on_a_folded_bn():
    model = randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    model[1].register_forward_hook(lambda m, i, o: None)
    model[1].register_forward_pre_hook(lambda m, i: None)
    with pytest.warns(UserWarning, match=r"BatchNorm `1` was folded .*forward pre-hook, forward hook"):
        folded = bnfold.fold(model)
    assert remaining_bn(folded) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no hook: no warning
        bnfold.fold(randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))))


def test_calibration_and_verification_run_under_frozen_backend_flags():
    """PyTorch's test harness calls torch.backends.disable_global_flags(): calibration and the
    verification runners (what convert runs) set cuDNN's TF32 flag through its context manager, and
    leave every flag as it was."""
    model = randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    x = torch.randn(4, 3, 8, 8)
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.deterministic)
    torch.backends.disable_global_flags()
    try:
        calibrated = bnfold.calibrate(model, [x])
        with TorchRunner(calibrated) as runner:
            out = runner.infer((x,))
    finally:
        # what disable_global_flags switched off; torch.backends' functions read their own globals (the
        # module object seen as torch.backends is not their namespace in torch 2.14), so set it there
        torch.backends.disable_global_flags.__globals__["__allow_nonbracketed_mutation_flag"] = True
    assert not torch.backends.flags_frozen()
    with torch.no_grad():
        np.testing.assert_allclose(out[0][1], calibrated(x).numpy(), rtol=1e-6, atol=1e-6)
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.deterministic) == before


# ------------------------------------------------------------------- §3 ONNX files the peers fold
RNG = np.random.default_rng(22)


def _bn_inits(c: int, p: str = "bn") -> list:
    vals = {"g": RNG.standard_normal(c) * 0.5 + 1, "b": RNG.standard_normal(c) * 0.5, "m": RNG.standard_normal(c) * 0.5,
            "v": RNG.random(c) + 0.5}
    return [numpy_helper.from_array(v.astype(np.float32), f"{p}_{k}") for k, v in vals.items()]


def conv_bn_model(bn_outputs: list[str], *, opset: int = 7, ir_version: int = 4, shuffle: bool = False) -> onnx.ModelProto:
    """x → Conv(3→4, 3×3) → BatchNormalization(outputs) → Relu → y, float32."""
    inits = [numpy_helper.from_array(RNG.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"), *_bn_inits(4)]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "bn_g", "bn_b", "bn_m", "bn_v"], bn_outputs, name="bn", epsilon=1e-3),
             helper.make_node("Relu", [bn_outputs[0]], ["y"], name="relu")]
    if shuffle:
        nodes = nodes[::-1]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 6, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def run_ort(model_or_path, feeds: dict) -> list:
    import onnxruntime as ort

    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, feeds)


X = {"x": RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)}


@pytest.mark.parametrize("outputs", [["y0", "", "", "", ""], ["y0", "mean", "", "", ""], ["y0", "mean", "var", "", ""]])
def test_bn7_with_empty_or_unused_optional_outputs_folds(tmp_path, outputs):
    """onnx_ir drops trailing empty outputs, which left a BN-7 with 2 outputs (onnx.checker: 'not in
    allowed output sizes'; onnxruntime crashes on it): an inference BN's unused outputs are dropped."""
    src = conv_bn_model(outputs)
    plan = bnfold.fold_onnx(src, tmp_path / "f.onnx")
    assert [f.into for f in plan.folded] == [["conv"]] and not plan.unfolded
    folded = onnx.load(str(tmp_path / "f.onnx"))
    assert bn_count(folded) == 0
    reference = conv_bn_model(["y0"])  # the same BN with no optional output: what the file means
    reference.graph.CopyFrom(src.graph)
    del reference.graph.node[1].output[1:]
    np.testing.assert_allclose(run_ort(folded, X)[0], run_ort(reference, X)[0], rtol=1e-5, atol=1e-5)


def test_bn7_kept_bn_loses_its_unused_outputs(tmp_path):
    """A BN-7 that stays (a graph input feeds it) is written with one output, which runtimes load."""
    model = conv_bn_model(["y0", "mean", "", "", ""])
    model.graph.node[1].input[0] = "x2"
    model.graph.input.append(helper.make_tensor_value_info("x2", onnx.TensorProto.FLOAT, [1, 4, 6, 6]))
    plan = bnfold.fold_onnx(model, tmp_path / "f.onnx")
    assert not plan.folded and any("dropped the unused optional outputs" in r for r in plan.repairs)
    bn = next(n for n in onnx.load(str(tmp_path / "f.onnx")).graph.node if n.op_type == "BatchNormalization")
    assert list(bn.output) == ["y0"]


def test_bn7_in_training_mode_is_refused_with_the_reason():
    model = conv_bn_model(["y0", "m1", "v1", "sm", "sv"])
    plan = fold_onnx_proto(model)
    assert not plan.folded and "with 5 outputs runs in training mode (all five named" in plan.unfolded[0].reason


def test_convert_never_hands_onnxruntime_a_file_it_crashes_on(tmp_path):
    """onnxruntime segfaults on a BN-7 with 2 outputs: convert says so (exit 2) instead of verifying;
    without verification it folds."""
    onnx.save(conv_bn_model(["y0", "mean", "", "", ""]), str(tmp_path / "m.onnx"))
    with pytest.raises(BadInputError, match=r"cannot verify against .*has 2 outputs .*onnxruntime crashes"):
        bnfold.convert(str(tmp_path / "m.onnx"), None, tmp_path / "f.onnx", providers="cpu")
    rep = bnfold.convert(str(tmp_path / "m.onnx"), None, tmp_path / "f.onnx", verify=False)
    assert rep.verified is False and rep.export["batchnorm_nodes"] == 0 and len(rep.folded) == 1


@pytest.mark.parametrize("ir_version, shuffle", [(3, False), (4, True), (3, True)])
def test_files_onnx_checker_rejects_but_onnxruntime_runs_are_repaired_and_folded(tmp_path, ir_version, shuffle):
    """IR < 4 with initializers not listed as inputs, nodes out of topological order: onnxruntime
    loads and optimises them, so bnfold repairs (sort, list), says so, folds, and verifies."""
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(["y0"], ir_version=ir_version, shuffle=shuffle), str(path))
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(onnx.load(str(path)))
    rep = bnfold.convert(str(path), None, tmp_path / "f.onnx", providers="cpu")
    assert rep.passed and rep.export["batchnorm_nodes"] == 0, rep.notes
    assert any("out of topological order" in n for n in rep.notes) == shuffle
    assert any("lists every initializer as a graph input" in n for n in rep.notes) == (ir_version < 4)
    onnx.checker.check_model(onnx.load(str(tmp_path / "f.onnx")))
    np.testing.assert_allclose(run_ort(tmp_path / "f.onnx", X)[0], run_ort(path, X)[0], rtol=1e-5, atol=1e-5)
    plan = bnfold.inspect_spec(str(path))  # inspect repairs what convert repairs
    assert len(plan.folded) == 1 and len(plan.repairs) == (ir_version < 4) + shuffle


# ------------------------------------------------------- §3 PyTorch: several heads, same-math subclasses
class DistilledHeads(nn.Module):
    """EfficientFormerV2 / SwiftFormer: conv → BN → pool → classifier and distillation heads."""

    def __init__(self, linear=nn.Linear, pool: str = "mean", heads: int = 2):
        super().__init__()
        self.conv, self.norm, self.pool = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), pool
        self.act = nn.ReLU()
        self.heads = nn.ModuleList(linear(6, 5) for _ in range(heads))

    def forward(self, x):
        x = self.norm(self.act(self.conv(x)))
        x = x.flatten(2).mean(-1) if self.pool == "mean" else nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        outs = [h(x) for h in self.heads]
        return sum(outs) / len(outs)


@pytest.mark.parametrize("pool, heads", [("mean", 2), ("adaptive", 3), ("adaptive", 1)])
def test_bn_before_pool_folds_into_every_head(pool, heads):
    model = randomise_bn(DistilledHeads(pool=pool, heads=heads)).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    folded, plan = bnfold.fold_with_plan(model, (x,))
    assert [(f.bn, f.rule, f.into) for f in plan.folded] == [("norm", "pool-head", [f"heads.{k}" for k in range(heads)])]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)


def test_a_head_that_is_not_linear_keeps_the_bn():
    class HeadAndSkip(DistilledHeads):
        def forward(self, x):
            x = self.norm(self.act(self.conv(x))).mean((2, 3))
            return self.heads[0](x) + x.sum(1, keepdim=True)

    plan = bnfold.inspect(randomise_bn(HeadAndSkip()), (torch.randn(2, 3, 5, 5),))
    assert not plan.folded and "has 2 consumers (`sum` is not a Conv/Linear module)" in plan.unfolded[0].reason


def test_timm_linear_is_a_producer_like_nn_linear():
    """timm.layers.Linear overrides forward() with its parent's math (plus a TorchScript-only cast):
    registered as data, it folds like nn.Linear."""
    layers = pytest.importorskip("timm.layers")
    model = randomise_bn(DistilledHeads(linear=layers.Linear)).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    folded, plan = bnfold.fold_with_plan(model, (x,))
    assert [f.into_type for f in plan.folded] == [["Linear", "Linear"]] and not plan.unfolded
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)


class RepVggDw(nn.Module):
    """timm's RepViT token mixer (the variants after repvit_m1): bn(conv_bn(x) + conv1(x) + x)."""

    def __init__(self, c: int = 4, skip: bool = True):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False), nn.BatchNorm2d(c))
        self.conv1 = nn.Conv2d(c, c, 1, 1, 0, groups=c)
        self.bn, self.skip = nn.BatchNorm2d(c), skip

    def forward(self, x):
        return self.bn(self.conv(x) + self.conv1(x) + x if self.skip else self.conv(x) + self.conv1(x))


@pytest.mark.parametrize("skip", [True, False])
def test_bn_after_a_sum_of_branches_folds_into_them(skip):
    """The BN after the sum folds into the branches ((s, t) into one, (s, 0) into the other, s − 1 at
    the centre tap for the skip that stays), then the branches merge into one conv."""
    model = randomise_bn(RepVggDw(skip=skip)).double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    folded, plan = bnfold.fold_with_plan(model, (x,))
    assert not plan.unfolded and {f.bn: f.rule for f in plan.folded}["bn"] == "sum"
    assert remaining_bn(folded) == [] and [m.target for m in plan.merges] == ["conv.0"]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)


def test_bn_after_a_sum_with_a_term_of_another_input_stays():
    class OtherTerm(RepVggDw):
        def forward(self, x, y):
            return self.bn(self.conv(x) + self.conv1(x) + y)

    x = torch.randn(1, 4, 6, 6)
    plan = bnfold.inspect(randomise_bn(OtherTerm()), (x, x))
    assert "the model input in the sum is not a conv branch" in next(u.reason for u in plan.unfolded if u.bn == "bn")


# ---------------------------------------------------------------------- §3 ONNX: the pool-head rule
def _f64(name: str, arr) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float64), name)


def _bn_inits64(c: int, p: str = "bn") -> list:
    return [_f64(t.name, numpy_helper.to_array(t)) for t in _bn_inits(c, p)]


def pool_heads_model(pool: str, heads: list[str], opset: int = 17) -> onnx.ModelProto:
    """x → Conv → Relu → BN → pool → Flatten → heads (Gemm/MatMul, 6 → 5 features) → Concat → y, float64."""
    D = onnx.TensorProto.DOUBLE
    inits = [_f64("w", RNG.standard_normal((6, 3, 3, 3))), *_bn_inits64(6)]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c0"], name="conv", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c0"], ["c"], name="relu"),
             helper.make_node("BatchNormalization", ["c", "bn_g", "bn_b", "bn_m", "bn_v"], ["n"], name="bn", epsilon=1e-3)]
    if pool == "gap":
        nodes.append(helper.make_node("GlobalAveragePool", ["n"], ["p"], name="pool"))
    elif pool == "flatten-mean":  # x.flatten(2).mean(-1), as torch.onnx writes it
        inits.append(numpy_helper.from_array(np.array([2, 6, -1], dtype=np.int64), "nc_"))
        nodes += [helper.make_node("Reshape", ["n", "nc_"], ["n2"], name="flatten2"),
                  helper.make_node("ReduceMean", ["n2"], ["p"], name="pool", axes=[-1], keepdims=0)]
    elif opset < 18:
        nodes.append(helper.make_node("ReduceMean", ["n"], ["p"], name="pool", axes=[-2, -1]))
    else:
        inits.append(numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes"))
        nodes.append(helper.make_node("ReduceMean", ["n", "axes"], ["p"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["p"], ["f"], name="flat"))
    for k, op in enumerate(heads):
        inits.append(_f64(f"hw{k}", RNG.standard_normal((5, 6) if op == "Gemm" else (6, 5))))
        if op == "Gemm":
            inits.append(_f64(f"hb{k}", RNG.standard_normal(5)))
            nodes.append(helper.make_node("Gemm", ["f", f"hw{k}", f"hb{k}"], [f"h{k}"], name=f"head{k}", transB=1, alpha=0.5, beta=2.0))
        else:
            nodes.append(helper.make_node("MatMul", ["f", f"hw{k}"], [f"h{k}"], name=f"head{k}"))
    nodes.append(helper.make_node("Concat", [f"h{k}" for k in range(len(heads))], ["y"], name="cat", axis=1))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", D, [2, 3, 5, 5])],
                              [helper.make_tensor_value_info("y", D, [2, 5 * len(heads)])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("pool, heads, opset", [("gap", ["Gemm"], 17), ("gap", ["Gemm", "MatMul"], 17),
                                                ("mean", ["MatMul", "Gemm", "Gemm"], 17), ("mean", ["Gemm", "Gemm"], 18),
                                                ("flatten-mean", ["Gemm", "Gemm"], 17)])
def test_onnx_pool_head_folds_into_every_head(pool, heads, opset):
    from onnx.reference import ReferenceEvaluator

    model = pool_heads_model(pool, heads, opset)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    plan = fold_onnx_proto(folded)
    assert [(f.rule, f.into) for f in plan.folded] == [("pool-head", [f"head{k}" for k in range(len(heads))])]
    assert bn_count(folded) == 0
    onnx.checker.check_model(folded)
    x = {"x": RNG.standard_normal((2, 3, 5, 5))}
    np.testing.assert_allclose(ReferenceEvaluator(folded).run(None, x)[0], ReferenceEvaluator(model).run(None, x)[0], rtol=1e-10, atol=1e-10)


def test_onnx_pool_head_refuses_a_head_that_is_not_linear():
    model = pool_heads_model("gap", ["Gemm", "Gemm"])
    model.graph.node[-2].op_type = "Relu"  # the second head becomes a Relu of the pooled value
    del model.graph.node[-2].input[1:], model.graph.node[-2].attribute[:]
    model.graph.node[-1].input[1] = "h1"
    plan = fold_onnx_proto(model)
    assert not plan.folded and "the pooled value goes to Relu 'head1' (input 0), not to a Gemm/MatMul head" in plan.unfolded[0].reason


# ------------------------------------------------------- §3 ONNX: MatMul → Reshape → Transpose → BN
def layout_model(producer: str, layout: list[tuple], x_shape: list[int], c: int) -> onnx.ModelProto:
    """x → MatMul (B: K×c) [+ bias] or Gemm → layout nodes ("Reshape", shape) / ("Transpose", perm) → BN(c) → y."""
    D = onnx.TensorProto.DOUBLE
    k = x_shape[-1]
    inits = [_f64("B", RNG.standard_normal((k, c))), _f64("bias", RNG.standard_normal(c)), *_bn_inits64(c)]
    if producer == "Gemm":
        nodes = [helper.make_node("Gemm", ["x", "B", "bias"], ["p"], name="mm", beta=0.5)]
    else:
        nodes = [helper.make_node("MatMul", ["x", "B"], ["p0" if producer == "MatMul+Add" else "p"], name="mm")]
        if producer == "MatMul+Add":
            nodes.append(helper.make_node("Add", ["bias", "p0"], ["p"], name="add"))
    v = "p"
    for i, (op, arg) in enumerate(layout):
        if op == "Reshape":
            inits.append(numpy_helper.from_array(np.asarray(arg, dtype=np.int64), f"shape{i}"))
            nodes.append(helper.make_node("Reshape", [v, f"shape{i}"], [f"l{i}"], name=f"reshape{i}"))
        else:
            nodes.append(helper.make_node("Transpose", [v], [f"l{i}"], name=f"transpose{i}", perm=arg))
        v = f"l{i}"
    nodes.append(helper.make_node("BatchNormalization", [v, "bn_g", "bn_b", "bn_m", "bn_v"], ["y"], name="bn", epsilon=1e-3))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", D, x_shape)], [helper.make_tensor_value_info("y", D, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("producer, layout, x_shape", [
    ("MatMul", [("Reshape", [2, 3, 6]), ("Transpose", [0, 2, 1])], [6, 8]),  # onnxruntime's matmul_bn_fusion case
    ("MatMul+Add", [("Transpose", [0, 2, 1])], [2, 3, 8]),
    ("Gemm", [("Reshape", [2, 3, 6]), ("Transpose", [0, 2, 1]), ("Reshape", [2, 6, 3, 1])], [6, 8]),
    ("MatMul", [("Transpose", [2, 0, 1]), ("Transpose", [1, 0, 2])], [2, 3, 8]),
])
def test_matmul_reshape_transpose_bn_folds_when_the_columns_reach_the_channel_axis(producer, layout, x_shape):
    from onnx.reference import ReferenceEvaluator

    model = layout_model(producer, layout, x_shape, 6)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    plan = fold_onnx_proto(folded)
    assert [(f.rule, f.into) for f in plan.folded] == [("reshape-transpose", ["mm"] + (["add"] if producer == "MatMul+Add" else []))], plan
    assert bn_count(folded) == 0
    x = {"x": RNG.standard_normal(x_shape)}
    np.testing.assert_allclose(ReferenceEvaluator(folded).run(None, x)[0], ReferenceEvaluator(model).run(None, x)[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout, x_shape, why", [
    ([("Transpose", [0, 1, 2])], [2, 4, 8], "the MatMul's columns land on axis 2 after Transpose, not on the BN's channel axis 1"),
    ([("Reshape", [2, 4, 2, 2]), ("Transpose", [0, 2, 1, 3])], [2, 4, 8], "does not keep the MatMul's columns on one axis"),
])
def test_matmul_layouts_the_algebra_does_not_allow_are_refused(layout, x_shape, why):
    plan = fold_onnx_proto(layout_model("MatMul", layout, x_shape, 4))
    assert not plan.folded and why in plan.unfolded[0].reason


def test_verify_against_an_original_onnxruntime_crashes_on_says_so(tmp_path):
    onnx.save(conv_bn_model(["y0", "mean", "", "", ""]), str(tmp_path / "m.onnx"))
    bnfold.convert(str(tmp_path / "m.onnx"), None, tmp_path / "f.onnx", verify=False)
    with pytest.raises(BadInputError, match=r"cannot verify against .*has 2 outputs"):
        bnfold.check_artifact(str(tmp_path / "m.onnx"), tmp_path / "f.onnx", providers="cpu")
