"""Fold BatchNormalization nodes inside an ONNX model, on onnx_ir (no PyTorch model needed).

The rules live in ``bnfold.onnx_pass.rules`` (one class per pattern, ``RULES``, on the protocol of
``bnfold.rule``): ``match`` returns the rule's match (the nodes) or raises ``NoMatch`` (why);
``rewrite`` applies ``fold_math`` in float64 and casts once to each weight's dtype. This module runs
them over every BatchNormalization node of every graph-like the one traversal (``io.walk``) visits:
the main graph, If/Loop/Scan bodies and model-local functions (each node gets exactly one plan entry), removes what ends up unused, and reads/writes files.
New weights are new tensors: a tensor shared with other nodes is never edited. Graph input/output
names and opsets are kept.
"""

from __future__ import annotations

import functools
from pathlib import Path

from bnfold.edges.files import OutputSet
from bnfold.edges.paths import check_run_paths, spec_files
from bnfold.errors import first_line
from bnfold.onnx_pass.core import BN, ONNX_DOMAINS, Ctx, bn_params, node_name, trim_unused_outputs
from bnfold.onnx_pass.io import initializer_bytes, load_onnx, save_onnx, walk
from bnfold.onnx_pass.rules import RULES
from bnfold.onnx_pass.merge import Merged, restructure
from bnfold.plan import IDENTITY_BRANCH, MERGED_BRANCH, Folded, FoldPlan, Merge, Unfolded, Unmerged, folded_entry
from bnfold.rule import NoMatch, Outcome, Rule, try_rules


def fold_graph(ctx: Ctx, plan: FoldPlan, record: dict | None = None) -> None:
    """Fold every BN node of one graph-like; ``record[id(node)] = (node, entry)`` when given.

    After the BN rules, the structural pass (``merge.restructure``) drops zero adds and merges sums
    of linear maps of one input into one Conv; BN nodes left are then tried again (a BN after a sum
    that became one Conv folds into it), until nothing changes."""
    bns = [n for n in ctx.graph if n.op_type == "BatchNormalization" and n.domain in ONNX_DOMAINS]
    entries = {id(bn): [bn, ctx.prefix + node_name(bn), None] for bn in bns}
    trimmed = [ctx.prefix + node_name(bn) for bn in bns if trim_unused_outputs(ctx, bn)]
    if trimmed:
        plan.graph_edits += len(trimmed)
        plan.repairs.append(f"repaired: dropped the unused optional outputs of {len(trimmed)} BatchNormalization node(s) "
                            f"({', '.join(trimmed[:3])}{', …' if len(trimmed) > 3 else ''}): inference mode, one output")
    left, unmerged = list(entries.values()), []
    for _ in range(8):
        for e in left:
            e[2] = _fold_one(ctx, e[0], e[1])
        zeros, merges, unmerged = restructure(ctx)
        plan.graph_edits += zeros + len(merges)
        _record_merges(ctx, merges, entries, plan)
        left = [e for e in entries.values() if isinstance(e[2], Unfolded)]
        if not (zeros or merges) or not left:
            break
    plan.unmerged.extend(Unmerged(tuple(ctx.prefix + b for b in u.branches), u.reason) for u in unmerged)
    for bn, _, entry in entries.values():
        (plan.folded if isinstance(entry, Folded) else plan.unfolded).append(entry)
        if record is not None:
            record[id(bn)] = (bn, entry)


def _record_merges(ctx: Ctx, merges: list[Merged], entries: dict, plan: FoldPlan) -> None:
    """Plan entries after merges: a BN absorbed as an identity branch folded into the target; a BN
    folded into a conv that merged away folded into the target (``backward`` → ``merged-branch``)."""
    for m in merges:
        target = ctx.prefix + m.target
        merged = {target} | {ctx.prefix + c for c, _ in m.convs}
        plan.merges.append(Merge(target, tuple((ctx.prefix + c, sign) for c, sign in m.convs), m.groups))
        absorbed = {id(b) for b in m.bns}
        for e in entries.values():
            name, entry = e[1], e[2]
            if id(e[0]) in absorbed:
                e[2] = folded_entry(name, [target], IDENTITY_BRANCH, ["Conv"])
            elif isinstance(entry, Folded) and any(i in merged for i in entry.into):
                pairs = dict.fromkeys((target if i in merged else i, ty) for i, ty in zip(entry.into, entry.into_type))
                rule = MERGED_BRANCH if entry.rule == "backward" and target not in entry.into else entry.rule
                e[2] = folded_entry(name, [i for i, _ in pairs], rule, [ty for _, ty in pairs])


def _fold_one(ctx: Ctx, node, name: str):
    try:
        s, t = bn_params(ctx, node)
    except NoMatch as nm:
        return Unfolded(name, nm.reason)
    except Exception as err:  # e.g. epsilon given by a function's caller: a refusal, never a crash
        return Unfolded(name, f"cannot read the BatchNormalization node ({type(err).__name__}: {first_line(err, 160, empty='')})")
    bn = BN(node, s, t)
    out = try_rules(RULES, ctx, bn, on_error=_unreadable)
    if out.match is None:
        return Unfolded(name, _reason(out))
    nodes = out.match.nodes
    into = [ctx.prefix + node_name(n) for n in nodes]
    into_type = [n.op_type for n in nodes]
    out.rule.rewrite(ctx, bn, out.match)
    return folded_entry(name, into, out.rule.name, into_type)


def _unreadable(rule: Rule, err: Exception) -> str:
    """An odd graph is a refusal with its reason, never a crash."""
    return f"{type(rule).__name__} could not read the graph here ({type(err).__name__}: {first_line(err, 120, empty='')})"


_TARGETS = {"backward": "Conv/ConvTranspose/Gemm/MatMul/Reshape or Transpose of MatMul or Gemm/Concat of convs/Add of convs",
            "forward": "an unpadded Conv, Gemm or MatMul, or a pool before Gemm/MatMul heads"}


def _reason(out: Outcome) -> str:
    """Per side (backward, forward): the reason of the first rule whose pattern was there, else the
    generic one (what was found instead of any pattern)."""
    parts = []
    for side in ("backward", "forward"):
        fails = [f for r, f in out.failures if r.side == side]
        hit = [f for f in fails if f.applies]
        parts.append(f"{side}: {hit[0].reason if hit else f'{fails[0].reason}, not {_TARGETS[side]}'}")
    return "; ".join(parts)


def _shapes(model) -> dict[str, tuple]:
    """Shapes from ONNX shape inference on a copy (dims: int, a symbol's name, or None), for the
    MatMul and Concat rules' ranks and the zero adds' broadcasting."""
    import onnx
    import onnx_ir as ir

    if initializer_bytes(model) > 1_900_000_000:  # shape inference needs one serialised message
        return {}
    try:
        proto = ir.serde.serialize_model(model)
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=False)
    except Exception:
        return {}
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in vi.type.tensor_type.shape.dim)
    return shapes


def fold_ir(model, record: dict | None = None) -> FoldPlan:
    """Fold the BatchNormalization nodes of an ``onnx_ir.Model`` in place; return the plan.
    ``record``: filled with ``id(node) -> (node, plan entry)`` for callers that map nodes back."""
    import onnx_ir as ir
    from onnx_ir.passes.common import AddInitializersToInputsPass, RemoveInitializersFromInputsPass, RemoveUnusedNodesPass

    # IR version < 4 requires every initializer to be listed as a graph input: there the listing
    # is the format's, not a wish to override, so they count as constants (and are listed again after)
    listed_by_format = (model.ir_version or 0) < 4
    if listed_by_format:
        RemoveInitializersFromInputsPass()(model)
    plan = FoldPlan(tracer="onnx")
    names = {v.name for n in ir.traversal.RecursiveGraphIterator(model.graph) for v in n.outputs if v.name}
    names |= {v.name for v in model.graph.inputs if v.name} | set(model.graph.initializers)
    # shape inference on first need only: it serialises the whole model (a copy of every weight),
    # which a graph whose values carry their shapes (the exporter's) never needs
    inferred = functools.cache(lambda: _shapes(model))
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 21))
    ctxs = [Ctx(w.graph, main=w.graph is model.graph, prefix=w.prefix,
                opset=opset if w.function is None else w.function.opset_imports.get("", opset),
                model_names=names, inferred=inferred) for w in walk(model)]
    for ctx in ctxs:
        fold_graph(ctx, plan, record)
    if plan.folded or plan.graph_edits:
        RemoveUnusedNodesPass()(model)
    if listed_by_format:
        AddInitializersToInputsPass()(model)
    return plan


# -------------------------------------------------------------------------------------- entry points
def fold_onnx_proto(model) -> FoldPlan:
    """Fold a ``ModelProto`` in place; return the plan (every BatchNormalization node, folded or why not)."""
    import onnx_ir as ir

    m = ir.serde.deserialize_model(model)
    plan = fold_ir(m)
    if plan.folded or plan.graph_edits:
        model.CopyFrom(ir.serde.serialize_model(m))
    return plan


def fold_onnx(src, dst: str | Path) -> FoldPlan:
    """Fold the BatchNormalization nodes of ``src`` (an .onnx path, ``onnx.ModelProto`` or
    ``onnx_ir.Model``; left unchanged) and write ``dst`` atomically, with its external data if any.
    Returns the plan."""
    import onnx
    import onnx_ir as ir

    check_run_paths({"src": spec_files(src)}, {"dst": dst}, sidecars={"dst": [".data"]})
    with OutputSet() as outs:  # the model and its external data land together
        staged = outs.reserve(dst)
        repairs: list[str] = []
        if isinstance(src, ir.Model):  # folded in a copy
            src = ir.serde.serialize_model(src)
        elif not isinstance(src, onnx.ModelProto):
            src = load_onnx(src, repairs)
        model = ir.serde.deserialize_model(src)
        plan = fold_ir(model)
        plan.repairs[:0] = repairs
        save_onnx(ir.serde.serialize_model(model), staged)
        return plan
