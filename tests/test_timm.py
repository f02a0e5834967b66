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


# every timm family with reparameterize()/fuse() support: (model, input size, BN left in the file
# (timm's own reparameterised export leaves them too, or they are no branch: see the reasons))
REPARAM = [
    ("repvgg_a0", 64, 0), ("mobileone_s0", 64, 0), ("repghostnet_050", 64, 0), ("fastvit_t8", 64, 0),
    ("repvit_m1", 64, 0), ("ghostnetv3_050", 64, 0), ("lcnetv2_small", 64, 0), ("efficientvim_m1", 224, 0),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,size,left", REPARAM, ids=[m[0] for m in REPARAM])
def test_reparameterisation_matches_timm_reparameterize_model(name, size, left):
    """Folding from the graph gives timm's own reparameterised network: equal in float64, and the
    exported file has as many Convs as timm's reparameterised export and no more nodes."""
    from timm.utils import reparameterize_model

    from bnfold.onnx_pass.export import export_folded, export_proto

    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(name, pretrained=False), seed=2).eval()
    x = torch.randn(1, 3, size, size)
    m64, x64 = copy.deepcopy(model).double(), x.double()
    folded, plan = fold_with_plan(m64, (x64,))
    torch.set_default_dtype(torch.float64)  # timm's fuse() builds new layers in the default dtype
    try:
        ref = reparameterize_model(copy.deepcopy(m64))
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        assert rel_err(folded(x64), ref(x64)) <= 1e-10, name
    del m64, folded, ref
    folded32, plan32 = fold_with_plan(model, (x,))
    proto, plan_file, _ = export_folded(folded32, (x,), plan=plan32)
    timm_proto = export_proto(reparameterize_model(copy.deepcopy(model)), (x,))

    def count(p, op=None):
        return sum(op is None or n.op_type == op for n in p.graph.node)

    assert count(proto, "Conv") == count(timm_proto, "Conv"), name
    assert count(proto) <= count(timm_proto), (name, count(proto), count(timm_proto))
    assert len(plan_file.unfolded) == left and not plan_file.unmerged, (plan_file.unfolded, plan_file.unmerged)


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
