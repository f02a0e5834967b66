"""Structural re-parameterisation in the PyTorch pass: parallel conv branches on the same input that
sum into one tensor become one conv. Found in the traced graph (any model with the pattern: RepVGG,
MobileOne, RepGhost, RepViT, FastViT, …), not from a list of classes.

Runs after the BN rules. A branch is a conv reading x, summed directly or through its own BN that
folded backward into it (``plan.edits``); BN-only branches on x have already joined one of these convs
(rule ``identity-branch``). The conv with the largest kernel is the target: each other branch's
kernel, after its own edits, is regrouped, centred and added to it, biases summed
(``fold_math.merge_branches``, applied by ``fold._apply``); its module becomes a ``ZeroBranch``, whose
zeros and Add the ONNX pass removes. A plain skip (x itself in the sum) stays in the PyTorch module:
only the ONNX pass can drop its Add. What the algebra does not allow (a non-linear op in a branch,
different strides, paddings that do not align) stays, its reason in ``plan.unmerged``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from bnfold.plan import IDENTITY_BRANCH, MERGED_BRANCH, Merge, Unmerged
from bnfold.rule import NoMatch
from bnfold.torch_pass import bn_kinds
from bnfold.torch_pass.rules import Context, is_sum, strip_identity, sum_root, sum_terms


@dataclass
class ConvBranch:
    """One term of a sum that is a conv on ``x``: ``bn`` its own BN folded backward into it (None:
    the conv is summed directly); ``sign``: ±1 in the sum."""

    conv: str
    sign: int
    bn: str | None
    x: object


def merge_parallel_branches(ctx: Context) -> None:
    """Every sum of the traced graph: its conv branches that read the same input merge into one
    (``plan.merges``), or stay with the reason (``plan.unmerged``)."""
    g = ctx.g
    edits_of: dict[str, list] = {}
    for e in ctx.plan.edits:
        edits_of.setdefault(e.bn, []).append(e)
    # a BN folded backward into one conv, whole (not a concat's slices, not a sum's several branches)
    backward = {bn: es[0].target for bn, es in edits_of.items() if len(es) == 1 and es[0].op == "backward" and es[0].sl is None}
    identity = {f.bn for f in ctx.plan.folded if f.rule == IDENTITY_BRANCH}
    roots = dict.fromkeys(sum_root(g, n) for n in g.graph.nodes if g.module_of(n) is None and is_sum(g, n))
    for root in roots:
        by_x, others = {}, []  # the conv branches by the input they read; the other terms and why
        for leaf, sign in sum_terms(g, root):
            try:
                b = _conv_branch(ctx, leaf, sign, backward, identity)
            except NoMatch as nm:
                others.append((leaf, nm.reason))
                continue
            if b is not None:
                by_x.setdefault(b.x, []).append(b)
        for x, group in by_x.items():
            _merge_group(ctx, group, [why for leaf, why in others if _reaches(g, leaf, x)])


def _merge_group(ctx: Context, group: list[ConvBranch], notes: list[str]) -> None:
    names = tuple(b.conv for b in group)
    if notes:  # branches on the same x that cannot join (they stay beside the merged conv)
        ctx.plan.unmerged.append(Unmerged(names, "; ".join(notes)))
    if len(group) < 2:
        return
    try:
        m = _merge(ctx, group)
    except NoMatch as nm:
        ctx.plan.unmerged.append(Unmerged(names, nm.reason))
        return
    ctx.plan.merges.append(m)
    gone = {p for p, _ in m.parts}
    their_bn = {b.bn for b in group if b.conv in gone and b.bn is not None}
    tname = type(ctx.module(m.target)).__name__
    for f in ctx.plan.folded:
        if f.bn in their_bn:
            f.rule, f.into, f.into_type = MERGED_BRANCH, [m.target], [tname]
        elif any(i in gone for i in f.into):  # e.g. an identity branch that joined a merged conv
            into = list(dict.fromkeys(m.target if i in gone else i for i in f.into))
            f.into, f.into_type = into, [type(ctx.module(i)).__name__ for i in into]


def _reaches(g, leaf, x, depth: int = 4) -> bool:
    """Whether the branch ``leaf`` reads ``x`` within ``depth`` nodes (a non-linear branch on x)."""
    if strip_identity(g, leaf) is x:
        return False  # a plain skip: it stays, nothing to say
    frontier = [leaf]
    for _ in range(depth):
        frontier = [i for n in frontier for i in n.all_input_nodes]
        if any(n is x for n in frontier):
            return True
    return False


def _conv_branch(ctx: Context, leaf, sign: int, backward: dict, identity: set) -> ConvBranch | None:
    """The conv branch that the sum term ``leaf`` is; None for a term with nothing to merge (a
    ``ZeroBranch``, an identity BN already inside a conv of the sum); NoMatch(why) for a term that
    is not a linear conv branch."""
    g = ctx.g
    own = g.owner(leaf)
    if own is None:
        if isinstance(g.module_of(leaf), bn_kinds.ZeroBranch):
            return None
        raise NoMatch(f"{g.what(leaf)} in a branch is not linear")
    path, mod = own[0], ctx.module(own[0])
    if len(g.data_users(leaf, own)) != 1:
        raise NoMatch(f"branch `{path}`'s output is also used outside the sum")
    bn = None
    if bn_kinds.is_batchnorm(mod):
        if path in identity:
            return None
        if path not in backward:
            raise NoMatch(f"BN `{path}` is not folded into a conv of the branch")
        if not bn_kinds.remainder_is_identity(mod):
            act = getattr(mod, "act", None)
            raise NoMatch(f"`{path}` applies {type(act).__name__ if act is not None else 'more'} after normalising (not linear)")
        bn, path = path, backward[path]
        mod = ctx.module(path)
    if not bn_kinds.is_conv(mod):
        raise NoMatch(f"branch `{path}` ({type(mod).__name__}) is not a Conv")
    calls = g.calls[path]
    call = next(iter(calls.values()))
    if len(calls) != 1 or len(call.inputs) != 1:
        raise NoMatch(f"branch `{path}` is called {len(calls)} times or reads {len(call.inputs)} inputs")
    return ConvBranch(path, sign, bn, strip_identity(g, call.inputs[0]))


def _padding(path: str, conv: nn.Module) -> tuple[int, ...]:
    if conv.padding == "same" and any(d * (k - 1) % 2 for k, d in zip(conv.kernel_size, conv.dilation)):
        raise NoMatch(f"branch `{path}` pads 'same' around an even kernel extent "
                      "(one side more than the other)")
    return bn_kinds.padding(conv)


_SAME = ("in_channels", "out_channels", "stride", "dilation", "padding_mode")


def _merge(ctx: Context, group: list[ConvBranch]) -> Merge:
    """The merge of ``group`` (convs on the same x), or NoMatch with what the algebra does not allow."""
    mods = [ctx.module(b.conv) for b in group]
    for b, m in zip(group, mods):
        pk, why = bn_kinds.producer_kind(m)
        if pk is None or pk.backward:
            raise NoMatch(f"branch `{b.conv}` ({type(m).__name__}) {why or (pk.backward if pk else 'is not a plain Conv')}")
        ctx.check_untied(b.conv, "branch")
        if bn_kinds.base_type(m) is not bn_kinds.base_type(mods[0]):
            raise NoMatch(f"branches `{group[0].conv}` and `{b.conv}` are {bn_kinds.base_type(mods[0]).__name__} and {bn_kinds.base_type(m).__name__}")
        for a in _SAME:
            if getattr(m, a) != getattr(mods[0], a):
                raise NoMatch(f"branches `{group[0].conv}` and `{b.conv}` have different {a}: {getattr(mods[0], a)} and {getattr(m, a)}")
    kernels = [tuple(m.kernel_size) for m in mods]
    size = tuple(max(k[d] for k in kernels) for d in range(len(kernels[0])))
    groups = min(m.groups for m in mods)
    if any(m.groups % groups for m in mods):
        raise NoMatch(f"branches with groups {sorted({m.groups for m in mods})}: not all multiples of {groups} (no exact common grouping)")
    tops = [i for i, k in enumerate(kernels) if k == size]
    if not tops:
        raise NoMatch(f"kernels {kernels}: none holds the others ({size} would)")
    t = next((i for i in tops if mods[i].groups == groups), tops[0])
    pad_t, dil = _padding(group[t].conv, mods[t]), tuple(mods[t].dilation)
    for b, m, k in zip(group, mods, kernels):
        pad = _padding(b.conv, m)
        if any((s - ki) % 2 for s, ki in zip(size, k)):
            raise NoMatch(f"branch `{b.conv}` kernel {k} cannot be centred in `{group[t].conv}`'s {size}")
        need = tuple(p - (s - ki) // 2 * d for p, s, ki, d in zip(pad_t, size, k, dil))
        if pad != need:
            raise NoMatch(f"branch `{b.conv}` padding {pad} does not align with `{group[t].conv}` (kernel {size}, padding {pad_t}): it needs {need}")
    parts = tuple((b.conv, b.sign * group[t].sign) for i, b in enumerate(group) if i != t)
    return Merge(group[t].conv, parts, groups)
