"""The fold engine's registries and rules, each on a small model built for it: BN kinds (timm's
BatchNormAct family, user-registered), producers (Conv2dSame, weight standardisation, CondConv),
shape reads, concat, reshape, pool-head, parallel branches — and every refusal with its reason.
All in float64 against the original (≤1e-10 relative), BN statistics/γ/β randomised."""

from __future__ import annotations

import inspect

import copy

import pytest
import torch
from torch import nn

import bnfold
from bnfold.torch_pass import bn_kinds
from bnfold.torch_pass.fold import ZeroBranch, fold_with_plan
from conftest import randomize_bn, rel_err, state_hash

timm_layers = pytest.importorskip("timm.layers")


def check(model: nn.Module, x: torch.Tensor, expected: dict[str, tuple], left: set[str] = frozenset()):
    """Fold in float64; expected {bn: (into…, rule)}; ``left`` BNs must stay. Returns (folded, plan)."""
    model = randomize_bn(model, seed=3).eval().double()
    x = x.double()
    before = state_hash(model)
    folded, plan = fold_with_plan(model, (x,))
    assert state_hash(model) == before, "fold changed the user's model"
    got = {f.bn: (*f.into, f.rule) for f in plan.folded}
    assert got == expected, (got, plan.unfolded)
    assert {u.bn for u in plan.unfolded} == set(left), plan.unfolded
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) <= 1e-10
    return folded, plan


def reason(model, x, bn) -> str:
    plan = bnfold.inspect(randomize_bn(model).eval(), (x,))
    assert not any(f.bn == bn for f in plan.folded), plan
    return next(u.reason for u in plan.unfolded if u.bn == bn)


class Seq(nn.Sequential):
    pass


X = torch.randn(2, 4, 9, 9)


# ------------------------------------------------------------------------------------ BN kinds
def test_timm_batchnorm_act_folds_backward_and_keeps_drop_then_act():
    bnact = timm_layers.BatchNormAct2d(6, act_layer=nn.SiLU, drop_layer=nn.Dropout)
    folded, _ = check(Seq(nn.Conv2d(4, 6, 3, padding=1), bnact), X, {"1": ("0", "backward")})
    rem = folded[1]
    assert isinstance(rem, bn_kinds.DropAct) and isinstance(rem.drop, nn.Dropout) and isinstance(rem.act, nn.SiLU)


def test_timm_batchnorm_act_with_activation_does_not_fold_forward():
    model = Seq(nn.ReLU(), timm_layers.BatchNormAct2d(4, act_layer=nn.ReLU), nn.Conv2d(4, 5, 1))
    assert "BatchNormAct2d applies ReLU after normalising" in reason(model, X, "1")


def test_timm_batchnorm_act_without_activation_folds_forward():
    model = Seq(nn.ReLU(), timm_layers.BatchNormAct2d(4, apply_act=False), nn.Conv2d(4, 5, 1))
    check(model, X, {"1": ("2", "forward")})


def test_timm_frozen_and_sync_batchnorm_act():
    frozen = timm_layers.FrozenBatchNormAct2d(6, act_layer=nn.GELU)
    check(Seq(nn.Conv2d(4, 6, 1), frozen), X, {"1": ("0", "backward")})
    sync = timm_layers.convert_sync_batchnorm(Seq(nn.Conv2d(4, 6, 1), timm_layers.BatchNormAct2d(6, act_layer=nn.Tanh)))
    assert type(sync[1]).__name__ == "SyncBatchNormAct"
    folded, _ = check(sync, X, {"1": ("0", "backward")})
    assert isinstance(folded[1].act, nn.Tanh)


def test_unknown_subclass_of_a_registered_kind_is_refused():
    class MyBNAct(timm_layers.BatchNormAct2d):
        def forward(self, x):
            return super().forward(x) * 2

    r = reason(Seq(nn.Conv2d(4, 6, 1), MyBNAct(6)), X, "1")
    assert "MyBNAct overrides forward()" in r and "register_batchnorm" in r


def test_register_batchnorm_with_remainder():
    class ScaledBN(nn.BatchNorm2d):  # BN, then a fixed ×3
        def forward(self, x):
            return super().forward(x) * 3

    class Times3(nn.Module):
        def forward(self, x):
            return x * 3

    model = Seq(nn.Conv2d(4, 6, 1), ScaledBN(6))
    assert "overrides forward()" in reason(model, X, "1")
    bnfold.register_batchnorm(ScaledBN, remainder=lambda bn: Times3())
    try:
        folded, _ = check(model, X, {"1": ("0", "backward")})
        assert isinstance(folded[1], Times3)
    finally:
        bn_kinds._BN.pop(ScaledBN)
    with pytest.raises(TypeError):
        bnfold.register_batchnorm("not a class")


# ----------------------------------------------------------------------------------- producers
def test_conv2d_same_backward_exact_forward_refused():
    check(Seq(timm_layers.Conv2dSame(4, 6, 3, stride=2), nn.BatchNorm2d(6)), X, {"1": ("0", "backward")})
    r = reason(Seq(nn.ReLU(), nn.BatchNorm2d(4), timm_layers.Conv2dSame(4, 6, 3, stride=2)), X, "1")
    assert "pads its input inside forward() (TF 'same')" in r


@pytest.mark.parametrize("cls", ["StdConv2d", "ScaledStdConv2d", "StdConv2dSame", "ScaledStdConv2dSame"])
def test_weight_standardised_conv_refused(cls):
    conv = getattr(timm_layers, cls)(4, 6, 3)
    assert "weight standardisation" in reason(Seq(conv, nn.BatchNorm2d(6)), X, "1")


def test_condconv_refused():
    class CC(nn.Module):
        def __init__(self):
            super().__init__()
            self.route = nn.Linear(4, 3)
            self.conv = timm_layers.CondConv2d(4, 6, 3, padding=1, num_experts=3)
            self.bn = nn.BatchNorm2d(6)

        def forward(self, x):
            r = torch.sigmoid(self.route(x.mean((2, 3))))
            return self.bn(self.conv(x, r))

    assert "routing weights (CondConv)" in reason(CC(), X, "bn")


# --------------------------------------------------------------------------------- shape reads
def test_shape_reads_are_not_consumers():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6)
            self.pre, self.proj = nn.BatchNorm2d(6), nn.Conv2d(6, 5, 1)

        def forward(self, x):
            y = self.conv(x)
            b, c, h, w = y.shape  # metadata read of the producer's output
            y = self.pre(torch.relu(self.bn(y)))
            n = y.size(0) + y.dim()  # and of the BN's output
            return self.proj(y).reshape(n - 4, -1)

    check(M(), X, {"bn": ("conv", "backward"), "pre": ("proj", "forward")})


# ---------------------------------------------------------------------------------------- concat
class Cat(nn.Module):
    def __init__(self, used_elsewhere=False, dim=1):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 3, 3, padding=1), nn.Conv2d(4, 5, 1, groups=1)
        self.bn = nn.BatchNorm2d(8 if dim == 1 else 3)
        self.used_elsewhere, self.dim = used_elsewhere, dim

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        if self.dim != 1:
            return self.bn(torch.cat([a, b[:, :3]], self.dim))
        y = self.bn(torch.cat([a, b], 1))
        return y + a.sum() if self.used_elsewhere else y


def test_concat_folds_slice_by_slice():
    check(Cat(), X, {"bn": ("a", "b", "concat")})


def test_mixed_conv_folds_per_slice():
    model = Seq(timm_layers.MixedConv2d(4, 8, [3, 5], padding=""), nn.BatchNorm2d(8))
    check(model, torch.randn(2, 4, 9, 9), {"1": ("0.0", "0.1", "concat")})


def test_concat_refusals():
    assert "output has 2 consumers" in reason(Cat(used_elsewhere=True), X, "bn")
    assert "joins dim 2" in reason(Cat(dim=2), X, "bn")


# --------------------------------------------------------------------------------------- reshape
class LinearNorm(nn.Module):  # timm LeViT's block
    def __init__(self, keep=True):
        super().__init__()
        self.linear, self.bn, self.keep = nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5), keep

    def forward(self, x):
        x = self.linear(x)
        if self.keep:
            return self.bn(x.flatten(0, 1)).reshape_as(x)
        return self.bn(x.transpose(1, 2).reshape(-1, 5))


def test_reshape_linear_bn1d():
    check(LinearNorm(), torch.randn(2, 7, 6), {"bn": ("linear", "reshape")})


def test_reshape_that_moves_the_feature_axis_is_refused():
    r = reason(LinearNorm(keep=False), torch.randn(2, 5, 6), "bn")
    assert "its input comes from `reshape`" in r


# ------------------------------------------------------------------------------------- pool-head
class Head(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1) if how != "avgpad" else nn.AvgPool2d(3, padding=1)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(4 * {"flatten": 81, "avgpad": 9}.get(how, 1), 3)

    def forward(self, x):
        y = self.bn(x)
        if self.how == "pool":
            y = torch.flatten(self.pool(y), 1)
        elif self.how == "mean":
            y = y.mean((2, 3))
        elif self.how == "flatten":
            y = y.flatten(1)
        elif self.how == "avgpad":
            y = self.pool(y).flatten(1)
        return self.fc(self.drop(y))


@pytest.mark.parametrize("how", ["pool", "mean", "flatten"])
def test_pool_head_forward(how):
    check(Head(how), X, {"bn": ("fc", "pool-head")})


@pytest.mark.parametrize("in_place", [True, False])
def test_backward_folds_in_blocks_give_the_same_bits(monkeypatch, in_place):
    """Backward-only folds of a weight past FOLD_CACHE_BYTES scale its rows block by block in one
    reused float64 buffer (issue 26): bit for bit the float32 weights and biases of the one-pass fold."""
    from bnfold.torch_pass import fold as folding

    torch.manual_seed(1)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                       nn.Conv2d(16, 12, 3), nn.BatchNorm2d(12))).eval()
    x = torch.randn(2, 3, 9, 9)
    whole, _ = fold_with_plan(model, (x,))
    used = []
    monkeypatch.setattr(folding, "FOLD_CACHE_BYTES", 8 * 100)  # blocks of a few rows
    monkeypatch.setattr(folding, "FOLD_BLOCK_BYTES", 8 * 100 if in_place else 1 << 40)
    orig = folding._scale_blocks
    monkeypatch.setattr(folding, "_scale_blocks", lambda *a: used.append(a[3]) or orig(*a))
    blocked, _ = fold_with_plan(model, (x,))
    assert used and all(r < 12 for r in used)  # really in blocks, on both convs
    for k, v in whole.state_dict().items():
        assert torch.equal(blocked.state_dict()[k], v), k


class DataDependent(Head):  # fake tensors cannot propagate nonzero: shapes come from a real forward
    def forward(self, x):
        y = super().forward(x)
        return y + torch.nonzero(y > 1e9).shape[0]


@pytest.mark.parametrize("model", [Head("flatten"), DataDependent("flatten"), LinearNorm()], ids=["flatten", "nonzero", "linear-bn1d"])
def test_fake_shape_propagation_gives_the_same_plan(monkeypatch, model):
    """Large models get their shapes from fake tensors (issue 26): the plan and the folded values are
    those of the real forward's shapes, and a model fake tensors cannot run falls back to it."""
    from bnfold.torch_pass import graph

    x = torch.randn(2, 7, 6) if isinstance(model, LinearNorm) else X
    expected = {"bn": ("linear", "reshape")} if isinstance(model, LinearNorm) else {"bn": ("fc", "pool-head")}
    real_folded, real_plan = check(copy.deepcopy(model), x, expected)
    monkeypatch.setattr(graph, "FAKE_SHAPES_BYTES", 0)
    fakes = []
    orig = graph.ShapeProp.__init__

    def spy(self, gm, fake_mode=None):
        fakes.append(fake_mode is not None)
        orig(self, gm, fake_mode)

    monkeypatch.setattr(graph.ShapeProp, "__init__", spy)
    folded, plan = check(copy.deepcopy(model), x, expected)
    assert fakes[0] and fakes[1:] == ([False] if isinstance(model, DataDependent) else [])
    assert plan.to_dict() == real_plan.to_dict()
    for k, v in real_folded.state_dict().items():
        assert torch.equal(folded.state_dict()[k], v), k


def test_pool_head_refuses_padded_average():
    assert "pads or uses ceil_mode" in reason(Head("avgpad"), X, "bn")


def test_bn_dropout_linear_is_forward():  # timm LeViT NormLinear
    check(Seq(nn.BatchNorm1d(6), nn.Dropout(0.1), nn.Linear(6, 3)), torch.randn(4, 6), {"0": ("2", "forward")})


# ------------------------------------------------------------------------------- identity branch
class Rep(nn.Module):
    """RepVGG/MobileOne block: identity BN + k×k conv-BN + 1×1 conv-BN on the same x."""

    def __init__(self, c=4, groups=1, stride=1, pad=1, sub=False):
        super().__init__()
        self.identity = nn.BatchNorm2d(c)
        self.kxk = nn.Sequential(nn.Conv2d(c, c, 3, stride, pad, groups=groups, bias=False), nn.BatchNorm2d(c))
        self.k1 = nn.Sequential(nn.Conv2d(c, c, 1, stride, groups=groups, bias=False), nn.BatchNorm2d(c))
        self.sub = sub

    def forward(self, x):
        y = self.kxk(x) + self.k1(x)
        y = y - self.identity(x) if self.sub else y + self.identity(x)
        return torch.relu(y)


@pytest.mark.parametrize("groups,sub", [(1, False), (2, False), (4, True)])
def test_identity_branch_into_centre_tap(groups, sub):
    """The identity BN joins the k×k conv's centre tap; the 1×1 branch merges into the same conv."""
    folded, _ = check(Rep(groups=groups, sub=sub), X, {
        "identity": ("kxk.0", "identity-branch"), "kxk.1": ("kxk.0", "backward"), "k1.1": ("kxk.0", "merged-branch")})
    assert isinstance(folded.identity, ZeroBranch) and isinstance(folded.k1[0], ZeroBranch)


class Residual(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.bn = nn.BatchNorm2d(4)
        self.conv = timm_layers.Conv2dSame(4, 4, 3) if how == "same" else nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        if self.how == "plain":  # pre-activation residual: no conv branch
            return x + self.bn(x)
        if self.how == "relu":  # the conv branch is not linear
            return torch.relu(self.conv(x)) + self.bn(x)
        c = self.conv(x)
        y = c + self.bn(x)
        return y * c.mean() if self.how == "shared" else y


@pytest.mark.parametrize("how,why", [
    ("plain", "no conv branch on the same input"),
    ("relu", "no conv branch on the same input"),
    ("shared", "output is used outside the sum"),
    ("same", "is not a plain Conv"),
])
def test_identity_branch_refusals(how, why):
    assert why in reason(Residual(how), X, "bn")


def test_identity_branch_matches_timm_reparameterize():
    """A RepVGG block folded from the graph equals timm's own reparameterisation."""
    from timm.models.byobnet import RepVggBlock
    from timm.utils import reparameterize_model

    blk = randomize_bn(RepVggBlock(4, 4), seed=5).eval().double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    folded, plan = fold_with_plan(blk, (x,))
    assert not plan.unfolded
    timm_rep = reparameterize_model(copy.deepcopy(blk))
    with torch.no_grad():
        assert rel_err(folded(x), timm_rep(x)) <= 1e-12


def test_concat_of_one_producer_twice_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn = nn.Conv2d(4, 3, 1), nn.BatchNorm2d(6)

        def forward(self, x):
            a = self.a(x)
            return self.bn(torch.cat([a, a], 1))

    assert "repeats an input" in reason(Twice(), X, "bn")


def test_torch_export_fallback_runs_the_same_rules():
    class Untraceable(nn.Module):  # Python control flow on a traced value: fx fails, torch.export works
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 3, 3, padding=1), nn.Conv2d(4, 5, 1)
            self.bn = timm_layers.BatchNormAct2d(8, act_layer=nn.ReLU)
            self.head_bn, self.fc = nn.BatchNorm2d(8), nn.Linear(8, 3)

        def forward(self, x):
            if x.dim() != 4:
                return x
            y = self.bn(torch.cat([self.a(x), self.b(x)], 1))
            return self.fc(self.head_bn(y).mean((2, 3)))

    _, plan = check(Untraceable(), X, {"bn": ("a", "b", "concat"), "head_bn": ("fc", "pool-head")})
    assert plan.tracer == "torch.export"


# ------------------------------------------------------------------ large weights: blocks of rows
class Big(nn.Module):
    """Backward, forward (grouped) and identity-branch edits on the same convs, plus a Linear."""

    def __init__(self, c=8, groups=2):
        super().__init__()
        self.rep = Rep(c=c, groups=groups)
        self.pre = nn.BatchNorm2d(c)
        self.conv = nn.Conv2d(c, c, 1, groups=groups)  # forward fold of `pre`, backward fold of `post`
        self.post = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 6)
        self.bn1d = nn.BatchNorm1d(6)

    def forward(self, x):
        y = self.post(self.conv(self.pre(self.rep(x))))
        return self.bn1d(self.fc(y.mean((2, 3))))


@pytest.mark.parametrize("in_place", [True, False])
def test_large_weights_fold_in_blocks_with_the_same_values(monkeypatch, in_place):
    """Weights whose float64 copy exceeds FOLD_CACHE_BYTES are folded a block of whole groups of rows
    at a time, into a new tensor, or past FOLD_BLOCK_BYTES into the module's own tensor: same values
    as one pass (float64, to rounding)."""
    from bnfold.torch_pass import fold as folding

    torch.manual_seed(0)
    model = randomize_bn(Big()).eval().double()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    whole, plan_a = fold_with_plan(model, (x,))
    calls = []
    orig = folding._fold_rows
    sig = inspect.signature(orig)

    def spy(*a, **k):  # the rows of each call, by name: a positional slice read the wrong arguments once
        bound = sig.bind(*a, **k).arguments
        calls.append((bound["r0"], bound["r1"]))
        return orig(*a, **k)

    monkeypatch.setattr(folding, "FOLD_CACHE_BYTES", 8 * 9)  # any weight with more than 9 elements, in blocks
    monkeypatch.setattr(folding, "FOLD_BLOCK_BYTES", 8 * 9 if in_place else 1 << 40)
    monkeypatch.setattr(folding, "_fold_rows", spy)
    work = copy.deepcopy(model)
    before = {n: p for n, p in work.named_parameters()}
    blocked, plan_b = fold_with_plan(work, (x,), inplace=True)
    same = [n for n, p in blocked.named_parameters() if n in before and p is before[n]]
    assert bool(same) == in_place  # in place: the module's own tensors; else new ones
    assert [(f.bn, f.rule) for f in plan_a.folded] == [(f.bn, f.rule) for f in plan_b.folded]
    assert {f.rule for f in plan_a.folded} >= {"backward", "forward", "identity-branch"}
    assert calls and all(0 <= r0 < r1 for r0, r1 in calls)
    assert any(r1 - r0 < 8 for r0, r1 in calls)  # really in blocks
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(blocked.state_dict()[k], v, rtol=1e-14, atol=1e-14, msg=k)
    with torch.no_grad():
        assert rel_err(blocked(x), model(x)) <= 1e-12
