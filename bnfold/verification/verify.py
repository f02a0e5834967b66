"""Verify stage: a loop over runners (bnfold/runners.py) whose outputs go to the comparator
(bnfold/compare.py), against a reference computed once per input set.

* the reference: the original PyTorch model in eval mode (on its own device; for a GPU provider also
  on the GPU, TF32 off), or for ONNX-in folding the original ONNX file on CPU at ``ORT_DISABLE_ALL``;
  plus, for a floating PyTorch reference that fits (float64 parameters ≤ 1.5 GB), one float64 run per
  input set: the comparator then knows each output's float32 noise floor (see bnfold/compare.py);
* the folded PyTorch module (when given);
* the ONNX file on onnxruntime, for each requested provider (bnfold/providers.py) that really runs,
  at ``ORT_DISABLE_ALL`` (the graph as written) and at the default level (``ORT_ENABLE_ALL``).

Honest verdicts: PASSED needs at least one ONNX comparison (when no requested provider can run,
``verify`` raises ProviderError, exit 2), a finite reference (a NaN/Inf reference fails, exit 1,
with a note naming the first module whose output was non-finite) and every output within tolerance.
Invalid statistics (negative or non-finite running_var, non-finite running_mean, negative epsilon,
in a PyTorch BN or an ONNX BatchNormalization of the reference) are bad input: ``verify`` raises
before running anything (exit 2), naming the layer. Per-output tolerance keys must name an output.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np


from bnfold.verification.compare import (
    NOISE_K,
    OutputComparison,
    check_tolerance,
    check_tolerance_keys,
    compare_outputs,
)
from bnfold.errors import BadInputError, first_line, ProviderError, WeightsError
from bnfold.verification.providers import DEFAULT_PROVIDERS, PROVIDERS, parse_providers
from bnfold.verification.runners import LEVELS, OrtRunner, RunnerUnavailable, TorchRunner
from bnfold.edges.data import Batch, eval_mode, model_dtype_device

FLOAT64_MAX_BYTES = 1_500_000_000  # float64 copy of the reference's parameters and buffers


# ------------------------------------------------------------------------------------- results
@dataclass
class Run:
    target: str  # "onnx" or "folded-module"
    provider: str  # "cpu", "cuda", ... or "pytorch"
    graph_optimization: str | None  # "disable_all", "default" (onnxruntime), None for PyTorch
    inputs: str  # name of the input set
    passed: bool
    outputs: list[OutputComparison] = field(default_factory=list)
    device: str | None = None  # where the candidate ran
    reference_device: str | None = None  # where the reference it was compared with ran

    def __bool__(self) -> bool:
        return self.passed

    @property
    def max_abs_error(self) -> float | None:
        vals = [o.max_abs_error for o in self.outputs if o.max_abs_error is not None]
        return max(vals) if vals else None

    @property
    def max_rel_error(self) -> float | None:
        vals = [o.max_rel_error for o in self.outputs if o.max_rel_error is not None]
        return max(vals) if vals else None

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "outputs"}
        return {**d, "max_abs_error": self.max_abs_error, "max_rel_error": self.max_rel_error,
                "outputs": [o.to_dict() for o in self.outputs]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Run":
        names = {f.name for f in fields(cls)} - {"outputs"}
        return cls(**{k: v for k, v in d.items() if k in names},
                   outputs=[OutputComparison.from_dict(o) for o in d.get("outputs", [])])


@dataclass
class VerifyReport:
    runs: list[Run] = field(default_factory=list)
    providers_unavailable: list[dict[str, str]] = field(default_factory=list)
    providers_run: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    float64_reference: str | None = None  # "ran", or why there was no float64 run
    noise_k: float = NOISE_K

    @property
    def passed(self) -> bool:
        # at least one artifact run (the folded PyTorch module alone proves nothing about the file)
        return any(r.target != "folded-module" for r in self.runs) and all(r.passed for r in self.runs)

    def __bool__(self) -> bool:
        return self.passed

    def failures(self) -> list[tuple[Run, OutputComparison]]:
        return [(r, o) for r in self.runs for o in r.outputs if not o.passed]

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "providers_run": list(self.providers_run),
            "providers_unavailable": [dict(u) for u in self.providers_unavailable],
            "float64_reference": self.float64_reference,
            "noise_k": self.noise_k,
            "notes": list(self.notes),
            "runs": [r.to_dict() for r in self.runs],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VerifyReport":
        return cls(runs=[Run.from_dict(r) for r in d.get("runs", [])],
                   providers_unavailable=[dict(u) for u in d.get("providers_unavailable", [])],
                   providers_run=list(d.get("providers_run", [])), notes=list(d.get("notes", [])),
                   float64_reference=d.get("float64_reference"), noise_k=d.get("noise_k", NOISE_K))


# --------------------------------------------------------------------- backwards-compatible helpers
def make_session(onnx_path: str | Path, provider: str, level: str):
    """(session, None) or (None, reason) — the reason why ``provider`` cannot really run here."""
    try:
        return OrtRunner(onnx_path, provider, level).session, None
    except RunnerUnavailable as err:
        return None, str(err)


# ----------------------------------------------------------------------------- input statistics
def check_statistics(reference) -> None:
    """Refuse (exit 2) BatchNorm statistics that cannot come from data: negative or non-finite
    running_var, non-finite running_mean, negative epsilon. Such a model's outputs are NaN or
    meaningless, so there is nothing to fold or verify; recalibrating (--calib) replaces them."""
    if isinstance(reference, (str, Path)):
        _check_onnx_statistics(Path(reference))
        return
    import torch

    for name, m in reference.named_modules():
        var, mean = getattr(m, "running_var", None), getattr(m, "running_mean", None)
        if not (isinstance(var, torch.Tensor) and isinstance(mean, torch.Tensor)):
            continue
        eps = getattr(m, "eps", 0.0)
        problem = None
        with torch.no_grad():
            v = var.detach()
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                problem = f"running_var has {int((~torch.isfinite(v)).sum())} NaN/Inf values"
            elif bool((v < 0).any()):
                problem = f"running_var has {int((v < 0).sum())} negative value(s) (min {float(v.min()):.3g})"
            elif mean.is_floating_point() and not bool(torch.isfinite(mean.detach()).all()):
                problem = f"running_mean has {int((~torch.isfinite(mean.detach())).sum())} NaN/Inf values"
            elif isinstance(eps, (int, float)) and eps < 0:
                problem = f"eps is negative ({eps:g})"
        if problem:
            raise WeightsError(f"BatchNorm layer '{name}' has invalid statistics: {problem}",
                               "check the checkpoint, or recompute the statistics with --calib")


def _check_onnx_statistics(path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 — an unreadable file is reported by the runner that loads it
        return
    inits = {i.name: i for i in m.graph.initializer}
    for node in m.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        label = node.name or (node.output[0] if node.output else "?")
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        problem = f"epsilon is negative ({eps:g})" if eps < 0 else None
        if problem is None and len(node.input) > 4 and node.input[4] in inits:
            t = inits[node.input[4]]
            if t.data_location != onnx.TensorProto.EXTERNAL:
                var = numpy_helper.to_array(t).astype(np.float64)
                if not np.isfinite(var).all():
                    problem = f"its variance has {int((~np.isfinite(var)).sum())} NaN/Inf values"
                elif (var < 0).any():
                    problem = f"its variance has {int((var < 0).sum())} negative values (min {var.min():.3g})"
        if problem:
            raise BadInputError(f"BatchNormalization '{label}' in {path.name} has invalid statistics: {problem}",
                                "fix the model's statistics (running variance ≥ 0, epsilon ≥ 0)")


# ------------------------------------------------------------------------------------ inputs
def _input_sets(inputs) -> dict[str, Any]:
    """Normalise to {name: Batch}."""
    import torch


    if isinstance(inputs, torch.Tensor):
        return {"inputs": Batch((inputs,), {})}
    if isinstance(inputs, Batch):
        return {"inputs": inputs}
    if isinstance(inputs, Mapping):
        out = {}
        for k, v in inputs.items():
            if isinstance(v, Batch):
                out[k] = v
            elif isinstance(v, torch.Tensor):
                out[k] = Batch((v,), {})
            else:
                out[k] = Batch(tuple(v), {})
        return out
    return {"inputs": Batch(tuple(inputs), {})}


def _float64_runner(reference, max_bytes: int, borrow: bool = False):
    """(TorchRunner in float64, None) or (None, why not)."""
    import itertools

    import torch


    dtype, _ = model_dtype_device(reference)
    if dtype == torch.float64:
        return None, "the reference is float64 already"
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None, f"the reference is {dtype}, not floating point"
    n = sum(t.numel() for t in itertools.chain(reference.parameters(), reference.buffers()) if t.is_floating_point())
    if n * 8 > max_bytes:
        return None, (f"a float64 copy of the reference would take {n * 8 / 1e9:.2f} GB "
                      f"(bound {max_bytes / 1e9:.2f} GB): judged against the {str(dtype).replace('torch.', '')} reference only")
    return TorchRunner(reference, dtype=torch.float64, allow_tf32=False, target="reference-float64", borrow=borrow), None


def compare_runners(reference, candidates, inputs, *, atol=None, rtol=None, reference64=None,
                    noise_k: float = NOISE_K) -> VerifyReport:
    """The comparator loop for any runners (a runner: ``infer(feeds) -> [(name, ndarray)]`` and the
    attributes ``target``, ``provider``, ``level``, ``device``): every candidate on every input set
    against ``reference`` (and ``reference64``, a float64 runner, for the noise floor).

    This is how a runtime bnfold does not ship (TensorRT's own API, ExecuTorch, ...) is verified:
    write one runner class and pass it here.
    """
    check_tolerance(atol, "atol")
    check_tolerance(rtol, "rtol")
    sets = _input_sets(inputs)
    report = VerifyReport(noise_k=noise_k)
    refs = {s: reference.infer(f) for s, f in sets.items()}
    refs64 = {s: reference64.infer(f) for s, f in sets.items()} if reference64 is not None else {}
    report.float64_reference = "ran" if refs64 else None
    names = [n for outs in refs.values() for n, _ in outs]
    check_tolerance_keys(atol, "atol", names)
    check_tolerance_keys(rtol, "rtol", names)
    for c in candidates:
        for s, f in sets.items():
            outs = compare_outputs(refs[s], c.infer(f), atol, rtol, reference64=refs64.get(s), k=noise_k)
            report.runs.append(Run(c.target, c.provider, c.level, s, all(outs), outs, device=c.device,
                                   reference_device=reference.device))
        if c.provider not in report.providers_run and c.target != "folded-module":
            report.providers_run.append(c.provider)
    _noise_notes(report)
    return report


def _unavailable(report: VerifyReport, provider: str, why: str, required: list[str]) -> None:
    report.providers_unavailable.append({"provider": provider, "reason": why})
    if provider in required:
        raise ProviderError(f"required provider '{provider}' cannot run here: {why}",
                            "run on a machine where it works, or drop --require-providers")


def verify(
    reference,
    onnx_path: str | Path,
    inputs,
    *,
    atol=None,
    rtol=None,
    providers=DEFAULT_PROVIDERS,
    folded=None,
    require_providers: Iterable[str] = (),
    levels: Iterable[str] = LEVELS,
    float64_reference: bool = True,
    float64_max_bytes: int = FLOAT64_MAX_BYTES,
    noise_k: float = NOISE_K,
    verbose: bool = False,
    references: "References | None" = None,
) -> VerifyReport:
    """Compare ``onnx_path`` (and ``folded``, a PyTorch module) against ``reference``.

    ``reference``: the original nn.Module (eval mode is used, the module is not changed) or the path
    of an original .onnx file. ``inputs``: a tensor, a tuple of tensors, or {name: tuple} for several
    input sets. ``atol``/``rtol``: a number, or {output_name: number, "*": default}.
    ``float64_reference``: also run a PyTorch reference in float64 (when it fits in
    ``float64_max_bytes``) and judge against the float32 model's own noise (``noise_k``).
    ``verbose``: let onnxruntime's warnings reach stderr (otherwise they go to the notes).
    ``references``: outputs taken earlier with ``reference_outputs`` (then ``reference`` may be None).
    Returns a VerifyReport (truthy when every run passed and at least one ONNX run happened).
    Raises ProviderError when no requested provider (or a required one) can run.
    """

    check_tolerance(atol, "atol")
    check_tolerance(rtol, "rtol")
    wanted = parse_providers(providers)
    required = parse_providers(require_providers) if require_providers else []
    for p in required:
        if p not in wanted:
            wanted.append(p)
    levels = tuple(levels)
    if not levels:
        raise BadInputError("no onnxruntime optimisation level to verify at", f"use {' and/or '.join(LEVELS)}")
    for lv in levels:
        if lv not in LEVELS:
            raise BadInputError(f"unknown optimisation level '{lv}'", f"use {' or '.join(LEVELS)}")
    if reference is None and references is None:
        raise BadInputError("verify needs a reference model or reference outputs", "pass the original model (or references=)")
    if reference is not None:
        check_statistics(reference)
    report = VerifyReport(noise_k=noise_k)
    sets = _input_sets(inputs)
    onnx_ref = isinstance(reference, (str, Path))
    with contextlib.ExitStack() as stack:
        if reference is not None and not onnx_ref:
            stack.enter_context(eval_mode(reference))  # no copy of the weights: flags restored
        if folded is not None:
            stack.enter_context(eval_mode(folded))
        if references is None:
            references = _references(reference, onnx_ref, sets, float64_reference, float64_max_bytes, verbose)
        elif set(references.refs) != set(sets):
            raise BadInputError(f"references cover input sets {sorted(references.refs)}, not {sorted(sets)}",
                                "take the references with the same inputs")
        _run_all(report, reference, onnx_ref, Path(onnx_path), sets, atol, rtol, wanted, required, folded, levels,
                 noise_k, verbose, references)
    return report


@dataclass
class References:
    """The reference's outputs for every input set, computed once (``reference_outputs``): float32 on
    its device, float64 when it ran, and on a GPU when one is used. With them, ``verify`` needs no
    reference module, so a caller that owns the model may fold it in place before the sessions exist."""

    refs: dict  # input set -> [(output name, ndarray)]
    device: str
    refs64: dict = field(default_factory=dict)
    float64_reference: str | None = None
    by_device: dict = field(default_factory=dict)  # torch device -> refs (the GPU reference)
    notes: list = field(default_factory=list)


def reference_outputs(reference, inputs, *, providers=DEFAULT_PROVIDERS, float64_reference: bool = True,
                      float64_max_bytes: int = FLOAT64_MAX_BYTES, verbose: bool = False, borrow: bool = False) -> References:
    """Run ``reference`` (an nn.Module, eval mode, not changed) on every input set now: float32, float64
    when it fits, and on the GPU when a requested provider runs there. Pass the result to
    ``verify(None, ..., references=...)``. ``borrow=True``: the float64 run casts the module itself
    and casts it back exactly afterwards (no float64 copy beside it); for a module nobody else uses
    meanwhile."""
    import torch


    check_statistics(reference)
    sets = _input_sets(inputs)
    with eval_mode(reference):
        refs = _references(reference, False, sets, float64_reference, float64_max_bytes, verbose, borrow=borrow)
        for p in parse_providers(providers):
            dev = PROVIDERS[p].torch_device
            if dev and dev.startswith("cuda") and torch.cuda.is_available() and not any(d.startswith("cuda") for d in refs.by_device):
                gr = TorchRunner(reference, device=dev, allow_tf32=False)
                refs.by_device[dev] = {s: gr.infer(f) for s, f in sets.items()}
                gr.close()
                del gr
    return refs


def check_folded(folded, inputs, references: References, *, atol=None, rtol=None, noise_k: float = NOISE_K) -> list[Run]:
    """Step 2 of verify on its own: the folded PyTorch module against ``references`` (taken before a
    fold in place). Returns the Runs; the caller may then drop the module before the sessions exist."""

    sets = _input_sets(inputs)
    runs = []
    with eval_mode(folded):
        fr = TorchRunner(folded, allow_tf32=False, target="folded-module")
        for s, f in sets.items():
            outs = compare_outputs(references.refs[s], fr.infer(f), atol, rtol, reference64=references.refs64.get(s), k=noise_k)
            runs.append(Run("folded-module", "pytorch", None, s, all(outs), outs, device=fr.device, reference_device=references.device))
        fr.close()
    return runs


def _references(reference, onnx_ref, sets, use_f64, f64_bytes, verbose, borrow: bool = False) -> References:
    """Step 1 of verify: the reference on every input set (float32, and float64 for the noise floor)."""
    notes: list[str] = []

    def note(text):
        if text not in notes:
            notes.append(text)

    if onnx_ref:
        ref_runner = OrtRunner(reference, "cpu", "disable_all", verbose=verbose, target="reference")
        f64_status = "not run for an ONNX reference"
    else:
        ref_runner = TorchRunner(reference, allow_tf32=False)
        f64_status = None
    try:
        refs = {s: ref_runner.infer(f) for s, f in sets.items()}
        refs64: dict[str, list] = {}
        if not onnx_ref:
            if not use_f64:
                f64_status = "switched off"
            else:
                r64, why = _float64_runner(reference, f64_bytes, borrow=borrow)
                if r64 is None:
                    f64_status = why
                    if "GB" in why:
                        note(f"no float64 run of the reference: {why}")
                else:
                    try:
                        refs64 = {s: r64.infer(f) for s, f in sets.items()}
                        f64_status = "ran"
                    except Exception as err:  # noqa: BLE001 — the model may not support float64
                        first = first_line(err)
                        f64_status = f"failed: {type(err).__name__}: {first[:200]}"
                        note(f"the float64 run of the reference failed ({type(err).__name__}: {first[:160]}): "
                             "judged against the float32 reference only")
                    finally:
                        r64.close()
                        del r64
        for s, outs in refs.items():
            bad = [n for n, o in outs if np.asarray(o).dtype.kind == "f" and not np.isfinite(o).all()]
            if bad:
                where = ref_runner.first_nonfinite_module(sets[s]) if isinstance(ref_runner, TorchRunner) else None
                at = f"; the first module with a NaN/Inf output is '{where}'" if where else ""
                note(f"the reference itself is non-finite on input set '{s}' (output {', '.join(bad)}){at}: "
                     "nothing can be verified against it")
        device = ref_runner.device
    finally:
        ref_runner.close()
    return References(refs=refs, device=device, refs64=refs64, float64_reference=f64_status, notes=notes)


def _run_all(report, reference, onnx_ref, onnx_path, sets, atol, rtol, wanted, required, folded, levels, k, verbose, pre: References):
    import torch

    # 1. the reference, once per input set (and once in float64): ``pre``
    refs, refs64, ref_device = pre.refs, pre.refs64, pre.device
    report.float64_reference = pre.float64_reference
    for n in pre.notes:
        report.note(n)
    names = [n for outs in refs.values() for n, _ in outs]
    check_tolerance_keys(atol, "atol", names)
    check_tolerance_keys(rtol, "rtol", names)

    def judge(s, got, against):
        return compare_outputs(against[s], got, atol, rtol, reference64=refs64.get(s), k=k)

    # 2. the folded PyTorch module
    if folded is not None:
        report.runs += check_folded(folded, sets, pre, atol=atol, rtol=rtol, noise_k=k)

    # 3. the ONNX file, per provider and level; one session alive at a time
    by_device = {ref_device: refs, **pre.by_device}
    for provider in wanted:
        spec = PROVIDERS[provider]
        for i, level in enumerate(levels):
            try:
                runner = OrtRunner(onnx_path, provider, level, verbose=verbose)
            except RunnerUnavailable as err:
                _unavailable(report, provider, str(err) if i == 0 else f"{level}: {err}", required)
                if i == 0:
                    break
                continue
            for msg in runner.messages:
                report.note(f"onnxruntime ({provider}, {level}): {msg}")
            if provider not in report.providers_run:
                report.providers_run.append(provider)
            against, against_dev = refs, ref_device
            dev = spec.torch_device
            if dev and not onnx_ref and dev.startswith("cuda") and torch.cuda.is_available():
                if not any(d.startswith("cuda") for d in by_device) and reference is not None:
                    gr = TorchRunner(reference, device=dev, allow_tf32=False)
                    by_device[dev] = {s: gr.infer(f) for s, f in sets.items()}
                    gr.close()
                    del gr
                cuda_dev = next((d for d in by_device if d.startswith("cuda")), None)
                if cuda_dev is not None:
                    against, against_dev = by_device[cuda_dev], cuda_dev
            for s, f in sets.items():
                outs = judge(s, runner.infer(f), against)
                report.runs.append(Run("onnx", provider, level, s, all(outs), outs, device=runner.device,
                                       reference_device=against_dev))
            runner.close()
            del runner

    if not report.providers_run:
        why = "; ".join(f"{u['provider']}: {u['reason']}" for u in report.providers_unavailable)
        raise ProviderError(f"none of the requested providers ({', '.join(wanted)}) can run here, so the ONNX file "
                            f"was never compared ({why})", "add cpu (--providers cpu,cuda), or run where the provider works")
    _noise_notes(report)


def _noise_notes(report: VerifyReport) -> None:
    """One note per output that is ill-conditioned in float32, with the worst artifact figures."""
    worst: dict[str, OutputComparison] = {}
    for r in report.runs:
        if r.target == "folded-module":  # the note is about the artifact
            continue
        for o in r.outputs:
            if o.ill_conditioned and (o.name not in worst or (o.max_abs_error_float64 or 0) > (worst[o.name].max_abs_error_float64 or 0)):
                worst[o.name] = o
    for name, o in worst.items():
        ratio = (o.max_abs_error_float64 or 0) / o.noise_floor if o.noise_floor else float("nan")
        report.note(
            f"the model is ill-conditioned in float32: output '{name}' of its float32 run is {o.noise_floor:.3g} away from "
            f"its float64 run, beyond the tolerance (atol {o.atol:.3g}, rtol {o.rtol:.3g}); the artifact is at most "
            f"{o.max_abs_error_float64:.3g} away from the float64 run ({ratio:.2f}× the model's own error; the limit is "
            f"{report.noise_k:g}×{' and a given tolerance is used as it is' if o.tolerance_given else ''})"
        )
