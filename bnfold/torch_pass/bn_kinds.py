"""Registries: which modules are BatchNorm (and what replaces them once folded), and which modules
are Conv/Linear producers bnfold may fold into (exactly, or refused with a reason).

Both registries are data keyed by class. A class counts when it is registered or when it inherits
``forward`` unchanged from a registered class; a subclass that overrides ``forward`` is unknown and
refused with that reason. Library classes (torchvision, timm) are registered lazily and only when
their module is already imported: a model that holds one has imported it, so bnfold never imports
timm or torchvision itself.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


# ------------------------------------------------------------------------------------ BN kinds
class DropAct(nn.Module):
    """What remains of timm's ``BatchNormAct2d`` once folded: ``act(drop(x))``, same submodule names
    (``drop``, ``act``) so their state_dict keys, if any, do not move."""

    def __init__(self, drop: nn.Module | None, act: nn.Module | None):
        super().__init__()
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x):
        return self.act(self.drop(x))


class ZeroBranch(nn.Module):
    """Stands where a branch of a sum was whose map now lives in a parallel conv (a BN-only branch:
    rule "identity-branch"; a conv branch: a merge of parallel branches): it contributes zeros of
    the branch's output shape. ``conv``: the conv it replaces (None: zeros shaped like the input).
    The tracer keeps it as one call; the ONNX pass removes the zeros and the Add they enter."""

    def __init__(self, conv: nn.Module | None = None):
        super().__init__()
        self.out_channels = None if conv is None else int(conv.out_channels)
        if conv is not None:  # 'same' padding only with odd extents (the merge checks)
            self.geometry = tuple(zip(conv.kernel_size, conv.stride, padding(conv), conv.dilation))

    def forward(self, x):
        if self.out_channels is None:
            return torch.zeros_like(x)
        n = len(self.geometry)
        sizes = [(x.shape[x.dim() - n + i] + 2 * p - d * (k - 1) - 1) // s + 1 for i, (k, s, p, d) in enumerate(self.geometry)]
        return x.new_zeros(tuple(x.shape[: x.dim() - n - 1]) + (self.out_channels,) + tuple(sizes))

    def extra_repr(self) -> str:
        return "" if self.out_channels is None else f"out_channels={self.out_channels}, geometry={self.geometry}"


def padding(conv: nn.Module) -> tuple[int, ...]:
    """A conv's padding as one number per spatial axis ('same': d·(k − 1)/2, exact for odd extents)."""
    if conv.padding == "same":
        return tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    return tuple(int(p) for p in conv.padding)


def identity_remainder(bn: nn.Module) -> nn.Module:
    return nn.Identity()


def drop_act_remainder(bn: nn.Module) -> nn.Module:
    return DropAct(getattr(bn, "drop", None), getattr(bn, "act", None))


_BN: dict[type, Callable[[nn.Module], nn.Module]] = {}  # class → what stays of forward() once folded
_LAZY_BN = {
    # module name → [(class name, remainder)]; registered by type once the module is imported
    "torchvision.ops.misc": [("FrozenBatchNorm2d", identity_remainder)],
    "timm.layers.norm_act": [
        ("BatchNormAct2d", drop_act_remainder),
        ("SyncBatchNormAct", drop_act_remainder),
        ("FrozenBatchNormAct2d", drop_act_remainder),
    ],
}


def register_batchnorm(cls: type, remainder: Callable[[nn.Module], nn.Module] | None = None) -> None:
    """Teach bnfold a BatchNorm class: its forward must be ``s·x + t`` (from ``running_mean``,
    ``running_var``, ``eps``, ``weight``, ``bias``) followed by ``remainder(bn)(…)``.

    ``remainder`` builds the module that replaces a folded layer (default: ``nn.Identity``), e.g.
    ``lambda bn: bn.act`` for a BN whose forward ends with an activation.
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_batchnorm expects an nn.Module subclass, got {cls!r}")
    _BN[cls] = remainder or identity_remainder


for _c in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
    register_batchnorm(_c)


def _load_lazy() -> None:
    """Register the library classes whose module is imported by now."""
    for lazy, register in ((_LAZY_BN, register_batchnorm), (_LAZY_PROD, register_producer)):
        for modname in [name for name in lazy if sys.modules.get(name) is not None]:
            for clsname, *kind in lazy.pop(modname):
                lib_cls = getattr(sys.modules[modname], clsname, None)
                if isinstance(lib_cls, type):
                    register(lib_cls, *kind)


def _registered_base(cls: type, registry: dict) -> type | None:
    _load_lazy()
    return next((base for base in cls.__mro__ if base in registry), None)


def bn_remainder(m: nn.Module) -> tuple[Callable[[nn.Module], nn.Module] | None, str | None]:
    """(its remainder, None) for a known BN, (None, reason) for a BN subclass bnfold does not know."""
    cls = type(m)
    base = _registered_base(cls, _BN)
    if base is None and not isinstance(m, nn.modules.batchnorm._BatchNorm):
        return None, None
    if base is None or (base is not cls and cls.forward is not base.forward):
        what = "BatchNorm" if base is None else base.__qualname__
        return None, (f"{cls.__module__}.{cls.__qualname__} overrides forward() (it does more than "
                      f"{what}); folding would drop that behaviour "
                      "(bnfold.register_batchnorm teaches bnfold its remainder)")
    return _BN[base], None


def is_batchnorm(m: nn.Module) -> bool:
    """BatchNorm of any flavour: torch's BN (subclasses included), registered kinds."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) or _registered_base(type(m), _BN) is not None


EVAL_IDENTITY = (nn.Identity, nn.modules.dropout._DropoutNd)  # modules that are the identity in eval


def remainder_is_identity(bn: nn.Module) -> bool:
    """True when ``bn`` is a known kind whose remainder is the identity in eval (only Identity /
    Dropout inside)."""
    remainder, _ = bn_remainder(bn)
    if remainder is None:
        return False
    rem = remainder(bn)
    leaves = [m for m in rem.modules() if not list(m.children())]
    return all(isinstance(m, EVAL_IDENTITY) for m in leaves) and (
        type(rem) in (nn.Identity, DropAct, nn.Sequential) or isinstance(rem, nn.modules.dropout._DropoutNd)
    )


# ----------------------------------------------------------------------------------- producers
@dataclass(frozen=True)
class ProducerKind:
    backward: str | None  # None: a backward fold is exact; else the reason it is refused
    forward: str | None  # same for a forward fold (BN → this module)


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_TORCH_PRODUCERS = _CONV + _CONVT + (nn.Linear,)
_PROD: dict[type, ProducerKind] = {}

_COND = "mixes expert kernels with input-dependent routing weights (CondConv)"
_WS = "standardises its weight in forward() (weight standardisation): a folded scale would be normalised away"
_LAZY_PROD = {
    "timm.layers.conv2d_same": [
        ("Conv2dSame", None, "pads its input inside forward() (TF 'same'): padded zeros never went through the BN"),
    ],
    "timm.layers.std_conv": [(n, _WS, _WS) for n in ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")],
    # subclasses whose forward() is their parent's math (timm's Linear only adds a TorchScript cast)
    "timm.layers.linear": [("Linear", None, None)],
    "timm.layers.cond_conv2d": [("CondConv2d", _COND, _COND)],
}


def register_producer(cls: type, backward: str | None = None, forward: str | None = None) -> None:
    """Teach bnfold a Conv/Linear subclass: ``backward``/``forward`` None means that fold is exact
    for it, a string is the reason it is refused."""
    _PROD[cls] = ProducerKind(backward, forward)


for _c in _TORCH_PRODUCERS:
    register_producer(_c)


def producer_kind(m: nn.Module) -> tuple[ProducerKind | None, str | None]:
    """(kind, None) for a known producer; (None, reason) for a Conv/Linear subclass that overrides
    forward() and is not registered; (None, None) for anything else."""
    cls = type(m)
    base = _registered_base(cls, _PROD)
    if base is None:
        return None, None
    if base is not cls and cls.forward is not base.forward:
        return None, f"{cls.__qualname__} overrides forward()"
    return _PROD[base], None


def is_producer_like(m: nn.Module) -> bool:
    """Modules the tracer keeps as one call: registered producers and their subclasses."""
    return _registered_base(type(m), _PROD) is not None


def base_type(m: nn.Module) -> type:
    """torch's Conv/ConvTranspose/Linear class under a producer (for the math), or the type."""
    return next((base for base in type(m).__mro__ if base in _TORCH_PRODUCERS), type(m))


def is_transposed(m: nn.Module) -> bool:
    return isinstance(m, _CONVT)


def is_conv(m: nn.Module) -> bool:
    return isinstance(m, _CONV)


def out_channels(m: nn.Module) -> int | None:
    if isinstance(m, nn.Linear):
        return m.out_features
    return getattr(m, "out_channels", None)
