"""The pieces every ONNX rule uses: the rule base and the BN it folds, constant resolution, the graph
context (with the IR edits rules make), the BN's own (s, t). A value that is a graph input, even with
an initializer, is overridable at run time and is never a constant; constant chains (Identity, Cast,
CastLike, Reshape, (Un)Squeeze, Expand, Shape of a static shape, Concat) are evaluated, so
deduplicated tensors and Expand-ed zero biases resolve; so is a parameter's own preprocessing
(Gather, Sigmoid, Neg, Sqrt, Add, Sub, Mul, Div of constants: a gate sigmoid(α)[k])."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from bnfold.fold_math import bn_scale_shift
from bnfold.onnx_pass.io import ONNX_DOMAINS
from bnfold.onnx_pass.io import node_label as node_name
from bnfold.rule import NoMatch, Rule


# ------------------------------------------------------------------------------------ rule protocol
@dataclass
class BN:
    """One BatchNormalization node being folded and its affine map y = s·x + t (float64 tensors)."""

    node: Any
    s: Any
    t: Any

    @property
    def channels(self) -> int:
        return self.s.numel()


class OnnxRule(Rule):
    """An ONNX pattern: ``match(ctx, bn)`` returns a dataclass whose ``nodes`` are the nodes that absorb
    the BN (the plan's ``into``) or raises ``NoMatch``; ``rewrite(ctx, bn, match)`` applies the fold and
    removes the BN. ``side``: which direction the pattern folds, for the generic refusal reason."""

    side = "backward"

    def rewrite(self, ctx: Ctx, bn: BN, m) -> None:
        raise NotImplementedError


def value_name(v) -> str:
    return v.name or "?"


def attr(node, name: str, default=None):
    a = node.attributes.get(name)
    if a is not None and (type(a).__name__ == "RefAttr" or (hasattr(a, "is_ref") and a.is_ref())):  # set by each caller
        raise ValueError(f"attribute '{name}' of {node.op_type} '{node_name(node)}' is set by the function's caller")
    return default if a is None else a.value


def f64(arr):
    """``arr`` as a float64 tensor (a copy); None stays None (a layer without bias)."""
    import torch

    return None if arr is None else torch.from_numpy(np.asarray(arr, dtype=np.float64).copy())


# --------------------------------------------------------------------------------- constant values
def _binary(ufunc):
    """A ``Consts`` op for a binary ONNX op, computed in its inputs' common dtype."""
    return lambda self, node, a, b: ufunc(a, b).astype(np.result_type(a, b))


class Consts:
    """Constant values, followed through the small op chains exporters write; never graph inputs."""

    MAX_DEPTH = 16
    META_ONLY = {("Shape", 0), ("CastLike", 1)}

    def value(self, v, depth: int = 0) -> tuple[np.ndarray | None, str | None]:
        """(array, None) or (None, why it is not a constant)."""
        if v is None:
            return None, "missing"
        if v.is_graph_input():
            return None, f"'{value_name(v)}' is a graph input (overridable at run time), not a constant"
        node = v.producer()
        if node is None:  # an initializer (of this graph or an enclosing one)
            if v.const_value is not None:
                return self._np(v.const_value), None
            return None, f"'{value_name(v)}' is an input of the enclosing function or graph, not a constant"
        if depth > self.MAX_DEPTH:
            return None, f"'{value_name(v)}' is computed by a chain of more than {self.MAX_DEPTH} nodes"
        fn = getattr(self, "_op_" + node.op_type, None) if node.domain in ONNX_DOMAINS else None
        if fn is None:
            return None, f"'{value_name(v)}' is computed by {node.op_type} '{node_name(node)}', not a constant"
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
            return None, f"'{value_name(v)}': cannot evaluate {node.op_type} ({type(err).__name__})"

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

        return x.astype(ir.DataType(attr(node, "to")).numpy())

    def _op_CastLike(self, node, x, like):
        return x.astype(like.dtype.numpy())

    def _op_Reshape(self, node, x, shape):
        shape = [int(d) for d in shape]
        if not attr(node, "allowzero", 0):
            shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return x.reshape(shape)

    def _op_Unsqueeze(self, node, x, axes=None):
        axes = attr(node, "axes") if axes is None else axes
        out = x
        rank = x.ndim + len(axes)
        for a in sorted(int(a) % rank for a in axes):
            out = np.expand_dims(out, a)
        return out

    def _op_Squeeze(self, node, x, axes=None):
        axes = attr(node, "axes") if axes is None else axes
        return np.squeeze(x) if axes is None else np.squeeze(x, axis=tuple(int(a) % x.ndim for a in axes))

    def _op_Expand(self, node, x, shape):
        return np.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(int(d) for d in shape))).copy()

    def _op_Shape(self, node, v):
        dims = list(v.shape.dims) if v.shape is not None else None
        if dims is None or not all(isinstance(d, int) for d in dims):
            raise ValueError("dynamic shape")
        start, end = attr(node, "start", 0), attr(node, "end", None)
        return np.asarray(dims[start:end], dtype=np.int64)

    def _op_Concat(self, node, *xs):
        return np.concatenate(xs, axis=attr(node, "axis"))

    # a parameter's own preprocessing (a gate sigmoid(α)[k], a scale's square root): elementwise, in its dtype
    def _op_Gather(self, node, x, idx):
        return np.take(x, idx.astype(np.int64), axis=int(attr(node, "axis", 0)))

    def _op_Sigmoid(self, node, x):
        return (1 / (1 + np.exp(-x))).astype(x.dtype)

    def _op_Neg(self, node, x):
        return -x

    def _op_Sqrt(self, node, x):
        return np.sqrt(x)

    _op_Add, _op_Sub, _op_Mul = _binary(np.add), _binary(np.subtract), _binary(np.multiply)

    def _op_Div(self, node, a, b):
        if a.dtype.kind in "iu":
            raise ValueError("integer division")
        return (a / b).astype(np.result_type(a, b))


# ----------------------------------------------------------------------------------- the context
class Ctx:
    """One graph-like (main graph, subgraph or function) being folded. ``model_names``: every value
    name of the model (new names avoid them); ``inferred()``: the model's shapes from shape inference
    (``fold._shapes``), for values whose IR shape is unknown."""

    def __init__(self, graph, *, main: bool, opset: int, prefix: str, model_names: set, inferred):
        self.graph, self.main, self.opset, self.prefix = graph, main, opset, prefix
        self.model_names, self.inferred = model_names, inferred
        self.consts = Consts()
        self._counter = itertools.count(1)

    def const(self, v):
        return self.consts.value(v)

    def need_const(self, v, what: str) -> np.ndarray:
        """The constant value of ``v``, or ``NoMatch("{what}: why it is not a constant")``."""
        arr, why = self.const(v)
        if why:
            raise NoMatch(f"{what}: {why}")
        return arr

    def owns(self, node) -> bool:
        """Whether ``node`` belongs to this graph-like (not to an enclosing or nested graph)."""
        return node.graph is self.graph or node.graph is getattr(self.graph, "graph", None)

    def single_use(self, v) -> str | None:
        """None when ``v`` feeds exactly one node input and is no graph output, else the reason."""
        if v.is_graph_output():
            return f"'{value_name(v)}' is a graph output"
        n = len(v.uses())
        return None if n == 1 else f"'{value_name(v)}' has {n} consumers"

    def reader(self, v) -> tuple | None:
        """(node, input index) of the one reader of ``v``, or None (``single_use`` says why)."""
        return None if self.single_use(v) else next(iter(v.uses()))

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
            v = ir.Value(name=name, const_value=tensor, shape=ir.Shape(arr.shape), type=ir.TensorType(tensor.dtype))
            self.graph.register_initializer(v)
            return v
        node = ir.Node("", "Constant", [], [ir.AttrTensor("value", tensor)], name=name + "_const")
        node.outputs[0].name = name
        self.graph.insert_before(before, node)
        return node.outputs[0]

    def set_input(self, node, index: int, base: str, arr: np.ndarray) -> None:
        v = self.new_const(base, arr, node)
        if index >= len(node.inputs):
            node.resize_inputs(index + 1)
        node.replace_input_with(index, v)

    def set_attr(self, node, name: str, value: float) -> None:
        import onnx_ir as ir

        node.attributes[name] = ir.AttrFloat32(name, float(value))

    def replace_bn(self, bn, value, new_nodes=()) -> None:
        """The BN's readers read ``value`` instead, which takes the BN output's name, type and shape
        (a kept graph-output name); ``new_nodes`` go where the BN was; the BN goes."""
        import onnx_ir as ir

        ir.convenience.replace_nodes_and_values(self.graph, bn, [bn], list(new_nodes), [bn.outputs[0]], [value])

    def bypass_bn(self, bn) -> None:
        """The BN's readers read its input (their weights took the BN); the BN goes."""
        import onnx_ir as ir

        ir.convenience.replace_all_uses_with(bn.outputs[0], bn.inputs[0])
        self.graph.remove(bn, safe=True)

    def rank(self, v) -> int | None:
        shape = self.shape(v)
        return None if shape is None else len(shape)

    def shape(self, v) -> tuple | None:
        """``v``'s dims (int, a symbol, None: unknown) from the IR, else from shape inference."""
        if v.shape is not None:
            return tuple(d if isinstance(d, int) else getattr(d, "value", None) for d in v.shape)
        return self.inferred().get(v.name) if v.name else None


# --------------------------------------------------------------------------------- the BN itself
def training_outputs(ctx: Ctx, bn) -> bool:
    """Before opset 14 a BatchNormalization with all five outputs named is in training mode (the
    spec's output case #1; onnxruntime runs it so). Unnamed (empty) optional outputs are absent."""
    return ctx.opset < 14 and len(bn.outputs) == 5 and all(o is not None and o.name for o in bn.outputs)


def trim_unused_outputs(ctx: Ctx, bn) -> int:
    """Drop the optional outputs of an inference BatchNormalization that nothing reads (empty, or
    named and unused): a runtime counts outputs up to the last named one, and before opset 14 only
    1 (inference) or 5 (training) are allowed. The number dropped (0: none, or training mode)."""
    extra = bn.outputs[1:]
    if not extra or training_outputs(ctx, bn) or attr(bn, "training_mode", 0):
        return 0
    if any(o is not None and (o.uses() or o.is_graph_output()) for o in extra):
        return 0
    bn.resize_outputs(1)
    return len(extra)


def bn_params(ctx: Ctx, bn):
    """(s, t) as float64 tensors, or ``NoMatch``: inference mode, constant parameters, finite scale."""
    if attr(bn, "training_mode", 0):
        raise NoMatch("BatchNormalization has training_mode=1")
    if ctx.opset < 7 and not attr(bn, "is_test", 0):
        raise NoMatch(f"BatchNormalization (opset {ctx.opset}) without is_test=1 runs in training mode")
    if ctx.opset < 9 and not attr(bn, "spatial", 1):
        raise NoMatch("BatchNormalization has spatial=0 (statistics per element, not per channel)")
    extra = [o for o in bn.outputs[1:] if o is not None and (o.uses() or o.is_graph_output())]
    if extra:
        raise NoMatch(f"BatchNormalization output '{value_name(extra[0])}' (a training statistic) is used")
    if training_outputs(ctx, bn):
        raise NoMatch(f"BatchNormalization (opset {ctx.opset}) with 5 outputs runs in training mode "
                      "(all five named: onnxruntime computes Y from the batch's own statistics)")
    if len(bn.inputs) < 5 or bn.inputs[0] is None:
        raise NoMatch("BatchNormalization has fewer than 5 inputs")
    vals = []
    for what, v in zip(("scale", "B", "mean", "var"), bn.inputs[1:5]):
        arr = ctx.need_const(v, what)
        if arr.dtype.kind not in "f" and "float" not in str(arr.dtype):
            raise NoMatch(f"{what} is {arr.dtype}, not floating point")
        vals.append(arr.astype(np.float64).reshape(-1))
    c = vals[0].size
    if any(a.size != c for a in vals):
        raise NoMatch(f"scale, B, mean and var have {[a.size for a in vals]} elements, not one per channel")
    eps = float(attr(bn, "epsilon", 1e-5))
    scale, bias, mean, var = vals
    bad = np.nonzero(~(var + eps > 0) | ~np.isfinite(var) | ~np.isfinite(scale) | ~np.isfinite(mean) | ~np.isfinite(bias))[0]
    if bad.size:
        k = int(bad[0])
        raise NoMatch(f"channel {k} has var + epsilon = {var[k] + eps:g} (epsilon {eps:g}) or non-finite parameters: its output is not a finite affine map")
    return bn_scale_shift(f64(mean), f64(var), eps, f64(scale), f64(bias))
