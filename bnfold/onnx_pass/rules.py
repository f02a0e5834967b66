"""ONNX fold rules, one class per pattern: ``match(ctx, bn, s, t) -> Match | Reject`` and
``rewrite(ctx, match, s, t)``. The math is ``fold_math``'s, in float64, cast once to each weight's
dtype; each docstring holds its formula. Adding a pattern = adding a class to ``RULES`` and its test."""

from __future__ import annotations

from bnfold.fold_math import fold_backward, fold_forward, fold_gemm_backward, fold_gemm_forward
from bnfold.onnx_pass.core import ONNX_DOMAINS, Ctx, Match, Reject, attr, f64, node_name, value_name


# ------------------------------------------------------------------------------- rule helpers
def _weights(ctx: Ctx, node, what: str = "weights"):
    """(W, B or None) of a Conv-like node, or a Reject when not constant floating-point tensors."""
    w, why = ctx.const(node.inputs[1] if len(node.inputs) > 1 else None)
    if why:
        return Reject(f"{node.op_type} '{node_name(node)}' {what}: {why}")
    b = None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        b, why = ctx.const(node.inputs[2])
        if why:
            return Reject(f"{node.op_type} '{node_name(node)}' bias: {why}")
    if (w.dtype.kind != "f" and "float" not in str(w.dtype)) or w.dtype.itemsize < 2:
        return Reject(f"{node.op_type} '{node_name(node)}' weights are {w.dtype}, not 16/32/64-bit floating point")
    return w, b


def _out_channels(node, w) -> int:
    if node.op_type == "ConvTranspose":
        return w.shape[1] * int(attr(node, "group", 1))
    return w.shape[0]


def _conv_backward(ctx: Ctx, node, w, b, s, t) -> None:
    """W'[c] = W[c]·s[c], b' = b·s + t (ConvTranspose: per group on weight dim 1)."""
    w2, b2 = fold_backward(f64(w), None if b is None else f64(b), s, t,
                           transposed=node.op_type == "ConvTranspose", groups=int(attr(node, "group", 1)))
    ctx.set_input(node, 1, value_name(node.inputs[1]), w2.numpy().astype(w.dtype))
    ctx.set_input(node, 2, value_name(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else node_name(node) + "_bias",
                  b2.numpy().astype(w.dtype))


def _producer(ctx: Ctx, x, ops: tuple[str, ...]):
    """The node producing ``x`` when its op is one of ``ops`` and ``x`` has one reader, or a Reject."""
    prod = x.producer()
    if prod is None:
        return Reject("its input is a graph input or initializer", applies=False)
    if prod.op_type not in ops or prod.domain not in ONNX_DOMAINS:
        return Reject(f"its input comes from {prod.op_type} '{node_name(prod)}'", applies=False)
    why = ctx.single_use(x)
    if why:
        return Reject(why)
    if not ctx.owns(prod):
        return Reject(f"'{value_name(x)}' comes from the enclosing graph")
    return prod


# -------------------------------------------------------------------------------------- rules
class BackwardConv:
    """Conv/ConvTranspose → BN:  W'[c,…] = W[c,…]·s[c],  b'[c] = b[c]·s[c] + t[c]
    (ConvTranspose weight (in, out/group, k…): output channel g·(out/group)+j scales W[g-th block, j])."""

    name = "backward"

    def match(self, ctx, bn, s, t):
        prod = _producer(ctx, bn.inputs[0], ("Conv", "ConvTranspose"))
        if isinstance(prod, Reject):
            return prod
        wb = _weights(ctx, prod)
        if isinstance(wb, Reject):
            return wb
        if _out_channels(prod, wb[0]) != s.numel():
            return Reject(f"{prod.op_type} '{node_name(prod)}' has {_out_channels(prod, wb[0])} output channels, BN {s.numel()}")
        return Match(bn, [prod], {"wb": wb})

    def rewrite(self, ctx, m, s, t):
        _conv_backward(ctx, m.nodes[0], *m.data["wb"], s, t)
        ctx.take_over(m.bn.outputs[0], m.nodes[0].outputs[0])


class BackwardGemm:
    """Gemm → BN, Y = α·op(A)·op(B) + β·C:  op(B)'[:,n] = op(B)[:,n]·s[n],  C' = β·C·s + t,  β' = 1."""

    name = "backward"

    def match(self, ctx, bn, s, t):
        prod = _producer(ctx, bn.inputs[0], ("Gemm",))
        if isinstance(prod, Reject):
            return prod
        bw, why = ctx.const(prod.inputs[1])
        if why:
            return Reject(f"Gemm '{node_name(prod)}' B: {why}")
        c = None
        if len(prod.inputs) > 2 and prod.inputs[2] is not None:
            c, why = ctx.const(prod.inputs[2])
            if why:
                return Reject(f"Gemm '{node_name(prod)}' C: {why}")
        trans_b = int(attr(prod, "transB", 0))
        n = bw.shape[0] if trans_b else bw.shape[1]
        if n != s.numel():
            return Reject(f"Gemm '{node_name(prod)}' has {n} outputs, BN {s.numel()} channels")
        return Match(bn, [prod], {"b": bw, "c": c, "trans_b": trans_b})

    def rewrite(self, ctx, m, s, t):
        g, d = m.nodes[0], m.data
        b2, c2 = fold_gemm_backward(f64(d["b"]), None if d["c"] is None else f64(d["c"]), s, t,
                                    beta=float(attr(g, "beta", 1.0)), trans_b=bool(d["trans_b"]))
        ctx.set_input(g, 1, value_name(g.inputs[1]), b2.numpy().astype(d["b"].dtype))
        ctx.set_input(g, 2, node_name(g) + "_C", c2.numpy().astype(d["b"].dtype))
        ctx.set_attr(g, "beta", 1.0)
        ctx.take_over(m.bn.outputs[0], g.outputs[0])


def _matmul_chain(ctx: Ctx, x, c: int, *, rank2: bool):
    """MatMul(·, constant 2-D B) [+ Add(constant bias)] producing ``x``, N = c: (mm, add, data) or a Reject."""
    prod = _producer(ctx, x, ("MatMul", "Add"))
    if isinstance(prod, Reject):
        return prod
    add, mm, bias, bias_i = None, prod, None, None
    if prod.op_type == "Add":
        add = prod
        mms = [(k, i) for k, i in enumerate(add.inputs) if i is not None and i.producer() is not None and i.producer().op_type == "MatMul"]
        if len(mms) != 1:
            return Reject(f"its input comes from Add '{node_name(add)}', not MatMul + constant bias", applies=False)
        k, mm_out = mms[0]
        bias_i = 1 - k
        bias, why = ctx.const(add.inputs[bias_i])
        if why:
            return Reject(f"Add '{node_name(add)}' bias: {why}")
        why = ctx.single_use(mm_out)
        if why:
            return Reject(f"MatMul output {why}")
        mm = mm_out.producer()
        if not ctx.owns(mm):
            return Reject(f"'{value_name(mm_out)}' comes from the enclosing graph")
    bw, why = ctx.const(mm.inputs[1])
    if why or bw.ndim != 2:
        return Reject(f"MatMul '{node_name(mm)}' has no constant 2-D B" + (f" ({why})" if why else ""))
    rank = ctx.rank(mm.outputs[0])
    if rank2 and rank != 2:
        return Reject(f"MatMul '{node_name(mm)}' output rank is {rank if rank is not None else 'unknown'}; BN normalises "
                      "axis 1, which is the MatMul's last axis only for 2-D outputs")
    if bw.shape[1] != c:
        return Reject(f"MatMul '{node_name(mm)}' has {bw.shape[1]} outputs, BN {c} channels")
    if bias is not None and (bias.size not in (1, c) or (bias.size == c and bias.shape[-1] != c)):
        return Reject(f"Add bias of shape {bias.shape} does not broadcast per channel")
    return mm, add, {"b": bw, "bias": bias, "bias_i": bias_i}


def _matmul_fold(ctx: Ctx, m: Match, s, t, tail) -> None:
    """B'[:,n] = B[:,n]·s[n]; bias' = bias·s + t, or an Add of t after ``tail`` (the node whose
    output replaces the BN's)."""
    import onnx_ir as ir

    mm, d = m.nodes[0], m.data
    bias = None if d["bias"] is None else f64(d["bias"]).reshape(-1).expand(s.numel())
    b2, bias2 = fold_backward(f64(d["b"]).T, bias, s, t)  # a Linear: weight (out, in)
    ctx.set_input(mm, 1, value_name(mm.inputs[1]), b2.T.contiguous().numpy().astype(d["b"].dtype))
    if len(m.nodes) == 2:
        add = m.nodes[1]
        shape = d["bias"].shape if d["bias"].size == s.numel() else (s.numel(),)
        ctx.set_input(add, d["bias_i"], value_name(add.inputs[d["bias_i"]]), bias2.numpy().astype(d["bias"].dtype).reshape(shape))
        ctx.take_over(m.bn.outputs[0], tail.outputs[0])
        return
    c = ctx.new_const(node_name(mm) + "_bias", bias2.numpy().astype(d["b"].dtype), m.bn)
    add = ir.Node("", "Add", [tail.outputs[0], c], name=node_name(m.bn) + "_bias_add")
    ctx.graph.insert_before(m.bn, add)
    ctx.take_over(m.bn.outputs[0], add.outputs[0])


class BackwardMatMul:
    """MatMul(x, B) [+ Add(bias)] → BN on a 2-D output:  B'[:,n] = B[:,n]·s[n],
    bias' = bias·s + t (a lone MatMul gets an Add carrying t)."""

    name = "backward"

    def match(self, ctx, bn, s, t):
        chain = _matmul_chain(ctx, bn.inputs[0], s.numel(), rank2=True)
        if isinstance(chain, Reject):
            return chain
        mm, add, data = chain
        return Match(bn, [mm] + ([add] if add else []), data)

    def rewrite(self, ctx, m, s, t):
        _matmul_fold(ctx, m, s, t, m.nodes[-1])


class BackwardReshape:
    """MatMul(x, B) [+ Add(bias)] → Reshape to (M, C) → BN, C the MatMul's last axis (a Linear on
    (N, T, C) and BN1d over N·T rows): the channel axis maps to itself, so the MatMul formula
    applies: B'[:,n] = B[:,n]·s[n], bias' = bias·s + t."""

    name = "reshape"

    def match(self, ctx, bn, s, t):
        rs = _producer(ctx, bn.inputs[0], ("Reshape",))
        if isinstance(rs, Reject):
            return rs
        shape, why = ctx.const(rs.inputs[1])
        c = s.numel()
        if why or shape.ndim != 1 or len(shape) != 2 or int(shape[-1]) != c:
            return Reject(f"Reshape '{node_name(rs)}' does not give (rows, {c}) with the channel axis last" + (f" ({why})" if why else ""))
        chain = _matmul_chain(ctx, rs.inputs[0], c, rank2=False)
        if isinstance(chain, Reject):
            return Reject(f"Reshape '{node_name(rs)}' input: {chain.reason}")
        mm, add, data = chain
        return Match(bn, [mm] + ([add] if add else []), {**data, "reshape": rs})

    def rewrite(self, ctx, m, s, t):
        _matmul_fold(ctx, m, s, t, m.data["reshape"])


class BackwardConcat:
    """Concat(conv₁ … convₖ, axis=1) → BN: each convᵢ folds its slice s[oᵢ:oᵢ₊₁], t[oᵢ:oᵢ₊₁]
    (the backward Conv formula per slice)."""

    name = "concat"

    def match(self, ctx, bn, s, t):
        cat = _producer(ctx, bn.inputs[0], ("Concat",))
        if isinstance(cat, Reject):
            return cat
        axis = int(attr(cat, "axis", 1))
        rank = ctx.rank(cat.outputs[0])
        if axis != 1 and not (rank is not None and axis == 1 - rank):
            return Reject(f"Concat '{node_name(cat)}' joins axis {axis}, not the channel axis 1")
        parts, seen = [], set()
        for x in cat.inputs:
            prod = _producer(ctx, x, ("Conv", "ConvTranspose"))
            if isinstance(prod, Reject):
                return Reject(f"Concat '{node_name(cat)}' input '{value_name(x)}': {prod.reason}")
            if id(prod) in seen:
                return Reject(f"Concat '{node_name(cat)}' reads '{value_name(x)}' twice")
            seen.add(id(prod))
            wb = _weights(ctx, prod)
            if isinstance(wb, Reject):
                return wb
            parts.append((prod, wb))
        total = sum(_out_channels(p, wb[0]) for p, wb in parts)
        if total != s.numel():
            return Reject(f"Concat '{node_name(cat)}' producers give {total} channels, BN {s.numel()}")
        return Match(bn, [p for p, _ in parts], {"parts": parts, "cat": cat})

    def rewrite(self, ctx, m, s, t):
        o = 0
        for prod, (w, b) in m.data["parts"]:
            c = _out_channels(prod, w)
            _conv_backward(ctx, prod, w, b, s[o:o + c], t[o:o + c])
            o += c
        ctx.take_over(m.bn.outputs[0], m.data["cat"].outputs[0])


class BackwardAdd:
    """Add(conv_a, conv_b) → BN:  s·(a + b) + t = (s·a + t) + s·b, so conv_a folds (s, t)
    and conv_b folds (s, 0) (the backward Conv formula on each branch)."""

    name = "branches"

    def match(self, ctx, bn, s, t):
        add = _producer(ctx, bn.inputs[0], ("Add",))
        if isinstance(add, Reject):
            return add
        parts = []
        for x in add.inputs:
            prod = _producer(ctx, x, ("Conv", "ConvTranspose"))
            if isinstance(prod, Reject):
                return Reject(f"Add '{node_name(add)}' input '{value_name(x)}': {prod.reason}", applies=prod.applies)
            wb = _weights(ctx, prod)
            if isinstance(wb, Reject):
                return wb
            if _out_channels(prod, wb[0]) != s.numel():
                return Reject(f"{prod.op_type} '{node_name(prod)}' has {_out_channels(prod, wb[0])} output channels, BN {s.numel()}")
            parts.append((prod, wb))
        if len(parts) != 2 or parts[0][0] is parts[1][0]:
            return Reject(f"Add '{node_name(add)}' does not add two different convolutions")
        return Match(bn, [p for p, _ in parts], {"parts": parts, "add": add})

    def rewrite(self, ctx, m, s, t):
        (pa, wba), (pb, wbb) = m.data["parts"]
        _conv_backward(ctx, pa, *wba, s, t)
        _conv_backward(ctx, pb, *wbb, s, t * 0)
        ctx.take_over(m.bn.outputs[0], m.data["add"].outputs[0])


def _consumer(ctx: Ctx, bn, ops: tuple[str, ...]):
    y = bn.outputs[0]
    why = ctx.single_use(y)
    if why:
        return Reject(why)
    cons, idx = next(iter(y.uses()))
    if cons.op_type not in ops or cons.domain not in ONNX_DOMAINS:
        return Reject(f"BN output goes to {cons.op_type} '{node_name(cons)}'", applies=False)
    if idx != 0:
        return Reject(f"BN output feeds {cons.op_type} '{node_name(cons)}' as input {idx}, not its data input")
    if not ctx.owns(cons):
        return Reject(f"BN output is read inside a subgraph of {cons.op_type} '{node_name(cons)}'")
    return cons


class ForwardConv:
    """BN → Conv that pads nothing:  W'[o,i,k…] = W[o,i,k…]·s[c(o,i)],
    b'[o] = b[o] + Σ_{i,k} W[o,i,k]·t[c(o,i)],  c(o,i) = group(o)·(C/group) + i."""

    name = "forward"

    def match(self, ctx, bn, s, t):
        cons = _consumer(ctx, bn, ("Conv",))
        if isinstance(cons, Reject):
            return cons
        wb = _weights(ctx, cons)
        if isinstance(wb, Reject):
            return Reject("consumer " + wb.reason)
        pads = list(attr(cons, "pads", None) or [])
        auto = attr(cons, "auto_pad", "NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        pointwise = all(k == 1 for k in wb[0].shape[2:])
        if any(int(p) for p in pads) or (auto not in ("NOTSET", "VALID") and not pointwise):
            return Reject(f"consumer Conv '{node_name(cons)}' pads its input (pads={pads}, auto_pad={auto}); padded zeros never went through the BN")
        if wb[0].shape[1] * int(attr(cons, "group", 1)) != s.numel():
            return Reject(f"consumer Conv '{node_name(cons)}' reads {wb[0].shape[1] * int(attr(cons, 'group', 1))} channels, BN has {s.numel()}")
        return Match(bn, [cons], {"wb": wb})

    def rewrite(self, ctx, m, s, t):
        cons, (w, b) = m.nodes[0], m.data["wb"]
        w2, b2 = fold_forward(f64(w), None if b is None else f64(b), s, t, groups=int(attr(cons, "group", 1)))
        ctx.set_input(cons, 1, value_name(cons.inputs[1]), w2.numpy().astype(w.dtype))
        ctx.set_input(cons, 2, value_name(cons.inputs[2]) if len(cons.inputs) > 2 and cons.inputs[2] is not None else node_name(cons) + "_bias",
                      b2.numpy().astype(w.dtype))
        cons.replace_input_with(0, m.bn.inputs[0])


class ForwardGemm:
    """BN → Gemm (transA = 0), Y = α·X·op(B) + β·C:  op(B)'[k,:] = s[k]·op(B)[k,:],
    C' = β·C + α·t·op(B),  β' = 1."""

    name = "forward"

    def match(self, ctx, bn, s, t):
        cons = _consumer(ctx, bn, ("Gemm", "MatMul"))
        if isinstance(cons, Reject):
            return cons
        if int(attr(cons, "transA", 0)):
            return Reject(f"consumer Gemm '{node_name(cons)}' has transA=1 (BN channels would be its rows)")
        bw, why = ctx.const(cons.inputs[1])
        if why:
            return Reject(f"consumer {cons.op_type} '{node_name(cons)}' B: {why}")
        c = None
        if cons.op_type == "Gemm" and len(cons.inputs) > 2 and cons.inputs[2] is not None:
            c, why = ctx.const(cons.inputs[2])
            if why:
                return Reject(f"consumer Gemm '{node_name(cons)}' C: {why}")
        if cons.op_type == "MatMul":
            rank = ctx.rank(bn.inputs[0])
            if bw.ndim != 2 or rank != 2:
                return Reject(f"consumer MatMul '{node_name(cons)}' needs a 2-D input and a constant 2-D B (input rank {rank}, B rank {bw.ndim})")
        trans_b = int(attr(cons, "transB", 0))
        k = bw.shape[1] if trans_b else bw.shape[0]
        if k != s.numel():
            return Reject(f"consumer {cons.op_type} '{node_name(cons)}' reads {k} features, BN has {s.numel()}")
        return Match(bn, [cons], {"b": bw, "c": c, "trans_b": trans_b})

    def rewrite(self, ctx, m, s, t):
        import onnx_ir as ir

        g, d = m.nodes[0], m.data
        b2, c2 = fold_gemm_forward(f64(d["b"]), None if d["c"] is None else f64(d["c"]), s, t,
                                   alpha=float(attr(g, "alpha", 1.0)), beta=float(attr(g, "beta", 1.0)), trans_b=bool(d["trans_b"]))
        dt = d["b"].dtype
        ctx.set_input(g, 1, value_name(g.inputs[1]), b2.numpy().astype(dt))
        g.replace_input_with(0, m.bn.inputs[0])
        if g.op_type == "Gemm":
            ctx.set_input(g, 2, node_name(g) + "_C", c2.numpy().astype(dt))
            ctx.set_attr(g, "beta", 1.0)
            return
        c = ctx.new_const(node_name(g) + "_bias", c2.numpy().astype(dt), m.bn)
        add = ir.Node("", "Add", [g.outputs[0], c], name=node_name(g) + "_bias_add")
        add.outputs[0].type, add.outputs[0].shape = g.outputs[0].type, g.outputs[0].shape
        ctx.graph.insert_after(g, add)
        name = g.outputs[0].name
        ir.convenience.replace_all_uses_with(g.outputs[0], add.outputs[0], replace_graph_outputs=True)
        add.replace_input_with(0, g.outputs[0])
        g.outputs[0].name = None
        add.outputs[0].name = name
        g.outputs[0].name = ctx.fresh(name or node_name(g))


RULES = [BackwardConv(), BackwardGemm(), BackwardMatMul(), BackwardReshape(), BackwardConcat(), BackwardAdd(), ForwardConv(), ForwardGemm()]


