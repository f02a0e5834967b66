"""Real architectures from timm (random weights, randomised BN statistics, float64): a sampled sweep
over the families each fold rule exists for, next to tests/test_torchvision.py. The full sweep is
benchmarks/timm_sweep.py."""

from __future__ import annotations

import copy

import pytest
import torch

from bnfold.torch_pass.fold import fold_with_plan
from conftest import randomize_bn, rel_err

timm = pytest.importorskip("timm")

# (model, input size, BN left, a phrase every left BN's reason contains, rules that must appear)
MODELS = [
    ("tf_efficientnet_b0", 32, 0, None, {"backward"}),  # BatchNormAct2d, Conv2dSame producers
    ("mixnet_s", 32, 0, None, {"concat"}),  # MixedConv2d
    ("levit_128s", 224, 0, None, {"reshape", "forward"}),  # LinearNorm, NormLinear head
    ("visformer_tiny", 224, 0, None, {"pool-head", "forward"}),  # shape reads, BN → pool → head
    ("coatnet_nano_rw_224", 224, 0, None, {"forward"}),  # pre-norm BN beside .shape reads
    ("repvgg_a0", 32, 0, None, {"identity-branch"}),
    ("mobileone_s0", 32, 0, None, {"identity-branch"}),
    ("fastvit_t8", 32, 0, None, {"identity-branch"}),  # RepMixer: mixer(x) − norm(x)
    ("repghostnet_050", 32, 0, None, {"identity-branch"}),
    ("efficientnet_cc_b0_4e", 32, 23, "(CondConv)", {"backward"}),
    ("dpn48b", 32, 21, "its input comes from", {"backward"}),  # pre-activation BN after a shared concat
]


@pytest.mark.slow
@pytest.mark.parametrize("name,size,left,why,rules", MODELS, ids=[m[0] for m in MODELS])
def test_timm_model_folds_exactly(name, size, left, why, rules):
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(name, pretrained=False)).eval().double()
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    folded, plan = fold_with_plan(model, (x,))
    assert plan.tracer == "fx"
    assert len(plan.unfolded) == left, [u.reason for u in plan.unfolded][:5]
    assert all(why in u.reason for u in plan.unfolded), [u.reason for u in plan.unfolded if why not in u.reason][:3]
    assert rules <= {f.rule for f in plan.folded}
    assert plan.bn_count == sum(1 for m in model.modules() if "BatchNorm" in type(m).__name__)
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) <= 1e-10


@pytest.mark.slow
def test_identity_branches_match_timm_reparameterize_model():
    """Folding RepVGG from the graph gives timm's own reparameterised network."""
    from timm.utils import reparameterize_model

    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    for name in ("repvgg_a0",):
        model = randomize_bn(timm.create_model(name, pretrained=False), seed=2).eval().double()
        folded, plan = fold_with_plan(model, (x,))
        assert not plan.unfolded
        ref = reparameterize_model(copy.deepcopy(model))
        with torch.no_grad():
            assert rel_err(folded(x), ref(x)) <= 1e-12, name


@pytest.mark.slow
def test_convmixer_bn_after_relu_feeding_a_skip_stays():
    from timm.models.convmixer import ConvMixer

    model = randomize_bn(ConvMixer(dim=16, depth=2, kernel_size=3, patch_size=4, num_classes=5)).eval().double()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    folded, plan = fold_with_plan(model, (x,))
    assert {f.rule for f in plan.folded} == {"pool-head"}  # only the last BN (→ pool → head)
    for u in plan.unfolded:  # BN after ReLU: to a skip sum, or to a padded depthwise conv and the skip
        assert "(GELU), not from a Conv/Linear" in u.reason, u.reason
        assert "consumers" in u.reason or "goes to `add`" in u.reason, u.reason
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) <= 1e-10
