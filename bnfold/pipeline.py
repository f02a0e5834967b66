"""The one function that strings the stages together: (calibrate →) fold → export → verify → report.

Every way in (``bnfold.convert`` keywords, the CLI's flags, a config file's table) arrives here as one
validated ``ConvertOptions``; calibration data arrives as one ``DataSource`` (read once, samples for
verification kept during that pass).

The ONNX file is written beside its target under a hidden staging name, verified there, and only
renamed onto the output path when verification passed (or ``keep_failed=True``), so a failing or
interrupted conversion never leaves a file at the output path. The file's ``metadata_props`` record
what made it (``bnfold.*`` keys, see ``provenance``); ``check_artifact`` reads them back.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

from bnfold.edges.files import OutputSet, not_written_note, write_text_atomic
from bnfold.edges import jsonio as json
from bnfold.errors import BadInputError, BnfoldError, EXIT_OK, EXIT_VERIFY_FAILED, first_line, inputs_rejected
from bnfold.options import API, CONVERT, VERIFY, ConvertOptions, Estimator, OptionError, Via, reword
from bnfold.report import SCHEMA_VERSION, CheckReport, ConvertReport, write_drift_plot  # noqa: F401  (ConvertReport is public here too)
from bnfold._version import __version__
from bnfold.edges.resources import collect_new_only, process_peak_rss_mb, return_freed_memory, stage, weight_bytes
from bnfold import progress
from bnfold.edges.load import check_alloc, check_onnx_sample, check_seed, load_model, load_weights, onnx_inputs, parse_model_spec
from bnfold.edges.data import _positional, as_source, Batch, call_model, eval_mode, model_dtype_device
from bnfold.edges.paths import check_run_paths, spec_files
from bnfold.onnx_pass.export import export_folded, opset_problem
from bnfold.calibration.population import run_calibration
from bnfold.onnx_pass.io import bn_count, check_onnx_file, load_onnx, opset_of, ort_blockers, save_onnx
from bnfold.torch_pass.fold import fold_with_plan
from bnfold.verification.explain import Explanation, explain_report
from bnfold.verification.verify import VerifyReport, check_folded, reference_outputs, verify
from bnfold.onnx_pass.fold import fold_onnx_proto

PROVENANCE_PREFIX = "bnfold."


def versions() -> dict[str, str | None]:
    import platform
    from importlib import metadata


    def v(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "bnfold": __version__,
        "python": platform.python_version(),
        "torch": v("torch"),
        "onnx": v("onnx"),
        "onnxscript": v("onnxscript"),
        "onnxruntime": v("onnxruntime") or v("onnxruntime-gpu"),
        "onnxruntime_package": "onnxruntime-gpu" if v("onnxruntime-gpu") else "onnxruntime",
        "numpy": v("numpy"),
    }


# the progress line a stage begins with (calibrate counts its batches, verify names each provider and level)
STAGE_LINES = {"check_inputs": "check inputs", "reference": "reference outputs", "fold": "fold", "export": "export", "explain": "explain"}


@contextlib.contextmanager
def _stage(rep, name: str, detail: str = ""):
    """Time, end RSS and peak RSS of one stage: rep.timings[name], rep.resources["stages"][name]; its
    progress line (bnfold.progress) as it begins."""

    if name in STAGE_LINES:
        progress.current().step(STAGE_LINES[name], detail)
    with stage(name, rep.timings, rep.resources["stages"]):
        yield


def _graph_counts(proto) -> dict[str, int]:
    return {"nodes": len(proto.graph.node), "batchnorm_nodes": bn_count(proto)}


def random_inputs(shapes, dtype=None, seed: int = 0) -> tuple:
    """Seeded normal inputs of the given shapes (float32 unless ``dtype``)."""
    import torch


    g = torch.Generator().manual_seed(check_seed(seed, slack=2**16))
    for s in shapes:
        check_alloc(s, dtype or torch.float32, "an input")
    return tuple(torch.randn(tuple(s), generator=g, dtype=torch.float64).to(dtype or torch.float32) for s in shapes)


# ------------------------------------------------------------------------------ options in
def _err(via: Via, key: str | None, problem: str, fix: str | None = None) -> OptionError:
    return OptionError(via, key, problem, fix)


def resolve_model(model, opts: ConvertOptions):
    """(kind, obj, name): ("onnx", Path, name) or ("torch", nn.Module, name). Specs are loaded here,
    for the API as for the CLI: ``"file.py:fn"``, ``"pkg.mod:fn"``, ``"model.onnx"``. Options without
    effect on the model (weights for an ONNX file, trust_pickle without weights) are refused before,
    by ``ConvertOptions.resolve``."""
    from torch import nn


    via = opts.via
    if opts.weights is not None and not opts.weights.is_file():
        raise _err(via, "weights", f"'{opts.weights}' does not exist" if not opts.weights.exists() else f"'{opts.weights}' is not a file",
                   "give the path of a state_dict checkpoint")
    if isinstance(model, (str, Path)):
        spec = parse_model_spec(str(model))
        if spec.kind == "onnx":
            return "onnx", Path(spec.target), str(model)
        return "torch", load_model(spec, opts.weights, trust_pickle=opts.trust_pickle), str(model)
    if isinstance(model, nn.Module):
        if opts.weights is not None:  # into a copy: the caller's model never changes
            model = copy.deepcopy(model)
            load_weights(model, opts.weights, trust_pickle=opts.trust_pickle)
        return "torch", model, type(model).__name__
    raise BadInputError(f"the model is a {type(model).__name__}",
                        "pass an nn.Module, a spec such as 'file.py:build' or 'package.module:build', or a .onnx path")


def _example(kind: str, model, example_inputs, opts: ConvertOptions):
    """Example inputs (a tuple of tensors) for a PyTorch model, or the shape overrides for an ONNX one."""
    import torch


    via = opts.via
    if example_inputs is not None and opts.input_shape:
        raise _err(via, "input_shape", "is given together with example inputs", "pass one of them")
    if kind == "onnx":
        if example_inputs is None:
            return [tuple(s) for s in opts.input_shape] or None
        ex = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        return [tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t) for t in ex]
    dtype, device = model_dtype_device(model)
    if example_inputs is None:
        if not opts.input_shape:
            if via.name == "cli":
                raise BadInputError("no --input-shape given", "pass one --input-shape per model input, e.g. --input-shape 1,3,224,224")
            fix = "add input_shape" if via.name == "config" else "pass example_inputs (a tensor or tuple of tensors) or input_shape=[1, 3, 224, 224]"
            raise _err(via, None, "no example inputs", fix)
        sig = _positional(model)  # a usage error, before torch.onnx.export fails on it
        limit = None if sig is None or sig[2] else len(sig[0])
        if limit is not None and len(opts.input_shape) > limit:
            raise _err(via, "input_shape", f"is given {len(opts.input_shape)} times, but the model's forward() takes {limit} input"
                       f"{'' if limit == 1 else 's'}", "give one shape per input of forward()")
        example = random_inputs(opts.input_shape, dtype, opts.seed)
    else:
        example = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        if not example or not all(isinstance(t, torch.Tensor) for t in example):
            raise BadInputError("example_inputs must be a tensor or a tuple of tensors", "pass e.g. (torch.randn(1, 3, 224, 224),)")
    return tuple(t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for t in example)


def _source(opts: ConvertOptions):
    if opts.calib is None:
        return None
    return as_source(opts.calib, opts.batch_size, what="the calibration data", fingerprint=True)  # provenance


# ------------------------------------------------------------------------------ provenance
def provenance(opts: ConvertOptions, source, opset: int | None, calibrated: bool) -> dict[str, str]:
    """What made an artifact, as string metadata (the ONNX file's ``metadata_props``)."""
    d = {
        "version": __version__,
        "calibrated": "true" if calibrated else "false",
        "opset": str(opset) if opset is not None else "",
        "dynamic_batch": "true" if opts.dynamic_batch else "false",
        "atol": json.dumps(opts.atol, sort_keys=True),
        "rtol": json.dumps(opts.rtol, sort_keys=True),
        "seed": str(opts.seed),
    }
    if calibrated:
        d["estimator"] = opts.estimator.value
        d["batch_size"] = "" if opts.batch_size is None else str(opts.batch_size)
        d["calib_sha256"] = source.fingerprint or ""
        d["calib_batches"] = str(source.batches)
    return {PROVENANCE_PREFIX + k: v for k, v in d.items()}


def add_provenance(proto, prov: dict[str, str]) -> None:
    """Record ``prov`` in the proto's metadata_props (after the exporter's metadata was stripped)."""
    keep = [(p.key, p.value) for p in proto.metadata_props if not p.key.startswith(PROVENANCE_PREFIX)]
    del proto.metadata_props[:]
    for k, v in keep + sorted(prov.items()):
        proto.metadata_props.add(key=k, value=v)


def provenance_defaults(prov: dict[str, str]) -> dict[str, Any]:
    """Option values an artifact was made with that say how to rebuild its inputs (estimator, batch size,
    dynamic batch, seed), as ConvertOptions fields (for ``bnfold verify``). Never the tolerance: the
    pass criterion comes from bnfold's defaults or the caller, not from the file being checked (trust
    rule "PASSED means compared", docs/trust.md)."""
    parse = {"estimator": Estimator, "batch_size": int, "dynamic_batch": lambda v: v == "true", "seed": int}
    out: dict[str, Any] = {}
    with contextlib.suppress(ValueError, KeyError, TypeError):  # the first value that does not parse ends it
        for key, value in parse.items():
            if prov.get(key):
                out[key] = value(prov[key])
    return out


# ------------------------------------------------------------------------------ convert
def _worded(fn):
    """Errors from the stages below name options the way the caller's interface spells them; the
    garbage collector walks only what the run makes (``collect_new_only``)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, options: ConvertOptions | None = None, **kw):
        via = options.via if isinstance(options, ConvertOptions) else API
        shown = options.progress if isinstance(options, ConvertOptions) else kw.get("progress")
        try:
            with progress.reporting(shown) as lines, collect_new_only():  # the stages' lines on stderr (progress=True)
                result = fn(*args, options=options, **kw)
                lines.step("done")
                return result
        except BnfoldError as err:
            raise reword(err, via)
    return wrapper


@_worded
def convert(model, example_inputs=None, output: str | Path | None = None, *, options: ConvertOptions | None = None, **kw) -> ConvertReport:
    """Calibrate (when ``calib`` is given), fold, export to ``output`` and verify it.

    ``model``: an nn.Module, a spec (``"file.py:build"``, ``"package.module:build"``, loaded with
    ``weights=``) or the path of an .onnx file (its BatchNormalization nodes are folded).
    ``example_inputs``: a tensor or tuple of tensors, or None with ``input_shape=``.
    Keywords are the options of ``bnfold convert`` (see ``bnfold.options.OPTIONS``): ``calib`` takes
    every data form (a path, ``module:fn``, a tensor, a list, (input, label) pairs, dicts, a
    DataLoader, an IterableDataset, a generator). Returns a ConvertReport (falsy only when verification
    failed; with ``verify=False`` its ``passed`` is None: written, not verified); the JSON report is
    written to ``report`` when given.
    """
    opts = ConvertOptions.resolve(options, kw, CONVERT, model)
    if output is None:
        raise BadInputError("no output path", "pass output, e.g. 'model.onnx'")

    check_seed(opts.seed)
    # trust rule "no output on an input", before any work: no output on an input, on another output or on a special file
    outputs = {"output": output, "--report": opts.report, "--plot": opts.plot}
    output = check_run_paths(_run_inputs(model, opts), outputs, no_overwrite=not opts.overwrite,
                             sidecars={"output": [".data"]})["output"]
    kind, obj, name = resolve_model(model, opts)
    example = _example(kind, obj, example_inputs, opts)
    rep = ConvertReport(model=name, output=str(output), versions=versions(), options=opts.to_dict())
    with OutputSet() as outs:  # the ONNX file, its data and the report: committed together at the end
        staged = outs.reserve(output)
        if kind == "onnx":
            _convert_onnx(rep, obj, example, staged, opts)
        else:
            # convert works on a module it owns: the one it built (a spec, or weights= into a copy), or
            # one copy of the caller's module, which is never changed
            held = [copy.deepcopy(obj) if obj is model else obj]
            del obj
            _convert_torch(rep, held, example, staged, opts, _rebuilder(model, opts))
        if rep or opts.keep_failed:  # passed, or written, not verified
            rep.export["path"] = str(output)
        else:  # rep.export["path"] stays None
            data = rep.export.get("external_data")
            outs.discard(output, *([output.parent / data] if data else []))
            rep.notes.append(not_written_note(output))
        rep.exit_code = EXIT_OK if rep else EXIT_VERIFY_FAILED

        peak = process_peak_rss_mb()
        rep.resources["peak_rss_mb"] = None if peak is None else round(peak, 1)
        if opts.plot is not None and rep.calibration:  # how stale the statistics were: an output like the report
            write_drift_plot(rep.calibration, opts.plot)
        if opts.report is not None:
            write_report(rep, opts.report)
    return rep


def _run_inputs(model, opts: ConvertOptions, artifact: str | Path | None = None) -> dict:
    """The files a run reads, for ``check_run_paths``; labels are flags: reword() spells them for the
    caller (--weights, weights=, key 'weights')."""
    files = {"model": spec_files(model) if isinstance(model, (str, Path)) else None}
    if artifact is not None:
        files["the ONNX file"] = str(artifact)
    return {**files, "--weights": None if opts.weights is None else str(opts.weights),
            "--calib": spec_files(opts.calib) if isinstance(opts.calib, (str, Path)) else None}


def _record_plan(rep: ConvertReport, plan) -> None:
    d = plan.to_dict()
    rep.fold = {"tracer": d.get("tracer"), "trace_error": d.get("trace_error"), "batchnorm_layers": plan.bn_count}
    rep.folded, rep.unfolded = d["folded"], d["unfolded"]


def _record_verification(rep: ConvertReport, vr) -> None:
    rep.verification = vr.to_dict()
    rep.providers_unavailable = vr.providers_unavailable
    rep.notes.extend(n for n in vr.notes if n not in rep.notes)
    rep.passed = vr.passed


def write_report(rep, path: str | Path) -> None:
    write_text_atomic(path, json.dumps(rep.to_dict(), indent=2, sort_keys=False, default=str) + "\n")


def _verify_keywords(opts: ConvertOptions) -> dict[str, Any]:
    """The options' tolerance and providers, as the keywords of ``verify`` (providers None: those this onnxruntime has)."""
    providers = None if opts.providers is None else [str(p) for p in opts.providers]
    return {"atol": opts.atol, "rtol": opts.rtol, "min_top1": opts.min_top1, "providers": providers,
            "require_providers": [str(p) for p in opts.require_providers]}


def _sample_count(example: tuple, dynamic_batch: bool) -> int:
    """How many calibration samples verification uses: the example's batch (at least 4 with a dynamic batch)."""
    n = example[0].shape[0] if example and example[0].dim() else 1
    return max(4, n) if dynamic_batch else n


def _verify_sets(example: tuple, dynamic_batch: bool, source, seed: int) -> dict:
    sets: dict[str, Any] = {}
    k = _sample_count(example, dynamic_batch)
    if dynamic_batch:
        for b in sorted({1, k}):
            shapes = [(b,) + tuple(t.shape[1:]) for t in example]
            sets[f"random(batch={b})"] = random_inputs(shapes, example[0].dtype, seed + b)
    else:
        sets[f"random(batch={k})"] = random_inputs([tuple(t.shape) for t in example], example[0].dtype, seed + 1)
    if source is not None:
        sample = source.head(k)
        if sample is not None and sample.size == k and not sample.kwargs and len(sample.args) >= len(example):
            dtype = example[0].dtype
            args = sample.args[:len(example)]  # (input, label) pairs: the label is not a model input
            sets[f"calibration[:{k}]"] = tuple(t.to(dtype) if t.is_floating_point() else t for t in args)
    return sets


def check_example(model, example: tuple, opts: ConvertOptions) -> None:
    """The model runs on its example inputs, or bad input (exit 2) naming their shapes and the option
    (``convert`` and ``inspect`` alike)."""
    import torch

    try:
        with torch.no_grad(), eval_mode(model):
            call_model(model, Batch(example, {}))
    except Exception as err:
        raise inputs_rejected(example, err, "example inputs", f"check {opts.via.key('input_shape').strip()} (rank, channels, size)") from err


def _calibrate(rep, model, source, example: tuple, opts: ConvertOptions) -> None:
    """New statistics into bnfold's own module, in place; samples for verification kept during the one pass."""
    source.want_head(_sample_count(example, opts.dynamic_batch))
    with _stage(rep, "calibrate"):
        _, summary = run_calibration(model, source, estimator=opts.estimator.value, inplace=True, progress=opts.progress,
                                     allow_tf32=opts.allow_tf32, effect=True)  # output_effect: on the batches of this pass
        rep.calibration = {**summary.to_dict(), "data_sha256": source.fingerprint}


def _convert_torch(rep, held: list, example, staged, opts: ConvertOptions, rebuild):
    """On a module bnfold owns (built from a spec, or one copy of the caller's): (calibrate →) reference
    outputs → fold in place → check the folded module → export → release → verify the file against the
    stored references. One copy of the weights; none left while the onnxruntime sessions exist."""
    model = held.pop()  # the caller keeps no reference: the module is freed after the export
    problem = opset_problem(opts.opset)
    if problem is not None:
        raise _err(opts.via, "opset", *problem)
    dtype, _ = model_dtype_device(model)
    with _stage(rep, "check_inputs"):
        check_example(model, example, opts)
    source = _source(opts)
    if source is not None:
        _calibrate(rep, model, source, example, opts)
    sets = references = None
    fold_runs: list = []
    kept = [copy.deepcopy(model)] if opts.explain and opts.verify else []  # the reference explain compares with (asked for)
    if opts.verify:
        sets = _verify_sets(example, opts.dynamic_batch, source, opts.seed)
        with _stage(rep, "reference"):  # before the fold changes the module
            references = reference_outputs(model, sets, providers=_verify_keywords(opts)["providers"], borrow=True)
            return_freed_memory()  # the float64 run's tensors: back to the OS, not left in the heap
    before = {"bytes": weight_bytes(model)}  # the before → after line (report.before_after)
    with _stage(rep, "fold"):
        model, plan = fold_with_plan(model, example, inplace=True)
        if opts.verify:  # checked now, so that it can be released as soon as it is exported
            fold_runs = check_folded(model, sets, references, atol=opts.atol, rtol=opts.rtol, min_top1=opts.min_top1)
        return_freed_memory()  # the fold's float64 working copies
    if plan.bn_count == 0:
        rep.notes.append("the model has no BatchNorm layer: exported and verified as it is")
    export_example = example
    if opts.dynamic_batch and example[0].shape[0] < 2:  # torch.export specialises a batch of 1
        export_example = random_inputs([(2,) + tuple(t.shape[1:]) for t in example], dtype, opts.seed)
    with _stage(rep, "export", f"opset {opts.opset}" if opts.opset is not None else ""):
        proto, plan, exporter = export_folded(model, export_example, opset=opts.opset, dynamic_batch=opts.dynamic_batch, plan=plan,
                                              external_data=(staged.parent, Path(rep.output).name + ".data"))
        model = None  # the proto is the one copy of the weights from here on
        _record_plan(rep, plan)
        got = opset_of(proto)  # the asked-for opset: _export_ir refuses any other
        add_provenance(proto, provenance(opts, source, got, source is not None))
        counts = _graph_counts(proto)
        info = save_onnx(proto, staged, data_name=Path(rep.output).name + ".data", check=False)
        del proto
        if not opts.verify:  # otherwise onnxruntime loads (and checks) the file in verify
            check_onnx_file(staged)
    rep.export = {"path": None, "opset": got, "exporter": exporter, "sha256": info["sha256"], "bytes": info["bytes"],
                  "external_data": info["external_data"], "dynamic_batch": opts.dynamic_batch, **counts, "before": before}
    if not opts.verify:
        rep.mark_unverified()
        return
    with _stage(rep, "verify"):
        return_freed_memory()  # the proto and the module are gone: sessions start lower
        try:
            vr = verify(None, staged, sets, references=references, **_verify_keywords(opts))
        except BadInputError:
            check_onnx_file(staged)  # a file onnx.checker rejects is the export's fault (exit 3), not the input's
            raise
    vr.runs[:0] = fold_runs
    _explain_hook(rep, vr, kept.pop if kept else rebuild, staged, sets, opts)
    _record_verification(rep, vr)


def onnx_input_sets(src: Path, overrides, source, seed: int) -> dict:
    """Seeded random inputs for an ONNX model's graph inputs (dynamic dims from ``overrides``,
    else 1), plus the first calibration samples when they fit."""
    import numpy as np
    import torch

    inputs = onnx_inputs(src, overrides)
    specs = [(i.shape, i.dtype) for i in inputs]
    rng = np.random.default_rng(seed)
    sets = {"random": tuple(
        torch.from_numpy(rng.standard_normal(shape).astype(dt) if np.dtype(dt).kind == "f" else rng.integers(0, 2, size=shape).astype(dt))
        for shape, dt in specs)}
    if source is not None:
        n = specs[0][0][0] if specs and specs[0][0] else 1
        sample = source.head(n)
        if sample is not None and not sample.kwargs:
            check_onnx_sample(inputs, sample.args)
        if sample is not None and not sample.kwargs and len(sample.args) == len(specs) and sample.size == n:
            sets["calibration"] = tuple(torch.from_numpy(np.asarray(t.numpy(), dtype=dt)) for t, (_, dt) in zip(sample.args, specs))
    return sets


def check_runnable(blockers: list[str], src, fix: str) -> None:
    """BadInputError before onnxruntime is handed an original it crashes on (``ort_blockers``)."""
    if blockers:
        raise BadInputError(f"cannot verify against '{src}': {blockers[0]}", fix)


def _convert_onnx(rep, src: Path, overrides, staged, opts: ConvertOptions):
    with _stage(rep, "fold"):
        repairs: list[str] = []
        proto = load_onnx(src, repairs)
        blockers = ort_blockers(proto)  # of the original, which verification runs in onnxruntime
        before = {**_graph_counts(proto), "opset": opset_of(proto), "bytes": src.stat().st_size}
        if opts.opset is not None and opset_of(proto) != opts.opset:
            proto = _convert_opset(proto, opts)
        plan = fold_onnx_proto(proto)
        rep.notes.extend(repairs + plan.repairs)
        source = _source(opts)
        add_provenance(proto, provenance(opts, source, opset_of(proto), False))
        info = save_onnx(proto, staged, data_name=Path(rep.output).name + ".data")
    _record_plan(rep, plan)
    rep.export = {"path": None, "opset": opset_of(proto), "sha256": info["sha256"], "bytes": info["bytes"],
                  "external_data": info["external_data"], **_graph_counts(proto), "before": before}
    del proto
    if plan.bn_count == 0:
        rep.notes.append("the model has no BatchNormalization node: written and verified as it is")
    if not opts.verify:
        rep.mark_unverified()
        return
    check_runnable(blockers, src, "re-export the original, or skip verification (--no-verify / verify=False)")
    sets = onnx_input_sets(src, overrides, source, opts.seed)
    with _stage(rep, "verify"):
        vr = verify(src, staged, sets, **_verify_keywords(opts))
    _explain_hook(rep, vr, lambda: str(src), staged, sets, opts)
    _record_verification(rep, vr)


def _convert_opset(proto, opts: ConvertOptions):
    """An ONNX input at another opset: onnx.version_converter, or a refusal naming why."""
    import onnx
    from onnx import version_converter


    have, hi = opset_of(proto), onnx.defs.onnx_opset_version()
    if not 7 <= opts.opset <= hi:
        raise _err(opts.via, "opset", f"{opts.opset} is outside what onnx {onnx.__version__} converts", f"choose an opset from 7 to {hi}")
    try:
        out = version_converter.convert_version(proto, opts.opset)
        onnx.checker.check_model(out)
    except Exception as err:
        first = first_line(err)
        raise _err(opts.via, "opset", f"{opts.opset}: onnx.version_converter cannot convert this model from opset {have}: {first[:200]}",
                   f"drop it to keep opset {have}") from err
    if opset_of(out) != opts.opset:
        raise _err(opts.via, "opset", f"{opts.opset}: onnx.version_converter wrote opset {opset_of(out)}", f"drop it to keep opset {have}")
    return out


# ------------------------------------------------------------------------------ verify an artifact
@_worded
def check_artifact(model, onnx_path: str | Path, example_inputs=None, *, options: ConvertOptions | None = None, **kw) -> CheckReport:
    """Verify an existing ONNX artifact against its source (an nn.Module, a model spec or the original .onnx).

    Options the artifact records that say how to rebuild its inputs (estimator, batch size, seed,
    dynamic batch: its ``bnfold.*`` metadata) are the defaults, given options win, and ``from_file``
    names the ones taken; the tolerance it records is never used (bnfold's defaults or the caller's).
    With ``calib``, the PyTorch reference is calibrated as ``convert`` did and samples of the data
    join the random inputs. When
    verification fails, every difference from how the artifact was made is named in ``differences``.
    Returns a CheckReport (truthy when it passed).
    """



    opts = ConvertOptions.resolve(options, kw, VERIFY, model)
    check_seed(opts.seed)
    check_run_paths(_run_inputs(model, opts, onnx_path), {"--report": opts.report})
    artifact = load_onnx(onnx_path)  # a clear error for a missing, truncated or non-ONNX artifact
    prov = {p.key[len(PROVENANCE_PREFIX):]: p.value for p in artifact.metadata_props
            if p.key.startswith(PROVENANCE_PREFIX)}  # what made it (``provenance``'s keys)
    made = provenance_defaults(prov)
    # batch size only for data that bnfold cuts into batches (files); a DataLoader has its own
    keys = ("estimator", "batch_size") if isinstance(opts.calib, (str, Path)) else ("estimator",)
    taken = {k: v for k, v in made.items() if k not in opts.given
             and (k not in ("estimator", "batch_size") or (k in keys and prov.get("calibrated") == "true" and opts.calib is not None))}
    opts = opts.with_defaults(taken)
    kind, obj, name = resolve_model(model, opts)
    source = _source(opts)
    check = CheckReport(model=name, onnx=str(onnx_path), verification=None, provenance=prov, versions=versions(),
                        from_file={k: opts.to_dict()[k] for k in taken})
    check.notes += _tolerance_notes(prov, opts)
    if kind == "onnx":
        overrides = _example(kind, obj, example_inputs, opts)
        check_runnable(ort_blockers(load_onnx(obj, [])), obj, "re-export the original")  # repairs onnxruntime makes itself pass
        sets = onnx_input_sets(obj, overrides, source, opts.seed)
        check_onnx_sample(onnx_inputs(artifact), sets["random"], what=f"the inputs of '{obj}'")
        reference = str(obj)
    else:
        example = _example(kind, obj, example_inputs, opts)
        check_onnx_sample(onnx_inputs(artifact), example, what="the model's example input (--input-shape)", with_batch=not opts.dynamic_batch)
        reference = obj
        if source is not None:  # the reference calibrated as convert did, on a copy
            source.want_head(_sample_count(example, opts.dynamic_batch))
            reference, _ = run_calibration(obj, source, estimator=opts.estimator.value, progress=opts.progress,
                                           allow_tf32=opts.allow_tf32)
        sets = _verify_sets(example, opts.dynamic_batch, source, opts.seed)
    check.verification = verify(reference, onnx_path, sets, **_verify_keywords(opts))
    _explain_check(check, reference, model, onnx_path, sets, opts)
    check.options = opts.to_dict()
    if not check.passed:
        check.differences = _differences(prov, opts, source)
    if opts.report is not None:
        write_report(check, opts.report)
    return check


def _tolerance_notes(prov: dict[str, str], opts: ConvertOptions) -> list[str]:
    """Where this check's pass criterion came from, when the file records another one."""
    recorded = {k: prov[k] for k in ("atol", "rtol") if prov.get(k) not in (None, "", "null")}
    if not recorded:
        return []
    used = ", ".join(f"{k} {json.dumps(getattr(opts, k))} (given)" for k in ("atol", "rtol") if k in opts.given) or "bnfold's default tolerance"
    note = (f"the file records {', '.join(f'{k} {v}' for k, v in recorded.items())} from when it was made: not used, "
            f"the pass criterion comes from bnfold or the caller, never from the file checked; used: {used}")
    return [note]


# ------------------------------------------------------------------------------ explanations
def _rebuilder(model, opts: ConvertOptions):
    """A function that builds the reference again from ``model`` as the caller gave it (its spec, its
    module, its weights, calibrated again with ``calib``): an explanation after the fold has changed
    bnfold's own copy costs nothing until it is needed."""

    def rebuild():
        with progress.reporting(False):  # the "explain" line says what happens: no second "load" line
            kind, obj, _ = resolve_model(model, opts)
            if kind == "onnx":
                return str(obj)
            source = _source(opts)
            if source is not None:
                obj, _ = run_calibration(obj, source, estimator=opts.estimator.value, allow_tf32=opts.allow_tf32)
            return obj

    return rebuild


def _explain_into(vr: VerifyReport, rebuild, onnx_path, sets, opts: ConvertOptions) -> dict:
    """``vr.explanation`` (explain.py) for ``onnx_path`` against the reference ``rebuild()`` returns."""
    try:
        reference = rebuild()
    except Exception as err:  # noqa: BLE001 — an explanation never changes the verdict
        vr.explanation = Explanation("unavailable", f"no explanation: the reference could not be built again ({type(err).__name__}: "
                                     f"{first_line(err)[:200]}); run again with {opts.via.key('explain').strip()}").to_dict()
    else:
        explain_report(vr, reference, onnx_path, sets)
    return vr.explanation


def _explain_hook(rep: ConvertReport, vr: VerifyReport, rebuild, staged, sets, opts: ConvertOptions) -> None:
    """convert: explain now when asked or when verification failed (the staged file is still there);
    otherwise ``rep.explain()`` does it later, on the written file."""
    if opts.explain or not vr.passed:
        with _stage(rep, "explain"):
            _explain_into(vr, rebuild, staged, sets, opts)
        return

    def later() -> None:
        again = VerifyReport.from_dict(rep.verification)
        rep.verification["explanation"] = _explain_into(again, rebuild, Path(rep.export["path"]), sets, opts)

    rep._explain_later = later


def _explain_check(check: CheckReport, reference, model, onnx_path, sets, opts: ConvertOptions) -> None:
    """bnfold verify: explain now when asked or when verification failed; otherwise ``check.explain()``
    does it later, with the reference built again (the report does not hold the model)."""
    if opts.explain or not check.passed:
        _explain_into(check.verification, lambda: reference, onnx_path, sets, opts)
    else:
        check._explain_later = lambda: _explain_into(check.verification, _rebuilder(model, opts), onnx_path, sets, opts)


def _differences(prov: dict[str, str], opts: ConvertOptions, source) -> list[str]:
    """How this check's settings differ from the ones the artifact was made with."""
    if not prov:
        return []
    out = []
    calibrated = prov.get("calibrated") == "true"
    k = opts.via.key
    if calibrated and source is None:
        out.append(f"the artifact was made with calibration data (sha256 {prov.get('calib_sha256', '?')[:12]}…); this check used none: pass {k('calib').strip()}")
    if not calibrated and source is not None:
        out.append(f"the artifact was made without calibration; this check calibrated with {k('calib').strip()}")
    if calibrated and source is not None:
        if source.fingerprint and prov.get("calib_sha256") and source.fingerprint != prov["calib_sha256"]:
            out.append(f"calibration data differs: sha256 {source.fingerprint[:12]}… here, {prov['calib_sha256'][:12]}… when made")
        here = "" if opts.batch_size is None else str(opts.batch_size)
        if prov.get("batch_size", "") != here or (prov.get("calib_batches") and str(source.batches) != prov["calib_batches"]):
            out.append(f"batch size {here or 'none'} ({source.batches} batches) here, {prov.get('batch_size') or 'none'} "
                       f"({prov.get('calib_batches', '?')} batches) when made: the paper estimator's statistics depend on the batches")
        if prov.get("estimator") and prov["estimator"] != opts.estimator.value:
            out.append(f"estimator {opts.estimator.value} here, {prov['estimator']} when made")
    for key in ("atol", "rtol"):
        if prov.get(key) not in (None, json.dumps(getattr(opts, key), sort_keys=True)):
            out.append(f"{key} {json.dumps(getattr(opts, key))} here, {prov[key]} when made")
    return out
