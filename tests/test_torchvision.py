"""Real architectures: torchvision's classification models with BatchNorm, random weights and
randomised statistics, through fold → export → verify. Every BN that follows a single-consumer
Conv/Linear must be folded (checked against the model's own fx graph, independently of bnfold)."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

import bnfold
from conftest import randomize_bn

tv = pytest.importorskip("torchvision")

# the smallest member of every torchvision classification family that has BatchNorm
MODELS = [
    ("resnet18", 64), ("resnet50", 64), ("resnext50_32x4d", 64), ("wide_resnet50_2", 64),
    ("mobilenet_v2", 64), ("mobilenet_v3_small", 64), ("mobilenet_v3_large", 64),
    ("efficientnet_b0", 64), ("efficientnet_v2_s", 64), ("densenet121", 64),
    ("regnet_x_400mf", 64), ("regnet_y_400mf", 64), ("shufflenet_v2_x0_5", 64), ("mnasnet0_5", 64),
    ("googlenet", 64), ("inception_v3", 80), ("vgg11_bn", 32),
]


def _expected_backward(model: nn.Module) -> set[str]:
    """BN calls whose input is a Conv/Linear module call with exactly one user (independent of bnfold)."""
    gm = torch.fx.symbolic_trace(model)
    mods = dict(model.named_modules())
    out = set()
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(mods[node.target], nn.modules.batchnorm._BatchNorm):
            src = node.args[0]
            if (getattr(src, "op", None) == "call_module" and isinstance(mods[src.target], (nn.Conv2d, nn.Linear))
                    and len(src.users) == 1):
                out.add(node.target)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name,size", MODELS, ids=[m for m, _ in MODELS])
def test_torchvision_model(name, size, tmp_path):
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    model = randomize_bn(tv.models.get_model(name, weights=None, **kwargs)).eval()
    x = torch.randn(1, 3, size, size)
    rep = bnfold.convert(model, (x,), tmp_path / f"{name}.onnx", providers="cpu")
    assert rep.passed, [(r["graph_optimization"], o["max_abs_error"], o["problem"])
                        for r in rep.verification["runs"] for o in r["outputs"] if not o["passed"]]
    folded = {f["bn"] for f in rep.folded}
    assert _expected_backward(model) <= folded, _expected_backward(model) - folded
    for u in rep.unfolded:
        assert u["reason"]
    assert rep.export["batchnorm_nodes"] == len(rep.unfolded)
    # the plan is the truth: the BN nodes in the written file are exactly the ones it says were left
    from bnfold.onnx_pass.io import bn_count

    assert bn_count(onnx.load(str(tmp_path / f"{name}.onnx"))) == len(rep.unfolded) == rep.fold["batchnorm_layers"] - len(rep.folded)
    assert all(f.get("pass", "pytorch") in ("pytorch", "onnx") for f in rep.folded)
