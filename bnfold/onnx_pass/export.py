"""Export stage: torch.onnx.export (dynamo), metadata stripped, onnx.checker, atomic write.

The dynamo exporter stamps every node with stack traces and absolute source paths; those are removed
so the same model gives the same bytes from any working folder. Models whose initializers exceed
the 2 GB protobuf limit are written with one external data file beside the .onnx.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

from bnfold.edges.data import eval_mode
from bnfold.edges.files import OutputSet, check_output_path, env_error
from bnfold.edges.resources import return_freed_memory
from bnfold.errors import BadInputError, ExportError, cause
from bnfold.onnx_pass.fold import fold_ir
from bnfold.onnx_pass import io as onnx_io
from bnfold.onnx_pass.io import save_onnx, strip_metadata
from bnfold.plan import merge_plans

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
        raise ExportError(f"torch.onnx.export failed: {cause(err)}", "make the model exportable (see the torch.export docs) or report it") from err
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
    import onnx_ir as ir
    import onnxscript.optimizer

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
        raise ExportError(f"the exporter's optimiser failed after the ONNX fold pass: {cause(err)}", "report this model to bnfold") from err
    after = {id(n) for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.op_type == "BatchNormalization"}
    if external_data is not None and _ir_initializer_bytes(model) > onnx_io.PROTO_LIMIT * 0.9:
        folder, name = external_data
        try:
            ir.external_data.unload_from_model(model, str(folder), name, size_threshold_bytes=1024)
        except OSError as err:
            raise env_error(err, Path(folder) / name) from err
    proto = ir.serde.serialize_model(model)
    _release_weights(model)
    del model
    return_freed_memory()
    strip_metadata(proto)

    return proto, merge_plans(plan, bn_nodes, {k: e for k, (_, e) in record.items()}, module_of, left - after)


def export(model, example_inputs, path: str | Path, *, opset: int | None = None, dynamic_batch: bool = False) -> Path:
    """Export ``model`` (eval mode) to ``path``: one checked, reproducible .onnx file. BN layers the
    graph still has are folded by bnfold's float64 ONNX rules where they can be (``export_folded``)."""
    check_output_path(path)
    path = Path(path)
    with OutputSet() as outs:  # the model and its external data land together
        staged = outs.reserve(path)
        proto, _ = export_folded(model, example_inputs, opset=opset, dynamic_batch=dynamic_batch,
                                 external_data=(staged.parent, path.name + ".data"))
        save_onnx(proto, staged, data_name=path.name + ".data")
    return Path(path)
