"""Cases the peers' own BatchNorm-fusion tests fold (onnxoptimizer, onnxruntime, OnnxSlim, PyTorch's
fusion utilities), built as tiny models: bnfold folds them too, exactly, or refuses with the reason;
and the folded PyTorch module behaves like the original (flags, hooks, torch.backends)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import bnfold


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


def test_convert_under_frozen_backend_flags(tmp_path):
    """PyTorch's test harness calls torch.backends.disable_global_flags(): convert sets cuDNN's
    TF32 flag through its context manager, and leaves every flag as it was."""
    model = randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.deterministic)
    torch.backends.disable_global_flags()
    try:
        rep = bnfold.convert(model, (torch.randn(1, 3, 8, 8),), tmp_path / "m.onnx", providers="cpu")
    finally:
        torch.backends.__allow_nonbracketed_mutation_flag = True  # what disable_global_flags switched off
    assert rep.passed
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.deterministic) == before
