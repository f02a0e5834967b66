"""Structural re-parameterisation (issue 22): parallel branches that sum into one tensor become ONE conv,
in the folded PyTorch module and in the ONNX file, found from the graph. Small RepVGG/MobileOne-style
blocks (k×k + BN ∥ 1×1 + BN ∥ BN identity ∥ several k×k, grouped and depthwise), timm repvgg_a0 and
mobileone_s0 through ``bnfold.convert``, ONNX-in files, and every refusal with its reason. BN statistics,
γ and β randomised; outputs compared in float64."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from torch import nn

import bnfold
from bnfold import fold_math
from bnfold.onnx_pass.export import export_folded, export_proto
from bnfold.onnx_pass.fold import fold_onnx_proto
from bnfold.torch_pass.bn_kinds import ZeroBranch
from bnfold.torch_pass.fold import fold_with_plan
from conftest import randomize_bn, rel_err

ZERO_CHAIN = {"Expand", "ConstantOfShape", "Shape"}


def conv_bn(cin, cout, k, stride=1, groups=1, pad=None, dilation=1):
    pad = dilation * (k // 2) if pad is None else pad
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, pad, dilation=dilation, groups=groups, bias=False), nn.BatchNorm2d(cout))


class RepBlock(nn.Module):
    """``n_kxk`` k×k conv-BN branches, a 1×1 conv-BN (``scale``), an identity BN when in = out and
    stride 1; MobileOne's in-place ``+=`` sum; ReLU after the sum."""

    def __init__(self, cin=4, cout=4, k=3, n_kxk=1, scale=True, identity=True, stride=1, groups=1, scale_groups=None,
                 pad=None):
        super().__init__()
        self.kxk = nn.ModuleList(conv_bn(cin, cout, k, stride, groups, pad) for _ in range(n_kxk))
        self.scale = conv_bn(cin, cout, 1, stride, scale_groups or groups) if scale else None
        self.identity = nn.BatchNorm2d(cout) if identity and cin == cout and stride == 1 else None

    def forward(self, x):
        out = self.scale(x) if self.scale is not None else 0
        for branch in self.kxk:
            out += branch(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return torch.relu(out)


class Stem(nn.Module):
    """A conv in front (the block's x is no graph input) and a head after."""

    def __init__(self, block, c=4):
        super().__init__()
        self.stem, self.block, self.head = nn.Conv2d(3, c, 3, padding=1), block, nn.Conv2d(block_out(block), 5, 1)

    def forward(self, x):
        return self.head(self.block(torch.relu(self.stem(x))))


def block_out(block) -> int:
    return next(m for m in block.modules() if isinstance(m, nn.Conv2d)).out_channels


def convs(module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in module.modules())


def ops(proto) -> collections.Counter:
    return collections.Counter(n.op_type for n in proto.graph.node)


def fold_and_export(model, x):
    """(folded module, plan, ONNX proto) in float64; the module and the file equal the original."""
    model = randomize_bn(model, seed=7).eval().double()
    x = x.double()
    folded, plan = fold_with_plan(model, (x,))
    with torch.no_grad():
        want = model(x)
        assert rel_err(folded(x), want) <= 1e-10
    proto, plan, _ = export_folded(folded, (x,), plan=plan)
    got = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: x.numpy()})[0]
    assert rel_err(torch.from_numpy(got), want) <= 1e-10
    return folded, plan, proto


X = torch.randn(2, 3, 8, 8)
BLOCKS = {
    "repvgg": lambda: RepBlock(),
    "repvgg-grouped": lambda: RepBlock(cin=4, cout=4, groups=2),
    "depthwise": lambda: RepBlock(groups=4),
    "mobileone": lambda: RepBlock(n_kxk=3),
    "mobileone-pointwise": lambda: RepBlock(k=1, n_kxk=3, scale=False),
    "stride2-widen": lambda: RepBlock(cin=4, cout=6, stride=2),
    "dense-with-depthwise-scale": lambda: RepBlock(scale_groups=4),
    "5x5-dilated": lambda: RepBlock(k=5),
    "padding-same": lambda: RepBlock(pad="same"),
    "pointwise-padding-valid": lambda: RepBlock(k=1, n_kxk=2, scale=False, pad="valid"),
}


@pytest.mark.parametrize("name", BLOCKS)
def test_a_merged_block_leaves_exactly_one_conv(name):
    folded, plan, proto = fold_and_export(Stem(BLOCKS[name]()), X)
    assert convs(folded.block) == 1, folded.block
    assert not plan.unfolded and not plan.unmerged, (plan.unfolded, plan.unmerged)
    assert len(plan.merges) == 1
    got = ops(proto)
    assert got["Conv"] == 3, got  # stem, the merged block, head
    assert not got["Add"] and not got["Sub"] and not (ZERO_CHAIN & set(got)), got
    rules = {f.bn: f.rule for f in plan.folded}
    target = plan.merges[0].target
    assert all(f.into == [target] for f in plan.folded), plan.folded
    assert sorted(rules.values()).count("backward") == 1  # the target's own BN; every other branch merged into it
    assert set(rules.values()) <= {"backward", "merged-branch", "identity-branch"}


def test_subtracted_branches_and_plain_convs_without_bn():
    class Sub(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1, groups=2)
            self.c, self.bn = conv_bn(4, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.a(x) - self.b(x) - (self.c(x) - self.bn(x))

    folded, plan, proto = fold_and_export(Stem(Sub()), X)
    assert convs(folded.block) == 1 and ops(proto)["Conv"] == 3 and not ops(proto)["Sub"], ops(proto)


def test_zero_branch_gives_the_branch_output_shape():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1)
    x = torch.randn(2, 4, 9, 7)
    assert ZeroBranch(conv)(x).shape == conv(x).shape
    assert not ZeroBranch(conv)(x).any() and ZeroBranch()(x).shape == x.shape


@pytest.mark.parametrize("opset,dynamic", [(None, True), (13, False)])
def test_convert_removes_every_zero_chain(tmp_path, opset, dynamic):
    """With a dynamic batch, the exporter writes the zeros as Shape → … → ConstantOfShape/Expand; the
    TorchScript exporter (opset 13) as constants whose shapes only shape inference knows: gone too."""
    model = randomize_bn(Stem(RepBlock(n_kxk=2)), seed=1).eval()
    rep = bnfold.convert(model, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx", dynamic_batch=dynamic, opset=opset)
    assert rep.passed, rep.verification
    got = ops(onnx.load(tmp_path / "m.onnx"))
    assert got["Conv"] == 3 and not got["Add"] and not (ZERO_CHAIN & set(got)), got


# ----------------------------------------------------------------------------------- refusals
class Refused(nn.Module):
    """Two conv-BN branches on x whose outputs have one shape but that cannot be one conv."""

    CASES = {  # (branch a, branch b) as (kernel, stride, padding), and the input size
        "relu": ((3, 1, 1), (1, 1, 0), 8),  # a ReLU inside branch a
        "stride": ((3, 2, 1), (5, 1, 0), 8),  # 4×4 outputs from different strides
        "padding": ((3, 3, 1), (3, 3, 0), 9),  # same kernel and stride, taps one pixel apart
        "even-kernel": ((3, 2, 1), (2, 2, 0), 8),  # a 2×2 kernel has no centre in the 3×3
    }

    def __init__(self, how):
        super().__init__()
        (ka, sa, pa), (kb, sb, pb), self.size = self.CASES[how]
        self.how = how
        self.a, self.b = conv_bn(4, 4, ka, sa, pad=pa), conv_bn(4, 4, kb, sb, pad=pb)

    def forward(self, x):
        a = self.a(x)
        return (torch.relu(a) if self.how == "relu" else a) + self.b(x)


@pytest.mark.parametrize("how,why", [
    ("relu", "`relu` in a branch is not linear"),
    ("stride", "different stride: (2, 2) and (1, 1)"),
    ("padding", "does not align"),
    ("even-kernel", "cannot be centred"),
])
def test_refusals_keep_every_branch_with_the_reason(how, why):
    model = randomize_bn(Refused(how), seed=2).eval().double()
    x = torch.randn(2, 4, model.size, model.size, dtype=torch.float64)
    folded, plan = fold_with_plan(model, (x,))
    assert convs(folded) == 2 and not plan.merges and not plan.unfolded
    assert any(why in u.reason for u in plan.unmerged), plan.unmerged
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) <= 1e-10
    if how != "relu":  # the ONNX pass refuses the same sums: both convs and their Add stay
        proto, _, _ = export_folded(folded, (x,), plan=plan)
        assert ops(proto)["Conv"] == 2 and ops(proto)["Add"] == 1, ops(proto)


# ------------------------------------------------------------------------------------ fold_math
@pytest.mark.parametrize("groups,leaf_groups,k", [(1, 1, 1), (1, 4, 1), (2, 4, 3), (4, 4, 1), (1, 2, 3)])
def test_merge_branches_math(groups, leaf_groups, k):
    """Σ conv(x, W_i) = conv(x, Σ pad(regroup(W_i))) for centred paddings, in float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 7, 7, generator=g, dtype=torch.float64)
    w_t = torch.randn(8, 8 // groups, 5, 5, generator=g, dtype=torch.float64)
    w_l = torch.randn(8, 8 // leaf_groups, k, k, generator=g, dtype=torch.float64)
    b_t, b_l = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    s = torch.randn(8, generator=g, dtype=torch.float64)
    want = (nn.functional.conv2d(x, w_t, b_t, padding=2, groups=groups)
            - nn.functional.conv2d(x, w_l, b_l, padding=k // 2, groups=leaf_groups) + s.reshape(1, -1, 1, 1) * x)
    w, b = fold_math.merge_branches([(w_t, b_t, groups, 1), (w_l, b_l, leaf_groups, -1),
                                     (fold_math.identity_kernel(s, 2), None, 8, 1)], (5, 5), groups)
    assert rel_err(nn.functional.conv2d(x, w, b, padding=2, groups=groups), want) <= 1e-13


# ------------------------------------------------------------------------------------- ONNX in
def test_onnx_in_repvgg_merges_branches_identity_and_skip():
    """An ONNX file with the branches and their BN nodes (exported unfolded): BNs fold, each sum of
    convs, identity BN and skip on one input becomes one Conv."""

    class RepViTLike(nn.Module):  # conv-BN ∥ 1×1 conv ∥ skip, then a BN after the sum (timm RepVggDw)
        def __init__(self):
            super().__init__()
            self.conv, self.conv1, self.bn = conv_bn(4, 4, 3, groups=4), nn.Conv2d(4, 4, 1, groups=4), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x) + self.conv1(x) + x)

    for block in (RepBlock(n_kxk=2), RepViTLike()):
        model = randomize_bn(Stem(block), seed=4).eval().double()
        x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
        proto = export_proto(model, (x,), optimize=False)
        assert ops(proto)["BatchNormalization"] >= 2
        plan = fold_onnx_proto(proto)
        assert not plan.unfolded and plan.merges, plan
        got = ops(proto)
        assert got["Conv"] == 3 and not got["Add"] and not got["BatchNormalization"], got
        y = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: x.numpy()})[0]
        with torch.no_grad():
            assert rel_err(torch.from_numpy(y), model(x)) <= 1e-10


def test_onnx_zero_add_that_broadcasts_stays():
    """Add(y, zeros) is only removed when the zeros do not widen y."""
    import onnx.parser

    m = onnx.parser.parse_model('''<ir_version: 8, opset_import: ["" : 17]>
agraph (float[2,1,3] x) => (float[2,4,3] y, float[2,1,3] z) {
  h = Relu (x)
  s = Constant <value = int64[3] {2, 4, 3}> ()
  zeros = ConstantOfShape (s)
  y = Add (h, zeros)
  zz = Constant <value = float[1] {0}> ()
  z = Sub (h, zz)
}''')
    plan = fold_onnx_proto(m)
    assert plan.graph_edits == 1
    assert [n.op_type for n in m.graph.node] == ["Relu", "Constant", "ConstantOfShape", "Add"]
    assert [o.name for o in m.graph.output] == ["y", "z"]
    x = np.random.default_rng(0).standard_normal((2, 1, 3)).astype(np.float32)
    y, z = ReferenceEvaluator(m).run(None, {"x": x})
    assert y.shape == (2, 4, 3) and np.array_equal(z, np.maximum(x, 0))


def _text_model(sig: str, body: list[str], consts: dict):
    import onnx.parser
    from onnx import numpy_helper

    m = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 17]>\n' + sig + " {\n  " + "\n  ".join(body) + "\n}\n")
    for name, arr in consts.items():
        m.graph.initializer.append(numpy_helper.from_array(np.asarray(arr), name))
    return m


def _fold_same(m, feeds):
    before = ReferenceEvaluator(m).run(None, feeds)
    plan = fold_onnx_proto(m)
    onnx.checker.check_model(m)
    for a, b in zip(ReferenceEvaluator(m).run(None, feeds), before):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
    return plan, [n.op_type for n in m.graph.node]


RNG = np.random.default_rng(3)


def test_onnx_layer_scale_and_skip_become_one_conv():
    """FastViT's RepMixer: x + γ·(mixer(x) − norm(x)), γ per channel: one depthwise Conv."""
    body = ["m = Conv <group = 4, pads = [1, 1, 1, 1]> (x, wm, bm)", "n = BatchNormalization (x, g, b, mu, var)",
            "d = Sub (m, n)", "s = Mul (d, gamma)", "y = Add (x, s)"]
    consts = {"wm": RNG.standard_normal((4, 1, 3, 3)), "bm": RNG.standard_normal(4), "g": RNG.standard_normal(4) + 1,
              "b": RNG.standard_normal(4), "mu": RNG.standard_normal(4), "var": RNG.random(4) + 0.5,
              "gamma": RNG.standard_normal((4, 1, 1))}
    m = _text_model("agraph (double[2,4,5,5] x) => (double[2,4,5,5] y)", body, consts)
    plan, ops_left = _fold_same(m, {"x": RNG.standard_normal((2, 4, 5, 5))})
    assert ops_left == ["Conv"], ops_left
    assert [(f.rule, f.into) for f in plan.folded] == [("identity-branch", ["m"])] and not plan.unfolded


def test_onnx_two_heads_on_one_input_become_one_gemm():
    """RepViT's distillation head: (Gemm₁(x) + Gemm₂(x)) / 2 is one Gemm."""
    body = ["a = Gemm <transB = 1, alpha = 0.5> (x, b1, c1)", "b = Gemm <beta = 2.0> (x, b2, c2)", "s = Add (a, b)", "y = Div (s, two)"]
    consts = {"b1": RNG.standard_normal((3, 6)), "c1": RNG.standard_normal(3), "b2": RNG.standard_normal((6, 3)),
              "c2": RNG.standard_normal((1, 3)), "two": np.array(2.0)}
    m = _text_model("agraph (double[2,6] x) => (double[2,3] y)", body, consts)
    _, ops_left = _fold_same(m, {"x": RNG.standard_normal((2, 6))})
    assert ops_left == ["Gemm"], ops_left


def test_onnx_constant_that_is_not_per_channel_stays():
    """A Mul by a per-pixel constant, an Add that widens the output: not folded into the Conv."""
    body = ["c = Conv (x, w)", "s = Mul (c, pix)", "y = Add (s, wide)"]
    consts = {"w": RNG.standard_normal((4, 4, 1, 1)), "pix": RNG.standard_normal((1, 1, 5, 5)), "wide": RNG.standard_normal((3, 1, 1, 1))}
    m = _text_model("agraph (double[1,4,5,5] x) => (double[3,4,5,5] y)", body, consts)
    _, ops_left = _fold_same(m, {"x": RNG.standard_normal((1, 4, 5, 5))})
    assert ops_left == ["Conv", "Mul", "Add"], ops_left


# --------------------------------------------------------------------------------------- timm
timm = pytest.importorskip("timm")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0"])
def test_timm_convert_gives_one_conv_per_block_like_timm(name, tmp_path):
    """After bnfold.convert, the file has as many Convs as timm's reparameterised export, no Add,
    no zero chain; the folded module equals timm's reparameterize_model in float64."""
    import copy

    from timm.utils import reparameterize_model

    model = randomize_bn(timm.create_model(name, pretrained=False), seed=2).eval()
    x = torch.randn(1, 3, 64, 64)
    rep = bnfold.convert(model, x, tmp_path / "m.onnx")
    assert rep.passed and not rep.unfolded, rep.unfolded
    got = ops(onnx.load(tmp_path / "m.onnx"))
    timm_ops = ops(export_proto(reparameterize_model(copy.deepcopy(model)), (x,)))
    assert got["Conv"] == timm_ops["Conv"] and not got["Add"] and not (ZERO_CHAIN & set(got)), (got, timm_ops)
    assert sum(got.values()) <= sum(timm_ops.values())
    m64, x64 = model.double(), x.double()
    folded, _ = fold_with_plan(m64, (x64,))
    with torch.no_grad():
        assert rel_err(folded(x64), reparameterize_model(copy.deepcopy(m64))(x64)) <= 1e-10
