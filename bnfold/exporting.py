"""Export stage: torch.onnx.export (dynamo), metadata stripped, onnx.checker, atomic write.

The dynamo exporter stamps every node with stack traces and absolute source paths; those are removed
so the same model gives the same bytes from any working folder. Models whose initializers exceed
the 2 GB protobuf limit are written with one external data file beside the .onnx.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

from ._io import atomic_path, check_output_path, sha256_file
from .errors import BadInputError, ExportError

PROTO_LIMIT = 2_000_000_000  # bytes; protobuf cannot serialise a message past 2 GiB


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
        raise ExportError(f"onnx.checker rejected the exported model: {str(err).splitlines()[0]}", "report this model to bnfold") from err


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


OPSET_NATIVE_MIN = 18  # torch's dynamo exporter writes opsets from 18 natively; below, it converts


def opset_range() -> tuple[int, int]:
    """(lowest, highest) opset bnfold asks the exporter for; below 18 the exporter's version
    conversion may fail for a given model (then ``export_folded`` says so)."""
    import onnx

    return 7, int(onnx.defs.onnx_opset_version())


def _check_opset(opset: int | None) -> None:
    if opset is None:
        return
    lo, hi = opset_range()
    if isinstance(opset, bool) or not isinstance(opset, int) or not lo <= opset <= hi:
        raise BadInputError(f"opset {opset!r} is outside the supported range {lo}..{hi}",
                            f"pass an opset from {OPSET_NATIVE_MIN} to {hi} (below {OPSET_NATIVE_MIN} the exporter converts, which can fail)")


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """The exporter logs version-conversion notes at WARNING: bnfold reports what matters itself."""
    import logging

    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export_ir(model, example_inputs, *, opset: int | None, dynamic_batch: bool, optimize: bool):
    """torch.onnx.export (dynamo) → onnx_ir Model, exporter metadata still on. Raises ExportError (exit 3)."""
    import torch

    _check_opset(opset)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        dynamic_shapes = tuple({0: batch} if isinstance(t, torch.Tensor) and t.dim() > 0 else None for t in example_inputs)
    from .data import eval_mode

    try:
        with warnings.catch_warnings(), torch.no_grad(), eval_mode(model), _quiet_loggers("torch.onnx", "onnxscript", "onnx_ir"):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                tuple(example_inputs),
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=dynamic_shapes,
                optimize=optimize,
                external_data=False,
                verbose=False,
                report=False,
            )
    except Exception as err:
        raise ExportError(f"torch.onnx.export failed: {_cause(err)}", "make the model exportable (see the torch.export docs) or report it") from err
    ir_model = program.model
    got = ir_model.opset_imports.get("", None)
    if opset is not None and got != opset:
        lo, hi = opset_range()
        raise BadInputError(f"the exporter could not write opset {opset} for this model (its version conversion left opset {got})",
                            f"pass an opset from {OPSET_NATIVE_MIN} to {hi}")
    return ir_model


def export_proto(model, example_inputs: tuple, *, opset: int | None = None, dynamic_batch: bool = False, optimize: bool = True):
    """torch.onnx.export → ModelProto with metadata stripped. Raises ExportError (exit 3).

    ``optimize=True`` lets the exporter's optimiser fold BN in float32; ``export_folded`` is the
    path that folds with bnfold's float64 rules first and attributes every fold."""
    import onnx_ir as ir

    ir_model = _export_ir(model, example_inputs, opset=opset, dynamic_batch=dynamic_batch, optimize=optimize)
    proto = ir.serde.serialize_model(ir_model)
    _release_weights(ir_model)
    strip_metadata(proto)
    return proto


def _ir_initializer_bytes(ir_model) -> int:
    return sum(v.const_value.nbytes for v in ir_model.graph.initializers.values() if v.const_value is not None)


def _return_freed_memory() -> None:
    """Collect the exporter's cycles and hand freed heap back to the OS (glibc keeps it otherwise):
    the onnxruntime sessions that follow then start from a lower RSS."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _release_weights(ir_model) -> None:
    """Drop the IR model's tensors once serialised. onnxscript's module-level rewrite rules keep
    the last graph they matched (their matchers' ``_graph``): without this, the exported copy of
    every weight stays alive for the rest of the process (benchmarks/PROFILE.md)."""
    for value in ir_model.graph.initializers.values():
        value.const_value = None


def _module_of(node) -> str | None:
    """The PyTorch module a dynamo-exported node came from (its name scope), or None."""
    import ast

    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            names = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            names = None
        if isinstance(names, list) and len(names) >= 2:
            return str(names[-2])
    if node.op_type == "BatchNormalization" and len(node.inputs) > 3 and node.inputs[3] is not None:
        name = node.inputs[3].name or ""
        if name.endswith(".running_mean"):
            return name[: -len(".running_mean")]
    return None


def export_folded(module, example_inputs, *, opset: int | None = None, dynamic_batch: bool = False, plan=None,
                  external_data: tuple[str | Path, str] | None = None):
    """Export ``module`` and fold, with bnfold's float64 ONNX rules, the BN layers ``plan`` left.

    Exports without the exporter's optimiser, maps every BatchNormalization node back to its
    PyTorch module (the exporter's name scopes, read before the metadata is stripped), runs the
    ONNX rules, then the exporter's optimiser for everything else (constant folding, rewrites).
    Returns ``(proto, plan)``: each BN of the new plan is folded in ``pytorch`` (as ``plan`` said),
    folded in ``onnx`` (into which modules, by which rule), or left with the reasons of both passes;
    the number left equals the BatchNormalization nodes in ``proto``.

    ``external_data=(folder, name)``: when the weights pass the 2 GB protobuf limit, they are written
    straight from the IR to ``folder/name`` (the proto then refers to ``name``), so no protobuf copy
    of the weights is ever built.
    """
    import dataclasses

    import onnx_ir as ir
    import onnxscript.optimizer

    from .folding import FoldPlan, Unfolded
    from .onnx_fold import fold_ir, folded_entry

    model = _export_ir(module, example_inputs, opset=opset, dynamic_batch=dynamic_batch, optimize=False)
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    module_of = {n.name: _module_of(n) for n in nodes if n.name}
    bn_nodes = [n for n in nodes if n.op_type == "BatchNormalization"]
    record: dict = {}
    fold_ir(model, record)
    # the exporter's optimiser runs next: whatever BN it still removes is attributed to it
    left = {id(n) for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.op_type == "BatchNormalization"}
    try:
        onnxscript.optimizer.optimize(model)
    except Exception as err:
        raise ExportError(f"the exporter's optimiser failed after the ONNX fold pass: {_cause(err)}", "report this model to bnfold") from err
    after = {id(n) for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.op_type == "BatchNormalization"}
    if external_data is not None and _ir_initializer_bytes(model) > PROTO_LIMIT * 0.9:
        folder, name = external_data
        try:
            ir.external_data.unload_from_model(model, str(folder), name, size_threshold_bytes=1024)
        except OSError as err:
            from ._io import env_error

            raise env_error(err, Path(folder) / name) from err
    proto = ir.serde.serialize_model(model)
    _release_weights(model)
    del model
    _return_freed_memory()
    strip_metadata(proto)

    def mod(node_name: str) -> str:
        return module_of.get(node_name) or node_name

    base = plan if plan is not None else FoldPlan(tracer="onnx")
    pytorch_left = {u.bn: u.reason for u in base.unfolded}
    folded, unfolded, seen = list(base.folded), [], set()
    for n in bn_nodes:
        name = mod(n.name)
        seen.add(name)
        entry = record.get(id(n), (n, None))[1]
        if isinstance(entry, Unfolded) and id(n) in left and id(n) not in after:
            folded.append(folded_entry(name, [], "exporter-optimizer", []))
        elif entry is not None and not isinstance(entry, Unfolded):
            folded.append(folded_entry(name, [mod(i) for i in entry.into], entry.rule, list(entry.into_type)))
        else:
            why_torch = pytorch_left.get(name)
            prefix = f"PyTorch pass: {why_torch}; " if why_torch else ""
            unfolded.append(Unfolded(name, f"{prefix}ONNX pass: {entry.reason if entry is not None else 'not visited'}"))
    # BN layers the plan left that have no node in the export (never called by forward())
    for u in base.unfolded:
        if u.bn not in seen:
            unfolded.append(Unfolded(u.bn, f"{u.reason}; not in the exported graph"))
    new_plan = dataclasses.replace(base, folded=folded, unfolded=unfolded)
    return proto, new_plan


def _cause(err: BaseException) -> str:
    """The innermost cause's first line, without terminal colour codes."""
    import re

    chain = [err]
    while chain[-1].__cause__ is not None and len(chain) < 10:
        chain.append(chain[-1].__cause__)
    parts = []
    for e in (chain[0], chain[-1]) if len(chain) > 1 else (chain[0],):
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
        parts.append(f"{type(e).__name__}: {first[:240]}")
    return " ← ".join(parts)


def export(model, example_inputs, path: str | Path, *, opset: int | None = None, dynamic_batch: bool = False) -> Path:
    """Export ``model`` (eval mode) to ``path``: one checked, reproducible .onnx file. BN layers the
    graph still has are folded by bnfold's float64 ONNX rules where they can be (``export_folded``)."""
    from ._io import OutputSet

    check_output_path(path)
    path = Path(path)
    with OutputSet() as outs:  # the model and its external data land together
        staged = outs.stage(path)
        proto, _ = export_folded(model, example_inputs, opset=opset, dynamic_batch=dynamic_batch,
                                 external_data=(staged.parent, path.name + ".data"))
        save_onnx(proto, staged, data_name=path.name + ".data")
    return Path(path)


def opset_of(proto) -> int | None:
    for o in proto.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return None
