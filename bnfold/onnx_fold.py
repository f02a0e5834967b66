"""Fold BatchNormalization nodes inside an existing ONNX graph (no PyTorch model needed).

Patterns (the math is ``fold_math``'s; weights are read in float64 and cast once to their dtype):

* backward, BN input produced by: ``Conv``; ``ConvTranspose`` (``group`` honoured: weight is
  (C_in, C_out/group, k…)); ``Gemm`` (alpha, beta, transA, transB; C created when absent);
  ``MatMul`` with a constant 2-D B, optionally followed by ``Add`` of a constant bias, when the MatMul
  output is 2-D (the BN channel axis 1 is then the MatMul's last axis). A lone MatMul gains its bias by
  turning the BN node into an ``Add``.
* forward, BN output consumed only by: ``Conv`` with all pads 0 (auto_pad NOTSET/VALID) or ``Gemm``
  with transA = 0.

Conditions: BN in inference mode (training_mode 0, a single output); every weight, bias and BN
parameter an initializer or a Constant node; the intermediate value has exactly one consumer and is not
a graph output. Activations are never crossed. New tensors get new initializer names, so an
initializer shared with other nodes is copied, never edited in place; initializers and Constant
nodes that end up unused are removed. Graph input/output names and the opset are kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import BadInputError
from .folding import Folded, FoldPlan, Unfolded


def load_onnx(path: str | Path):
    import onnx

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"ONNX file '{path}' does not exist" if not path.exists() else f"'{path}' is not a file", "check the path")
    try:
        model = onnx.load(str(path))
    except Exception as err:
        from .load import onnx_error

        raise onnx_error(path, err) from err
    if not model.graph.node and not model.graph.output:
        raise BadInputError(f"'{path}' is not an ONNX model (it has no graph)", "pass a .onnx file written by an exporter")
    try:
        onnx.checker.check_model(model if model.ByteSize() < 2_000_000_000 else str(path))
    except Exception as err:
        raise BadInputError(f"'{path}' fails onnx.checker: {str(err).splitlines()[0]}", "fix or re-export the model") from err
    return model


class _Graph:
    def __init__(self, model):
        from onnx import numpy_helper

        self.model = model
        self.g = model.graph
        self.inits = {i.name: i for i in self.g.initializer}
        self.const_nodes = {}
        for n in self.g.node:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                for a in n.attribute:
                    if a.name == "value":
                        self.const_nodes[n.output[0]] = numpy_helper.to_array(a.t)
        self.graph_outputs = {o.name for o in self.g.output}
        self.counter = 0
        self.ranks = self._ranks()
        self.refresh()

    def _ranks(self) -> dict[str, int]:
        import onnx

        try:
            inferred = onnx.shape_inference.infer_shapes(self.model, strict_mode=False, data_prop=False)
        except Exception:
            return {}
        ranks = {}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            tt = vi.type.tensor_type
            if tt.HasField("shape"):
                ranks[vi.name] = len(tt.shape.dim)
        return ranks

    def refresh(self) -> None:
        self.producer = {o: n for n in self.g.node for o in n.output if o}
        self.consumers: dict[str, list] = {}
        for n in self.g.node:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
            for name in _subgraph_names(n):
                self.consumers.setdefault(name, []).append(n)

    def const(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        if not name:
            return None
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        return self.const_nodes.get(name)

    def is_const(self, name: str) -> bool:
        return name in self.inits or name in self.const_nodes

    def add_init(self, base: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper

        while True:
            self.counter += 1
            name = f"{base}_bnfold{self.counter}"
            if name not in self.inits and name not in self.producer:
                break
        t = numpy_helper.from_array(arr, name)
        self.g.initializer.append(t)
        self.inits[name] = t
        return name

    def single_consumer(self, name: str) -> str | None:
        """None when ``name`` feeds exactly one node and is no graph output, else the reason."""
        if name in self.graph_outputs:
            return f"'{name}' is a graph output"
        n = len(self.consumers.get(name, []))
        return None if n == 1 else f"'{name}' has {n} consumers"


def _subgraph_names(node) -> set[str]:
    names: set[str] = set()
    for a in node.attribute:
        subs = list(a.graphs) + ([a.g] if a.HasField("g") else [])
        for sg in subs:
            for n in sg.node:
                names.update(i for i in n.input if i)
                for inner in n.attribute:
                    if inner.HasField("g") or inner.graphs:
                        names |= _subgraph_names(n)
    return names


def _attr(node, name: str, default: Any = None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node, name: str, value) -> None:
    from onnx import helper

    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def _t(a: np.ndarray):
    import torch

    return torch.from_numpy(np.asarray(a, dtype=np.float64).copy())


def _bn_params(G: _Graph, bn) -> tuple[Any, Any, str | None]:
    """(s, t) as float64 torch tensors, or (None, None, reason)."""
    from .fold_math import bn_scale_shift

    if _attr(bn, "training_mode", 0):
        return None, None, "BatchNormalization has training_mode=1"
    if len([o for o in bn.output if o]) != 1:
        return None, None, "BatchNormalization has extra outputs (training mode)"
    names = list(bn.input[1:5])
    vals = [G.const(n) for n in names]
    missing = [n for n, v in zip(names, vals) if v is None]
    if len(names) < 4 or missing:
        return None, None, f"parameters {missing or names} are not initializers or Constant nodes"
    scale, bias, mean, var = vals
    s, t = bn_scale_shift(_t(mean), _t(var), float(_attr(bn, "epsilon", 1e-5)), _t(scale), _t(bias))
    return s, t, None


def _weights(G: _Graph, node, what: str = "weights"):
    """(W, B or None, None) of a Conv-like node, or (None, None, reason) when not constant."""
    w = G.const(node.input[1])
    has_b = len(node.input) > 2 and bool(node.input[2])
    b = G.const(node.input[2]) if has_b else None
    if w is None or (has_b and b is None):
        return None, None, f"{node.op_type} '{node.name}' {what} are not constant"
    return w, b, None


def _set_weights(G: _Graph, node, w_new, b_new, dtype) -> None:
    """Point ``node`` at new initializers (copies: shared initializers stay as they were)."""
    node.input[1] = G.add_init(node.input[1], w_new.numpy().astype(dtype))
    has_b = len(node.input) > 2 and bool(node.input[2])
    bname = G.add_init(node.input[2] if has_b else (node.name or node.op_type.lower()) + "_bias", b_new.numpy().astype(dtype))
    if len(node.input) > 2:
        node.input[2] = bname
    else:
        node.input.append(bname)


def _backward(G: _Graph, bn, s, t) -> tuple[str | None, str | None]:
    """Fold into the producer of the BN input. (producer description, None) or (None, reason)."""
    from .fold_math import fold_backward

    x = bn.input[0]
    prod = G.producer.get(x)
    if prod is None:
        return None, "its input is a graph input or initializer"
    why = G.single_consumer(x)
    if why:
        return None, why
    op = prod.op_type
    c = s.numel()
    if op in ("Conv", "ConvTranspose"):
        w, b, why = _weights(G, prod)
        if why:
            return None, why
        groups = int(_attr(prod, "group", 1))
        try:
            w2, b2 = fold_backward(_t(w), None if b is None else _t(b), s, t, transposed=op == "ConvTranspose", groups=groups)
        except ValueError as err:
            return None, f"{op} '{prod.name}': {err}"
        _set_weights(G, prod, w2, b2, w.dtype)
        _bypass(G, prod, bn)
        return f"{op} {prod.name or prod.output[0]}", None
    if op == "Gemm":
        if _attr(prod, "transA", 0) not in (0, 1):
            return None, "Gemm has an unknown transA"
        bw = G.const(prod.input[1])
        if bw is None:
            return None, f"Gemm '{prod.name}' B is not constant"
        cw = G.const(prod.input[2]) if len(prod.input) > 2 and prod.input[2] else None
        if len(prod.input) > 2 and prod.input[2] and cw is None:
            return None, f"Gemm '{prod.name}' C is not constant"
        trans_b = int(_attr(prod, "transB", 0))
        beta = float(_attr(prod, "beta", 1.0))
        n_out = bw.shape[0] if trans_b else bw.shape[1]
        if n_out != c:
            return None, f"Gemm '{prod.name}' has {n_out} outputs, BN {c} channels"
        B = _t(bw)
        B2 = B * (s.reshape(-1, 1) if trans_b else s.reshape(1, -1))
        C = torch_zeros(c) if cw is None else beta * _t(cw)
        C2 = C * s + t  # broadcasts over (N,), (1, N) or (M, N)
        prod.input[1] = G.add_init(prod.input[1], B2.numpy().astype(bw.dtype))
        cname = G.add_init((prod.name or "gemm") + "_C" if cw is None else prod.input[2], C2.numpy().astype(bw.dtype))
        if len(prod.input) > 2:
            prod.input[2] = cname
        else:
            prod.input.append(cname)
        _set_attr(prod, "beta", 1.0)
        _bypass(G, prod, bn)
        return f"Gemm {prod.name or prod.output[0]}", None
    if op in ("MatMul", "Add"):
        add = None
        mm = prod
        bias_name = None
        if op == "Add":
            add = prod
            srcs = [(G.producer.get(i), i) for i in add.input]
            mms = [(p, i) for p, i in srcs if p is not None and p.op_type == "MatMul"]
            consts = [i for i in add.input if G.is_const(i)]
            if len(mms) != 1 or len(consts) != 1:
                return None, "its input comes from Add, not MatMul + constant bias"
            mm, mm_out = mms[0]
            why = G.single_consumer(mm_out)
            if why:
                return None, f"MatMul output {why}"
            bias_name = consts[0]
        bw = G.const(mm.input[1])
        if bw is None or bw.ndim != 2:
            return None, f"MatMul '{mm.name}' has no constant 2-D B"
        rank = G.ranks.get(mm.output[0])
        if rank != 2:
            return None, f"MatMul '{mm.name}' output rank is {rank if rank is not None else 'unknown'}; BN normalises axis 1, which is the MatMul's last axis only for 2-D outputs"
        if bw.shape[1] != c:
            return None, f"MatMul '{mm.name}' has {bw.shape[1]} outputs, BN {c} channels"
        bias = G.const(bias_name) if add is not None else None
        if bias is not None and (bias.size not in (1, c) or bias.ndim > 2):
            return None, f"Add bias of shape {bias.shape} does not broadcast per channel"
        B2 = _t(bw) * s.reshape(1, -1)
        mm.input[1] = G.add_init(mm.input[1], B2.numpy().astype(bw.dtype))
        if add is not None:
            b2 = (_t(bias).reshape(-1) * s + t) if bias.size == c else (_t(bias).reshape(()) * s + t)
            new = G.add_init(bias_name, b2.numpy().astype(bias.dtype).reshape(bias.shape if bias.size == c else (c,)))
            add.input[list(add.input).index(bias_name)] = new
            _bypass(G, add, bn)
            return f"MatMul {mm.name or mm.output[0]} + Add {add.name or add.output[0]}", None
        # a lone MatMul: the BN node becomes the Add that carries the folded bias
        new = G.add_init((mm.name or "matmul") + "_bias", t.numpy().astype(bw.dtype))
        bn.op_type = "Add"
        del bn.input[:]
        bn.input.extend([x, new])
        del bn.attribute[:]
        return f"MatMul {mm.name or mm.output[0]} (+ Add)", None
    return None, f"its input comes from {op} '{prod.name}', not Conv/ConvTranspose/Gemm/MatMul"


def torch_zeros(c):
    import torch

    return torch.zeros(c, dtype=torch.float64)


def _bypass(G: _Graph, prod, bn) -> None:
    """The producer now writes the BN's output name; the BN node goes."""
    out = bn.output[0]
    old = prod.output[0]
    prod.output[0] = out
    G.g.node.remove(bn)
    _drop_value_info(G, old)


def _drop_value_info(G: _Graph, name: str) -> None:
    for vi in list(G.g.value_info):
        if vi.name == name:
            G.g.value_info.remove(vi)


def _forward(G: _Graph, bn, s, t) -> tuple[str | None, str | None]:
    from .fold_math import fold_forward

    y = bn.output[0]
    why = G.single_consumer(y)
    if why:
        return None, why
    cons = G.consumers[y][0]
    if not cons.input or cons.input[0] != y:
        return None, f"BN output feeds {cons.op_type} '{cons.name}' as a weight"
    if cons.op_type == "Conv":
        pads = _attr(cons, "pads", None) or []
        auto = _attr(cons, "auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if any(int(p) for p in pads) or auto not in ("NOTSET", "VALID"):
            return None, f"consumer Conv '{cons.name}' pads its input (pads={list(pads)}, auto_pad={auto})"
        w, b, why = _weights(G, cons)
        if why:
            return None, f"consumer {why}"
        try:
            w2, b2 = fold_forward(_t(w), None if b is None else _t(b), s, t, groups=int(_attr(cons, "group", 1)))
        except ValueError as err:
            return None, f"consumer Conv '{cons.name}': {err}"
        _set_weights(G, cons, w2, b2, w.dtype)
    elif cons.op_type == "Gemm":
        if int(_attr(cons, "transA", 0)):
            return None, f"consumer Gemm '{cons.name}' has transA=1 (BN channels would be its rows)"
        bw = G.const(cons.input[1])
        cw = G.const(cons.input[2]) if len(cons.input) > 2 and cons.input[2] else None
        if bw is None or (len(cons.input) > 2 and cons.input[2] and cw is None):
            return None, f"consumer Gemm '{cons.name}' weights are not constant"
        trans_b = int(_attr(cons, "transB", 0))
        alpha, beta = float(_attr(cons, "alpha", 1.0)), float(_attr(cons, "beta", 1.0))
        opB = _t(bw).T if trans_b else _t(bw)  # (K, N)
        if opB.shape[0] != s.numel():
            return None, f"consumer Gemm '{cons.name}' reads {opB.shape[0]} features, BN has {s.numel()}"
        opB2 = opB * s.reshape(-1, 1)
        shift = alpha * (t @ opB)  # (N,)
        C2 = shift if cw is None else beta * _t(cw) + shift
        cons.input[1] = G.add_init(cons.input[1], (opB2.T if trans_b else opB2).contiguous().numpy().astype(bw.dtype))
        cname = G.add_init(cons.input[2] if cw is not None else (cons.name or "gemm") + "_C", C2.numpy().astype(bw.dtype))
        if len(cons.input) > 2:
            cons.input[2] = cname
        else:
            cons.input.append(cname)
        _set_attr(cons, "beta", 1.0)
    else:
        return None, f"BN output goes to {cons.op_type} '{cons.name}', not to Conv/Gemm"
    cons.input[0] = bn.input[0]
    G.g.node.remove(bn)
    _drop_value_info(G, y)
    return f"{cons.op_type} {cons.name or cons.output[0]}", None


def _cleanup(G: _Graph) -> None:
    """Remove Constant nodes and initializers nothing reads any more."""
    G.refresh()
    used = set(G.consumers) | G.graph_outputs
    changed = True
    while changed:
        changed = False
        for n in list(G.g.node):
            if n.op_type == "Constant" and not any(o in used for o in n.output):
                G.g.node.remove(n)
                changed = True
        G.refresh()
        used = set(G.consumers) | G.graph_outputs
    for init in list(G.g.initializer):
        if init.name not in used:
            G.g.initializer.remove(init)
            G.inits.pop(init.name, None)
            for gi in list(G.g.input):
                if gi.name == init.name:
                    G.g.input.remove(gi)


def fold_onnx_proto(model) -> FoldPlan:
    """Fold in place; return the plan (every BatchNormalization node, folded or with a reason)."""
    G = _Graph(model)
    plan = FoldPlan(tracer="onnx")
    bns = [n for n in G.g.node if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")]
    for bn in bns:
        name = bn.name or bn.output[0]
        s, t, why = _bn_params(G, bn)
        if why:
            plan.unfolded.append(Unfolded(name, why))
            continue
        into, back = _backward(G, bn, s, t)
        direction = "backward"
        if into is None:
            into, fwd = _forward(G, bn, s, t)
            direction = "forward"
        G.refresh()
        if into is None:
            plan.unfolded.append(Unfolded(name, f"backward: {back}; forward: {fwd}"))
            continue
        op, _, node_name = into.partition(" ")
        plan.folded.append(Folded(name, node_name, direction, op))
    _cleanup(G)
    return plan


def fold_onnx_file(src: str | Path, dst: str | Path, data_name: str | None = None) -> tuple[FoldPlan, dict[str, Any]]:
    from .exporting import opset_of, save_onnx

    model = load_onnx(src)
    plan = fold_onnx_proto(model)
    info = save_onnx(model, dst, data_name=data_name)
    info["opset"] = opset_of(model)
    info["nodes"] = len(model.graph.node)
    info["batchnorm_nodes"] = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    return plan, info


def fold_onnx(src: str | Path, dst: str | Path) -> FoldPlan:
    """Fold the BatchNormalization nodes of ``src`` and write ``dst`` (atomically). Returns the plan."""
    from ._io import OutputSet
    from .paths import check_run_paths, spec_files

    check_run_paths({"src": spec_files(str(src))}, {"dst": dst}, sidecars={"dst": [".data"]})
    with OutputSet() as outs:  # the model and its external data land together
        return fold_onnx_file(src, outs.stage(dst))[0]
