"""Export stage: torch.onnx.export, metadata stripped, onnx.checker, atomic write.

Opsets from 18 (and no opset) go through the dynamo exporter. Below 18 the dynamo exporter writes 18
and converts down, which fails for many models (torchvision's ResNet-18 and MobileNetV3 keep opset
18: the converter wants constant ``axes`` inputs): then the TorchScript exporter (``dynamo=False``,
constant folding off) writes the opset directly, and bnfold's ONNX pass folds what is left. Which
one ran is returned with the file (``export_folded``).

The dynamo exporter stamps every node with stack traces and absolute source paths; those are removed
so the same model gives the same bytes from any working folder. Models whose initializers exceed
the 2 GB protobuf limit are written with one external data file beside the .onnx.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
import warnings
from pathlib import Path

from bnfold.edges.data import eval_mode
from bnfold.edges.files import OutputSet, check_output_path, env_error, env_errors, is_env_error
from bnfold.edges.resources import return_freed_memory
from bnfold.errors import BadInputError, ExportError, cause
from bnfold.onnx_pass.fold import fold_ir
from bnfold.onnx_pass import io as onnx_io
from bnfold.onnx_pass.io import initializer_bytes, save_onnx, strip_metadata
from bnfold.plan import merge_plans
from bnfold.options import opset_range

OPSET_NATIVE_MIN = 18  # torch's dynamo exporter writes opsets from 18 natively; below, it converts


def opset_problem(opset) -> tuple[str, str] | None:
    """(problem, fix) when ``opset`` is one bnfold cannot write, else None: checked before any work."""
    if opset is None:
        return None
    lo, hi = opset_range()
    if isinstance(opset, bool) or not isinstance(opset, int) or not lo <= opset <= hi:
        return f"{opset!r} is outside the opsets bnfold writes ({lo}..{hi})", f"pass an opset from {lo} to {hi}"
    return None


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


@contextlib.contextmanager
def _stdout_held():
    """Hold what is written to the process's stdout (fd 1) inside the block; pass it on only when the
    block succeeds. The TorchScript exporter logs the whole TorchScript graph there from C++ when it
    fails, where a ``--json`` report goes; the error bnfold raises names the cause."""
    import sys

    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no stdout to protect
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        held.seek(0)
        text = held.read().decode(errors="replace")
        if text:  # e.g. the model's own prints
            sys.stdout.write(text)
            sys.stdout.flush()


# The dynamo exporter builds its table of ATen → ONNX functions (``ONNXRegistry.from_torchlib``) on
# every call: 0.7 s in a fresh process, 0.9 s warm on this machine, most of it spent recompiling each
# torchlib function's source only to read a domain the table never uses. bnfold builds the same table
# without that (``_build_registry``; tests/test_export.py checks it equals the exporter's own) once per
# opset and process, and hands each export a copy. Anything unexpected falls back to the exporter's own.
_REGISTRIES: dict[int, object] = {}


def _build_registry(opset_version: int):
    """``ONNXRegistry.from_torchlib(opset_version)`` without compiling each function's source."""
    from onnxscript.function_libs.torch_lib import ops, registration  # noqa: F401  (ops: registers the functions)
    from torch.onnx._internal.exporter import _registration as reg
    from torch.onnx._internal.exporter._torchlib import _torchlib_registry

    table = reg.ONNXRegistry()
    table._opset_version = opset_version
    for meta in _torchlib_registry.get_torchlib_ops():
        table._register(meta.fx_target, meta)
    for name, funcs in registration.default_registry.items():
        if name.startswith("internal::"):
            continue
        pairs = [(f, False) for f in funcs.overloads] + [(f, True) for f in funcs.complex]
        target = reg._get_overload(name) if pairs else None
        for func, is_complex in pairs if target is not None else ():
            table._register(target, reg.OnnxDecompMeta(onnx_function=func, fx_target=target, signature=None,
                                                       is_custom=False, is_complex=is_complex))
    table._cleanup_registry_based_on_opset_version()
    return table


def _registry_for(opset_version: int, stock):
    table = _REGISTRIES.get(opset_version)
    if table is None:
        try:
            table = _build_registry(opset_version)
        except Exception:  # noqa: BLE001  (a torch or onnxscript this code does not know: the exporter's own)
            table = stock()
        _REGISTRIES[opset_version] = table
    return table


def warm_exporter() -> None:
    """Import the exporter and build its table for the default opset: ``--config`` does this once in
    the parent, so that every conversion child starts with it (no torch computation runs here)."""
    with contextlib.suppress(Exception):
        from torch.onnx._internal.exporter import _registration as reg

        _registry_for(18, lambda: reg.ONNXRegistry.from_torchlib(18))


_PATCH = {"depth": 0, "stock": None, "lock": threading.Lock()}  # exports in several threads: one patch, one restore


@contextlib.contextmanager
def _shared_registry():
    """Inside the block the exporter gets a copy of bnfold's table for its opset (see above). Blocks
    may overlap (exports in threads): the first installs the method, the last puts the exporter's back."""
    try:
        from torch.onnx._internal.exporter import _registration as reg
        reg.ONNXRegistry.__dict__["from_torchlib"]
    except (ImportError, AttributeError, KeyError):  # another torch: its own table, as it builds it
        yield
        return

    def from_torchlib(cls, opset_version=18):
        table = _registry_for(opset_version, lambda: _PATCH["stock"].__func__(cls, opset_version))
        copy = cls()  # the exporter may add custom functions to its table: never to the shared one
        copy._opset_version = table._opset_version
        copy.functions = {k: list(v) for k, v in table.functions.items()}
        return copy

    with _PATCH["lock"]:
        if _PATCH["depth"] == 0:
            _PATCH["stock"] = reg.ONNXRegistry.__dict__["from_torchlib"]
            reg.ONNXRegistry.from_torchlib = classmethod(from_torchlib)
        _PATCH["depth"] += 1
    try:
        yield
    finally:
        with _PATCH["lock"]:
            _PATCH["depth"] -= 1
            if _PATCH["depth"] == 0:
                reg.ONNXRegistry.from_torchlib = _PATCH["stock"]


def _dynamo_ir(model, example_inputs: tuple, *, opset: int | None, dynamic_batch: bool, optimize: bool):
    """torch.onnx.export (dynamo) → onnx_ir Model at whatever opset it wrote, exporter metadata still
    on. Raises ExportError (exit 3)."""
    import torch

    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        dynamic_shapes = tuple({0: batch} if isinstance(t, torch.Tensor) and t.dim() > 0 else None for t in example_inputs)
    try:
        with warnings.catch_warnings(), torch.no_grad(), eval_mode(model), _quiet_loggers("torch.onnx", "onnxscript", "onnx_ir"), \
                _shared_registry():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                example_inputs,
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
    return program.model


def _input_names(model, n: int) -> list[str]:
    """forward()'s parameter names, as the dynamo exporter names the graph inputs; else input_0, ..."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:n]
    return names if len(names) == n else [f"input_{i}" for i in range(n)]


def _torchscript_ir(model, example_inputs: tuple, *, opset: int, dynamic_batch: bool, optimize: bool):
    """torch.onnx.export (TorchScript, ``dynamo=False``) → onnx_ir Model at ``opset`` (7–20).

    Constant folding is off unless ``optimize``: BatchNormalization nodes keep their inputs' names
    (``layer1.0.bn1.running_mean``; equal tensors become Identity nodes of that name) and every node
    is named after the module scopes it ran in (``/layer1/layer1.0/bn1/BatchNormalization``).
    Written to a temporary folder, so that models past 2 GB come back with their external data.
    Raises ExportError (exit 3)."""
    import onnx
    import onnx_ir as ir
    import torch

    names = _input_names(model, len(example_inputs))
    axes = {n: {0: "batch"} for n, t in zip(names, example_inputs) if dynamic_batch and isinstance(t, torch.Tensor) and t.dim() > 0}
    with env_errors(tempfile.gettempdir(), "the TorchScript exporter's file"), tempfile.TemporaryDirectory(prefix="bnfold-export-") as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            with warnings.catch_warnings(), torch.no_grad(), eval_mode(model), _quiet_loggers("torch.onnx"), _stdout_held():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, example_inputs, str(path), dynamo=False, opset_version=opset, do_constant_folding=optimize,
                                  input_names=names, dynamic_axes=axes or None, verbose=False)
        except Exception as err:
            if is_env_error(err):  # a full or read-only temporary folder: env_errors names it
                raise
            raise ExportError(f"torch.onnx.export (TorchScript, opset {opset}) failed: {cause(err)}",
                              f"pass an opset from {OPSET_NATIVE_MIN} (the dynamo exporter's own), or make the model traceable by torch.jit.trace") from err
        proto = onnx.load(str(path))  # with any external data beside it: read before the folder goes
    return ir.serde.deserialize_model(proto)


def _export_ir(model, example_inputs, *, opset: int | None, dynamic_batch: bool, optimize: bool):
    """(onnx_ir Model at ``opset``, exporter name): the dynamo exporter, or below opset 18 when it
    cannot convert down, the TorchScript exporter. Raises BadInputError (exit 2), ExportError (exit 3)."""
    import torch

    problem = opset_problem(opset)
    if problem is not None:
        raise BadInputError(f"opset {problem[0]}", problem[1])
    example_inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    native = opset is None or opset >= OPSET_NATIVE_MIN
    try:
        ir_model = _dynamo_ir(model, example_inputs, opset=opset, dynamic_batch=dynamic_batch, optimize=optimize)
    except ExportError as err:
        if native:
            raise
        why = f"the dynamo exporter failed ({cause(err.__cause__) if err.__cause__ is not None else err.problem})"
    else:
        got = ir_model.opset_imports.get("", None)
        if opset is None or got == opset:
            return ir_model, "dynamo"
        if native:
            raise BadInputError(f"the exporter could not write opset {opset} for this model (it wrote opset {got})",
                                "pass another opset, or none for the exporter's")
        why = f"the dynamo exporter's version conversion left opset {got}"
        _release_weights(ir_model)
        del ir_model
        return_freed_memory()
    try:
        return _torchscript_ir(model, example_inputs, opset=opset, dynamic_batch=dynamic_batch, optimize=optimize), "torchscript"
    except ExportError as err:
        raise ExportError(f"no exporter wrote opset {opset}: {why}; {err.problem}", err.fix) from err


def export_proto(model, example_inputs: tuple, *, opset: int | None = None, dynamic_batch: bool = False, optimize: bool = True):
    """torch.onnx.export → ModelProto with metadata stripped. Raises ExportError (exit 3).

    ``optimize=True`` lets the exporter's optimiser fold BN in float32; ``export_folded`` is the
    path that folds with bnfold's float64 rules first and attributes every fold."""
    import onnx_ir as ir

    ir_model, _ = _export_ir(model, example_inputs, opset=opset, dynamic_batch=dynamic_batch, optimize=optimize)
    proto = ir.serde.serialize_model(ir_model)
    _release_weights(ir_model)
    strip_metadata(proto)
    return proto


def _release_weights(ir_model) -> None:
    """Drop the IR model's tensors once serialised. onnxscript's module-level rewrite rules keep
    the last graph they matched (their matchers' ``_graph``): without this, the exported copy of
    every weight stays alive for the rest of the process (benchmarks/PROFILE.md)."""
    for value in ir_model.graph.initializers.values():
        value.const_value = None


def _scope_paths(module) -> dict[str, str]:
    """Each module's scope path as the TorchScript exporter prefixes node names with it
    (``/layer1/layer1.0/bn1`` → ``layer1.0.bn1``): one scope per level, each the module's name from
    its last non-numeric part on (``features.0.1`` stays whole, ``layer1.0.bn1`` is ``bn1``)."""
    paths, out = {"": ""}, {}
    for name, _ in module.named_modules():
        if not name:
            continue
        atoms = name.split(".")
        first = max((i for i, a in enumerate(atoms) if not a.isnumeric()), default=0)
        paths[name] = paths.get(name.rpartition(".")[0], "") + "/" + ".".join(atoms[first:])
        out[paths[name]] = name
    return out


def _module_of(node, scopes: dict[str, str]) -> str | None:
    """The PyTorch module an exported node came from, or None: the dynamo exporter's name scopes,
    a BatchNormalization's ``<module>.running_mean`` input, or the TorchScript exporter's node name
    (``scopes`` from ``_scope_paths``; a module called again gets ``_1``, ``_2``, ... there)."""
    import ast

    names = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if names:
        try:
            names = ast.literal_eval(names)
        except (ValueError, SyntaxError):
            names = None
        if isinstance(names, list) and len(names) >= 2:
            return str(names[-2])
    if node.op_type == "BatchNormalization" and len(node.inputs) > 3 and node.inputs[3] is not None:
        name = node.inputs[3].name or ""
        if name.endswith(".running_mean"):
            return name[: -len(".running_mean")]
    prefix = (node.name or "").rpartition("/")[0]
    if not prefix:
        return None
    return scopes.get(prefix) or scopes.get(re.sub(r"_\d+(?=/|$)", "", prefix))


def _optimise(model, exporter: str) -> None:
    """After the ONNX fold pass: onnxscript's optimiser (constant folding, rewrites) on a dynamo
    export. Its rewrite rules write opset-18 forms (at opset 7, a Gemm without its C input), so a
    TorchScript export only loses its Identity nodes and unused nodes, which no opset changes."""
    import onnx_ir as ir
    import onnxscript.optimizer

    try:
        if exporter == "dynamo":
            onnxscript.optimizer.optimize(model)
        else:
            ir.passes.Sequential(ir.passes.common.IdentityEliminationPass(), ir.passes.common.RemoveUnusedNodesPass())(model)
    except Exception as err:
        raise ExportError(f"the exporter's optimiser failed after the ONNX fold pass: {cause(err)}", "report this model to bnfold") from err


def export_folded(module, example_inputs, *, opset: int | None = None, dynamic_batch: bool = False, plan=None,
                  external_data: tuple[str | Path, str] | None = None):
    """Export ``module`` and fold, with bnfold's float64 ONNX rules, the BN layers ``plan`` left.

    Exports without the exporter's optimiser, maps every BatchNormalization node back to its
    PyTorch module (the exporter's name scopes, read before the metadata is stripped), runs the
    ONNX rules, then the exporter's optimiser for everything else (constant folding, rewrites;
    after the TorchScript exporter, only the opset-independent clean-ups: ``_optimise``). Returns ``(proto, plan, exporter)``: each BN of the new plan is folded in ``pytorch`` (as ``plan``
    said), folded in ``onnx`` (into which modules, by which rule), or left with the reasons of both
    passes; the number left equals the BatchNormalization nodes in ``proto``. ``exporter`` is the one
    that wrote the graph: ``"dynamo"``, or ``"torchscript"`` for an opset below 18 the dynamo exporter
    cannot convert down to.

    ``external_data=(folder, name)``: when the weights pass the 2 GB protobuf limit, they are written
    straight from the IR to ``folder/name`` (the proto then refers to ``name``), so no protobuf copy
    of the weights is ever built.
    """
    import onnx_ir as ir

    model, exporter = _export_ir(module, example_inputs, opset=opset, dynamic_batch=dynamic_batch, optimize=False)
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    scopes = _scope_paths(module) if exporter == "torchscript" else {}
    module_of = {n.name: _module_of(n, scopes) for n in nodes if n.name}
    bn_nodes = [n for n in nodes if n.op_type == "BatchNormalization"]
    record: dict = {}
    fold_ir(model, record)
    # the exporter's optimiser runs next: whatever BN it still removes is attributed to it
    left = {id(n) for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.op_type == "BatchNormalization"}
    _optimise(model, exporter)
    after = {id(n) for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.op_type == "BatchNormalization"}
    if external_data is not None and initializer_bytes(model) > onnx_io.PROTO_LIMIT * 0.9:
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

    return proto, merge_plans(plan, bn_nodes, {k: e for k, (_, e) in record.items()}, module_of, left - after), exporter


def export(model, example_inputs, path: str | Path, *, opset: int | None = None, dynamic_batch: bool = False) -> Path:
    """Export ``model`` (eval mode) to ``path``: one checked, reproducible .onnx file. BN layers the
    graph still has are folded by bnfold's float64 ONNX rules where they can be (``export_folded``)."""
    path = check_output_path(path)
    with OutputSet() as outs:  # the model and its external data land together
        staged = outs.reserve(path)
        proto, _, _ = export_folded(model, example_inputs, opset=opset, dynamic_batch=dynamic_batch,
                                 external_data=(staged.parent, path.name + ".data"))
        save_onnx(proto, staged, data_name=path.name + ".data")
    return path
