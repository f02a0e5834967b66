"""Export stage: torch.onnx.export (dynamo), metadata stripped, onnx.checker, atomic write.

The dynamo exporter stamps every node with stack traces and absolute source paths; those are removed
so the same model gives the same bytes from any working folder. Models whose initializers exceed
the 2 GB protobuf limit are written with one external data file beside the .onnx.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ._io import atomic_path, check_output_path, sha256_file
from .errors import ExportError

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


def _initializer_bytes(proto) -> int:
    return sum(len(t.raw_data) for t in proto.graph.initializer)


def save_onnx(proto, path: str | Path, *, check: bool = True, data_name: str | None = None) -> dict[str, Any]:
    """Write ``proto`` atomically (deterministic bytes); external data above the 2 GB limit.

    ``data_name``: the external data file's name (beside ``path``); default ``path.name + ".data"``.
    A caller that writes under a staging name passes the final name, so the model refers to it.
    """
    import onnx

    path = Path(path)
    large = _initializer_bytes(proto) > PROTO_LIMIT * 0.9
    info: dict[str, Any] = {"path": str(path), "external_data": None}
    if not large:
        data = proto.SerializeToString(deterministic=True)
        if check:
            try:
                onnx.checker.check_model(proto, full_check=False)
            except Exception as err:
                raise ExportError(f"onnx.checker rejected the exported model: {str(err).splitlines()[0]}", "report this model to bnfold") from err
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    else:
        data_name = data_name or path.name + ".data"
        with atomic_path(path.parent / data_name) as tmp_data, atomic_path(path) as tmp:
            onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=tmp_data.name, size_threshold=1024)
            # the model refers to the data file by name: point it at the final name before renaming
            m = onnx.load(str(tmp), load_external_data=False)
            for t in m.graph.initializer:
                for e in t.external_data:
                    if e.key == "location":
                        e.value = data_name
            tmp.write_bytes(m.SerializeToString(deterministic=True))
        if check:
            try:
                onnx.checker.check_model(str(path), full_check=False)
            except Exception as err:
                raise ExportError(f"onnx.checker rejected the exported model: {str(err).splitlines()[0]}", "report this model to bnfold") from err
        info["external_data"] = data_name
    info["sha256"] = sha256_file(path)
    info["bytes"] = path.stat().st_size
    return info


def export_proto(model, example_inputs: tuple, *, opset: int | None = None, dynamic_batch: bool = False, optimize: bool = True):
    """torch.onnx.export → ModelProto with metadata stripped. Raises ExportError (exit 3)."""
    import torch

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        dynamic_shapes = tuple({0: batch} if isinstance(t, torch.Tensor) and t.dim() > 0 else None for t in example_inputs)
    from .data import eval_mode

    try:
        with warnings.catch_warnings(), torch.no_grad(), eval_mode(model):
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
            proto = program.model_proto
    except Exception as err:
        raise ExportError(f"torch.onnx.export failed: {_cause(err)}", "make the model exportable (see the torch.export docs) or report it") from err
    strip_metadata(proto)
    return proto


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
    """Export ``model`` (eval mode) to ``path``: one checked, reproducible .onnx file."""
    from ._io import OutputSet

    check_output_path(path)
    proto = export_proto(model, example_inputs, opset=opset, dynamic_batch=dynamic_batch)
    with OutputSet() as outs:  # the model and its external data land together
        save_onnx(proto, outs.stage(path))
    return Path(path)


def opset_of(proto) -> int | None:
    for o in proto.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return None
