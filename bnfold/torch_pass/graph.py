"""Graph discovery for the PyTorch pass: which node feeds each module call, and who consumes it.

``torch.fx`` symbolic tracing first, ``torch.export`` (which needs example inputs) for models fx
cannot trace. Both graphs are reduced to the same questions per module *call*: which node feeds it,
and who consumes its output (reads of ``.shape``/``.size()``/``.dim()`` are metadata, not consumers).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from bnfold.edges.resources import weight_bytes
from bnfold.errors import first_line
from bnfold.torch_pass import bn_kinds


class _LeafTracer(torch.fx.Tracer):
    """fx tracer that keeps every BN kind and producer (registered or subclassed), and a folded
    branch's ``ZeroBranch``, as one call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if bn_kinds.is_batchnorm(m) or bn_kinds.is_producer_like(m) or isinstance(m, bn_kinds.ZeroBranch):
            return True
        return super().is_leaf_module(m, qualname)


@dataclass
class Call:
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
    if hasattr(t, "_schema"):  # aten OpOverload: aten.cat.default → "cat"
        return t._schema.name.split("::")[-1]
    return getattr(t, "__name__", None) or str(t)


class Graph:
    """Module calls and node ownership over an fx graph (from fx or torch.export)."""

    def __init__(self, graph: torch.fx.Graph, model: nn.Module, owner: Callable, rank: Callable,
                 shape: Callable, is_param: Callable):
        self.graph = graph
        self.model = model
        self.owner = owner  # node -> (path, call_key) | None
        self.rank = rank
        self.shape = shape  # node -> tuple | None
        self.calls: dict[str, dict[Any, Call]] = {}
        for node in graph.nodes:
            own = owner(node)
            if own is None:
                continue
            path, key = own
            call = self.calls.setdefault(path, {}).setdefault(key, Call(path, [], []))
            for arg in node.all_input_nodes:
                if owner(arg) != own and not is_param(arg) and arg not in call.inputs:
                    call.inputs.append(arg)
                    call.rank_in = rank(arg)
            if any(owner(u) != own for u in node.users):
                call.outputs.append(node)

    @staticmethod
    def is_meta_read(node, value) -> bool:
        """``node`` reads only metadata (shape, dtype, …) of ``value``."""
        if node.op not in ("call_method", "call_function"):
            return False
        name = _fn_name(node)
        args = node.args
        if name in _SHAPE_OF_SECOND and len(args) > 1 and args[1] is value and args[0] is not value:
            return True  # x.reshape_as(value): value is a shape template
        if name in _LIKE and args and args[0] is value:
            return True
        if node.op == "call_method":
            return name in _META_METHODS
        if node.target is getattr:
            return len(args) > 1 and args[1] in _META_ATTRS
        return name in _META_ATEN or node.target is len

    def data_users(self, node, own=None) -> list:
        """Consumers of ``node``'s value outside its call, metadata reads excluded. A free node
        (function, module outside interest): every user is outside."""
        own = self.owner(node) if own is None else own
        outside = [u for u in node.users if own is None or self.owner(u) != own]
        return [u for u in outside if not self.is_meta_read(u, node)]

    def op_name(self, node) -> str | None:
        """'cat', 'flatten', 'mean', ... for function/method nodes; None for others."""
        return _fn_name(node) if node.op in ("call_function", "call_method") else None

    def module_of(self, node) -> nn.Module | None:
        """The module a call_module node calls (fx only: torch.export inlines every module)."""
        return self.model.get_submodule(node.target) if node.op == "call_module" else None

    def what(self, node) -> str:
        own = self.owner(node)
        if own:
            return f"module `{own[0]}`"
        if node.op == "placeholder":
            return "the model input"
        if node.op == "call_module":
            return f"module `{node.target}` ({type(self.module_of(node)).__name__})"
        return f"`{_fn_name(node)}`"


FAKE_SHAPES_BYTES = 256 << 20  # weights above which shapes are propagated without computing


def _propagate_shapes(gm, example_inputs: tuple) -> None:
    """Every node's output shape (``tensor_meta``). A model with large weights propagates fake
    tensors (shapes only: 1.5 s instead of a 4 s forward on the 2.4 GB net, whose every forward
    faults in a reordered copy of its weights); a small one runs a real forward, which is then the
    cheaper (ResNet-50: 0.1 s against 0.35 s). Fake propagation that fails falls back to the real one."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    big = weight_bytes(gm) > FAKE_SHAPES_BYTES
    # ShapeProp prints a traceback itself before raising (the caller records the error): not on stderr
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        if big:
            try:
                ShapeProp(gm, fake_mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(*example_inputs)
                return
            except Exception:  # noqa: BLE001  (data-dependent code: the real forward below decides)
                pass
        ShapeProp(gm).propagate(*example_inputs)


def _fx_graph(model: nn.Module, example_inputs: tuple | None, interest: set[str]) -> Graph:
    tracer = _LeafTracer()
    graph = tracer.trace(model)
    if example_inputs is not None:
        _propagate_shapes(torch.fx.GraphModule(model, graph), example_inputs)

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

    return Graph(graph, model, owner, rank, shape, lambda n: n.op == "get_attr")


def _export_graph(model: nn.Module, example_inputs: tuple, interest: set[str]) -> Graph:
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
        try:
            return tuple(int(d) for d in val.shape) if isinstance(val, torch.Tensor) else None
        except Exception:  # symbolic sizes
            return None

    def rank(node):
        val = node.meta.get("val")
        return val.dim() if isinstance(val, torch.Tensor) else None

    return Graph(ep.graph, model, owner, rank, shape,
                 lambda n: n.op == "placeholder" and n.name in state_inputs)


def trace(model: nn.Module, example_inputs: tuple | None, interest: set[str]) -> tuple[Graph | None, str | None, str | None]:
    try:
        return _fx_graph(model, example_inputs, interest), "fx", None
    except Exception as fx_err:  # fx cannot trace data-dependent Python; fall back
        fx_msg = f"torch.fx: {type(fx_err).__name__}: {first_line(fx_err, empty='')}"
    if example_inputs is None:
        return None, None, fx_msg + "; pass example inputs so torch.export can trace it"
    try:
        return _export_graph(model, example_inputs, interest), "torch.export", None
    except Exception as ex_err:
        return None, None, f"{fx_msg}; torch.export: {type(ex_err).__name__}: {first_line(ex_err, empty='')}"
