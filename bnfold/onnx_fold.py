"""Fold BatchNormalization nodes inside an ONNX model, on onnx_ir (no PyTorch model needed).

One rule per pattern (``RULES``): ``match`` returns a ``Match`` (the nodes) or a ``Reject`` (why),
``rewrite`` applies ``fold_math`` in float64 and casts once to each weight's dtype. Every BN node of
the main graph, of If/Loop/Scan bodies and of model-local functions gets exactly one plan entry.

Before matching, constants are resolved (``Consts``): initializers, ``Constant`` nodes and small
constant chains (Identity, Cast, CastLike, Reshape, (Un)Squeeze, Expand, Shape of a static shape,
Concat) — what torch's legacy exporter (deduplicated tensors behind Identity) and the dynamo
exporter with ``optimize=False`` (a zero bias as Expand of a constant) write. A value that is a
graph input, even with an initializer, is overridable at run time and is never a constant. New
weights are new initializers (Constant nodes inside functions and subgraphs): a tensor shared with
other nodes is never edited; what ends up unused is removed. Graph input/output names and opsets
are kept.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BadInputError
from .folding import Folded, FoldPlan, Unfolded

_ONNX = ("", "ai.onnx")


# ------------------------------------------------------------------------------------ plan entries
def folded_entry(bn: str, into: list[str], rule: str, into_type: list[str], stage: str = "onnx") -> Folded:
    """A ``Folded`` plan entry; the one place that knows the dataclass's shape (old: one target
    string and ``direction``; the contract: lists, ``rule`` and ``stage``)."""
    names = {f.name for f in dataclasses.fields(Folded)}
    if "stage" in names:
        return Folded(bn, list(into), rule, list(into_type), stage=stage)
    return Folded(bn, ", ".join(into), rule, ", ".join(into_type))


# ------------------------------------------------------------------------------------------ loading
def load_onnx(path: str | Path):
    """Read and check an .onnx file (ModelProto); BadInputError with one line when it is not one."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"ONNX file '{path}' does not exist" if not path.exists() else f"'{path}' is not a file", "check the path")
    try:
        model = onnx.load(str(path))
    except Exception as err:
        raise BadInputError(f"'{path}' is not a readable ONNX model ({type(err).__name__}); it may be truncated or another format",
                            "export it again, or pass the original .onnx file") from err
    if not model.graph.node and not model.graph.output:
        raise BadInputError(f"'{path}' is not an ONNX model (it has no graph)", "pass a .onnx file written by an exporter")
    try:
        onnx.checker.check_model(model if model.ByteSize() < 2_000_000_000 else str(path))
    except Exception as err:
        raise BadInputError(f"'{path}' fails onnx.checker: {str(err).splitlines()[0]}", "fix or re-export the model") from err
    return model


# ------------------------------------------------------------------------------------ match results
@dataclass
class Reject:
    reason: str
    applies: bool = True  # False: the pattern's anchor op is not there at all (reason is generic)


@dataclass
class Match:
    bn: Any
    nodes: list  # the nodes whose weights change (the plan's ``into``)
    data: dict = field(default_factory=dict)


def _name(node) -> str:
    return node.name or (node.outputs[0].name if node.outputs else node.op_type)


def _vname(v) -> str:
    return v.name or "?"


def _attr(node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _t(arr):
    import torch

    return torch.from_numpy(np.asarray(arr, dtype=np.float64).copy())


# --------------------------------------------------------------------------------- constant values
class Consts:
    """Constant values, followed through the small op chains exporters write; never graph inputs."""

    MAX_DEPTH = 16
    META_ONLY = {("Shape", 0), ("CastLike", 1)}

    def value(self, v, depth: int = 0) -> tuple[np.ndarray | None, str | None]:
        """(array, None) or (None, why it is not a constant)."""
        if v is None:
            return None, "missing"
        if v.is_graph_input():
            return None, f"'{_vname(v)}' is a graph input (overridable at run time), not a constant"
        if v.const_value is not None and v.is_initializer():
            return self._np(v.const_value), None
        node = v.producer()
        if node is None:
            if v.const_value is not None:
                return self._np(v.const_value), None
            return None, f"'{_vname(v)}' is an input of the enclosing function or graph, not a constant"
        if depth > self.MAX_DEPTH:
            return None, f"'{_vname(v)}' is computed by a chain of more than {self.MAX_DEPTH} nodes"
        fn = getattr(self, "_op_" + node.op_type, None) if node.domain in _ONNX else None
        if fn is None:
            return None, f"'{_vname(v)}' is computed by {node.op_type} '{_name(node)}', not a constant"
        ins = []
        for k, i in enumerate(node.inputs):
            if i is None or (node.op_type, k) in self.META_ONLY:  # only the value's shape/dtype is read
                ins.append(i)
                continue
            arr, why = self.value(i, depth + 1)
            if why:
                return None, why
            ins.append(arr)
        try:
            return np.asarray(fn(node, *ins)), None
        except Exception as err:  # an odd constant chain is a refusal, not a crash
            return None, f"'{_vname(v)}': cannot evaluate {node.op_type} ({type(err).__name__})"

    @staticmethod
    def _np(tensor) -> np.ndarray:
        return np.asarray(tensor.numpy())

    def _op_Constant(self, node):
        for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
            a = node.attributes.get(key)
            if a is not None:
                if key == "value":
                    return self._np(a.value)
                return np.asarray(a.value, dtype=np.float32 if "float" in key else np.int64)
        raise ValueError("unsupported Constant")

    def _op_Identity(self, node, x):
        return x

    def _op_Cast(self, node, x):
        import onnx_ir as ir

        return x.astype(ir.DataType(_attr(node, "to")).numpy())

    def _op_CastLike(self, node, x, like):
        return x.astype(like.dtype.numpy())

    def _op_Reshape(self, node, x, shape):
        shape = [int(d) for d in shape]
        if not _attr(node, "allowzero", 0):
            shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return x.reshape(shape)

    def _op_Unsqueeze(self, node, x, axes=None):
        axes = _attr(node, "axes") if axes is None else axes
        out = x
        rank = x.ndim + len(axes)
        for a in sorted(int(a) % rank for a in axes):
            out = np.expand_dims(out, a)
        return out

    def _op_Squeeze(self, node, x, axes=None):
        axes = _attr(node, "axes") if axes is None else axes
        return np.squeeze(x) if axes is None else np.squeeze(x, axis=tuple(int(a) % x.ndim for a in axes))

    def _op_Expand(self, node, x, shape):
        return np.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(int(d) for d in shape))).copy()

    def _op_Shape(self, node, v):
        dims = list(v.shape.dims) if v.shape is not None else None
        if dims is None or not all(isinstance(d, int) for d in dims):
            raise ValueError("dynamic shape")
        start, end = _attr(node, "start", 0), _attr(node, "end", None)
        return np.asarray(dims[start:end], dtype=np.int64)

    def _op_Concat(self, node, *xs):
        return np.concatenate(xs, axis=_attr(node, "axis"))


# ----------------------------------------------------------------------------------- the context
class Ctx:
    """One graph-like (main graph, subgraph or function) being folded."""

    def __init__(self, model, graph, *, main: bool, opset: int, prefix: str = ""):
        self.model, self.graph, self.main, self.opset, self.prefix = model, graph, main, opset, prefix
        self.consts = Consts()
        self._counter = itertools.count(1)

    def const(self, v):
        return self.consts.value(v)

    def owns(self, node) -> bool:
        """Whether ``node`` belongs to this graph-like (not to an enclosing or nested graph)."""
        return node.graph is self.graph or node.graph is getattr(self.graph, "graph", None)

    def single_use(self, v) -> str | None:
        """None when ``v`` feeds exactly one node input and is no graph output, else the reason."""
        if v.is_graph_output():
            return f"'{_vname(v)}' is a graph output"
        n = len(v.uses())
        return None if n == 1 else f"'{_vname(v)}' has {n} consumers"

    def fresh(self, base: str) -> str:
        name = f"{base}_bnfold{next(self._counter)}"
        while name in self.model_names:
            name = f"{base}_bnfold{next(self._counter)}"
        self.model_names.add(name)
        return name

    def new_const(self, base: str, arr: np.ndarray, before):
        """A new constant: an initializer of the main graph, or a Constant node before ``before``."""
        import onnx_ir as ir

        name = self.fresh(base)
        tensor = ir.tensor(np.ascontiguousarray(arr), name=name)
        if self.main:
            v = ir.Value(name=name, const_value=tensor)
            self.graph.register_initializer(v)
            return v
        node = ir.Node("", "Constant", [], [ir.AttrTensor("value", tensor)], name=name + "_const")
        node.outputs[0].name = name
        self.graph.insert_before(before, node)
        return node.outputs[0]

    def set_input(self, node, index: int, base: str, arr: np.ndarray) -> None:
        v = self.new_const(base, arr, node)
        if index < len(node.inputs):
            node.replace_input_with(index, v)
        else:
            node.resize_inputs(index + 1)
            node.replace_input_with(index, v)

    def set_attr(self, node, name: str, value: float) -> None:
        import onnx_ir as ir

        node.attributes[name] = ir.AttrFloat32(name, float(value))

    def take_over(self, old, new) -> None:
        """Every reader of ``old`` reads ``new``; ``new`` takes ``old``'s name (kept graph outputs)."""
        import onnx_ir as ir

        name = old.name
        if old.type is not None:
            new.type = old.type
        if old.shape is not None:
            new.shape = old.shape
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        old.name = None
        new.name = name

    def remove(self, node) -> None:
        self.graph.remove(node, safe=True)

    def rank(self, v) -> int | None:
        if v.shape is not None:
            return len(v.shape)
        return self.ranks.get(v.name)


# ------------------------------------------------------------------------------- rule helpers
def _weights(ctx: Ctx, node, what: str = "weights"):
    """(W, B or None) of a Conv-like node, or a Reject when not constant floating-point tensors."""
    w, why = ctx.const(node.inputs[1] if len(node.inputs) > 1 else None)
    if why:
        return Reject(f"{node.op_type} '{_name(node)}' {what}: {why}")
    b = None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        b, why = ctx.const(node.inputs[2])
        if why:
            return Reject(f"{node.op_type} '{_name(node)}' bias: {why}")
    if w.dtype.kind != "f" and "float" not in str(w.dtype):
        return Reject(f"{node.op_type} '{_name(node)}' weights are {w.dtype}, not floating point")
    return w, b


def _out_channels(node, w) -> int:
    if node.op_type == "ConvTranspose":
        return w.shape[1] * int(_attr(node, "group", 1))
    return w.shape[0]


def _conv_backward(ctx: Ctx, node, w, b, s, t) -> None:
    """W'[c] = W[c]·s[c], b' = b·s + t (ConvTranspose: per group on weight dim 1)."""
    from .fold_math import fold_backward

    w2, b2 = fold_backward(_t(w), None if b is None else _t(b), s, t,
                           transposed=node.op_type == "ConvTranspose", groups=int(_attr(node, "group", 1)))
    ctx.set_input(node, 1, _vname(node.inputs[1]), w2.numpy().astype(w.dtype))
    ctx.set_input(node, 2, _vname(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else _name(node) + "_bias",
                  b2.numpy().astype(w.dtype))


def _producer(ctx: Ctx, x, ops: tuple[str, ...]):
    """The node producing ``x`` when its op is one of ``ops`` and ``x`` has one reader, or a Reject."""
    prod = x.producer()
    if prod is None:
        return Reject("its input is a graph input or initializer", applies=False)
    if prod.op_type not in ops or prod.domain not in _ONNX:
        return Reject(f"its input comes from {prod.op_type} '{_name(prod)}'", applies=False)
    why = ctx.single_use(x)
    if why:
        return Reject(why)
    if not ctx.owns(prod):
        return Reject(f"'{_vname(x)}' comes from the enclosing graph")
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
            return Reject(f"{prod.op_type} '{_name(prod)}' has {_out_channels(prod, wb[0])} output channels, BN {s.numel()}")
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
            return Reject(f"Gemm '{_name(prod)}' B: {why}")
        c = None
        if len(prod.inputs) > 2 and prod.inputs[2] is not None:
            c, why = ctx.const(prod.inputs[2])
            if why:
                return Reject(f"Gemm '{_name(prod)}' C: {why}")
        trans_b = int(_attr(prod, "transB", 0))
        n = bw.shape[0] if trans_b else bw.shape[1]
        if n != s.numel():
            return Reject(f"Gemm '{_name(prod)}' has {n} outputs, BN {s.numel()} channels")
        return Match(bn, [prod], {"b": bw, "c": c, "trans_b": trans_b})

    def rewrite(self, ctx, m, s, t):
        from .fold_math import fold_gemm_backward

        g, d = m.nodes[0], m.data
        b2, c2 = fold_gemm_backward(_t(d["b"]), None if d["c"] is None else _t(d["c"]), s, t,
                                    beta=float(_attr(g, "beta", 1.0)), trans_b=bool(d["trans_b"]))
        ctx.set_input(g, 1, _vname(g.inputs[1]), b2.numpy().astype(d["b"].dtype))
        ctx.set_input(g, 2, _name(g) + "_C", c2.numpy().astype(d["b"].dtype))
        ctx.set_attr(g, "beta", 1.0)
        ctx.take_over(m.bn.outputs[0], g.outputs[0])


class BackwardMatMul:
    """MatMul(x, B) [+ Add(bias)] → BN on a 2-D output:  B'[:,n] = B[:,n]·s[n],
    bias' = bias·s + t (a lone MatMul gets an Add carrying t)."""

    name = "backward"

    def match(self, ctx, bn, s, t):
        x = bn.inputs[0]
        prod = _producer(ctx, x, ("MatMul", "Add"))
        if isinstance(prod, Reject):
            return prod
        add, mm, bias, bias_i = None, prod, None, None
        if prod.op_type == "Add":
            add = prod
            mms = [(k, i) for k, i in enumerate(add.inputs) if i is not None and i.producer() is not None and i.producer().op_type == "MatMul"]
            if len(mms) != 1:
                return Reject(f"its input comes from Add '{_name(add)}', not MatMul + constant bias", applies=False)
            k, mm_out = mms[0]
            bias_i = 1 - k
            bias, why = ctx.const(add.inputs[bias_i])
            if why:
                return Reject(f"Add '{_name(add)}' bias: {why}")
            why = ctx.single_use(mm_out)
            if why:
                return Reject(f"MatMul output {why}")
            mm = mm_out.producer()
            if not ctx.owns(mm):
                return Reject(f"'{_vname(mm_out)}' comes from the enclosing graph")
        bw, why = ctx.const(mm.inputs[1])
        if why or bw.ndim != 2:
            return Reject(f"MatMul '{_name(mm)}' has no constant 2-D B" + (f" ({why})" if why else ""))
        rank = ctx.rank(mm.outputs[0])
        if rank != 2:
            return Reject(f"MatMul '{_name(mm)}' output rank is {rank if rank is not None else 'unknown'}; BN normalises "
                          "axis 1, which is the MatMul's last axis only for 2-D outputs")
        if bw.shape[1] != s.numel():
            return Reject(f"MatMul '{_name(mm)}' has {bw.shape[1]} outputs, BN {s.numel()} channels")
        if bias is not None and (bias.size not in (1, s.numel()) or bias.ndim > 2):
            return Reject(f"Add bias of shape {bias.shape} does not broadcast per channel")
        return Match(bn, [mm] + ([add] if add else []), {"b": bw, "bias": bias, "bias_i": bias_i})

    def rewrite(self, ctx, m, s, t):
        import onnx_ir as ir

        from .fold_math import fold_backward

        mm, d = m.nodes[0], m.data
        bias = None if d["bias"] is None else _t(d["bias"]).reshape(-1).expand(s.numel())
        b2, bias2 = fold_backward(_t(d["b"]).T, bias, s, t)  # a Linear: weight (out, in)
        ctx.set_input(mm, 1, _vname(mm.inputs[1]), b2.T.contiguous().numpy().astype(d["b"].dtype))
        if len(m.nodes) == 2:
            add = m.nodes[1]
            shape = d["bias"].shape if d["bias"].size == s.numel() else (s.numel(),)
            ctx.set_input(add, d["bias_i"], _vname(add.inputs[d["bias_i"]]), bias2.numpy().astype(d["bias"].dtype).reshape(shape))
            ctx.take_over(m.bn.outputs[0], add.outputs[0])
            return
        c = ctx.new_const(_name(mm) + "_bias", bias2.numpy().astype(d["b"].dtype), m.bn)
        add = ir.Node("", "Add", [mm.outputs[0], c], name=_name(m.bn) + "_bias_add")
        ctx.graph.insert_before(m.bn, add)
        ctx.take_over(m.bn.outputs[0], add.outputs[0])


class BackwardConcat:
    """Concat(conv₁ … convₖ, axis=1) → BN: each convᵢ folds its slice s[oᵢ:oᵢ₊₁], t[oᵢ:oᵢ₊₁]
    (the backward Conv formula per slice)."""

    name = "concat"

    def match(self, ctx, bn, s, t):
        cat = _producer(ctx, bn.inputs[0], ("Concat",))
        if isinstance(cat, Reject):
            return cat
        axis = int(_attr(cat, "axis", 1))
        rank = ctx.rank(cat.outputs[0])
        if axis != 1 and not (rank is not None and axis == 1 - rank):
            return Reject(f"Concat '{_name(cat)}' joins axis {axis}, not the channel axis 1")
        parts, seen = [], set()
        for x in cat.inputs:
            prod = _producer(ctx, x, ("Conv", "ConvTranspose"))
            if isinstance(prod, Reject):
                return Reject(f"Concat '{_name(cat)}' input '{_vname(x)}': {prod.reason}")
            if id(prod) in seen:
                return Reject(f"Concat '{_name(cat)}' reads '{_vname(x)}' twice")
            seen.add(id(prod))
            wb = _weights(ctx, prod)
            if isinstance(wb, Reject):
                return wb
            parts.append((prod, wb))
        total = sum(_out_channels(p, wb[0]) for p, wb in parts)
        if total != s.numel():
            return Reject(f"Concat '{_name(cat)}' producers give {total} channels, BN {s.numel()}")
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
                return Reject(f"Add '{_name(add)}' input '{_vname(x)}': {prod.reason}", applies=prod.applies)
            wb = _weights(ctx, prod)
            if isinstance(wb, Reject):
                return wb
            if _out_channels(prod, wb[0]) != s.numel():
                return Reject(f"{prod.op_type} '{_name(prod)}' has {_out_channels(prod, wb[0])} output channels, BN {s.numel()}")
            parts.append((prod, wb))
        if len(parts) != 2 or parts[0][0] is parts[1][0]:
            return Reject(f"Add '{_name(add)}' does not add two different convolutions")
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
    if cons.op_type not in ops or cons.domain not in _ONNX:
        return Reject(f"BN output goes to {cons.op_type} '{_name(cons)}'", applies=False)
    if idx != 0:
        return Reject(f"BN output feeds {cons.op_type} '{_name(cons)}' as input {idx}, not its data input")
    if not ctx.owns(cons):
        return Reject(f"BN output is read inside a subgraph of {cons.op_type} '{_name(cons)}'")
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
        pads = list(_attr(cons, "pads", None) or [])
        auto = _attr(cons, "auto_pad", "NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        pointwise = all(k == 1 for k in wb[0].shape[2:])
        if any(int(p) for p in pads) or (auto not in ("NOTSET", "VALID") and not pointwise):
            return Reject(f"consumer Conv '{_name(cons)}' pads its input (pads={pads}, auto_pad={auto}); padded zeros never went through the BN")
        if wb[0].shape[1] * int(_attr(cons, "group", 1)) != s.numel():
            return Reject(f"consumer Conv '{_name(cons)}' reads {wb[0].shape[1] * int(_attr(cons, 'group', 1))} channels, BN has {s.numel()}")
        return Match(bn, [cons], {"wb": wb})

    def rewrite(self, ctx, m, s, t):
        from .fold_math import fold_forward

        cons, (w, b) = m.nodes[0], m.data["wb"]
        w2, b2 = fold_forward(_t(w), None if b is None else _t(b), s, t, groups=int(_attr(cons, "group", 1)))
        ctx.set_input(cons, 1, _vname(cons.inputs[1]), w2.numpy().astype(w.dtype))
        ctx.set_input(cons, 2, _vname(cons.inputs[2]) if len(cons.inputs) > 2 and cons.inputs[2] is not None else _name(cons) + "_bias",
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
        if int(_attr(cons, "transA", 0)):
            return Reject(f"consumer Gemm '{_name(cons)}' has transA=1 (BN channels would be its rows)")
        bw, why = ctx.const(cons.inputs[1])
        if why:
            return Reject(f"consumer {cons.op_type} '{_name(cons)}' B: {why}")
        c = None
        if cons.op_type == "Gemm" and len(cons.inputs) > 2 and cons.inputs[2] is not None:
            c, why = ctx.const(cons.inputs[2])
            if why:
                return Reject(f"consumer Gemm '{_name(cons)}' C: {why}")
        if cons.op_type == "MatMul":
            rank = ctx.rank(bn.inputs[0])
            if bw.ndim != 2 or rank != 2:
                return Reject(f"consumer MatMul '{_name(cons)}' needs a 2-D input and a constant 2-D B (input rank {rank}, B rank {bw.ndim})")
        trans_b = int(_attr(cons, "transB", 0))
        k = bw.shape[1] if trans_b else bw.shape[0]
        if k != s.numel():
            return Reject(f"consumer {cons.op_type} '{_name(cons)}' reads {k} features, BN has {s.numel()}")
        return Match(bn, [cons], {"b": bw, "c": c, "trans_b": trans_b})

    def rewrite(self, ctx, m, s, t):
        import onnx_ir as ir

        from .fold_math import fold_gemm_forward

        g, d = m.nodes[0], m.data
        b2, c2 = fold_gemm_forward(_t(d["b"]), None if d["c"] is None else _t(d["c"]), s, t,
                                   alpha=float(_attr(g, "alpha", 1.0)), beta=float(_attr(g, "beta", 1.0)), trans_b=bool(d["trans_b"]))
        dt = d["b"].dtype
        ctx.set_input(g, 1, _vname(g.inputs[1]), b2.numpy().astype(dt))
        g.replace_input_with(0, m.bn.inputs[0])
        if g.op_type == "Gemm":
            ctx.set_input(g, 2, _name(g) + "_C", c2.numpy().astype(dt))
            ctx.set_attr(g, "beta", 1.0)
            return
        c = ctx.new_const(_name(g) + "_bias", c2.numpy().astype(dt), m.bn)
        add = ir.Node("", "Add", [g.outputs[0], c], name=_name(g) + "_bias_add")
        add.outputs[0].type, add.outputs[0].shape = g.outputs[0].type, g.outputs[0].shape
        ctx.graph.insert_after(g, add)
        name = g.outputs[0].name
        ir.convenience.replace_all_uses_with(g.outputs[0], add.outputs[0], replace_graph_outputs=True)
        add.replace_input_with(0, g.outputs[0])
        g.outputs[0].name = None
        add.outputs[0].name = name
        g.outputs[0].name = ctx.fresh(name or _name(g))


RULES = [BackwardConv(), BackwardGemm(), BackwardMatMul(), BackwardConcat(), BackwardAdd(), ForwardConv(), ForwardGemm()]


# --------------------------------------------------------------------------------- the BN itself
def bn_params(ctx: Ctx, bn):
    """(s, t) as float64 tensors, or a Reject: inference mode, constant parameters, finite scale."""
    from .fold_math import bn_scale_shift

    if _attr(bn, "training_mode", 0):
        return Reject("BatchNormalization has training_mode=1")
    if ctx.opset < 7 and not _attr(bn, "is_test", 0):
        return Reject(f"BatchNormalization (opset {ctx.opset}) without is_test=1 runs in training mode")
    if ctx.opset < 9 and not _attr(bn, "spatial", 1):
        return Reject("BatchNormalization has spatial=0 (statistics per element, not per channel)")
    if ctx.opset < 14 and any(o is not None and o.name for o in bn.outputs[1:]):
        return Reject(f"BatchNormalization (opset {ctx.opset}) with {len(bn.outputs)} outputs runs in training mode")
    extra = [o for o in bn.outputs[1:] if o is not None and (o.uses() or o.is_graph_output())]
    if extra:
        return Reject(f"BatchNormalization output '{_vname(extra[0])}' (a training statistic) is used")
    if len(bn.inputs) < 5 or bn.inputs[0] is None:
        return Reject("BatchNormalization has fewer than 5 inputs")
    vals = []
    for what, v in zip(("scale", "B", "mean", "var"), bn.inputs[1:5]):
        arr, why = ctx.const(v)
        if why:
            return Reject(f"{what}: {why}")
        if arr.dtype.kind not in "f" and "float" not in str(arr.dtype):
            return Reject(f"{what} is {arr.dtype}, not floating point")
        vals.append(arr.astype(np.float64).reshape(-1))
    c = vals[0].size
    if any(a.size != c for a in vals):
        return Reject(f"scale, B, mean and var have {[a.size for a in vals]} elements, not one per channel")
    eps = float(_attr(bn, "epsilon", 1e-5))
    scale, bias, mean, var = vals
    bad = np.nonzero(~(var + eps > 0) | ~np.isfinite(var) | ~np.isfinite(scale) | ~np.isfinite(mean) | ~np.isfinite(bias))[0]
    if bad.size:
        k = int(bad[0])
        return Reject(f"channel {k} has var + epsilon = {var[k] + eps:g} (epsilon {eps:g}) or non-finite parameters: its output is not a finite affine map")
    return bn_scale_shift(_t(mean), _t(var), eps, _t(scale), _t(bias))


def fold_graph(ctx: Ctx, plan: FoldPlan) -> None:
    bns = [n for n in ctx.graph if n.op_type == "BatchNormalization" and n.domain in _ONNX]
    for bn in bns:
        name = ctx.prefix + _name(bn)
        st = bn_params(ctx, bn)
        if isinstance(st, Reject):
            plan.unfolded.append(Unfolded(name, st.reason))
            continue
        s, t = st
        tried: dict[str, list[Reject]] = {"backward": [], "forward": []}
        for rule in RULES:
            m = rule.match(ctx, bn, s, t)
            if isinstance(m, Match):
                into = [ctx.prefix + _name(n) for n in m.nodes]
                rule.rewrite(ctx, m, s, t)
                ctx.remove(bn)
                plan.folded.append(folded_entry(name, into, rule.name, [n.op_type for n in m.nodes]))
                break
            tried["forward" if rule.name == "forward" else "backward"].append(m)
        else:
            plan.unfolded.append(Unfolded(name, "; ".join(f"{side}: {_pick(rs, side)}" for side, rs in tried.items())))


_TARGETS = {"backward": "Conv/ConvTranspose/Gemm/MatMul/Concat of convs/Add of convs", "forward": "an unpadded Conv, Gemm or MatMul"}


def _pick(rejects: list[Reject], side: str) -> str:
    """The reason of the rule whose pattern was there, else the generic one (what was found instead)."""
    hit = [r for r in rejects if r.applies]
    return hit[0].reason if hit else f"{rejects[0].reason}, not {_TARGETS[side]}"


def _graphs(graph, prefix: str):
    """(graph, name prefix) of every subgraph of If/Loop/Scan (and custom ops) below ``graph``."""
    import onnx_ir as ir

    for node in graph:
        for attr in node.attributes.values():
            subs = [attr.value] if attr.type == ir.AttributeType.GRAPH else list(attr.value) if attr.type == ir.AttributeType.GRAPHS else []
            for k, sub in enumerate(subs):
                p = f"{prefix}{_name(node)}/{attr.name}{'' if len(subs) == 1 else k}/"
                yield sub, p
                yield from _graphs(sub, p)


def _ranks(model) -> dict[str, int]:
    """Ranks from ONNX shape inference on a copy (only needed for MatMul and Concat rules)."""
    import onnx
    import onnx_ir as ir

    try:
        proto = ir.serde.serialize_model(model)
        if proto.ByteSize() > 1_900_000_000:
            return {}
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=False)
    except Exception:
        return {}
    ranks = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.type.tensor_type.HasField("shape"):
            ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    return ranks


def fold_ir(model) -> FoldPlan:
    """Fold the BatchNormalization nodes of an ``onnx_ir.Model`` in place; return the plan."""
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    plan = FoldPlan(tracer="onnx")
    names = {v.name for n in ir.traversal.RecursiveGraphIterator(model.graph) for v in n.outputs if v.name}
    names |= {v.name for v in model.graph.inputs if v.name} | set(model.graph.initializers)
    needs_rank = any(n.op_type in ("MatMul", "Concat") for n in ir.traversal.RecursiveGraphIterator(model.graph))
    ranks = _ranks(model) if needs_rank else {}
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 21))
    ctxs = [Ctx(model, model.graph, main=True, opset=opset)]
    ctxs += [Ctx(model, g, main=False, opset=opset, prefix=p) for g, p in _graphs(model.graph, "")]
    for fn in model.functions.values():
        fopset = fn.opset_imports.get("", opset)
        ctxs.append(Ctx(model, fn, main=False, opset=fopset, prefix=f"{fn.name}:"))
        ctxs += [Ctx(model, g, main=False, opset=fopset, prefix=p) for g, p in _graphs(fn, f"{fn.name}:")]
    for ctx in ctxs:
        ctx.model_names, ctx.ranks = names, ranks
        fold_graph(ctx, plan)
    if plan.folded:
        RemoveUnusedNodesPass()(model)
    return plan


# -------------------------------------------------------------------------------------- entry points
def _to_ir(src, *, copy: bool):
    import onnx
    import onnx_ir as ir

    if isinstance(src, ir.Model):
        return ir.serde.deserialize_model(ir.serde.serialize_model(src)) if copy else src
    if isinstance(src, onnx.ModelProto):
        return ir.serde.deserialize_model(src)
    return ir.serde.deserialize_model(load_onnx(src))


def fold_onnx_proto(model) -> FoldPlan:
    """Fold a ``ModelProto`` in place; return the plan (every BatchNormalization node, folded or why not)."""
    import onnx_ir as ir

    m = ir.serde.deserialize_model(model)
    plan = fold_ir(m)
    if plan.folded:
        model.CopyFrom(ir.serde.serialize_model(m))
    return plan


def bn_count(proto) -> int:
    """BatchNormalization nodes in the main graph, subgraphs and functions of a ModelProto."""

    def graph(g) -> int:
        n = 0
        for node in g.node:
            n += node.op_type == "BatchNormalization" and node.domain in _ONNX
            for a in node.attribute:
                n += sum(graph(sub) for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs))
        return n

    return graph(proto.graph) + sum(graph(f) for f in proto.functions)


def fold_onnx_file(src, dst: str | Path, data_name: str | None = None) -> tuple[FoldPlan, dict[str, Any]]:
    """Fold ``src`` (a path, ModelProto or onnx_ir Model, never modified) and write ``dst``."""
    import onnx_ir as ir

    from .exporting import opset_of, save_onnx

    model = _to_ir(src, copy=True)
    plan = fold_ir(model)
    proto = ir.serde.serialize_model(model)
    info = save_onnx(proto, dst, data_name=data_name)
    info["opset"] = opset_of(proto)
    info["nodes"] = len(proto.graph.node)
    info["batchnorm_nodes"] = bn_count(proto)
    return plan, info


def fold_onnx(src, dst: str | Path) -> FoldPlan:
    """Fold the BatchNormalization nodes of ``src`` (an .onnx path, ``onnx.ModelProto`` or
    ``onnx_ir.Model``; left unchanged) and write ``dst`` atomically. Returns the plan."""
    from ._io import check_output_path

    check_output_path(dst)
    return fold_onnx_file(src, dst)[0]
