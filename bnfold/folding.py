"""Fold BatchNorm into neighbouring Conv/ConvTranspose/Linear modules of a PyTorch model.

Discovery reads the model's graph, not its module order: ``torch.fx`` symbolic tracing first, and
``torch.export`` (which needs example inputs) for models fx cannot trace. Both graphs are reduced to
the same questions per module *call*: which node feeds it, and who consumes its output (reads of
``.shape``/``.size()``/``.dim()`` are metadata, not consumers). The rules in ``fold_rules`` (one unit
per pattern: backward, concat, reshape, forward/pool-head) then decide, for every BN layer, where it
folds or why it stays.

The rewrite works on a copy (unless ``inplace=True``): the same classes, each folded BN replaced by
what remains of its forward (``nn.Identity`` for torch's BN; ``act(drop(x))`` for timm's
``BatchNormAct2d``), so state_dict names of every other module keep working. All math runs on
float64 working copies of the weights (``fold_math``) and is cast back once per tensor.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from . import bn_kinds, fold_math
from .bn_kinds import is_batchnorm, register_batchnorm  # noqa: F401  (public re-exports)
from .errors import ModelError


# ----------------------------------------------------------------------------------- plan data
@dataclass
class Folded:
    bn: str
    into: list[str]
    rule: str  # backward | forward | concat | reshape | pool-head | ...
    into_type: list[str]
    stage: str = "pytorch"  # "pytorch" or "onnx"

    def to_dict(self) -> dict[str, Any]:
        return {"bn": self.bn, "into": list(self.into), "rule": self.rule, "into_type": list(self.into_type),
                "pass": self.stage}


@dataclass
class Unfolded:
    bn: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"bn": self.bn, "reason": self.reason}


@dataclass(frozen=True)
class Edit:
    """One piece of a fold: apply the BN's (s, t) — channels ``sl`` of it, each repeated ``repeat``
    times — to ``target``'s output channels ("backward") or input channels ("forward")."""

    target: str
    op: str  # "backward" | "forward" | "identity" (a parallel BN branch added at the centre tap)
    bn: str
    sl: tuple[int, int] | None = None
    repeat: int = 1
    sign: int = 1  # −1: the BN branch is subtracted from the conv branch it joins


@dataclass
class FoldPlan:
    """Every BN layer's fate. ``folded`` and ``unfolded`` together name each BN exactly once."""

    folded: list[Folded] = field(default_factory=list)
    unfolded: list[Unfolded] = field(default_factory=list)
    tracer: str | None = None
    trace_error: str | None = None
    edits: list[Edit] = field(default_factory=list, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tracer": self.tracer,
            "trace_error": self.trace_error,
            "folded": [f.to_dict() for f in self.folded],
            "unfolded": [u.to_dict() for u in self.unfolded],
        }

    @property
    def bn_count(self) -> int:
        return len(self.folded) + len(self.unfolded)


# ------------------------------------------------------------------------------ BN recognition
def _bn_problem(m: nn.Module) -> str | None:
    """Why this BN cannot be folded whatever its neighbours are, or None."""
    kind, why = bn_kinds.bn_kind(m)
    if kind is None:
        return why or f"{type(m).__qualname__} is not a known BatchNorm kind"
    if getattr(m, "running_mean", None) is None or getattr(m, "running_var", None) is None:
        return "no running statistics (track_running_stats=False): run calibration first (bnfold calibrate / --calib)"
    return None


def bn_scale_shift(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return fold_math.bn_scale_shift(
        m.running_mean, m.running_var, m.eps, getattr(m, "weight", None), getattr(m, "bias", None)
    )


# ------------------------------------------------------------------------------------ discovery
class _LeafTracer(torch.fx.Tracer):
    """fx tracer that keeps every BN kind and producer (registered or subclassed) as one call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if is_batchnorm(m) or bn_kinds.is_producer_like(m):
            return True
        return super().is_leaf_module(m, qualname)


@dataclass
class _Call:
    """One call of a module of interest, reduced from an fx or torch.export graph."""

    path: str
    inputs: list  # activation input nodes (from outside the call)
    outputs: list  # nodes of the call whose values leave it
    rank_in: int | None = None


# metadata reads: the value's data is not consumed
_META_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad"}
_META_METHODS = {"size", "dim", "numel", "type", "get_device", "nelement"}
_META_ATEN = {"sym_size", "sym_numel", "sym_stride", "sym_storage_offset"}
_SHAPE_OF_SECOND = {"reshape_as", "view_as", "expand_as", "type_as"}
_LIKE = {"zeros_like", "ones_like", "empty_like"}


def _fn_name(node) -> str:
    t = node.target
    if node.op == "call_method":
        return str(t)
    name = getattr(t, "__name__", None) or str(t)
    if hasattr(t, "_schema"):  # aten OpOverload: aten.cat.default → "cat"
        name = t._schema.name.split("::")[-1]
    return name


class _Graph:
    """Module calls and node ownership over an fx graph (from fx or torch.export)."""

    def __init__(self, graph: torch.fx.Graph, owner: Callable, rank: Callable, is_param: Callable, describe: Callable,
                 shape: Callable, module_of: Callable, tracer: str):
        self.graph = graph
        self.owner = owner  # node -> (path, call_key) | None
        self.rank = rank
        self.shape = shape  # node -> tuple | None
        self.module_of = module_of  # node -> nn.Module | None (fx call_module nodes outside interest)
        self.describe = describe
        self.tracer = tracer
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

    @staticmethod
    def is_meta_read(node, value=None) -> bool:
        """``node`` reads only metadata (shape, dtype, …) of ``value``."""
        if value is not None and node.op in ("call_method", "call_function"):
            name = _fn_name(node)
            if name in _SHAPE_OF_SECOND and len(node.args) > 1 and node.args[1] is value and node.args[0] is not value:
                return True  # x.reshape_as(value): value is a shape template
            if name in _LIKE and node.args and node.args[0] is value:
                return True
        if node.op == "call_function" and node.target is getattr and len(node.args) > 1:
            return node.args[1] in _META_ATTRS
        if node.op == "call_method":
            return node.target in _META_METHODS
        if node.op == "call_function":
            return _fn_name(node) in _META_ATEN or node.target is len
        return False

    def users_outside(self, node, own=None) -> list:
        own = self.owner(node) if own is None else own
        if own is None:  # a free node (function, module outside interest): every user is outside
            return list(node.users)
        return [u for u in node.users if self.owner(u) != own]

    def data_users(self, node, own=None) -> list:
        """Consumers of ``node``'s value outside its call, metadata reads excluded."""
        return [u for u in self.users_outside(node, own) if not self.is_meta_read(u, node)]

    def op_name(self, node) -> str | None:
        """'cat', 'flatten', 'mean', ... for function/method nodes; None for others."""
        if node.op in ("call_function", "call_method"):
            return _fn_name(node)
        return None

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

    def shape(node):
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def rank(node):
        s = shape(node)
        return None if s is None else len(s)

    def module_of(node):
        return model.get_submodule(node.target) if node.op == "call_module" else None

    def describe(node):
        if node.op == "placeholder":
            return "the model input"
        if node.op == "call_module":
            return f"module `{node.target}` ({type(model.get_submodule(node.target)).__name__})"
        return f"`{_fn_name(node)}`"

    return _Graph(graph, owner, rank, lambda n: n.op == "get_attr", describe, shape, module_of, "fx")


def _export_graph(model: nn.Module, example_inputs: tuple, interest: set[str]) -> _Graph:
    ep = torch.export.export(model, tuple(example_inputs), strict=False)
    sig = ep.graph_signature
    state_inputs = set(sig.inputs_to_parameters) | set(sig.inputs_to_buffers)
    state_inputs |= set(getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {})

    def owner(node):
        stack = node.meta.get("nn_module_stack")
        if not stack or node.op != "call_function":
            return None
        for key, (path, _type) in reversed(list(stack.items())):  # innermost module of interest
            if path in interest:
                return (path, key)
        return None

    def shape(node):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            try:
                return tuple(int(d) for d in val.shape)
            except Exception:  # symbolic sizes
                return None
        return None

    def rank(node):
        val = node.meta.get("val")
        return val.dim() if isinstance(val, torch.Tensor) else None

    def describe(node):
        if node.op == "placeholder":
            return "the model input"
        return f"`{_fn_name(node)}`"

    return _Graph(ep.graph, owner, rank, lambda n: n.op == "placeholder" and n.name in state_inputs, describe,
                  shape, lambda n: None, "torch.export")


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


def _shared_params(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return owners


def _discover(model: nn.Module, example_inputs: tuple | None) -> FoldPlan:
    from .fold_rules import RULES, Context, Match

    bns = {name: m for name, m in model.named_modules() if name and is_batchnorm(m)}
    plan = FoldPlan()
    if not bns:
        return plan
    interest = set(bns) | {name for name, m in model.named_modules() if name and bn_kinds.is_producer_like(m)}
    g, plan.tracer, plan.trace_error = _trace(model, example_inputs, interest)
    ctx = Context(g, model, _shared_params(model)) if g is not None else None
    taken: dict[tuple[str, str], str] = {}  # (target, op) → the BN already folded there
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
        reasons = []
        for rule in RULES:
            res = rule.match(ctx, name, call)
            if res is None:
                continue
            if isinstance(res, Match):
                clash = next((taken[(e.target, e.op)] for e in res.edits if (e.target, e.op) in taken), None)
                if clash:
                    reasons.append(f"{rule.name}: its target already takes the fold of `{clash}`")
                    continue
                for e in res.edits:
                    taken[(e.target, e.op)] = name
                plan.edits.extend(res.edits)
                into_type = [type(model.get_submodule(t)).__name__ for t in res.into]
                plan.folded.append(Folded(name, list(res.into), res.rule or rule.name, into_type))
                break
            reasons.append(f"{rule.name}: {res.reason}")
        else:
            plan.unfolded.append(Unfolded(name, "; ".join(reasons)))
    _second_pass(ctx, plan, taken)
    return plan


def _second_pass(ctx, plan: FoldPlan, taken: dict) -> None:
    """Rules that build on the first pass's folds (parallel branches merge into a conv whose own
    BN already folded backward)."""
    from .fold_rules import LATE_RULES, Match

    if ctx is None:
        return
    still = []
    for u in plan.unfolded:
        calls = ctx.g.calls.get(u.bn, {})
        if len(calls) != 1 or _bn_problem(ctx.module(u.bn)):
            still.append(u)
            continue
        call = next(iter(calls.values()))
        for rule in LATE_RULES:
            res = rule.match(ctx, u.bn, call, plan, taken)
            if isinstance(res, Match):
                for e in res.edits:  # identity branches add up: several may join one conv
                    taken.setdefault((e.target, e.op), u.bn)
                plan.edits.extend(res.edits)
                into_type = [type(ctx.module(t)).__name__ for t in res.into]
                plan.folded.append(Folded(u.bn, list(res.into), res.rule or rule.name, into_type))
                break
            if res is not None:
                u = Unfolded(u.bn, f"{u.reason}; {rule.name}: {res.reason}")
        else:
            still.append(u)
    plan.unfolded = still


class ZeroBranch(nn.Module):
    """Stands where a BN-only branch was: its s·x + t now lives in the centre tap and bias of a
    parallel conv on the same input (rule "branches"), so this branch contributes zeros."""

    def forward(self, x):
        return torch.zeros_like(x)


# ---------------------------------------------------------------------------------------- apply
def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    parent._modules[leaf] = new


def _apply(model: nn.Module, plan: FoldPlan) -> None:
    """Rewrite weights and swap folded BNs for what remains of their forward.

    Module by module: a float64 copy of its weight and bias takes every edit aimed at it (a forward
    and a backward fold compose in either order), is cast back once, and is freed before the next
    module, so at most one module's float64 copy exists at a time.
    """
    by_target: dict[str, list[Edit]] = {}
    order = {"forward": 0, "backward": 1, "identity": 2}  # the identity branch adds after the conv's own BN
    for e in sorted(plan.edits, key=lambda e: order[e.op]):
        by_target.setdefault(e.target, []).append(e)
    st_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def scale_shift(e: Edit, device) -> tuple[torch.Tensor, torch.Tensor]:
        if e.bn not in st_cache:
            st_cache[e.bn] = bn_scale_shift(model.get_submodule(e.bn))
        s, t = st_cache[e.bn]
        if e.sl is not None:
            s, t = s[e.sl[0]:e.sl[1]], t[e.sl[0]:e.sl[1]]
        if e.sign != 1:
            s, t = s * e.sign, t * e.sign
        if e.repeat != 1:
            s, t = s.repeat_interleave(e.repeat), t.repeat_interleave(e.repeat)
        return s.to(device), t.to(device)

    for path, edits in by_target.items():
        mod = model.get_submodule(path)
        like = mod.weight
        groups = getattr(mod, "groups", 1)
        transposed = bn_kinds.is_transposed(mod)
        rows = _row_block(like, groups, transposed)
        with torch.no_grad():
            if rows is None:  # the whole weight at once
                w, b = _fold_rows(like, mod.bias, edits, scale_shift, transposed, groups, 0, like.shape[0], groups)
                mod.weight = nn.Parameter(fold_math.cast_like(w, like), requires_grad=like.requires_grad)
                mod.bias = nn.Parameter(fold_math.cast_like(b, like), requires_grad=like.requires_grad)
                del w, b
            else:  # a large weight: blocks of whole groups of output rows, written into the module's own tensors
                per_group = like.shape[0] // groups
                bias = mod.bias if mod.bias is not None else nn.Parameter(torch.zeros(like.shape[0], dtype=like.dtype, device=like.device),
                                                                         requires_grad=like.requires_grad)
                for r0 in range(0, like.shape[0], rows):
                    r1 = min(r0 + rows, like.shape[0])
                    w, b = _fold_rows(like, bias, edits, scale_shift, transposed, groups, r0, r1, (r1 - r0) // per_group)
                    like.data[r0:r1] = fold_math.cast_like(w, like)
                    bias.data[r0:r1] = fold_math.cast_like(b, like)
                    del w, b
                mod.bias = bias
        del like
    for f in plan.folded:
        if f.stage != "pytorch":
            continue
        bn = model.get_submodule(f.bn)
        kind, _ = bn_kinds.bn_kind(bn)
        _set_submodule(model, f.bn, ZeroBranch() if f.rule == "branches" else kind.remainder(bn))


FOLD_BLOCK_BYTES = 256 << 20  # float64 working copy above which a weight is folded in blocks of rows


def _row_block(weight: torch.Tensor, groups: int, transposed: bool) -> int | None:
    """Rows (output channels, whole groups) per block for a weight whose float64 copy exceeds
    FOLD_BLOCK_BYTES; None to fold it at once (small weights, and ConvTranspose, whose output
    channels are not its rows). Every row's fold reads only that row (and the BN's s, t), so blocks
    give the same values as one pass, with one block of float64 alive instead of the whole weight."""
    if transposed or weight.dim() < 2 or weight.numel() * 8 <= FOLD_BLOCK_BYTES:
        return None
    row_bytes = weight[0].numel() * 8
    if groups == 1:  # any rows
        return max(1, FOLD_BLOCK_BYTES // row_bytes)
    per_group = weight.shape[0] // groups
    return per_group * max(1, FOLD_BLOCK_BYTES // (row_bytes * per_group))


def _fold_rows(weight, bias, edits, scale_shift, transposed: bool, groups: int, r0: int, r1: int, block_groups: int):
    """float64 (W', b') of output rows r0:r1 after every edit (forward, backward, identity order).
    With groups, r0:r1 spans ``block_groups`` whole groups: the forward fold reads only their input
    channels. (ConvTranspose is always folded whole: its rows are input channels.)"""
    whole = r0 == 0 and r1 == weight.shape[0]
    rows = slice(None) if whole else slice(r0, r1)  # bias and BN channels are output channels, not rows, for ConvTranspose
    w = weight.detach()[rows].to(torch.float64)
    b = None if bias is None else bias.detach()[rows].to(torch.float64)
    g = block_groups if groups > 1 else 1
    g0 = r0 // (weight.shape[0] // groups)
    cols = slice(None) if whole or groups == 1 else slice(g0 * weight.shape[1], (g0 + g) * weight.shape[1])
    for e in edits:  # fold_* always return a bias, so b is set after the first edit
        s, t = scale_shift(e, w.device)
        if e.op == "backward":
            w, b = fold_math.fold_backward(w, b, s[rows], t[rows], transposed=transposed, groups=g)
        elif e.op == "identity":
            w, b = fold_math.fold_identity_branch(w, b, s[rows], t[rows], groups=g)
        else:
            w, b = fold_math.fold_forward(w, b, s[cols], t[cols], groups=g)
    return w, b


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

    Folded BN layers become what remains of their forward (``nn.Identity`` for torch's BN); the rest
    stay, with reasons in ``inspect(model)``. ``example_inputs`` (a tensor or tuple) enables the
    torch.export fallback and the shape checks that Linear ↔ BatchNorm1d, reshape and flatten folds need.
    """
    return fold_with_plan(model, example_inputs, inplace=inplace)[0]


def inspect(model: nn.Module, example_inputs=None) -> FoldPlan:
    """Every BN layer's fate (folded into what, by which rule, or why not). Changes nothing."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"expected a torch.nn.Module, got {type(model).__name__}", "pass the model object")
    work = copy.deepcopy(model).eval()
    return _discover(work, _as_tuple(example_inputs))

