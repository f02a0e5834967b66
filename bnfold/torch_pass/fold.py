"""Fold BatchNorm into neighbouring Conv/ConvTranspose/Linear modules of a PyTorch model.

Discovery reads the model's graph, not its module order (``graph``). The rules in ``rules`` (one unit
per pattern: backward, concat, reshape, forward/pool-head, identity-branch, sum; the protocol of
``bnfold.rule``) then decide, for every BN layer, where it folds or why it stays (``merge`` then joins
parallel conv branches); this module applies their edits.

The rewrite works on a copy (unless ``inplace=True``): the same classes, each folded BN replaced by
what remains of its forward (``nn.Identity`` for torch's BN; ``act(drop(x))`` for timm's
``BatchNormAct2d``), so state_dict names of every other module keep working. All math runs on
float64 working copies of the weights (``fold_math``) and is cast back once per tensor.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from bnfold import fold_math
from bnfold.errors import ModelError
from bnfold.plan import Edit, FoldPlan, Merge, Unfolded
from bnfold.rule import try_rules
from bnfold.torch_pass import bn_kinds
from bnfold.torch_pass.bn_kinds import ZeroBranch, is_batchnorm
from bnfold.torch_pass.graph import trace
from bnfold.torch_pass.merge import merge_parallel_branches
from bnfold.torch_pass.rules import BN, LATE_RULES, RULES, Context, IdentityBranch


# ------------------------------------------------------------------------------ BN recognition
def _bn_problem(m: nn.Module) -> str | None:
    """Why this BN cannot be folded whatever its neighbours are, or None."""
    remainder, why = bn_kinds.bn_remainder(m)
    if remainder is None:
        return why or f"{type(m).__qualname__} is not a known BatchNorm kind"
    if getattr(m, "running_mean", None) is None or getattr(m, "running_var", None) is None:
        return "no running statistics (track_running_stats=False): run calibration first (bnfold calibrate / --calib)"
    return None


def _shared_params(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return owners


def _discover(model: nn.Module, example_inputs: tuple | None) -> FoldPlan:
    bns = {name: m for name, m in model.named_modules() if name and is_batchnorm(m)}
    plan = FoldPlan()
    if not bns:
        return plan
    interest = set(bns) | {name for name, m in model.named_modules() if name and bn_kinds.is_producer_like(m)}
    g, plan.tracer, plan.trace_error = trace(model, example_inputs, interest)
    ctx = Context(g, model, _shared_params(model), plan) if g is not None else None
    for name, bn in bns.items():
        target, why = _target(ctx, plan.trace_error, name, bn)
        if target is None:
            plan.unfolded.append(Unfolded(name, why))
            continue
        out = try_rules(RULES, ctx, target, accept=ctx.check_free)
        if out.match is not None:
            ctx.record(target, out.rule, out.match)
        else:
            plan.unfolded.append(Unfolded(name, "; ".join(out.reasons())))
    if ctx is not None:
        _second_pass(ctx)
        merge_parallel_branches(ctx)
    return plan


def _target(ctx: Context | None, trace_error: str | None, name: str, bn: nn.Module) -> tuple[BN | None, str | None]:
    """(the BN and its one call, None), or (None, why no rule can fold it whatever its neighbours)."""
    problem = _bn_problem(bn)
    if problem:
        return None, problem
    if ctx is None:
        return None, f"model could not be traced ({trace_error})"
    calls = ctx.g.calls.get(name, {})
    if len(calls) != 1:
        return None, "never called in forward()" if not calls else f"called {len(calls)} times (shared BN)"
    return BN(name, next(iter(calls.values()))), None


def _second_pass(ctx: Context) -> None:
    """Rules that build on the first pass's folds (parallel branches merge into a conv whose own
    BN already folded backward)."""
    plan, still = ctx.plan, []
    for u in plan.unfolded:
        target, _ = _target(ctx, None, u.bn, ctx.module(u.bn))
        if target is None:
            still.append(u)
            continue
        out = try_rules(LATE_RULES, ctx, target)
        if out.match is not None:
            ctx.record(target, out.rule, out.match)
        else:
            still.append(Unfolded(u.bn, "; ".join([u.reason] + out.reasons())))
    plan.unfolded = still


# ---------------------------------------------------------------------------------------- apply
def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    parent._modules[leaf] = new


def _apply(model: nn.Module, plan: FoldPlan) -> None:
    """Rewrite weights and swap folded BNs for what remains of their forward.

    Module by module: a float64 copy of its weight and bias takes every edit aimed at it (a forward
    and a backward fold compose in either order), is cast back once, and is freed before the next
    module, so at most one module's float64 copy exists at a time. A merge of parallel branches
    folds each branch's convs in float64, sums them into the target, and casts once.
    """
    by_target: dict[str, list[Edit]] = {}
    order = {"forward": 0, "backward": 1, "identity": 2}  # the identity branch adds after the conv's own BN
    for e in sorted(plan.edits, key=lambda e: order[e.op]):
        by_target.setdefault(e.target, []).append(e)
    st_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def scale_shift(e: Edit, device) -> tuple[torch.Tensor, torch.Tensor]:
        if e.bn not in st_cache:
            m = model.get_submodule(e.bn)
            st_cache[e.bn] = fold_math.bn_scale_shift(m.running_mean, m.running_var, m.eps,
                                                      getattr(m, "weight", None), getattr(m, "bias", None))
        s, t = st_cache[e.bn]
        if e.sl is not None:
            s, t = s[e.sl[0]:e.sl[1]], t[e.sl[0]:e.sl[1]]
        if e.affine != "st":  # a BN after a sum: the shift goes to one branch only; a kept skip takes s − 1
            s, t = (s - 1 if e.affine == "s-1" else s), torch.zeros_like(t)
        if e.sign != 1:
            s, t = s * e.sign, t * e.sign
        if e.repeat != 1:
            s, t = s.repeat_interleave(e.repeat), t.repeat_interleave(e.repeat)
        return s.to(device), t.to(device)

    merged = {m.target for m in plan.merges} | {p for m in plan.merges for p, _ in m.parts}
    for path, edits in by_target.items():
        if path not in merged:
            _fold_module(model.get_submodule(path), edits, scale_shift, model.get_submodule)
    for m in plan.merges:
        _apply_merge(model, m, by_target, scale_shift)
    for f in plan.folded:  # the plan _discover made: every fold is of this pass
        bn = model.get_submodule(f.bn)
        remainder, _ = bn_kinds.bn_remainder(bn)
        _warn_hooks(f.bn, bn)
        _set_submodule(model, f.bn, ZeroBranch() if f.rule == IdentityBranch.name else remainder(bn))


_HOOKS = {"_forward_pre_hooks": "forward pre-hook", "_forward_hooks": "forward hook",
          "_backward_pre_hooks": "backward pre-hook", "_backward_hooks": "backward hook"}


def _warn_hooks(path: str, bn: nn.Module) -> None:
    """A hook on a folded BN has no layer left to run on: say so (one line naming the layer)."""
    kinds = [what for attr, what in _HOOKS.items() if getattr(bn, attr, None)]
    if kinds:
        warnings.warn(f"bnfold: BatchNorm `{path}` was folded and no longer exists; its hooks "
                      f"({', '.join(kinds)}) will not run; register them on the layer it folded into", stacklevel=4)


def bias_requires_grad(mod: nn.Module, edits: list[Edit], bn_of) -> bool:
    """The fused bias's ``requires_grad``, as ``torch.nn.utils.fusion`` keeps it: the layer's own
    bias's flag; a layer without bias gets the folded BNs' β flag (its shift is β's), False without β."""
    if mod.bias is not None:
        return mod.bias.requires_grad
    betas = [getattr(bn_of(e.bn), "bias", None) for e in edits]
    return any(isinstance(b, torch.Tensor) and b.requires_grad for b in betas)


def _fold_module(mod: nn.Module, edits: list[Edit], scale_shift, bn_of) -> None:
    """Every edit aimed at ``mod``, in float64, cast back once. Weights past FOLD_CACHE_BYTES of
    float64 are folded in cache-sized blocks of rows (13× faster than one pass on a 4096×4096×3×3
    weight: the float64 block stays in cache), into a new tensor, or into the module's own tensors
    past FOLD_BLOCK_BYTES (no second copy of a large weight). Each parameter keeps its
    ``requires_grad`` (``bias_requires_grad`` for the fused bias)."""
    like = mod.weight
    groups = getattr(mod, "groups", 1)
    transposed = bn_kinds.is_transposed(mod)
    rows = _row_block(like, groups, transposed)
    grad_b = bias_requires_grad(mod, edits, bn_of)
    with torch.no_grad():
        if rows is None:  # the whole weight at once
            w, b = _fold_rows(like, mod.bias, edits, scale_shift, transposed, groups, 0, like.shape[0])
            mod.weight = nn.Parameter(fold_math.cast_like(w, like), requires_grad=like.requires_grad)
            mod.bias = nn.Parameter(fold_math.cast_like(b, like), requires_grad=grad_b)
            return
        in_place = like.numel() * 8 > FOLD_BLOCK_BYTES
        weight = like.data if in_place else torch.empty_like(like)
        bias = mod.bias if in_place and mod.bias is not None else None
        new_bias = torch.empty(like.shape[0], dtype=like.dtype, device=like.device) if bias is None else bias.data
        if all(e.op == "backward" for e in edits):  # the common case: rows scaled in one reused float64 block
            _scale_blocks(like, mod.bias, [scale_shift(e, like.device) for e in edits], rows, weight, new_bias)
        else:
            for r0 in range(0, like.shape[0], rows):  # blocks of whole groups of output rows
                r1 = min(r0 + rows, like.shape[0])
                w, b = _fold_rows(like, mod.bias, edits, scale_shift, transposed, groups, r0, r1)
                weight[r0:r1] = fold_math.cast_like(w, like)
                new_bias[r0:r1] = fold_math.cast_like(b, like)
                del w, b
        if not in_place:
            mod.weight = nn.Parameter(weight, requires_grad=like.requires_grad)
        mod.bias = bias if bias is not None else nn.Parameter(new_bias, requires_grad=grad_b)


def _apply_merge(model: nn.Module, m: Merge, by_target: dict, scale_shift) -> None:
    """The target conv of ``m`` becomes the sum of every branch (each after its own edits, float64,
    cast once); the other branch convs become ``ZeroBranch``es."""
    target = model.get_submodule(m.target)
    branches = ((m.target, 1),) + m.parts
    parts = []
    for path, sign in branches:
        conv = model.get_submodule(path)
        w, b = _fold_rows(conv.weight, conv.bias, by_target.get(path, []), scale_shift, False, conv.groups,
                          0, conv.weight.shape[0])
        parts.append((w, b, conv.groups, sign))
    like = target.weight
    with torch.no_grad():
        w, b = fold_math.merge_branches(parts, tuple(like.shape[2:]), m.groups)
        target.weight = nn.Parameter(fold_math.cast_like(w, like), requires_grad=like.requires_grad)
        edits = [e for path, _ in branches for e in by_target.get(path, [])]
        target.bias = nn.Parameter(fold_math.cast_like(b, like), requires_grad=bias_requires_grad(target, edits, model.get_submodule))
    target.groups = m.groups
    del parts, w, b
    for path, _ in m.parts:
        _set_submodule(model, path, ZeroBranch(model.get_submodule(path)))


def _scale_blocks(like, bias, scale_shifts: list, rows: int, weight, new_bias) -> None:
    """Backward folds only (not transposed): ``weight`` = the rows of ``like`` scaled block by block in
    one float64 buffer (a new block per step would be a fresh allocation each, which this machine
    pays in page faults: 1.5 s instead of 0.14 s per 4096×4096×3×3 weight); the bias at once."""
    b = fold_math.bias64(None if bias is None else bias.detach(), like.shape[0], like)
    for s, t in scale_shifts:
        b = fold_math.backward_bias(b, s, t)
    buf = torch.empty(rows * like[0].numel(), dtype=torch.float64, device=like.device)
    for r0 in range(0, like.shape[0], rows):
        r1 = min(r0 + rows, like.shape[0])
        fold_math.scale_rows_(weight[r0:r1], like.detach()[r0:r1], [s[r0:r1] for s, _ in scale_shifts], buf)
    new_bias.copy_(fold_math.cast_like(b, like))


FOLD_BLOCK_BYTES = 256 << 20  # float64 size above which a weight is folded into its own tensor (no second copy)
FOLD_CACHE_BYTES = 4 << 20  # float64 rows per block: the block stays in cache (benchmarks/PROFILE.md)


def _row_block(weight: torch.Tensor, groups: int, transposed: bool) -> int | None:
    """Rows (output channels, whole groups) per block for a weight whose float64 copy exceeds
    FOLD_CACHE_BYTES; None to fold it at once (small weights, and ConvTranspose, whose output
    channels are not its rows). Every row's fold reads only that row (and the BN's s, t), so blocks
    give the same values as one pass (bit for bit), with one block of float64 alive instead of the
    whole weight."""
    if transposed or weight.dim() < 2 or weight.numel() * 8 <= FOLD_CACHE_BYTES:
        return None
    row_bytes = weight[0].numel() * 8
    if groups == 1:  # any rows
        return max(1, FOLD_CACHE_BYTES // row_bytes)
    per_group = weight.shape[0] // groups
    return per_group * max(1, FOLD_CACHE_BYTES // (row_bytes * per_group))


def _fold_rows(weight, bias, edits, scale_shift, transposed: bool, groups: int, r0: int, r1: int):
    """float64 (W', b') of output rows r0:r1 after every edit (forward, backward, identity order).
    With groups, r0:r1 spans whole groups: the forward fold reads only their input channels.
    (ConvTranspose is always folded whole: its rows are input channels.)"""
    whole = r0 == 0 and r1 == weight.shape[0]
    rows = slice(None) if whole else slice(r0, r1)  # bias and BN channels are output channels, not rows, for ConvTranspose
    w = weight.detach()[rows].to(torch.float64)
    b = None if bias is None else bias.detach()[rows].to(torch.float64)
    per_group = weight.shape[0] // groups
    g = (r1 - r0) // per_group if groups > 1 else 1  # the groups in the block
    g0 = r0 // per_group
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

