"""ONNX files in and out: load and check, write atomically with deterministic bytes (streamed, one
initializer at a time; external data above the 2 GB protobuf limit), strip exporter metadata; the one traversal (``walk``) every walk of a graph goes through: counting
BatchNormalization nodes, validating their statistics, folding."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnfold.edges.files import atomic_path, sha256_file
from bnfold.edges.load import onnx_error
from bnfold.errors import BadInputError, ExportError, first_line

PROTO_LIMIT = 2_000_000_000  # bytes; protobuf cannot serialise a message past 2 GiB
ONNX_DOMAINS = ("", "ai.onnx")


def load_onnx(path: str | Path, repairs: list[str] | None = None):
    """Read and check an .onnx file (ModelProto); BadInputError with one line when it is not one.

    ``repairs``: a list to allow the repairs onnxruntime makes silently when onnx.checker rejects a
    file it can run (nodes out of topological order, IR < 4 initializers not listed as inputs):
    they are applied, and each is described in the list. None: the file must pass as it is."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"ONNX file '{path}' does not exist" if not path.exists() else f"'{path}' is not a file", "check the path")
    try:
        model = onnx.load(str(path))
    except Exception as err:
        raise onnx_error(path, err) from err
    if not model.graph.node and not model.graph.output:
        raise BadInputError(f"'{path}' is not an ONNX model (it has no graph)", "pass a .onnx file written by an exporter")
    try:
        onnx.checker.check_model(model if model.ByteSize() < 2_000_000_000 else str(path))
    except Exception as err:
        fixed = repaired(model, repairs) if repairs is not None else None
        if fixed is None:
            raise BadInputError(f"'{path}' fails onnx.checker: {first_line(err)}", "fix or re-export the model") from err
        model = fixed
    return model


def repaired(model, repairs: list[str]):
    """A copy of ``model`` with its nodes in topological order and, below IR 4, every initializer
    listed as a graph input (what the format requires there; onnxruntime loads such files as they
    are), when that makes onnx.checker accept it: then each repair is added to ``repairs``.
    None when the file still fails (or nothing could be repaired)."""
    import onnx

    if model.ByteSize() >= PROTO_LIMIT:  # the checker needs one serialised message
        return None
    fixed, notes = onnx.ModelProto(), []
    fixed.CopyFrom(model)
    moved = sum(_sort_graph(where.graph) for where in walk(fixed))
    if moved:
        notes.append(f"repaired: {moved} node(s) were out of topological order (sorted, as onnxruntime does)")
    if fixed.ir_version < 4:
        listed = {i.name for i in fixed.graph.input}
        missing = [t for t in fixed.graph.initializer if t.name not in listed]
        for t in missing:
            fixed.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        if missing:
            notes.append(f"repaired: IR version {fixed.ir_version} lists every initializer as a graph input; "
                         f"listed {len(missing)} that were not ({', '.join(t.name for t in missing[:3])}{', …' if len(missing) > 3 else ''})")
    if not notes:
        return None
    try:
        onnx.checker.check_model(fixed)
    except onnx.checker.ValidationError:
        return None
    repairs.extend(notes)
    return fixed


def _names_read(node) -> set[str]:
    """Values ``node`` reads: its inputs and what its subgraphs read from outside themselves."""
    names = {i for i in node.input if i}
    for _, subs in _subgraphs(node):
        for sub in subs:
            top = Where(sub, "")
            for where in (top, *_below(top)):
                for n in where.graph.node:
                    names.update(i for i in n.input if i)
    return names


def _sort_graph(graph) -> int:
    """Sort ``graph.node`` topologically in place (stable: ready nodes keep their order); the
    number of nodes that moved. 0 (unchanged) when the graph has a cycle."""
    nodes = list(graph.node)
    made = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    deps = [{made[i] for i in _names_read(n) if i in made and made[i] != k} for k, n in enumerate(nodes)]
    users: list[list[int]] = [[] for _ in nodes]
    for k, d in enumerate(deps):
        for j in d:
            users[j].append(k)
    waiting = [len(d) for d in deps]
    ready = [k for k, w in enumerate(waiting) if not w]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for u in users[k]:
            waiting[u] -= 1
            if not waiting[u]:
                heapq.heappush(ready, u)
    if len(order) < len(nodes):
        return 0
    moved = sum(k != j for j, k in enumerate(order))
    if moved:
        del graph.node[:]
        graph.node.extend(nodes[k] for k in order)
    return moved


def strip_metadata(proto) -> None:
    """Remove exporter metadata (stack traces, paths, names of Python files) in place, in every graph
    and function (``walk``)."""

    def clear(x) -> None:
        del x.metadata_props[:]
        x.doc_string = ""

    clear(proto)
    for where in walk(proto):
        g = where.graph
        # a GraphProto's values too; a FunctionProto has only its nodes to clear
        values = (g.input, g.output, g.value_info, g.initializer) if where.function is None else ()
        for x in itertools.chain([g], g.node, *values):
            clear(x)


# ------------------------------------------------------------------------------ the one traversal
@dataclass
class Where:
    """One graph-like of a model: the main graph, an If/Loop/Scan body (any depth) or a model-local
    function (or a body inside one). ``prefix`` names its nodes uniquely in a plan
    ("if/then_branch/", "MyFn:"); ``parents`` are the graphs around it (innermost last), whose
    values it may read; ``function`` is the function it belongs to, None in the main graph."""

    graph: Any
    prefix: str
    parents: tuple = ()
    function: Any = None


def _is_ir(x) -> bool:
    return not hasattr(x, "SerializeToString")


def graph_nodes(graph) -> list:
    """The nodes of a graph-like, ONNX proto or onnx_ir."""
    return list(graph) if _is_ir(graph) else list(graph.node)


def _subgraphs(node) -> Iterator[tuple[str, list]]:
    """(attribute name, [graphs]) of a node's graph-valued attributes, ONNX proto or onnx_ir."""
    if _is_ir(node):
        import onnx_ir as ir

        for a in node.attributes.values():
            if a.type == ir.AttributeType.GRAPH:
                yield a.name, [a.value]
            elif a.type == ir.AttributeType.GRAPHS:
                yield a.name, list(a.value)
        return
    for a in node.attribute:
        subs = ([a.g] if a.HasField("g") else []) + list(a.graphs)
        if subs:
            yield a.name, subs


def node_label(node) -> str:
    """A node's name in plans and messages: its name, else its first output, else its op type."""
    if _is_ir(node):
        return node.name or (node.outputs[0].name if node.outputs and node.outputs[0] is not None else node.op_type)
    return node.name or (node.output[0] if node.output else node.op_type)


def _below(where: Where) -> Iterator[Where]:
    for node in graph_nodes(where.graph):
        for name, subs in _subgraphs(node):
            for k, sub in enumerate(subs):
                inner = Where(sub, f"{where.prefix}{node_label(node)}/{name}{'' if len(subs) == 1 else k}/",
                              where.parents + (where.graph,), where.function)
                yield inner
                yield from _below(inner)


def walk(model) -> Iterator[Where]:
    """Every graph-like of ``model`` (an ``onnx.ModelProto`` or an ``onnx_ir.Model``): the main graph,
    the bodies of If/Loop/Scan (and any graph attribute) at every depth, the model-local functions and
    the bodies inside them. The one traversal: counting, validating statistics and folding all use it
    (trust rule "every walk includes subgraphs", docs/trust.md)."""
    main = Where(model.graph, "")
    yield main
    yield from _below(main)
    functions = model.functions.values() if _is_ir(model) else model.functions
    for fn in functions:
        top = Where(fn, f"{fn.name}:", (), fn)
        yield top
        yield from _below(top)


def walk_nodes(model, op_type: str | None = None) -> Iterator[tuple[Any, Where]]:
    """(node, where) for every node of every graph-like (``walk``), only ``op_type`` nodes of the ONNX
    domain when given."""
    for where in walk(model):
        for node in graph_nodes(where.graph):
            if op_type is None or (node.op_type == op_type and node.domain in ONNX_DOMAINS):
                yield node, where


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _field(num: int, payload_len: int) -> bytes:  # tag + length of a length-delimited field
    return _varint((num << 3) | 2) + _varint(payload_len)


_MODEL_FIELDS = {"ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string",
                 "graph", "opset_import", "metadata_props", "training_info", "functions"}
_GRAPH_FIELDS = {"node", "name", "initializer", "doc_string", "input", "output", "value_info",
                 "quantization_annotation", "sparse_initializer", "metadata_props"}


def write_streamed(proto, f) -> None:
    """Write ``proto`` as SerializeToString(deterministic=True) would (the same bytes: fields in
    field-number order), serialising one initializer at a time: no second copy of the weights."""
    import onnx

    g = proto.graph
    if {f.name for f, _ in proto.ListFields()} - _MODEL_FIELDS or {f.name for f, _ in g.ListFields()} - _GRAPH_FIELDS:
        f.write(proto.SerializeToString(deterministic=True))  # a field this writer does not place
        return
    inits = list(g.initializer)
    # the graph without initializers, cut where field 5 goes: fields 1-4 before, 6+ after
    head, tail = onnx.GraphProto(), onnx.GraphProto()
    head.node.extend(g.node)
    if g.HasField("name"):
        head.name = g.name
    if g.HasField("doc_string"):
        tail.doc_string = g.doc_string
    for name in ("input", "output", "value_info", "quantization_annotation", "sparse_initializer", "metadata_props"):
        getattr(tail, name).extend(getattr(g, name))
    hb, tb = head.SerializeToString(deterministic=True), tail.SerializeToString(deterministic=True)
    sizes = [t.ByteSize() for t in inits]
    glen = len(hb) + len(tb) + sum(len(_field(5, s)) + s for s in sizes)
    before, after = onnx.ModelProto(), onnx.ModelProto()
    for name in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        if proto.HasField(name):  # proto2: an explicitly set default is serialised too
            setattr(before, name, getattr(proto, name))
    for name in ("opset_import", "metadata_props", "training_info", "functions"):  # fields 8+
        getattr(after, name).extend(getattr(proto, name))
    bb, ab = before.SerializeToString(deterministic=True), after.SerializeToString(deterministic=True)
    f.write(bb)
    f.write(_field(7, glen))
    f.write(hb)
    for t, s in zip(inits, sizes):
        f.write(_field(5, s))
        f.write(t.SerializeToString(deterministic=True))
    f.write(tb)
    f.write(ab)


def check_onnx_file(path: str | Path) -> None:
    """onnx.checker on a written file (external data beside it is found by name); ExportError
    (exit 3) when it rejects what the exporter wrote."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as err:
        raise ExportError(f"onnx.checker rejected the exported model: {first_line(err)}", "report this model to bnfold") from err


def initializer_bytes(model) -> int:
    """The bytes of a model's initializers: an ``onnx_ir.Model``'s tensors, a ModelProto's raw data."""
    if _is_ir(model):
        values = model.graph.initializers.values()
        return sum(v.const_value.nbytes for v in values if v.const_value is not None)
    return sum(len(t.raw_data) for t in model.graph.initializer)


def save_onnx(proto, path: str | Path, *, check: bool = True, data_name: str | None = None) -> dict[str, Any]:
    """Write ``proto`` atomically (deterministic bytes); external data above the 2 GB limit.

    ``data_name``: the external data file's name (beside ``path``); default ``path.name + ".data"``.
    A caller that writes under a staging name passes the final name, so the model refers to it.
    """
    import onnx

    path = Path(path)
    # weights already written as external data (export_folded's IR path) keep their file
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    large = not external and initializer_bytes(proto) > PROTO_LIMIT * 0.9
    if not large:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:  # one initializer at a time: no second copy of the weights
                write_streamed(proto, f)
            if check:
                check_onnx_file(tmp)
        # the file of the weights the exporter already wrote beside the model (None: none)
        locations = (e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location")
        data_name = next(locations, None)
    else:
        data_name = data_name or path.name + ".data"
        with atomic_path(path.parent / data_name) as tmp_data, atomic_path(path) as tmp:
            tmp_data.unlink()  # onnx >= 1.20 refuses to write external data over an existing file
            onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=tmp_data.name, size_threshold=1024)
            # the model refers to the data file by name: point it at the final name before renaming
            m = onnx.load(str(tmp), load_external_data=False)
            for t in m.graph.initializer:
                for e in t.external_data:
                    if e.key == "location":
                        e.value = data_name
            tmp.write_bytes(m.SerializeToString(deterministic=True))
        if check:
            check_onnx_file(path)
    return {"path": str(path), "external_data": data_name, "sha256": sha256_file(path),
            "bytes": path.stat().st_size}


def opset_of(proto) -> int | None:
    for o in proto.opset_import:
        if o.domain in ONNX_DOMAINS:
            return int(o.version)
    return None


def bn_count(model) -> int:
    """BatchNormalization nodes in every graph-like of a model (``walk``): main graph, subgraphs, functions."""
    return sum(1 for _ in walk_nodes(model, "BatchNormalization"))


def ort_blockers(proto) -> list[str]:
    """What in ``proto`` onnxruntime cannot run (it crashes or refuses): BatchNormalization before
    opset 14 whose named outputs are neither 1 (inference) nor 5 (training)."""
    opset = opset_of(proto) or 21
    if opset >= 14:
        return []
    out = []
    for n, _ in walk_nodes(proto, "BatchNormalization"):
        k = max((i + 1 for i, name in enumerate(n.output) if name), default=0)  # as runtimes count them
        if k not in (1, 5):
            out.append(f"BatchNormalization '{node_label(n)}' (opset {opset}) has {k} outputs (up to its last "
                       "named one), not 1 or 5: onnxruntime crashes or refuses to load it")
    return out
