"""The one function that strings the stages together: (calibrate →) fold → export → verify → report.

The ONNX file is written beside its target under a hidden staging name, verified there, and only
renamed onto the output path when verification passed (or ``keep_failed=True``), so a failing or
interrupted conversion never leaves a file at the output path.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._io import OutputSet, not_written_note, write_text_atomic
from .errors import BadInputError, EXIT_OK, EXIT_VERIFY_FAILED

SCHEMA_VERSION = 1


def versions() -> dict[str, str | None]:
    import platform
    from importlib import metadata

    from . import __version__

    def v(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    ort = v("onnxruntime") or v("onnxruntime-gpu")
    return {
        "bnfold": __version__,
        "python": platform.python_version(),
        "torch": v("torch"),
        "onnx": v("onnx"),
        "onnxscript": v("onnxscript"),
        "onnxruntime": ort,
        "onnxruntime_package": "onnxruntime-gpu" if v("onnxruntime-gpu") else "onnxruntime",
        "numpy": v("numpy"),
    }


@dataclass
class ConvertReport:
    model: str
    output: str | None
    passed: bool = False
    exit_code: int = EXIT_OK
    folded: list = field(default_factory=list)
    unfolded: list = field(default_factory=list)
    fold: dict = field(default_factory=dict)
    calibration: dict | None = None
    export: dict = field(default_factory=dict)
    verification: dict | None = None
    providers_unavailable: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "passed": self.passed,
            "exit_code": self.exit_code,
            "model": self.model,
            "output": self.output,
            "folded": self.folded,
            "unfolded": self.unfolded,
            "fold": self.fold,
            "calibration": self.calibration,
            "export": self.export,
            "verification": self.verification,
            "providers_unavailable": self.providers_unavailable,
            "notes": self.notes,
            "timings": self.timings,
            "versions": self.versions,
        }


@contextlib.contextmanager
def _stage(timings: dict, name: str):
    t = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - t, 4)


def random_inputs(shapes, dtype=None, seed: int = 0) -> tuple:
    """Seeded normal inputs of the given shapes (float32 unless ``dtype``)."""
    import torch

    from .load import check_alloc, check_seed

    g = torch.Generator().manual_seed(check_seed(seed, slack=2**16))
    for s in shapes:
        check_alloc(s, dtype or torch.float32, "an input")
    return tuple(torch.randn(tuple(s), generator=g, dtype=torch.float64).to(dtype or torch.float32) for s in shapes)


def _staging_path(output: Path) -> Path:
    return output.parent / f".{output.name}.{os.getpid()}.staging.onnx"


def _verify_sets(example: tuple, dynamic_batch: bool, calib_batches, seed: int) -> dict:
    from .data import take_samples

    sets: dict[str, Any] = {}
    n = example[0].shape[0] if example and example[0].dim() else 1
    if dynamic_batch:
        for b in sorted({1, max(4, n)}):
            shapes = [(b,) + tuple(t.shape[1:]) for t in example]
            sets[f"random(batch={b})"] = random_inputs(shapes, example[0].dtype, seed + b)
    else:
        sets[f"random(batch={n})"] = random_inputs([tuple(t.shape) for t in example], example[0].dtype, seed + 1)
    if calib_batches:
        k = max(4, n) if dynamic_batch else n
        sample = take_samples(calib_batches, k)
        if sample is not None and sample.size == k and not sample.kwargs:
            dtype = example[0].dtype
            sets[f"calibration[:{k}]"] = tuple(t.to(dtype) if t.is_floating_point() else t for t in sample.args)
    return sets


def convert(
    model,
    example_inputs,
    output: str | Path,
    *,
    calib=None,
    batch_size: int | None = None,
    estimator: str = "paper",
    opset: int | None = None,
    dynamic_batch: bool = False,
    atol=None,
    rtol=None,
    providers=("cpu", "cuda"),
    require_providers=(),
    verify: bool = True,
    report: str | Path | None = None,
    force: bool = True,
    keep_failed: bool = False,
    progress: bool = False,
    seed: int = 0,
    model_name: str | None = None,
) -> ConvertReport:
    """Calibrate (when ``calib`` is given), fold, export to ``output`` and verify it.

    ``model``: an nn.Module, or the path of an .onnx file (folded with ``fold_onnx``).
    ``example_inputs``: a tensor or tuple of tensors (for an .onnx model, None or shapes to
    override dynamic dimensions). Returns a ConvertReport (truthy when verification passed); the JSON
    report is written to ``report`` when given.
    """
    from . import verification as verify_mod

    from .load import check_seed
    from .paths import check_run_paths, spec_files

    check_seed(seed)
    output = check_run_paths({"model": spec_files(str(model)) if isinstance(model, (str, Path)) else None,
                              "calib": calib if isinstance(calib, (str, Path)) else None},
                             {"output": output, "report": report}, no_overwrite=[] if force else ["output"],
                             sidecars={"output": [".data"]})["output"]
    verify_mod.check_tolerance(atol, "atol")
    verify_mod.check_tolerance(rtol, "rtol")
    provider_list = verify_mod.parse_providers(providers)
    if require_providers:
        verify_mod.parse_providers(require_providers)
    rep = ConvertReport(model=model_name or (str(model) if isinstance(model, (str, Path)) else type(model).__name__), output=str(output))
    rep.versions = versions()
    with OutputSet() as outs:  # the ONNX file, its data and the report: committed together at the end
        staged = outs.stage(output)
        if isinstance(model, (str, Path)):
            _convert_onnx(rep, Path(model), example_inputs, staged, calib, batch_size, atol, rtol,
                          provider_list, require_providers, verify, seed)
        else:
            _convert_torch(rep, model, example_inputs, staged, calib, batch_size, estimator, opset, dynamic_batch,
                           atol, rtol, provider_list, require_providers, verify, progress, seed)
        if rep.passed or keep_failed:
            rep.export["path"] = str(output)
        else:
            rep.export["path"] = None
            data = rep.export.get("external_data")
            outs.discard(output, *([output.parent / data] if data else []))
            rep.notes.append(not_written_note(output))
        rep.exit_code = EXIT_OK if rep.passed else EXIT_VERIFY_FAILED
        if report is not None:
            write_report(rep, report)
    return rep


def _record_plan(rep: ConvertReport, plan) -> None:
    d = plan.to_dict()
    rep.fold = {"tracer": d["tracer"], "trace_error": d["trace_error"], "batchnorm_layers": plan.bn_count}
    rep.folded, rep.unfolded = d["folded"], d["unfolded"]


def _record_verification(rep: ConvertReport, vr) -> None:
    rep.verification = vr.to_dict()
    rep.providers_unavailable = vr.providers_unavailable
    rep.passed = vr.passed


def write_report(rep: ConvertReport, path: str | Path) -> None:
    from . import _json as json

    write_text_atomic(path, json.dumps(rep.to_dict(), indent=2, sort_keys=False, default=str) + "\n")


def _convert_torch(rep, model, example_inputs, staged, calib, batch_size, estimator, opset, dynamic_batch,
                   atol, rtol, providers, require_providers, do_verify, progress, seed):

    import torch

    from .calibration import run_calibration
    from .data import Batch, call_model, eval_mode, load_batches, model_dtype_device
    from .exporting import export_proto, opset_of, save_onnx
    from .folding import fold_with_plan
    from .verification import verify

    if example_inputs is None:
        raise BadInputError("no example inputs", "pass --input-shape (one per model input)")
    example = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    dtype, device = model_dtype_device(model)
    example = tuple(t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for t in example)
    # the reference is the user's model itself (compared in eval mode, flags restored) unless
    # calibration gives it new statistics, which happens on a copy: the user's model never changes
    reference = model
    with _stage(rep.timings, "check_inputs"):
        try:
            with torch.no_grad(), eval_mode(model):
                call_model(model, Batch(example, {}))
        except Exception as err:
            shapes = ", ".join(str(list(t.shape)) for t in example)
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise BadInputError(f"the model rejected example inputs of shape {shapes}: {first[:200]}", "check --input-shape (rank, channels, size)") from err
    calib_batches = None
    if calib is not None:
        with _stage(rep.timings, "calibrate"):
            calib_batches = load_batches(calib, batch_size) if isinstance(calib, (str, Path)) else calib
            reference, summary = run_calibration(model, calib_batches, estimator=estimator, inplace=False, progress=progress)
            rep.calibration = summary.to_dict()
    with _stage(rep.timings, "fold"):
        folded, plan = fold_with_plan(reference, example, inplace=False)
    _record_plan(rep, plan)
    if plan.bn_count == 0:
        rep.notes.append("the model has no BatchNorm layer: exported and verified as it is")
    export_example = example
    if dynamic_batch and example[0].shape[0] < 2:  # torch.export specialises a batch of 1
        export_example = random_inputs([(2,) + tuple(t.shape[1:]) for t in example], dtype, seed)
    with _stage(rep.timings, "export"):
        proto = export_proto(folded, export_example, opset=opset, dynamic_batch=dynamic_batch)
        info = save_onnx(proto, staged, data_name=Path(rep.output).name + ".data")
    rep.export = {"path": None, "opset": opset_of(proto), "sha256": info["sha256"], "bytes": info["bytes"],
                  "external_data": info["external_data"], "dynamic_batch": dynamic_batch,
                  "batchnorm_nodes": sum(n.op_type == "BatchNormalization" for n in proto.graph.node),
                  "nodes": len(proto.graph.node)}
    del proto
    if not do_verify:
        rep.passed = True
        rep.notes.append("verification skipped (--no-verify)")
        return
    with _stage(rep.timings, "verify"):
        sets = _verify_sets(example, dynamic_batch, calib_batches, seed)
        vr = verify(reference, staged, sets, atol=atol, rtol=rtol, providers=providers, folded=folded,
                    require_providers=require_providers)
    _record_verification(rep, vr)


def onnx_input_shapes(path: Path, overrides=None) -> list[tuple[tuple[int, ...], Any]]:
    """(shape, numpy dtype) of each graph input; dynamic dims from ``overrides`` or 1."""
    from .load import onnx_inputs

    return [(i.shape, i.dtype) for i in onnx_inputs(path, overrides)]


def onnx_input_sets(src: Path, example_inputs, batches, seed: int) -> dict:
    """Seeded random inputs for an ONNX model's graph inputs (dynamic dims from ``example_inputs``
    shapes, else 1), plus the first calibration samples when they fit."""
    import numpy as np
    import torch

    from .data import take_samples

    overrides = None
    if example_inputs is not None:
        overrides = [tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t) for t in example_inputs]
    specs = onnx_input_shapes(src, overrides)
    rng = np.random.default_rng(seed)
    sets = {"random": tuple(
        torch.from_numpy(rng.standard_normal(shape).astype(dt) if np.dtype(dt).kind == "f" else rng.integers(0, 2, size=shape).astype(dt))
        for shape, dt in specs)}
    if batches:
        n = specs[0][0][0] if specs and specs[0][0] else 1
        sample = take_samples(batches, n)
        if sample is not None and not sample.kwargs:
            from .load import check_onnx_sample, onnx_inputs

            check_onnx_sample(onnx_inputs(src, overrides), sample.args)
        if sample is not None and not sample.kwargs and len(sample.args) == len(specs) and sample.size == n:
            sets["calibration"] = tuple(torch.from_numpy(np.asarray(t.numpy(), dtype=dt)) for t, (_, dt) in zip(sample.args, specs))
    return sets


def _convert_onnx(rep, src, example_inputs, staged, calib, batch_size, atol, rtol, providers, require_providers, do_verify, seed):
    from .data import load_batches
    from .onnx_fold import fold_onnx_file
    from .verification import verify

    with _stage(rep.timings, "fold"):
        plan, info = fold_onnx_file(src, staged, data_name=Path(rep.output).name + ".data")
    _record_plan(rep, plan)
    rep.export = {"path": None, **{k: info[k] for k in ("opset", "sha256", "bytes", "external_data", "nodes", "batchnorm_nodes")}}
    if plan.bn_count == 0:
        rep.notes.append("the model has no BatchNormalization node: written and verified as it is")
    if not do_verify:
        rep.passed = True
        rep.notes.append("verification skipped (--no-verify)")
        return
    batches = None
    if calib is not None:
        batches = load_batches(calib, batch_size) if isinstance(calib, (str, Path)) else calib
    sets = onnx_input_sets(src, example_inputs, batches, seed)
    with _stage(rep.timings, "verify"):
        vr = verify(src, staged, sets, atol=atol, rtol=rtol, providers=providers, require_providers=require_providers)
    _record_verification(rep, vr)


def check_artifact(
    model,
    onnx_path: str | Path,
    example_inputs=None,
    *,
    calib=None,
    batch_size: int | None = None,
    estimator: str = "paper",
    dynamic_batch: bool = False,
    atol=None,
    rtol=None,
    providers=("cpu", "cuda"),
    require_providers=(),
    seed: int = 0,
):
    """Verify an existing ONNX artifact against its source (an nn.Module or the original .onnx).

    With ``calib``, the PyTorch reference is first calibrated exactly as ``convert --calib`` does,
    and samples of the data join the random inputs. Returns a VerifyReport.
    """
    import torch

    from .calibration import run_calibration
    from .data import load_batches, model_dtype_device
    from .onnx_fold import load_onnx
    from .verification import verify

    from .load import check_seed

    check_seed(seed)
    artifact = load_onnx(onnx_path)  # a clear error for a missing, truncated or non-ONNX artifact
    batches = None
    if calib is not None:
        batches = load_batches(calib, batch_size) if isinstance(calib, (str, Path)) else calib
    if isinstance(model, (str, Path)):
        load_onnx(model)
        sets = onnx_input_sets(Path(model), example_inputs, batches, seed)
        from .load import check_onnx_sample, onnx_inputs

        check_onnx_sample(onnx_inputs(artifact), sets["random"], what=f"the inputs of '{model}'")
        return verify(str(model), onnx_path, sets, atol=atol, rtol=rtol, providers=providers, require_providers=require_providers)
    if example_inputs is None:
        raise BadInputError("no example inputs", "pass --input-shape (one per model input)")
    example = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    dtype, device = model_dtype_device(model)
    example = tuple(t.to(device=device, dtype=dtype) if t.is_floating_point() else t for t in example)
    from .load import check_onnx_sample, onnx_inputs

    check_onnx_sample(onnx_inputs(artifact), example, what="the model's example input (--input-shape)", with_batch=not dynamic_batch)
    reference = model
    if batches is not None:
        reference, _ = run_calibration(model, batches, estimator=estimator)
    sets = _verify_sets(example, dynamic_batch, batches, seed)
    return verify(reference, onnx_path, sets, atol=atol, rtol=rtol, providers=providers, require_providers=require_providers)
