"""Factories for the benchmarks: torchvision models with random weights and randomised BN statistics
(like trained ones, so folding is not a no-op), and a synthetic conv net with > 2 GB of weights."""

from __future__ import annotations

import torch
from torch import nn


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.randn(c, generator=g) * 0.1 + 1)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
    return model.eval()


def _torchvision(name: str):
    def build() -> nn.Module:
        import torchvision

        torch.manual_seed(0)
        return _randomize(getattr(torchvision.models, name)())

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"torchvision's {name}, random weights, randomised BN statistics"
    return build


# the `--config` benchmark's ten models (benchmarks/run.py: bench_config), and the ResNets of the scaling rows
TEN = ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf",
       "shufflenet_v2_x1_0", "mnasnet1_0", "densenet121")
for _name in TEN + ("resnet101", "resnet152"):
    globals()[_name] = _torchvision(_name)


def weight_bytes(name: str) -> tuple[int, int]:
    """(parameter count, bytes of parameters and buffers) of factory ``name``, built on the meta
    device: no memory is allocated, so the 2.4 GB net costs nothing to measure."""
    import torchvision

    with torch.device("meta"):
        model = BigNet() if name == "bignet" else getattr(torchvision.models, name)()
    params = sum(p.numel() for p in model.parameters())
    nbytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return params, nbytes


class BigNet(nn.Module):
    """Four 3×3 convolutions of 4096 channels: 604 M parameters, 2.4 GB in float32."""

    def __init__(self, width: int = 4096, depth: int = 4):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 1)]
        for _ in range(depth):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def bignet() -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        model = BigNet()
        for m in model.modules():  # small weights keep activations finite through 4 wide layers
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0, (2.0 / (m.in_channels * 9)) ** 0.5)
    return _randomize(model)
