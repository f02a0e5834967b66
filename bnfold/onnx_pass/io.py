"""ONNX files in and out: load and check, write atomically with deterministic bytes (streamed, one
initializer at a time; external data above the 2 GB protobuf limit), strip exporter metadata, count
BatchNormalization nodes in every graph and function."""

from __future__ import annotations

import heapq
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
    moved = sum(_sort_graph(g) for g in _all_graphs(fixed.graph)) + sum(_sort_graph(f) for f in fixed.functions)
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


def _all_graphs(graph):
    """``graph`` and every subgraph below it (If/Loop/Scan bodies)."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _all_graphs(sub)


def _names_read(node) -> set[str]:
    """Values ``node`` reads: its inputs and what its subgraphs read from outside themselves."""
    names = {i for i in node.input if i}
    for a in node.attribute:
        for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            for g in _all_graphs(sub):
                for n in g.node:
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
    """Remove exporter metadata (stack traces, paths, names of Python files) in place."""

    def graph_strip(g):
        del g.metadata_props[:]
        g.doc_string = ""
        for n in g.node:
            del n.metadata_props[:]
            n.doc_string = ""
            for a in n.attribute:
                if a.g is not None and a.HasField("g"):
                    graph_strip(a.g)
                for sub in a.graphs:
                    graph_strip(sub)
        for coll in (g.input, g.output, g.value_info):
            for v in coll:
                del v.metadata_props[:]
                v.doc_string = ""
        for init in g.initializer:
            del init.metadata_props[:]
            init.doc_string = ""

    del proto.metadata_props[:]
    proto.doc_string = ""
    graph_strip(proto.graph)
    for f in proto.functions:
        del f.metadata_props[:]
        f.doc_string = ""
        for n in f.node:
            del n.metadata_props[:]
            n.doc_string = ""


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
    after.opset_import.extend(proto.opset_import)  # fields 8+
    after.metadata_props.extend(proto.metadata_props)
    after.training_info.extend(proto.training_info)
    after.functions.extend(proto.functions)
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


def _initializer_bytes(proto) -> int:
    return sum(len(t.raw_data) for t in proto.graph.initializer)


def save_onnx(proto, path: str | Path, *, check: bool = True, data_name: str | None = None) -> dict[str, Any]:
    """Write ``proto`` atomically (deterministic bytes); external data above the 2 GB limit.

    ``data_name``: the external data file's name (beside ``path``); default ``path.name + ".data"``.
    A caller that writes under a staging name passes the final name, so the model refers to it.
    """
    import onnx

    path = Path(path)
    # weights already written as external data (export_folded's IR path) keep their file
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    large = not external and _initializer_bytes(proto) > PROTO_LIMIT * 0.9
    info: dict[str, Any] = {"path": str(path), "external_data": None}
    if not large:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:  # one initializer at a time: no second copy of the weights
                write_streamed(proto, f)
            if check:
                check_onnx_file(tmp)
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
        info["external_data"] = data_name
    if info["external_data"] is None:  # weights the exporter already wrote beside the model
        info["external_data"] = next((e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"), None)
    info["sha256"] = sha256_file(path)
    info["bytes"] = path.stat().st_size
    return info


def opset_of(proto) -> int | None:
    for o in proto.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return None


def bn_count(proto) -> int:
    """BatchNormalization nodes in the main graph, subgraphs and functions of a ModelProto."""

    def graph(g) -> int:
        n = 0
        for node in g.node:
            n += node.op_type == "BatchNormalization" and node.domain in ONNX_DOMAINS
            for a in node.attribute:
                n += sum(graph(sub) for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs))
        return n

    return graph(proto.graph) + sum(graph(f) for f in proto.functions)


def _bn_output_count(node) -> int:
    """Outputs of a node as runtimes count them: up to the last one with a name."""
    names = list(node.output)
    while names and not names[-1]:
        names.pop()
    return len(names)


def ort_blockers(proto) -> list[str]:
    """What in ``proto`` onnxruntime cannot run (it crashes or refuses): BatchNormalization before
    opset 14 whose named outputs are neither 1 (inference) nor 5 (training)."""
    opset = opset_of(proto) or 21
    if opset >= 14:
        return []
    out = []
    for g in _all_graphs(proto.graph):
        for n in g.node:
            k = _bn_output_count(n) if n.op_type == "BatchNormalization" and n.domain in ONNX_DOMAINS else 1
            if k not in (1, 5):
                out.append(f"BatchNormalization '{n.name or n.output[0]}' (opset {opset}) has {k} outputs (up to its last "
                           "named one), not 1 or 5: onnxruntime crashes or refuses to load it")
    return out
