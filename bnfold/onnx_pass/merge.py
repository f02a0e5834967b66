"""Structural re-parameterisation in the ONNX pass: a sum of linear maps of the same input becomes one Conv.

Two rewrites, run by ``fold.fold_graph`` around the BN rules, on exported files and ONNX-in files alike:

* ``drop_zero_adds``: ``Add(y, Z)``, ``Add(Z, y)`` and ``Sub(y, Z)`` become ``y`` when ``Z`` is zeros
  (a constant, or a Shape → Expand / ConstantOfShape chain, as the exporter writes a ``ZeroBranch``)
  that does not change ``y``'s shape by broadcasting.
* ``merge_sums``: in a tree of Add/Sub/Sum, the terms that read the same x (Convs with constant
  weights, an unfolded BatchNormalization of x, x itself: a skip) become one Conv, the one with the
  largest kernel, every other kernel regrouped, centred and added to it, biases summed
  (``fold_math.merge_branches``, float64, cast once); the other terms of the tree stay, added to it.
  Strides and dilations must be equal and paddings aligned (pad_i = pad − (k − k_i)/2·dilation, on
  each side); an identity term (BN, skip) needs in = out channels, stride 1 and a centred kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bnfold.fold_math import identity_kernel, merge_branches, merge_linear_branches
from bnfold.onnx_pass.core import ONNX_DOMAINS, Ctx, attr, bn_params, f64, node_name, value_name
from bnfold.onnx_pass.rules import conv_backward, conv_weights, gemm_backward, gemm_weights, producer
from bnfold.plan import Unmerged
from bnfold.rule import NoMatch

_SUMS = ("Add", "Sub", "Sum")
_ZERO_CHAIN = ("Identity", "Cast", "CastLike", "Reshape", "Expand", "Unsqueeze", "Squeeze", "Flatten")


# ------------------------------------------------------------------------------------- zero adds
def is_zero(ctx: Ctx, v, depth: int = 0) -> bool:
    """``v`` is all zeros whatever the inputs: a constant, or zeros carried through shape-only ops."""
    if v is None or v.is_graph_input() or depth > 16:
        return False
    node = v.producer()
    if node is not None and node.domain in ONNX_DOMAINS:
        if node.op_type == "ConstantOfShape":
            val = node.attributes.get("value")
            return val is None or not np.any(np.asarray(val.value.numpy()))
        if node.op_type in _ZERO_CHAIN and node.inputs and is_zero(ctx, node.inputs[0], depth + 1):
            return True
    arr, why = ctx.const(v)
    return why is None and arr.size > 0 and arr.dtype.kind in "fiu" and not np.any(arr)


def _keeps_shape(ctx: Ctx, y, z) -> bool:
    """Whether broadcasting ``z`` against ``y`` gives ``y``'s shape (each z dim 1 or y's own)."""
    zs = ctx.shape(z)
    if zs is None:
        arr, why = ctx.const(z)
        zs = None if why else arr.shape
    if zs is None:
        return False
    ys = ctx.shape(y)
    if ys is None or len(zs) > len(ys):
        return False
    return all(b == 1 or (a is not None and a == b) for a, b in zip(reversed(ys), reversed(zs)))


def _bypass(ctx: Ctx, node, keep) -> bool:
    """``node``'s readers read ``keep`` instead; ``node`` goes. False (nothing done) when its output
    is a graph output whose name ``keep`` cannot take."""
    import onnx_ir as ir

    out = node.outputs[0]
    if out.is_graph_output():
        if keep.is_graph_input() or keep.is_graph_output() or keep.is_initializer() or keep.producer() is None:
            return False
        ir.convenience.replace_nodes_and_values(ctx.graph, node, [node], [], [out], [keep])
        return True
    ir.convenience.replace_all_uses_with(out, keep)
    ctx.graph.remove(node, safe=True)
    return True


def drop_zero_adds(ctx: Ctx) -> int:
    """Remove every Add/Sub of zeros that keeps the other operand's shape; returns how many."""
    n = 0
    for node in list(ctx.graph):
        if node.op_type not in ("Add", "Sub") or node.domain not in ONNX_DOMAINS or len(node.inputs) != 2:
            continue
        a, b = node.inputs
        order = [(a, b), (b, a)] if node.op_type == "Add" else [(a, b)]
        for keep, z in order:
            if keep is not None and is_zero(ctx, z) and _keeps_shape(ctx, keep, z):
                n += _bypass(ctx, node, keep)
                break
    return n


# ------------------------------------------------------------------- constant affine after a conv
def _per_channel(arr: np.ndarray, rank: int | None, c: int) -> np.ndarray | None:
    """``arr`` as one value per channel on axis 1 of a rank-``rank`` output (broadcast from a
    scalar or a (…, C, 1…) tensor that does not widen the output), float64; None when it is not one."""
    if rank is None or arr.ndim > rank or arr.dtype.kind != "f":
        return None
    shape = (1,) * (rank - arr.ndim) + tuple(arr.shape)
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, c):
        return None
    return np.broadcast_to(arr.astype(np.float64).reshape(-1), (c,)).copy()


def fold_affine_after(ctx: Ctx) -> int:
    """Conv/Gemm → Mul, Div, Add or Sub by a constant per output channel (a layer scale, a bias, the
    mean of two heads), folded into the weights as the backward BN fold with (s, t):
    Mul s = c, Div s = 1/c, Add t = c, Sub t = −c (the producer its first input). Returns how many."""
    n = 0
    for node in list(ctx.graph):
        if node.op_type not in ("Mul", "Div", "Add", "Sub") or node.domain not in ONNX_DOMAINS or len(node.inputs) != 2:
            continue
        for k in ((0, 1) if node.op_type in ("Mul", "Add") else (0,)):
            v = node.inputs[k]
            if v is None:
                continue
            try:
                p = producer(ctx, v, ("Conv", "Gemm"))  # read by this node alone, in this graph
                if _fold_into(ctx, node, p, ctx.need_const(node.inputs[1 - k], "the other operand")):
                    n += _bypass(ctx, node, v)
                    break
            except NoMatch:
                continue
    return n


def _fold_into(ctx: Ctx, node, p, arr: np.ndarray) -> bool:
    """Fold ``node`` (``p``'s output op the constant ``arr``) into ``p``'s weights; False when ``arr``
    is not one value per output channel (or divides by zero)."""
    if p.op_type == "Conv":
        cw = conv_weights(ctx, p)
        c, rank = cw.out_channels, ctx.rank(p.outputs[0])
    else:
        cw = gemm_weights(ctx, p, f"Gemm '{node_name(p)}'")
        c, rank = cw.b.shape[0] if cw.trans_b else cw.b.shape[1], 2
    vec = _per_channel(arr, rank, c)
    if vec is None or (node.op_type == "Div" and not np.all(np.isfinite(1 / vec))):
        return False
    one, zero = np.ones(c), np.zeros(c)
    s, t = {"Mul": (vec, zero), "Div": (1 / vec, zero), "Add": (one, vec), "Sub": (one, -vec)}[node.op_type]
    (conv_backward if p.op_type == "Conv" else gemm_backward)(ctx, cw, f64(s), f64(t))
    return True


# ----------------------------------------------------------------------------------- the merge
@dataclass
class Term:
    """A term of a sum: ``value`` with ``sign``; ``kind`` "conv" (``node`` a Conv on ``x``), "bn" (an
    unfolded BatchNormalization of ``x``, ``st`` its (s, t)), "skip" (``x`` itself), "other"."""

    value: Any
    sign: int
    kind: str = "other"
    x: Any = None
    node: Any = None
    st: Any = None
    geo: dict = field(default_factory=dict)


@dataclass
class Merged:
    """One merge done: the Conv (or Gemm) that stays (``target``, its node name kept), the nodes it
    absorbed (``convs``: (name, sign relative to the target's)) and the BatchNormalization nodes."""

    target: str
    convs: list[tuple[str, int]]
    bns: list[Any]
    groups: int


def _is_sum(ctx: Ctx, node) -> bool:
    return node.op_type in _SUMS and node.domain in ONNX_DOMAINS and ctx.owns(node) and (node.op_type != "Sub" or len(node.inputs) == 2)


def _inner(ctx: Ctx, v) -> bool:
    """``v`` is read once, by a sum node: its own sum continues in that one."""
    use = ctx.reader(v)
    return use is not None and _is_sum(ctx, use[0])


def _tree(ctx: Ctx, root) -> tuple[list, list[Term]]:
    """The sum nodes of the tree ending at ``root`` and its terms."""
    nodes, terms = [], []

    def expand(node, sign):
        nodes.append(node)
        for k, v in enumerate(node.inputs):
            s = -sign if node.op_type == "Sub" and k == 1 else sign
            p = v.producer() if v is not None else None
            if p is not None and _is_sum(ctx, p) and _inner(ctx, v):
                expand(p, s)
            else:
                terms.append(Term(v, s))

    expand(root, 1)
    return nodes, terms


def _geometry(ctx: Ctx, node) -> dict:
    """A Conv's constant weights and layout, or NoMatch."""
    cw = conv_weights(ctx, node)
    n = cw.w.ndim - 2
    auto = attr(node, "auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto not in ("NOTSET", "VALID"):
        raise NoMatch(f"Conv '{node_name(node)}' has auto_pad={auto}")
    pads = [0] * (2 * n) if auto == "VALID" else [int(p) for p in (attr(node, "pads", None) or [0] * (2 * n))]
    return {"w": cw.w, "b": cw.b, "k": tuple(cw.w.shape[2:]), "pads": pads, "group": int(attr(node, "group", 1)),
            "strides": tuple(int(s) for s in (attr(node, "strides", None) or [1] * n)),
            "dilations": tuple(int(d) for d in (attr(node, "dilations", None) or [1] * n))}


def _classify(ctx: Ctx, t: Term) -> None:
    v = t.value
    if v is None:
        return
    try:
        p = producer(ctx, v, ("Conv", "BatchNormalization", "Gemm"))
        if p.op_type == "Conv" and len(p.inputs) >= 2:
            t.geo, t.kind = _geometry(ctx, p), "conv"
        elif p.op_type == "BatchNormalization":
            t.st, t.kind = bn_params(ctx, p), "bn"
        elif p.op_type == "Gemm" and not int(attr(p, "transA", 0)):
            g = gemm_weights(ctx, p, f"Gemm '{node_name(p)}'")
            n = g.b.shape[0] if g.trans_b else g.b.shape[1]
            if g.c is not None and g.c.size not in (1, n):
                return
            t.geo = {"b": g.b.T if g.trans_b else g.b, "c": g.c, "alpha": float(attr(p, "alpha", 1.0)), "beta": float(attr(p, "beta", 1.0))}
            t.kind = "gemm"
        else:
            return
    except NoMatch:
        return
    t.node, t.x = p, p.inputs[0]


def merge_sums(ctx: Ctx, unmerged: list) -> list[Merged]:
    """Merge the terms of every sum tree that read the same x into one Conv (or one Gemm);
    ``unmerged`` gets the reason of every group that cannot merge."""
    done = []
    roots = [n for n in ctx.graph if _is_sum(ctx, n) and not _inner(ctx, n.outputs[0])]
    for root in roots:
        nodes, terms = _tree(ctx, root)
        for t in terms:
            _classify(ctx, t)
        keys = list(dict.fromkeys((t.kind, id(t.x)) for t in terms if t.kind in ("conv", "gemm")))
        for kind, xid in keys:
            x = next(t.x for t in terms if t.kind == kind and id(t.x) == xid)
            if kind == "conv":
                for t in terms:
                    if t.kind == "other" and t.value is x:
                        t.kind, t.x = "skip", x
            family = ("conv", "bn", "skip") if kind == "conv" else ("gemm",)
            group = [t for t in terms if t.kind in family and t.x is x]
            if len(group) < 2:
                continue
            try:
                node, merged = (_merge_convs if kind == "conv" else _merge_gemms)(ctx, root, group)
            except NoMatch as nm:
                unmerged.append(Unmerged(tuple(node_name(t.node) for t in group if t.kind == kind), nm.reason))
                continue
            _rebuild(ctx, root, nodes, terms, group, node)
            done.append(merged)
            break  # the tree is rewritten: its other groups wait for the next round
    return done


def _merge_plan(group: list[Term]) -> tuple[Term, tuple, int]:
    """(target, its kernel size, common groups) for ``group``, or NoMatch with what does not fit."""
    convs = [t for t in group if t.kind == "conv"]
    ref = convs[0]
    cin = ref.geo["w"].shape[1] * ref.geo["group"]
    cout = ref.geo["w"].shape[0]
    for t in convs:
        g = t.geo
        if (g["w"].shape[1] * g["group"], g["w"].shape[0]) != (cin, cout) or g["w"].ndim != ref.geo["w"].ndim:
            raise NoMatch(f"Convs '{node_name(ref.node)}' and '{node_name(t.node)}' map different channels")
        for key in ("strides", "dilations"):
            if g[key] != ref.geo[key]:
                raise NoMatch(f"Convs '{node_name(ref.node)}' and '{node_name(t.node)}' have different {key}: {ref.geo[key]} and {g[key]}")
    size = tuple(max(t.geo["k"][d] for t in convs) for d in range(len(ref.geo["k"])))
    tops = [t for t in convs if t.geo["k"] == size]
    if not tops:
        raise NoMatch(f"kernels {[t.geo['k'] for t in convs]}: none holds the others")
    ident = [t for t in group if t.kind != "conv"]
    groups = min([t.geo["group"] for t in convs] + ([cout] if ident else []))
    if any(t.geo["group"] % groups for t in convs):
        raise NoMatch(f"Convs with groups {sorted({t.geo['group'] for t in convs})}: no exact common grouping")
    target = next((t for t in tops if t.geo["group"] == groups), tops[0])
    pads, dil, n = target.geo["pads"], target.geo["dilations"], len(size)
    for t in convs:
        off = [(s - k) for s, k in zip(size, t.geo["k"])]
        need = [pads[i] - off[i % n] // 2 * dil[i % n] for i in range(2 * n)]
        if any(o % 2 for o in off) or t.geo["pads"] != need:
            raise NoMatch(f"Conv '{node_name(t.node)}' (kernel {t.geo['k']}, pads {t.geo['pads']}) does not align with "
                          f"'{node_name(target.node)}' (kernel {size}, pads {pads})")
    if ident:
        centred = [(size[i % n] - 1) // 2 * dil[i % n] for i in range(2 * n)]
        what = "a skip" if ident[0].kind == "skip" else f"BatchNormalization '{node_name(ident[0].node)}'"
        if cin != cout or any(s != 1 for s in target.geo["strides"]) or any(k % 2 == 0 for k in size) or pads != centred:
            raise NoMatch(f"{what} on the input of '{node_name(target.node)}' needs a centred stride-1 {cin}→{cin} conv "
                          f"(it is {cin}→{cout}, strides {target.geo['strides']}, kernel {size}, pads {pads})")
    return target, size, groups


def _merge_convs(ctx: Ctx, root, group: list[Term]):
    """The one Conv for ``group`` (it keeps the target's name and attributes) and its record."""
    import onnx_ir as ir

    target, size, groups = _merge_plan(group)
    n, dt = len(size), target.geo["w"].dtype
    parts = []
    for t in group:
        if t.kind == "conv":
            g = t.geo
            parts.append((f64(g["w"]), f64(g["b"]), g["group"], t.sign))
        else:
            s, sh = t.st if t.kind == "bn" else (f64(np.ones(target.geo["w"].shape[0])), None)
            parts.append((identity_kernel(s, n), sh, s.numel(), t.sign))
    w, b = merge_branches(parts, size, groups)
    tnode = target.node
    wv = ctx.new_const(value_name(tnode.inputs[1]), w.numpy().astype(dt), root)
    bv = ctx.new_const(node_name(tnode) + "_bias", b.numpy().astype(dt), root)
    attrs = [a for a in tnode.attributes.values() if a.name != "group"] + [ir.AttrInt64("group", groups)]
    conv = ir.Node(tnode.domain, "Conv", [target.x, wv, bv], attrs, name=node_name(tnode), metadata_props=dict(tnode.metadata_props))
    return conv, Merged(node_name(tnode), [(node_name(t.node), t.sign * target.sign) for t in group if t.kind == "conv" and t is not target],
                        [t.node for t in group if t.kind == "bn"], groups)


def _merge_gemms(ctx: Ctx, root, group: list[Term]):
    """The one Gemm for Gemms on the same input (transA = 0): op(B) = Σ ±α_i·op(B_i), C = Σ ±β_i·C_i."""
    import onnx_ir as ir

    shapes = {t.geo["b"].shape for t in group}
    if len(shapes) != 1:
        raise NoMatch(f"Gemms with B of shapes {sorted(shapes)}")
    target = group[0]
    dt = target.geo["b"].dtype
    parts = [(f64(t.geo["b"]), f64(t.geo["c"]), t.geo["alpha"], t.geo["beta"], t.sign) for t in group]
    b, c = merge_linear_branches(parts)
    tnode = target.node
    bv = ctx.new_const(value_name(tnode.inputs[1]), b.numpy().astype(dt), root)
    cv = ctx.new_const(node_name(tnode) + "_C", c.numpy().astype(dt), root)
    gemm = ir.Node(tnode.domain, "Gemm", [target.x, bv, cv], name=node_name(tnode), metadata_props=dict(tnode.metadata_props))
    return gemm, Merged(node_name(tnode), [(node_name(t.node), t.sign * target.sign) for t in group[1:]], [], 1)


def _rebuild(ctx: Ctx, root, nodes: list, terms: list[Term], group: list[Term], new) -> None:
    """``new`` (computing the sum of ``group``) plus the tree's other terms replace the tree."""
    import onnx_ir as ir

    out = next(t.node.outputs[0] for t in group if t.node is not None and node_name(t.node) == new.name)
    new.outputs[0].name, new.outputs[0].type, new.outputs[0].shape = ctx.fresh(out.name or node_name(new)), out.type, out.shape
    added, y = [new], new.outputs[0]
    for t in terms:
        if any(t is m for m in group):
            continue
        add = ir.Node("", "Add" if t.sign > 0 else "Sub", [y, t.value], name=ctx.fresh(node_name(root)))
        add.outputs[0].name, add.outputs[0].type = ctx.fresh(value_name(root.outputs[0])), root.outputs[0].type
        added.append(add)
        y = add.outputs[0]
    old = nodes + [t.node for t in group if t.node is not None]
    ir.convenience.replace_nodes_and_values(ctx.graph, root, old, added, [root.outputs[0]], [y])


def restructure(ctx: Ctx) -> tuple[int, list[Merged], list[Unmerged]]:
    """Zero adds dropped, constant affine ops after convs folded, then sums merged, until nothing
    changes: (nodes dropped, merges done, the groups that stay and why)."""
    zeros, merges = 0, []
    for _ in range(64):
        unmerged: list[Unmerged] = []
        z = drop_zero_adds(ctx) + fold_affine_after(ctx)
        m = merge_sums(ctx, unmerged)
        zeros, merges = zeros + z, merges + m
        if not z and not m:
            break
    return zeros, merges, unmerged
