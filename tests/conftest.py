"""Shared helpers: randomised BN statistics, model hashing, the sample's paths."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "digits"
SAMPLE_SPEC = f"{SAMPLE / 'model.py'}:build"

# Under pytest-xdist (README's test command: -n auto) the cores are shared by the workers.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running stats, γ and β for every BN (default stats make folding a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            rm = getattr(m, "running_mean", None)
            if isinstance(rm, torch.Tensor) and isinstance(getattr(m, "running_var", None), torch.Tensor):
                rm.copy_((torch.randn(rm.shape, generator=g) * 0.5).to(rm.dtype))
                m.running_var.copy_((torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.25).to(rm.dtype))
            w, b = getattr(m, "weight", None), getattr(m, "bias", None)
            if isinstance(m, nn.modules.batchnorm._BatchNorm) or type(m).__name__ == "FrozenBatchNorm2d":
                if isinstance(w, torch.Tensor):
                    w.copy_((torch.randn(w.shape, generator=g) * 0.5 + 1).to(w.dtype))
                if isinstance(b, torch.Tensor):
                    b.copy_((torch.randn(b.shape, generator=g) * 0.5).to(b.dtype))
    return model


def state_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if v.dtype != torch.bool else v.numpy().tobytes())
    h.update(str([(n, type(m).__name__, m.training) for n, m in model.named_modules()]).encode())
    return h.hexdigest()


def file_hash(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state: inputs drawn with torch.randn are the same
    whatever ran before, so a tolerance is tested on one input, not on whichever a test order gives."""
    torch.manual_seed(0)
    yield


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error of a against reference b, in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.fixture
def sample_model():
    from bnfold.edges.load import load_model

    return load_model(SAMPLE_SPEC, SAMPLE / "weights.pt")
