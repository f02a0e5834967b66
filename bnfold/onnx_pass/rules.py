"""ONNX fold rules, one class per pattern (the protocol of ``bnfold.rule``): ``match(ctx, bn)`` returns
the rule's match, a dataclass whose ``nodes`` absorb the BN, or raises ``NoMatch`` with the reason;
``rewrite(ctx, bn, match)`` folds and removes the BN (onnx_ir's ``replace_nodes_and_values`` carries
the BN output's name, type and shape to the value that replaces it). The math is ``fold_math``'s, in
float64, cast once to each weight's dtype; each docstring holds its formula. Adding a pattern = adding
a class to ``RULES`` and its test."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bnfold.fold_math import fold_backward, fold_forward, fold_gemm_backward, fold_gemm_forward
from bnfold.onnx_pass.core import BN, ONNX_DOMAINS, Ctx, OnnxRule, attr, f64, node_name, value_name
from bnfold.rule import NoMatch


# --------------------------------------------------------------------------------- match data
@dataclass
class ConvWeights:
    """A Conv/ConvTranspose node and its constant weight and bias (None: it has none)."""

    node: Any
    w: np.ndarray
    b: np.ndarray | None

    @property
    def nodes(self) -> list:
        return [self.node]

    @property
    def out_channels(self) -> int:
        if self.node.op_type == "ConvTranspose":
            return self.w.shape[1] * int(attr(self.node, "group", 1))
        return self.w.shape[0]


@dataclass
class GemmWeights:
    """A Gemm (or, read forward, a MatMul) and its constant B, C (None: no C) and transB."""

    node: Any
    b: np.ndarray
    c: np.ndarray | None
    trans_b: bool

    @property
    def nodes(self) -> list:
        return [self.node]


@dataclass
class MatMulChain:
    """MatMul(x, constant 2-D B), optionally followed by Add(constant bias) at input ``bias_index``."""

    matmul: Any
    b: np.ndarray
    add: Any = None
    bias: np.ndarray | None = None
    bias_index: int = 1

    @property
    def nodes(self) -> list:
        return [self.matmul] + ([self.add] if self.add is not None else [])


@dataclass
class LayoutOfProducer:
    """A MatMul chain or a Gemm → Reshape/Transpose nodes (``path``, in order) → BN: one Reshape for the
    ``reshape`` rule, any Reshape/Transpose chain for ``reshape-transpose``."""

    producer: MatMulChain | GemmWeights
    path: list

    @property
    def nodes(self) -> list:
        return self.producer.nodes


@dataclass
class JoinOfConvs:
    """Concat or Add of convolutions (``join``), each conv read by the join alone."""

    join: Any
    parts: list[ConvWeights]

    @property
    def nodes(self) -> list:
        return [p.node for p in self.parts]


# ------------------------------------------------------------------------------- rule helpers
def conv_weights(ctx: Ctx, node) -> ConvWeights:
    """A Conv-like node's weights, or NoMatch when they are not constant floating-point tensors."""
    what = f"{node.op_type} '{node_name(node)}'"
    w = ctx.need_const(node.inputs[1] if len(node.inputs) > 1 else None, f"{what} weights")
    b = None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        b = ctx.need_const(node.inputs[2], f"{what} bias")
    if (w.dtype.kind != "f" and "float" not in str(w.dtype)) or w.dtype.itemsize < 2:
        raise NoMatch(f"{what} weights are {w.dtype}, not 16/32/64-bit floating point")
    return ConvWeights(node, w, b)


def _set_conv(ctx: Ctx, conv: ConvWeights, w2, b2) -> None:
    """New weight and bias tensors (float64 → the weight's dtype) for ``conv``."""
    node, dt = conv.node, conv.w.dtype
    ctx.set_input(node, 1, value_name(node.inputs[1]), w2.numpy().astype(dt))
    base = node_name(node) + "_bias" if conv.b is None else value_name(node.inputs[2])
    ctx.set_input(node, 2, base, b2.numpy().astype(dt))


def conv_backward(ctx: Ctx, conv: ConvWeights, s, t) -> None:
    """W'[c] = W[c]·s[c], b' = b·s + t (ConvTranspose: per group on weight dim 1)."""
    node = conv.node
    w2, b2 = fold_backward(f64(conv.w), f64(conv.b), s, t,
                           transposed=node.op_type == "ConvTranspose", groups=int(attr(node, "group", 1)))
    _set_conv(ctx, conv, w2, b2)


def producer(ctx: Ctx, x, ops: tuple[str, ...]):
    """The node producing ``x`` when its op is one of ``ops`` and ``x`` has one reader, else NoMatch."""
    prod = x.producer()
    if prod is None:
        raise NoMatch("its input is a graph input or initializer", applies=False)
    if prod.op_type not in ops or prod.domain not in ONNX_DOMAINS:
        raise NoMatch(f"its input comes from {prod.op_type} '{node_name(prod)}'", applies=False)
    why = ctx.single_use(x)
    if why:
        raise NoMatch(why)
    if not ctx.owns(prod):
        raise NoMatch(f"'{value_name(x)}' comes from the enclosing graph")
    return prod


def _conv_of(ctx: Ctx, node, c: int) -> ConvWeights:
    """The weights of Conv/ConvTranspose ``node``, which must give ``c`` output channels."""
    conv = conv_weights(ctx, node)
    if conv.out_channels != c:
        raise NoMatch(f"{node.op_type} '{node_name(node)}' has {conv.out_channels} output channels, BN {c}")
    return conv


def gemm_weights(ctx: Ctx, node, what: str) -> GemmWeights:
    """A Gemm's or MatMul's constant B, its C (a Gemm's; None: none) and transB; ``what`` names the
    node in the NoMatch of a value that is not constant."""
    b = ctx.need_const(node.inputs[1], f"{what} B")
    c = None
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        c = ctx.need_const(node.inputs[2], f"{what} C")
    return GemmWeights(node, b, c, bool(attr(node, "transB", 0)))


def gemm_producer(ctx: Ctx, x, c: int) -> GemmWeights:
    """The Gemm producing ``x`` with ``c`` outputs, and its constant B and C."""
    prod = producer(ctx, x, ("Gemm",))
    gemm = gemm_weights(ctx, prod, f"Gemm '{node_name(prod)}'")
    n = gemm.b.shape[0] if gemm.trans_b else gemm.b.shape[1]
    if n != c:
        raise NoMatch(f"Gemm '{node_name(prod)}' has {n} outputs, BN {c} channels")
    return gemm


def _set_gemm(ctx: Ctx, gemm: GemmWeights, b2, c2) -> None:
    """New B and C tensors (float64 → B's dtype) for Gemm ``gemm``, and β = 1."""
    g, dt = gemm.node, gemm.b.dtype
    ctx.set_input(g, 1, value_name(g.inputs[1]), b2.numpy().astype(dt))
    ctx.set_input(g, 2, node_name(g) + "_C", c2.numpy().astype(dt))
    ctx.set_attr(g, "beta", 1.0)


def gemm_backward(ctx: Ctx, gemm: GemmWeights, s, t) -> None:
    """op(B)'[:,n] = op(B)[:,n]·s[n],  C' = β·C·s + t,  β' = 1."""
    b2, c2 = fold_gemm_backward(f64(gemm.b), f64(gemm.c), s, t,
                                beta=float(attr(gemm.node, "beta", 1.0)), trans_b=gemm.trans_b)
    _set_gemm(ctx, gemm, b2, c2)


def _matmul_chain(ctx: Ctx, x, c: int, *, rank2: bool) -> MatMulChain:
    """MatMul(·, constant 2-D B) [+ Add(constant bias)] producing ``x``, N = c."""
    prod = producer(ctx, x, ("MatMul", "Add"))
    chain = MatMulChain(prod, None)
    if prod.op_type == "Add":
        mms = [(k, i) for k, i in enumerate(prod.inputs) if i is not None and i.producer() is not None and i.producer().op_type == "MatMul"]
        if len(mms) != 1:
            raise NoMatch(f"its input comes from Add '{node_name(prod)}', not MatMul + constant bias", applies=False)
        k, mm_out = mms[0]
        chain.add, chain.bias_index = prod, 1 - k
        chain.bias = ctx.need_const(prod.inputs[1 - k], f"Add '{node_name(prod)}' bias")
        why = ctx.single_use(mm_out)
        if why:
            raise NoMatch(f"MatMul output {why}")
        chain.matmul = mm_out.producer()
        if not ctx.owns(chain.matmul):
            raise NoMatch(f"'{value_name(mm_out)}' comes from the enclosing graph")
    mm = chain.matmul
    bw, why = ctx.const(mm.inputs[1])
    if why or bw.ndim != 2:
        raise NoMatch(f"MatMul '{node_name(mm)}' has no constant 2-D B" + (f" ({why})" if why else ""))
    chain.b = bw
    rank = ctx.rank(mm.outputs[0])
    if rank2 and rank != 2:
        raise NoMatch(f"MatMul '{node_name(mm)}' output rank is {rank if rank is not None else 'unknown'}; BN normalises "
                      "axis 1, which is the MatMul's last axis only for 2-D outputs")
    if bw.shape[1] != c:
        raise NoMatch(f"MatMul '{node_name(mm)}' has {bw.shape[1]} outputs, BN {c} channels")
    bias = chain.bias
    if bias is not None and (bias.size not in (1, c) or (bias.size == c and bias.shape[-1] != c)):
        raise NoMatch(f"Add bias of shape {bias.shape} does not broadcast per channel")
    return chain


def _linear_producer(ctx: Ctx, x, c: int) -> GemmWeights | MatMulChain:
    """The Gemm, else the MatMul chain (any rank), producing ``x`` with ``c`` outputs."""
    if x.producer() is not None and x.producer().op_type == "Gemm":
        return gemm_producer(ctx, x, c)
    return _matmul_chain(ctx, x, c, rank2=False)


def _matmul_weights(ctx: Ctx, chain: MatMulChain, s, t):
    """B'[:,n] = B[:,n]·s[n]; bias' = bias·s + t, into the chain's Add if any; returns bias' (float64)."""
    mm = chain.matmul
    bias = None if chain.bias is None else f64(chain.bias).reshape(-1).expand(s.numel())
    b2, bias2 = fold_backward(f64(chain.b).T, bias, s, t)  # a Linear: weight (out, in)
    ctx.set_input(mm, 1, value_name(mm.inputs[1]), b2.T.contiguous().numpy().astype(chain.b.dtype))
    if chain.add is not None:
        add, k = chain.add, chain.bias_index
        shape = chain.bias.shape if chain.bias.size == s.numel() else (s.numel(),)
        ctx.set_input(add, k, value_name(add.inputs[k]), bias2.numpy().astype(chain.bias.dtype).reshape(shape))
    return bias2


def _backward_linear(ctx: Ctx, bn: BN, p: GemmWeights | MatMulChain, tail) -> None:
    """The backward fold into Gemm or MatMul chain ``p``; the BN's readers read the output of
    ``tail`` (``p``'s last node or a layout node after it), through an Add of bias' = t after it
    when ``p`` is a MatMul without an Add."""
    import onnx_ir as ir

    if isinstance(p, GemmWeights):
        gemm_backward(ctx, p, bn.s, bn.t)
        ctx.replace_bn(bn.node, tail.outputs[0])
        return
    bias2 = _matmul_weights(ctx, p, bn.s, bn.t)
    if p.add is not None:
        ctx.replace_bn(bn.node, tail.outputs[0])
        return
    c = ctx.new_const(node_name(p.matmul) + "_bias", bias2.numpy().astype(p.b.dtype), bn.node)
    add = ir.Node("", "Add", [tail.outputs[0], c], name=node_name(bn.node) + "_bias_add")
    ctx.replace_bn(bn.node, add.outputs[0], [add])


def _consumer(ctx: Ctx, bn, ops: tuple[str, ...]):
    """The one node reading the BN's output, as its data input, when its op is one of ``ops``."""
    y = bn.outputs[0]
    why = ctx.single_use(y)
    if why:
        raise NoMatch(why)
    cons, idx = next(iter(y.uses()))
    if cons.op_type not in ops or cons.domain not in ONNX_DOMAINS:
        raise NoMatch(f"BN output goes to {cons.op_type} '{node_name(cons)}'", applies=False)
    if idx != 0:
        raise NoMatch(f"BN output feeds {cons.op_type} '{node_name(cons)}' as input {idx}, not its data input")
    if not ctx.owns(cons):
        raise NoMatch(f"BN output is read inside a subgraph of {cons.op_type} '{node_name(cons)}'")
    return cons


# ------------------------------------------------------------------------------ backward rules
class BackwardConv(OnnxRule):
    """Conv/ConvTranspose → BN:  W'[c,…] = W[c,…]·s[c],  b'[c] = b[c]·s[c] + t[c]
    (ConvTranspose weight (in, out/group, k…): output channel g·(out/group)+j scales W[g-th block, j])."""

    name = "backward"

    def match(self, ctx: Ctx, bn: BN) -> ConvWeights:
        return _conv_of(ctx, producer(ctx, bn.node.inputs[0], ("Conv", "ConvTranspose")), bn.channels)

    def rewrite(self, ctx: Ctx, bn: BN, m: ConvWeights) -> None:
        conv_backward(ctx, m, bn.s, bn.t)
        ctx.replace_bn(bn.node, m.node.outputs[0])


class BackwardGemm(OnnxRule):
    """Gemm → BN, Y = α·op(A)·op(B) + β·C:  op(B)'[:,n] = op(B)[:,n]·s[n],  C' = β·C·s + t,  β' = 1."""

    name = "backward"

    def match(self, ctx: Ctx, bn: BN) -> GemmWeights:
        return gemm_producer(ctx, bn.node.inputs[0], bn.channels)

    def rewrite(self, ctx: Ctx, bn: BN, m: GemmWeights) -> None:
        _backward_linear(ctx, bn, m, m.node)


class BackwardMatMul(OnnxRule):
    """MatMul(x, B) [+ Add(bias)] → BN on a 2-D output:  B'[:,n] = B[:,n]·s[n],
    bias' = bias·s + t (a lone MatMul gets an Add carrying t)."""

    name = "backward"

    def match(self, ctx: Ctx, bn: BN) -> MatMulChain:
        return _matmul_chain(ctx, bn.node.inputs[0], bn.channels, rank2=True)

    def rewrite(self, ctx: Ctx, bn: BN, m: MatMulChain) -> None:
        _backward_linear(ctx, bn, m, m.nodes[-1])


class BackwardReshape(OnnxRule):
    """MatMul(x, B) [+ Add(bias)] or Gemm → Reshape to (M, C) → BN, C the producer's last axis (a Linear
    on (N, T, C) and BN1d over N·T rows): the channel axis maps to itself, so the MatMul formula
    B'[:,n] = B[:,n]·s[n], bias' = bias·s + t (or the Gemm one, C' = β·C·s + t, β' = 1) applies."""

    name = "reshape"

    def match(self, ctx: Ctx, bn: BN) -> LayoutOfProducer:
        rs = producer(ctx, bn.node.inputs[0], ("Reshape",))
        shape, why = ctx.const(rs.inputs[1])
        c = bn.channels
        if why or shape.ndim != 1 or len(shape) != 2 or int(shape[-1]) != c:
            raise NoMatch(f"Reshape '{node_name(rs)}' does not give (rows, {c}) with the channel axis last" + (f" ({why})" if why else ""))
        try:
            return LayoutOfProducer(_linear_producer(ctx, rs.inputs[0], c), [rs])
        except NoMatch as nm:
            raise NoMatch(f"Reshape '{node_name(rs)}' input: {nm.reason}") from None

    def rewrite(self, ctx: Ctx, bn: BN, m: LayoutOfProducer) -> None:
        _backward_linear(ctx, bn, m.producer, m.path[-1])


class BackwardTranspose(OnnxRule):
    """MatMul(x, B) [+ Add(bias)] or Gemm → Reshape/Transpose … → BN, where the producer's output
    columns land on the BN's channel axis 1 (onnxruntime's MatMul+BN fusion pattern; a Reshape keeps
    the columns only as its last axis, same size; a Transpose moves them by its perm): channel c is
    column c, so B'[:,c] = B[:,c]·s[c], bias' = bias·s + t (a lone MatMul gets an Add of t right
    after it; a Gemm: C' = β·C·s + t, β' = 1)."""

    name = "reshape-transpose"

    def match(self, ctx: Ctx, bn: BN) -> LayoutOfProducer:
        path, x = [], bn.node.inputs[0]
        while x.producer() is not None and x.producer().op_type in ("Reshape", "Transpose") and len(path) < 8:
            path.insert(0, producer(ctx, x, ("Reshape", "Transpose")))
            x = path[0].inputs[0]
        if not any(n.op_type == "Transpose" for n in path):
            raise NoMatch("no Transpose between a MatMul/Gemm and the BN", applies=False)
        c = bn.channels
        try:
            prod = _linear_producer(ctx, x, c)
        except NoMatch as nm:
            raise NoMatch(f"{path[0].op_type} '{node_name(path[0])}' input: {nm.reason}", applies=nm.applies) from None
        rank = ctx.rank(x)
        if rank is None:
            raise NoMatch(f"the rank of '{value_name(x)}' is unknown")
        axis = rank - 1  # where the producer's columns are
        for n in path:
            if n.op_type == "Transpose":
                perm = attr(n, "perm", None)
                perm = list(range(ctx.rank(n.inputs[0]) or 0))[::-1] if perm is None else [int(p) for p in perm]
                if axis not in perm:
                    raise NoMatch(f"Transpose '{node_name(n)}' has no perm for axis {axis}")
                axis = perm.index(axis)
                continue
            ins, outs = ctx.shape(n.inputs[0]), ctx.shape(n.outputs[0])
            known = ins is not None and outs is not None and all(isinstance(d, int) for d in ins + outs)
            if known and ins[:axis + 1] == outs[:axis + 1]:  # the axes up to the columns' stay: so do they
                continue
            if not known or axis != len(ins) - 1 or ins[-1] != outs[-1]:
                raise NoMatch(f"Reshape '{node_name(n)}' {list(ins) if ins else '?'} → {list(outs) if outs else '?'} does not keep "
                              "the MatMul's columns on one axis (its last, or one before which nothing changes)")
            axis = len(outs) - 1
        if axis != 1:
            raise NoMatch(f"the MatMul's columns land on axis {axis} after {'/'.join(n.op_type for n in path)}, not on the BN's channel axis 1")
        return LayoutOfProducer(prod, path)

    def rewrite(self, ctx: Ctx, bn: BN, m: LayoutOfProducer) -> None:
        import onnx_ir as ir

        p = m.producer
        if not isinstance(p, MatMulChain) or p.add is not None:
            _backward_linear(ctx, bn, p, m.path[-1])
            return
        mm = p.matmul  # B' now; t added right after the MatMul, before the layout nodes
        _matmul_weights(ctx, p, bn.s, bn.t)
        c = ctx.new_const(node_name(mm) + "_bias", bn.t.numpy().astype(p.b.dtype), m.path[0])
        add = ir.Node("", "Add", [mm.outputs[0], c], name=node_name(mm) + "_bias_add")
        add.outputs[0].name = ctx.fresh(value_name(mm.outputs[0]))
        ctx.graph.insert_after(mm, add)
        m.path[0].replace_input_with(0, add.outputs[0])
        ctx.replace_bn(bn.node, m.path[-1].outputs[0])


class BackwardConcat(OnnxRule):
    """Concat(conv₁ … convₖ, axis=1) → BN: each convᵢ folds its slice s[oᵢ:oᵢ₊₁], t[oᵢ:oᵢ₊₁]
    (the backward Conv formula per slice)."""

    name = "concat"

    def match(self, ctx: Ctx, bn: BN) -> JoinOfConvs:
        cat = producer(ctx, bn.node.inputs[0], ("Concat",))
        axis = int(attr(cat, "axis", 1))
        rank = ctx.rank(cat.outputs[0])
        if axis != 1 and not (rank is not None and axis == 1 - rank):
            raise NoMatch(f"Concat '{node_name(cat)}' joins axis {axis}, not the channel axis 1")
        parts = []
        for x in cat.inputs:  # each read once (``producer``): a repeated input has two consumers
            try:
                prod = producer(ctx, x, ("Conv", "ConvTranspose"))
            except NoMatch as nm:
                raise NoMatch(f"Concat '{node_name(cat)}' input '{value_name(x)}': {nm.reason}") from None
            parts.append(conv_weights(ctx, prod))
        total = sum(p.out_channels for p in parts)
        if total != bn.channels:
            raise NoMatch(f"Concat '{node_name(cat)}' producers give {total} channels, BN {bn.channels}")
        return JoinOfConvs(cat, parts)

    def rewrite(self, ctx: Ctx, bn: BN, m: JoinOfConvs) -> None:
        o = 0
        for conv in m.parts:
            c = conv.out_channels
            conv_backward(ctx, conv, bn.s[o:o + c], bn.t[o:o + c])
            o += c
        ctx.replace_bn(bn.node, m.join.outputs[0])


class AddOfConvs(OnnxRule):
    """Add(conv_a, conv_b) → BN:  s·(a + b) + t = (s·a + t) + s·b, so conv_a folds (s, t)
    and conv_b folds (s, 0) (the backward Conv formula on each branch)."""

    name = "add-of-convs"

    def match(self, ctx: Ctx, bn: BN) -> JoinOfConvs:
        add = producer(ctx, bn.node.inputs[0], ("Add",))
        parts = []
        for x in add.inputs:
            try:
                prod = producer(ctx, x, ("Conv", "ConvTranspose"))
            except NoMatch as nm:
                raise NoMatch(f"Add '{node_name(add)}' input '{value_name(x)}': {nm.reason}", applies=nm.applies) from None
            parts.append(_conv_of(ctx, prod, bn.channels))
        if len(parts) != 2:  # Add(a, a): 'a' has two consumers, which ``producer`` refuses
            raise NoMatch(f"Add '{node_name(add)}' does not add two different convolutions")
        return JoinOfConvs(add, parts)

    def rewrite(self, ctx: Ctx, bn: BN, m: JoinOfConvs) -> None:
        a, b = m.parts
        conv_backward(ctx, a, bn.s, bn.t)
        conv_backward(ctx, b, bn.s, bn.t * 0)
        ctx.replace_bn(bn.node, m.join.outputs[0])


# ------------------------------------------------------------------------------- forward rules
class ForwardConv(OnnxRule):
    """BN → Conv that pads nothing:  W'[o,i,k…] = W[o,i,k…]·s[c(o,i)],
    b'[o] = b[o] + Σ_{i,k} W[o,i,k]·t[c(o,i)],  c(o,i) = group(o)·(C/group) + i."""

    name = "forward"
    side = "forward"

    def match(self, ctx: Ctx, bn: BN) -> ConvWeights:
        cons = _consumer(ctx, bn.node, ("Conv",))
        try:
            conv = conv_weights(ctx, cons)
        except NoMatch as nm:
            raise NoMatch("consumer " + nm.reason) from None
        pads = list(attr(cons, "pads", None) or [])
        auto = attr(cons, "auto_pad", "NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        pointwise = all(k == 1 for k in conv.w.shape[2:])
        if any(int(p) for p in pads) or (auto not in ("NOTSET", "VALID") and not pointwise):
            raise NoMatch(f"consumer Conv '{node_name(cons)}' pads its input (pads={pads}, auto_pad={auto}); padded zeros never went through the BN")
        reads = conv.w.shape[1] * int(attr(cons, "group", 1))
        if reads != bn.channels:
            raise NoMatch(f"consumer Conv '{node_name(cons)}' reads {reads} channels, BN has {bn.channels}")
        return conv

    def rewrite(self, ctx: Ctx, bn: BN, m: ConvWeights) -> None:
        w2, b2 = fold_forward(f64(m.w), f64(m.b), bn.s, bn.t, groups=int(attr(m.node, "group", 1)))
        _set_conv(ctx, m, w2, b2)
        ctx.bypass_bn(bn.node)


class ForwardGemm(OnnxRule):
    """BN → Gemm (transA = 0), Y = α·X·op(B) + β·C:  op(B)'[k,:] = s[k]·op(B)[k,:],
    C' = β·C + α·t·op(B),  β' = 1. A MatMul (2-D) is the case α = β = 1, and gets an Add of C'."""

    name = "forward"
    side = "forward"

    def match(self, ctx: Ctx, bn: BN) -> GemmWeights:
        cons = _consumer(ctx, bn.node, ("Gemm", "MatMul"))
        what = f"consumer {cons.op_type} '{node_name(cons)}'"
        if int(attr(cons, "transA", 0)):
            raise NoMatch(f"consumer Gemm '{node_name(cons)}' has transA=1 (BN channels would be its rows)")
        m = gemm_weights(ctx, cons, what)
        if cons.op_type == "MatMul":
            rank = ctx.rank(bn.node.inputs[0])
            if m.b.ndim != 2 or rank != 2:
                raise NoMatch(f"{what} needs a 2-D input and a constant 2-D B "
                              f"(input rank {rank}, B rank {m.b.ndim})")
        k = m.b.shape[1] if m.trans_b else m.b.shape[0]
        if k != bn.channels:
            raise NoMatch(f"{what} reads {k} features, BN has {bn.channels}")
        return m

    def rewrite(self, ctx: Ctx, bn: BN, m: GemmWeights) -> None:
        gemm_forward(ctx, m, bn.s, bn.t)
        ctx.bypass_bn(bn.node)


def gemm_forward(ctx: Ctx, gemm: GemmWeights, s, t) -> None:
    """op(B)'[k,:] = s[k]·op(B)[k,:],  C' = β·C + α·t·op(B),  β' = 1; a MatMul ``g`` becomes
    MatMul(x, B') → Add(C'), the Add's output taking ``g``'s output (name, type, shape)."""
    import onnx_ir as ir

    g, dt = gemm.node, gemm.b.dtype
    b2, c2 = fold_gemm_forward(f64(gemm.b), f64(gemm.c), s, t,
                               alpha=float(attr(g, "alpha", 1.0)), beta=float(attr(g, "beta", 1.0)),
                               trans_b=gemm.trans_b)
    if g.op_type == "Gemm":
        _set_gemm(ctx, gemm, b2, c2)
        return
    out = g.outputs[0]
    b = ctx.new_const(value_name(g.inputs[1]), b2.numpy().astype(dt), g)
    c = ctx.new_const(node_name(g) + "_bias", c2.numpy().astype(dt), g)
    mm = ir.Node(g.domain, "MatMul", [g.inputs[0], b], name=g.name, metadata_props=dict(g.metadata_props))
    mm.outputs[0].name = ctx.fresh(out.name or node_name(g))
    mm.outputs[0].type, mm.outputs[0].shape = out.type, out.shape
    add = ir.Node("", "Add", [mm.outputs[0], c], name=node_name(g) + "_bias_add")
    ir.convenience.replace_nodes_and_values(ctx.graph, g, [g], [mm, add], [out], [add.outputs[0]])


@dataclass
class PoolHeads:
    """BN → pool → (flatten) → one or more heads (Gemm/MatMul), each with its constant B and C."""

    heads: list[GemmWeights]

    @property
    def nodes(self) -> list:
        return [h.node for h in self.heads]


_FLATTENS = ("Flatten", "Reshape", "Squeeze")
_TO_POOL = ("GlobalAveragePool", "ReduceMean", "Reshape", "Flatten")


class PoolHead(OnnxRule):
    """BN → GlobalAveragePool / ReduceMean over the spatial axes → (Flatten/Reshape/Squeeze to
    (N, C)) → Gemm/MatMul heads (a classifier and a distillation head): the average of s·x + t is
    s·avg(x) + t, so each head takes the forward Gemm formula op(B)'[k,:] = s[k]·op(B)[k,:],
    C' = β·C + α·t·op(B), β' = 1 (a MatMul gets an Add of C')."""

    name = "pool-head"
    side = "forward"

    def match(self, ctx: Ctx, bn: BN) -> PoolHeads:
        pool = _consumer(ctx, bn.node, _TO_POOL)
        while pool.op_type in ("Reshape", "Flatten"):  # x.flatten(2).mean(-1): spatial axes merged, (N, C) kept
            ins, outs = ctx.shape(pool.inputs[0]), ctx.shape(pool.outputs[0])
            if not (ins and outs and len(outs) >= 3 and all(isinstance(d, int) for d in ins[:2]) and tuple(ins[:2]) == tuple(outs[:2])):
                raise NoMatch(f"BN output goes to {pool.op_type} '{node_name(pool)}', not to an average pool", applies=False)
            use = ctx.reader(pool.outputs[0])
            if not use or use[1] != 0 or use[0].op_type not in _TO_POOL or use[0].domain not in ONNX_DOMAINS:
                raise NoMatch(f"{pool.op_type} '{node_name(pool)}' after the BN does not go to an average pool alone", applies=False)
            pool = use[0]
        rank = ctx.rank(pool.inputs[0])
        if pool.op_type == "ReduceMean":
            axes = attr(pool, "axes", None)
            if axes is None and len(pool.inputs) > 1 and pool.inputs[1] is not None:
                axes = ctx.need_const(pool.inputs[1], f"ReduceMean '{node_name(pool)}' axes").reshape(-1).tolist()
            if not axes or rank is None or sorted(int(a) % rank for a in axes) != list(range(2, rank)):
                raise NoMatch(f"ReduceMean '{node_name(pool)}' does not average exactly the spatial axes (axes {axes}, rank {rank})")
        x = pool.outputs[0]  # then flatten/reshape/squeeze to (N, C), each the only reader of the last
        while (use := ctx.reader(x)) and use[0].op_type in _FLATTENS and use[1] == 0:
            x = use[0].outputs[0]
        shape = ctx.shape(x)
        if shape is None or len(shape) != 2 or shape[1] != bn.channels:
            raise NoMatch(f"the pooled value '{value_name(x)}' is not (N, {bn.channels}) (shape {shape})")
        if x.is_graph_output() or not x.uses():
            raise NoMatch(f"the pooled value '{value_name(x)}' is a graph output" if x.is_graph_output() else "the pooled value is unused")
        # a node reading it twice reads it as an input other than 0 too: ``_head`` refuses that
        return PoolHeads([self._head(ctx, bn, node, idx) for node, idx in x.uses()])

    @staticmethod
    def _head(ctx: Ctx, bn: BN, node, idx: int) -> GemmWeights:
        what = f"head {node.op_type} '{node_name(node)}'"
        if node.op_type not in ("Gemm", "MatMul") or node.domain not in ONNX_DOMAINS or idx != 0 or not ctx.owns(node):
            raise NoMatch(f"the pooled value goes to {node.op_type} '{node_name(node)}' (input {idx}), not to a Gemm/MatMul head")
        if int(attr(node, "transA", 0)):
            raise NoMatch(f"{what} has transA=1")
        head = gemm_weights(ctx, node, what)
        if head.b.ndim != 2 or (head.b.shape[1] if head.trans_b else head.b.shape[0]) != bn.channels:
            raise NoMatch(f"{what} B of shape {head.b.shape} does not read {bn.channels} features")
        return head

    def rewrite(self, ctx: Ctx, bn: BN, m: PoolHeads) -> None:
        for h in m.heads:
            gemm_forward(ctx, h, bn.s, bn.t)
        ctx.bypass_bn(bn.node)


# The order is the preference: a backward fold keeps the consumer's padding question out of it.
RULES = [BackwardConv(), BackwardGemm(), BackwardMatMul(), BackwardReshape(), BackwardTranspose(), BackwardConcat(), AddOfConvs(), ForwardConv(),
         ForwardGemm(), PoolHead()]
