"""Fold BatchNorm into neighbouring Conv/ConvTranspose/Linear modules of a PyTorch model.

Discovery reads the model's graph, not its module order: ``torch.fx`` symbolic tracing first, and
``torch.export`` (which needs example inputs) for models fx cannot trace. Both graphs are reduced to
the same question per module *call*: which node feeds it, and who consumes its output. The rules
(see the README's table) then decide, for every BN layer, one of

* folded **backward** into the Conv/ConvTranspose/Linear that produces its input;
* folded **forward** into the unpadded Conv or the Linear that is its only consumer;
* left in place, with the reason.

The rewrite works on a copy (unless ``inplace=True``): the same classes, the folded BN layers
replaced by ``nn.Identity`` so state_dict names of every other module keep working. All math runs on
float64 working copies of the weights (``fold_math``) and is cast back once per tensor.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from . import fold_math
from .errors import ModelError

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_PRODUCERS = _CONV + _CONVT + (nn.Linear,)


# ----------------------------------------------------------------------------------- plan data
@dataclass
class Folded:
    bn: str
    into: str
    direction: str  # "backward" (producer → BN) or "forward" (BN → consumer)
    into_type: str


@dataclass
class Unfolded:
    bn: str
    reason: str


@dataclass
class FoldPlan:
    """Every BN layer's fate. ``folded`` and ``unfolded`` together name each BN exactly once."""

    folded: list[Folded] = field(default_factory=list)
    unfolded: list[Unfolded] = field(default_factory=list)
    tracer: str | None = None
    trace_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "tracer": self.tracer,
            "trace_error": self.trace_error,
            "folded": [asdict(f) for f in self.folded],
            "unfolded": [asdict(u) for u in self.unfolded],
        }

    @property
    def bn_count(self) -> int:
        return len(self.folded) + len(self.unfolded)


# ------------------------------------------------------------------------------ BN recognition
def _is_frozen_bn(m: nn.Module) -> bool:
    return type(m).__name__ == "FrozenBatchNorm2d" and all(
        hasattr(m, b) for b in ("weight", "bias", "running_mean", "running_var", "eps")
    )


def is_batchnorm(m: nn.Module) -> bool:
    """BatchNorm of any flavour: torch's BN1d/2d/3d, SyncBatchNorm, subclasses, FrozenBatchNorm2d."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) or _is_frozen_bn(m)


def _plain_forwards() -> set[Callable]:
    plain = {nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward}
    for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
        plain.add(cls.forward)
    return plain


def _bn_problem(m: nn.Module) -> str | None:
    """Why this BN cannot be folded whatever its neighbours are, or None."""
    if _is_frozen_bn(m):
        if not type(m).__module__.startswith("torchvision"):
            return f"{type(m).__qualname__} is not torchvision's FrozenBatchNorm2d; its forward is unknown"
        return None
    if type(m).forward not in _plain_forwards():
        return (
            f"{type(m).__module__}.{type(m).__qualname__} overrides forward() (it does more than "
            "BatchNorm); folding would drop that behaviour"
        )
    if getattr(m, "running_mean", None) is None or getattr(m, "running_var", None) is None:
        return "no running statistics (track_running_stats=False): run calibration first (bnfold calibrate / --calib)"
    return None


def bn_scale_shift(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return fold_math.bn_scale_shift(
        m.running_mean, m.running_var, m.eps, getattr(m, "weight", None), getattr(m, "bias", None)
    )


# ------------------------------------------------------------------------------------ discovery
class _LeafTracer(torch.fx.Tracer):
    """fx tracer that keeps every BN (subclasses, FrozenBatchNorm2d) and producer as one call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if is_batchnorm(m) or isinstance(m, _PRODUCERS):
            return True
        return super().is_leaf_module(m, qualname)


@dataclass
class _Call:
    """One call of a module of interest, reduced from an fx or torch.export graph."""

    path: str
    inputs: list  # activation input nodes (from outside the call)
    outputs: list  # nodes of the call whose values leave it
    rank_in: int | None = None


class _Graph:
    """Module calls and node ownership over an fx graph (from fx or torch.export)."""

    def __init__(self, graph: torch.fx.Graph, owner: Callable, rank: Callable, is_param: Callable, describe: Callable):
        self.graph = graph
        self.owner = owner  # node -> (path, call_key) | None
        self.rank = rank
        self.describe = describe
        self.calls: dict[str, dict[Any, _Call]] = {}
        for node in graph.nodes:
            own = owner(node)
            if own is None:
                continue
            path, key = own
            call = self.calls.setdefault(path, {}).setdefault(key, _Call(path, [], []))
            for arg in node.all_input_nodes:
                if owner(arg) != own and not is_param(arg) and arg not in call.inputs:
                    call.inputs.append(arg)
                    call.rank_in = rank(arg)
            if any(owner(u) != own for u in node.users):
                call.outputs.append(node)

    def users_outside(self, node, own) -> list:
        return [u for u in node.users if self.owner(u) != own]

    def what(self, node) -> str:
        own = self.owner(node)
        return f"module `{own[0]}`" if own else self.describe(node)


def _fx_graph(model: nn.Module, example_inputs: tuple | None, interest: set[str]) -> _Graph:
    tracer = _LeafTracer()
    graph = tracer.trace(model)
    if example_inputs is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        gm = torch.fx.GraphModule(model, graph)
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)

    def owner(node):
        if node.op == "call_module" and node.target in interest:
            return (node.target, node.name)
        return None

    def rank(node):
        meta = node.meta.get("tensor_meta")
        return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def describe(node):
        if node.op == "placeholder":
            return "the model input"
        if node.op == "call_module":
            return f"module `{node.target}` ({type(model.get_submodule(node.target)).__name__})"
        name = getattr(node.target, "__name__", str(node.target))
        return f"`{name}`"

    return _Graph(graph, owner, rank, lambda n: n.op == "get_attr", describe)


def _export_graph(model: nn.Module, example_inputs: tuple, interest: set[str]) -> _Graph:
    ep = torch.export.export(model, tuple(example_inputs), strict=False)
    sig = ep.graph_signature
    state_inputs = set(sig.inputs_to_parameters) | set(sig.inputs_to_buffers)
    state_inputs |= set(getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {})

    def owner(node):
        stack = node.meta.get("nn_module_stack")
        if not stack or node.op != "call_function":
            return None
        key, (path, _type) = list(stack.items())[-1]
        return (path, key) if path in interest else None

    def rank(node):
        val = node.meta.get("val")
        return val.dim() if isinstance(val, torch.Tensor) else None

    def describe(node):
        if node.op == "placeholder":
            return "the model input"
        return f"`{getattr(node.target, '__name__', node.target)}`"

    return _Graph(ep.graph, owner, rank, lambda n: n.op == "placeholder" and n.name in state_inputs, describe)


def _trace(model: nn.Module, example_inputs: tuple | None, interest: set[str]) -> tuple[_Graph | None, str | None, str | None]:
    try:
        return _fx_graph(model, example_inputs, interest), "fx", None
    except Exception as fx_err:  # fx cannot trace data-dependent Python; fall back
        fx_msg = f"torch.fx: {type(fx_err).__name__}: {str(fx_err).splitlines()[0] if str(fx_err) else ''}"
    if example_inputs is None:
        return None, None, fx_msg + "; pass example inputs so torch.export can trace it"
    try:
        return _export_graph(model, example_inputs, interest), "torch.export", None
    except Exception as ex_err:
        first = str(ex_err).strip().splitlines()[0] if str(ex_err).strip() else ""
        return None, None, f"{fx_msg}; torch.export: {type(ex_err).__name__}: {first}"


# ---------------------------------------------------------------------------------------- rules
def _shared_params(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return owners


def _tied(model: nn.Module, path: str, shared: dict[int, list[str]]) -> str | None:
    mod = model.get_submodule(path)
    for pname in ("weight", "bias"):
        p = getattr(mod, pname, None)
        if isinstance(p, nn.Parameter) and len(shared.get(id(p), [])) > 1:
            others = [n for n in shared[id(p)] if n != f"{path}.{pname}"]
            return f"its {pname} is shared with {', '.join(others)}"
    return None


def _overrides_forward(mod: nn.Module) -> bool:
    """A Conv/Linear subclass whose forward() is not torch's: it may pad or add more."""
    base = next(c for c in type(mod).__mro__ if c in _PRODUCERS)
    return type(mod).forward is not base.forward


def _has_padding(conv: nn.Module) -> bool:
    pad = conv.padding
    if isinstance(pad, str):
        if pad == "valid":
            return False
        # 'same' pads unless every (dilated) kernel extent is 1
        return any((k - 1) * d for k, d in zip(conv.kernel_size, conv.dilation))
    return any(p != 0 for p in pad)


def _backward_reason(g: _Graph, model, bn_path: str, bn_call: _Call, shared) -> tuple[str | None, str | None]:
    """(producer path, None) when the BN can fold into its producer, else (None, reason)."""
    if len(bn_call.inputs) != 1:
        return None, f"BN has {len(bn_call.inputs)} activation inputs"
    src = bn_call.inputs[0]
    own = g.owner(src)
    if own is None:
        return None, f"its input comes from {g.what(src)}, not from a Conv/Linear module"
    ppath = own[0]
    prod = model.get_submodule(ppath)
    if not isinstance(prod, _PRODUCERS):
        return None, f"its input comes from {type(prod).__name__} `{ppath}`, not from a Conv/Linear"
    if _overrides_forward(prod):
        return None, f"producer `{ppath}` ({type(prod).__name__}) overrides forward()"
    if len(g.calls[ppath]) != 1:
        return None, f"producer `{ppath}` is called {len(g.calls[ppath])} times (its weights serve every call)"
    consumers = g.users_outside(src, own)
    if len(consumers) != 1:
        return None, f"producer `{ppath}`'s output has {len(consumers)} consumers"
    tied = _tied(model, ppath, shared)
    if tied:
        return None, f"producer `{ppath}`: {tied}"
    if isinstance(prod, nn.Linear):
        if bn_call.rank_in is None:
            return None, "Linear → BN needs example inputs to check the Linear output is (N, C)"
        if bn_call.rank_in != 2:
            return None, f"Linear `{ppath}` output has rank {bn_call.rank_in}; BatchNorm1d normalises dim 1, not the Linear's features"
    out_ch = prod.out_features if isinstance(prod, nn.Linear) else prod.out_channels
    bn = model.get_submodule(bn_path)
    if bn.running_mean.numel() != out_ch:
        return None, f"producer `{ppath}` has {out_ch} output channels, BN has {bn.running_mean.numel()}"
    return ppath, None


def _forward_reason(g: _Graph, model, bn_path: str, bn_call: _Call, shared) -> tuple[str | None, str | None]:
    """(consumer path, None) when the BN can fold into its only consumer, else (None, reason)."""
    if len(bn_call.outputs) != 1:
        return None, "BN output is not a single value"
    out = bn_call.outputs[0]
    users = g.users_outside(out, g.owner(out))
    if len(users) != 1:
        return None, f"BN output has {len(users)} consumers"
    own = g.owner(users[0])
    if own is None:
        return None, f"BN output goes to {g.what(users[0])}, not to a Conv/Linear module"
    cpath = own[0]
    cons = model.get_submodule(cpath)
    if isinstance(cons, _CONVT):
        return None, f"consumer `{cpath}` is a ConvTranspose (border outputs see part of the kernel: the shift would not be exact)"
    if not isinstance(cons, _CONV + (nn.Linear,)):
        return None, f"BN output goes to {type(cons).__name__} `{cpath}`"
    if _overrides_forward(cons):  # e.g. a "same"-padding conv that pads inside forward()
        return None, f"consumer `{cpath}` ({type(cons).__name__}) overrides forward()"
    if len(g.calls[cpath]) != 1:
        return None, f"consumer `{cpath}` is called {len(g.calls[cpath])} times"
    ccall = next(iter(g.calls[cpath].values()))
    if ccall.inputs != [out]:
        return None, f"consumer `{cpath}` reads other inputs too"
    if isinstance(cons, _CONV) and _has_padding(cons):
        return None, f"consumer `{cpath}` pads its input (padding={cons.padding}); padded zeros never went through the BN"
    if isinstance(cons, nn.Linear):
        if bn_call.rank_in is None:
            return None, "BN → Linear needs example inputs to check the BN input is (N, C)"
        if bn_call.rank_in != 2:
            return None, f"BN input has rank {bn_call.rank_in}; the Linear `{cpath}` does not read channels on dim 1"
    tied = _tied(model, cpath, shared)
    if tied:
        return None, f"consumer `{cpath}`: {tied}"
    return cpath, None


def _discover(model: nn.Module, example_inputs: tuple | None) -> FoldPlan:
    bns = {name: m for name, m in model.named_modules() if name and is_batchnorm(m)}
    plan = FoldPlan()
    if not bns:
        return plan
    interest = set(bns) | {name for name, m in model.named_modules() if isinstance(m, _PRODUCERS)}
    g, plan.tracer, plan.trace_error = _trace(model, example_inputs, interest)
    shared = _shared_params(model)
    for name, bn in bns.items():
        problem = _bn_problem(bn)
        if problem:
            plan.unfolded.append(Unfolded(name, problem))
            continue
        if g is None:
            plan.unfolded.append(Unfolded(name, f"model could not be traced ({plan.trace_error})"))
            continue
        calls = g.calls.get(name, {})
        if len(calls) != 1:
            why = "never called in forward()" if not calls else f"called {len(calls)} times (shared BN)"
            plan.unfolded.append(Unfolded(name, why))
            continue
        call = next(iter(calls.values()))
        target, back_why = _backward_reason(g, model, name, call, shared)
        if target:
            plan.folded.append(Folded(name, target, "backward", type(model.get_submodule(target)).__name__))
            continue
        # A conv may take one forward fold (its only input) and one backward fold (its only
        # consumer); _apply composes them on one float64 copy, so both stay exact.
        target, fwd_why = _forward_reason(g, model, name, call, shared)
        if target:
            plan.folded.append(Folded(name, target, "forward", type(model.get_submodule(target)).__name__))
            continue
        plan.unfolded.append(Unfolded(name, f"backward: {back_why}; forward: {fwd_why}"))
    return plan


# ---------------------------------------------------------------------------------------- apply
def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    parent._modules[leaf] = new


def _apply(model: nn.Module, plan: FoldPlan) -> None:
    """Rewrite weights and swap folded BNs for nn.Identity.

    Module by module: a float64 copy of its weight and bias takes every fold aimed at it (a forward
    and a backward fold compose in either order), is cast back once, and is freed before the next
    module, so at most one module's float64 copy exists at a time.
    """
    by_target: dict[str, list[Folded]] = {}
    for f in plan.folded:
        by_target.setdefault(f.into, []).append(f)
    for path, folds in by_target.items():
        mod = model.get_submodule(path)
        like = mod.weight
        w = like.detach().to(torch.float64)
        b = None if mod.bias is None else mod.bias.detach().to(torch.float64)
        for f in folds:
            s, t = bn_scale_shift(model.get_submodule(f.bn))
            s, t = s.to(w.device), t.to(w.device)
            if f.direction == "backward":
                w, b = fold_math.fold_backward(w, b, s, t, transposed=isinstance(mod, _CONVT), groups=getattr(mod, "groups", 1))
            else:
                w, b = fold_math.fold_forward(w, b, s, t, groups=getattr(mod, "groups", 1))
        with torch.no_grad():
            mod.weight = nn.Parameter(fold_math.cast_like(w, like), requires_grad=like.requires_grad)
            mod.bias = nn.Parameter(fold_math.cast_like(b, like), requires_grad=like.requires_grad)
        del w, b, like
    for f in plan.folded:
        _set_submodule(model, f.bn, nn.Identity())


# ----------------------------------------------------------------------------------- public API
def _as_tuple(example_inputs) -> tuple | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def fold_with_plan(model: nn.Module, example_inputs=None, *, inplace: bool = False) -> tuple[nn.Module, FoldPlan]:
    """Fold every foldable BN; return (folded model in eval mode, plan)."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"expected a torch.nn.Module, got {type(model).__name__}", "pass the model object")
    work = model if inplace else copy.deepcopy(model)
    work.eval()
    plan = _discover(work, _as_tuple(example_inputs))
    _apply(work, plan)
    return work, plan


def fold(model: nn.Module, example_inputs=None, *, inplace: bool = False) -> nn.Module:
    """Return a copy of ``model`` (eval mode) with every foldable BatchNorm folded.

    Folded BN layers become ``nn.Identity``; the rest stay, with reasons in ``inspect(model)``.
    ``example_inputs`` (a tensor or tuple) enables the torch.export fallback and the shape checks
    that Linear ↔ BatchNorm1d folds need.
    """
    return fold_with_plan(model, example_inputs, inplace=inplace)[0]


def inspect(model: nn.Module, example_inputs=None) -> FoldPlan:
    """Every BN layer's fate (folded backward/forward into what, or why not). Changes nothing."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"expected a torch.nn.Module, got {type(model).__name__}", "pass the model object")
    work = copy.deepcopy(model).eval()
    return _discover(work, _as_tuple(example_inputs))

