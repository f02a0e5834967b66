"""Verify stage: one comparator loop (``_compare_into``, public as ``compare_runners``) over runners
(runners.py) whose outputs go to the comparator (compare.py), against reference outputs computed once
per input set (``References``) and judged with one ``Tolerance``.

* the reference: the original PyTorch model in eval mode (on its own device; for a GPU provider also
  on the GPU, TF32 off), or for ONNX-in folding the original ONNX file on CPU at every optimisation
  level a candidate runs at: each candidate is compared with the reference run at its own level (like
  with like: a QDQ model that onnxruntime fuses at ``ORT_ENABLE_ALL`` is compared fused with fused);
  plus, for a floating PyTorch reference that fits (float64 parameters ≤ 1.5 GB), one float64 run per
  input set: the comparator then knows each output's float32 noise floor (see compare.py);
* the folded PyTorch module (when given);
* the ONNX file on onnxruntime, for each requested provider (providers.py) that really runs, at
  ``ORT_DISABLE_ALL`` (the graph as written) and at the default level (``ORT_ENABLE_ALL``); every
  session is a runner used in a ``with`` block, released before the next one is made.

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
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from bnfold.edges.data import model_dtype_device
from bnfold.errors import BadInputError, ProviderError, WeightsError, first_line
from bnfold.onnx_pass.io import node_label, walk_nodes
from bnfold.report import LEVEL_NAMES, plain_status, html, render_verification, show
from bnfold.verification.compare import FLOAT32_EPS, NOISE_K, OutputComparison, Record, Tolerance
from bnfold import progress
from bnfold.verification.providers import DEFAULT_PROVIDERS, PROVIDERS, available_providers, parse_providers, unavailable_reason
from bnfold.verification.runners import LEVELS, OrtRunner, RunnerUnavailable, TorchRunner, positional_batch

FLOAT64_MAX_BYTES = 1_500_000_000  # float64 copy of the reference's parameters and buffers


# ------------------------------------------------------------------------------------- results
@dataclass
class Run(Record):
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
        return max((o.max_abs_error for o in self.outputs if o.max_abs_error is not None), default=None)

    @property
    def max_rel_error(self) -> float | None:
        return max((o.max_rel_error for o in self.outputs if o.max_rel_error is not None), default=None)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "outputs"}
        return {**d, "max_abs_error": self.max_abs_error, "max_rel_error": self.max_rel_error,
                "outputs": [o.to_dict() for o in self.outputs]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Run":
        return super().from_dict(d, outputs=[OutputComparison.from_dict(o) for o in d.get("outputs", [])])


@dataclass
class VerifyReport:
    runs: list[Run] = field(default_factory=list)
    providers_unavailable: list[dict[str, str]] = field(default_factory=list)
    providers_run: list[str] = field(default_factory=list)
    providers_available: list[str] = field(default_factory=list)  # the ones this onnxruntime build lists
    notes: list[str] = field(default_factory=list)
    float64_reference: str | None = None  # "ran", or why there was no float64 run
    noise_k: float = NOISE_K
    explanation: dict | None = None  # where the candidate first left the reference (explain.py), when asked or on failure

    @property
    def passed(self) -> bool:
        # at least one artifact run (the folded PyTorch module alone proves nothing about the file)
        return any(r.target != "folded-module" for r in self.runs) and all(r.passed for r in self.runs)

    def __bool__(self) -> bool:
        return self.passed

    def failures(self) -> list[tuple[Run, OutputComparison]]:
        return [(r, o) for r in self.runs for o in r.outputs if not o.passed]

    def __repr__(self) -> str:
        errs = [r.max_abs_error for r in self.runs if r.max_abs_error is not None]
        worst = f", max abs {max(errs):.2e}" if errs else ""
        return (f"<VerifyReport {plain_status(self.passed)}: {len(self.runs)} runs on "
                f"{', '.join(self.providers_run) or 'no provider'}, {len(self.failures())} failed{worst}>")

    def print(self, *, verbose: bool = False, file=None, width: int | None = None) -> None:
        """Print the verification as the CLI shows it (``verbose``: the full table, as with -v)."""
        show(render_verification, self.to_dict(), verbose=verbose, file=file, width=width)

    def _repr_html_(self) -> str:  # notebooks
        return html(render_verification, self.to_dict())

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "providers_run": list(self.providers_run),
            "providers_unavailable": [dict(u) for u in self.providers_unavailable],
            "providers_available": list(self.providers_available),
            "float64_reference": self.float64_reference,
            "noise_k": self.noise_k,
            "notes": list(self.notes),
            "runs": [r.to_dict() for r in self.runs],
            "explanation": self.explanation,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VerifyReport":
        return cls(runs=[Run.from_dict(r) for r in d.get("runs", [])],
                   providers_unavailable=[dict(u) for u in d.get("providers_unavailable", [])],
                   providers_run=list(d.get("providers_run", [])), providers_available=list(d.get("providers_available", [])), notes=list(d.get("notes", [])),
                   float64_reference=d.get("float64_reference"), noise_k=d.get("noise_k", NOISE_K),
                   explanation=d.get("explanation"))


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
            if var.is_floating_point() and not bool(torch.isfinite(var).all()):
                problem = f"running_var has {int((~torch.isfinite(var)).sum())} NaN/Inf values"
            elif bool((var < 0).any()):
                problem = (f"running_var has {int((var < 0).sum())} negative value(s) "
                           f"(min {float(var.min()):.3g})")
            elif mean.is_floating_point() and not bool(torch.isfinite(mean).all()):
                problem = f"running_mean has {int((~torch.isfinite(mean)).sum())} NaN/Inf values"
            elif isinstance(eps, (int, float)) and eps < 0:
                problem = f"eps is negative ({eps:g})"
        if problem:
            raise WeightsError(f"BatchNorm layer '{name}' has invalid statistics: {problem}",
                               "check the checkpoint, or recompute the statistics with --calib")


def _check_onnx_statistics(path: Path) -> None:
    """Every BatchNormalization node of every graph-like (``io.walk``: subgraphs and functions too):
    a negative epsilon, a negative or non-finite variance, a non-finite mean is bad input (exit 2)."""
    import onnx
    from onnx import numpy_helper

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 — an unreadable file is reported by the runner that loads it
        return
    for node, where in walk_nodes(m, "BatchNormalization"):
        label = where.prefix + node_label(node)
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        problem = f"epsilon is negative ({eps:g})" if eps < 0 else None
        for k, what in ((4, "variance"), (3, "mean")):
            t = _initializer(where, node.input[k]) if len(node.input) > k else None
            if problem is not None or t is None or t.data_location == onnx.TensorProto.EXTERNAL:
                continue
            arr = numpy_helper.to_array(t).astype(np.float64)
            if not np.isfinite(arr).all():
                problem = f"its {what} has {int((~np.isfinite(arr)).sum())} NaN/Inf values"
            elif what == "variance" and (arr < 0).any():
                problem = f"its variance has {int((arr < 0).sum())} negative values (min {arr.min():.3g})"
        if problem:
            raise BadInputError(f"BatchNormalization '{label}' in {path.name} has invalid statistics: {problem}",
                                "fix the model's statistics (finite mean, running variance ≥ 0, epsilon ≥ 0)")


def _initializer(where, name: str):
    """The constant ``name`` as the graph-like ``where`` sees it (an initializer or a Constant node's
    tensor): its own, else the nearest enclosing graph's; None when it is computed or an input."""
    for g in (where.graph, *reversed(where.parents)):
        for t in getattr(g, "initializer", ()):
            if t.name == name:
                return t
        for n in g.node:
            if n.op_type == "Constant" and list(n.output) == [name]:
                return next((a.t for a in n.attribute if a.name == "value" and a.HasField("t")), None)
    return None


# ------------------------------------------------------------------------------------ inputs
def _input_sets(inputs) -> dict[str, Any]:
    """Normalise to {name: Batch}: one input set, or {name: inputs} for several."""
    if isinstance(inputs, Mapping):
        return {k: positional_batch(v) for k, v in inputs.items()}
    return {"inputs": positional_batch(inputs)}


# ------------------------------------------------------------------------------- settings
@dataclass
class VerifySettings:
    """How ``verify`` runs, everything but the tolerance (that is ``Tolerance``); checked and normalised
    when made: ``providers`` are registry keys in order, the required ones added; ``levels`` are
    onnxruntime optimisation levels (LEVELS)."""

    providers: Any = DEFAULT_PROVIDERS
    require_providers: Any = ()
    levels: Any = LEVELS
    float64_reference: bool = True  # also run a PyTorch reference in float64 when it fits ...
    float64_max_bytes: int = FLOAT64_MAX_BYTES  # ... in this many bytes
    verbose: bool = False  # onnxruntime's warnings reach stderr (otherwise they go to the notes)

    def __post_init__(self) -> None:
        self.require_providers = tuple(parse_providers(self.require_providers)) if self.require_providers else ()
        wanted = parse_providers(self.providers)
        self.providers = tuple(wanted + [p for p in self.require_providers if p not in wanted])
        self.levels = tuple(self.levels)
        if not self.levels:
            raise BadInputError("no onnxruntime optimisation level to verify at", f"use {' and/or '.join(LEVELS)}")
        for lv in self.levels:
            if lv not in LEVELS:
                raise BadInputError(f"unknown optimisation level '{lv}'", f"use {' or '.join(LEVELS)}")


def _group(cls, given, keywords: dict, what: str):
    """``given`` (a ``cls``), or a ``cls`` made of the keywords that are its fields (taken out of
    ``keywords``): the two spellings of the same settings, never both."""
    names = {f.name for f in fields(cls)}
    mine = {k: keywords.pop(k) for k in list(keywords) if k in names}
    if given is None:
        return cls(**mine)
    if mine:
        raise BadInputError(f"{what}= and {', '.join(mine)} were both given", f"pass one {cls.__name__} or its keywords, not both")
    return given


def _no_more(keywords: dict, fn: str) -> None:
    if keywords:
        raise TypeError(f"{fn}() got an unexpected keyword argument '{next(iter(keywords))}'")


# ----------------------------------------------------------------------------- references
@dataclass
class References:
    """The reference's outputs for every input set, computed once (``reference_outputs``): float32 on
    its device, float64 when it ran, and on a GPU when a requested provider runs there. With them,
    ``verify`` needs no reference module, so a caller that owns the model may fold it in place before
    the sessions exist."""

    refs: dict  # input set -> [(output name, ndarray)]
    device: str
    refs64: dict = field(default_factory=dict)
    float64_reference: str | None = None
    by_device: dict = field(default_factory=dict)  # torch device -> refs (the GPU reference)
    notes: list = field(default_factory=list)
    by_level: dict = field(default_factory=dict)  # onnxruntime level -> refs (an ONNX reference, run at each level)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def output_names(self) -> list[str]:
        return [n for outs in self.refs.values() for n, _ in outs]

    def against(self, device, level: str | None = None) -> tuple[dict, str]:
        """(outputs, device) a candidate running on ``device`` at onnxruntime ``level`` is compared with:
        like with like. An ONNX reference ran at every level, and a candidate is compared with the run at
        its own level (so a difference is bnfold's, never onnxruntime's optimiser's); a GPU candidate with
        the reference that ran on a GPU when there is one (same hardware, TF32 off); others with the
        reference on its own device."""
        if level in self.by_level:
            return self.by_level[level], self.device
        if str(device).startswith("cuda"):
            for dev, refs in {self.device: self.refs, **self.by_device}.items():
                if dev.startswith("cuda"):
                    return refs, dev
        return self.refs, self.device


def reference_outputs(reference, inputs, *, providers=DEFAULT_PROVIDERS, float64_reference: bool = True,
                      float64_max_bytes: int = FLOAT64_MAX_BYTES, verbose: bool = False, borrow: bool = False) -> References:
    """Run ``reference`` (an nn.Module, eval mode, not changed) on every input set now: float32, float64
    when it fits, and on the GPU when a requested provider runs there. Pass the result to
    ``verify(None, ..., references=...)``. ``borrow=True``: the float64 run casts the module itself
    and casts it back exactly afterwards (no float64 copy beside it); for a module nobody else uses
    meanwhile."""
    check_statistics(reference)
    settings = VerifySettings(providers=providers, float64_reference=float64_reference, float64_max_bytes=float64_max_bytes,
                              verbose=verbose)
    return _take_references(reference, _input_sets(inputs), settings, borrow=borrow)


def _take_references(reference, sets: dict, settings: VerifySettings, borrow: bool = False) -> References:
    """The reference (a module, or the path of an ONNX file run on CPU at ORT_DISABLE_ALL) on every
    input set: float32, float64 for the noise floor, and the GPU run; each runner released at once."""
    if isinstance(reference, (str, Path)):  # on CPU at every level a candidate runs at: like with like
        by_level = {}
        for level in dict.fromkeys(("disable_all", *settings.levels)):
            with OrtRunner(reference, "cpu", level, verbose=settings.verbose, target="reference") as runner:
                by_level[level] = {s: runner.infer(f) for s, f in sets.items()}
        out = References(by_level["disable_all"], "cpu", float64_reference="not run for an ONNX reference", by_level=by_level)
        _nonfinite_notes(out, sets, None)
        return out
    with TorchRunner(reference, allow_tf32=False) as runner:  # the module itself (same device and dtype)
        out = References({s: runner.infer(f) for s, f in sets.items()}, runner.device)
        _float64_outputs(out, reference, sets, settings, borrow)
        _nonfinite_notes(out, sets, runner)
    _gpu_outputs(out, reference, sets, settings.providers)
    return out


def _float64_outputs(out: References, reference, sets: dict, settings: VerifySettings, borrow: bool) -> None:
    """``out.refs64``: the reference run in float64 (when switched on, floating and small enough)."""
    if not settings.float64_reference:
        out.float64_reference = "switched off"
        return
    runner, why = _float64_runner(reference, settings.float64_max_bytes, borrow=borrow)
    if runner is None:
        out.float64_reference = why
        if "GB" in why:
            out.note(f"no float64 run of the reference: {why}")
        return
    with runner:  # a borrowed module is cast back here, a float64 copy dropped
        try:
            out.refs64 = {s: runner.infer(f) for s, f in sets.items()}
            out.float64_reference = "ran"
        except Exception as err:  # noqa: BLE001 — the model may not support float64
            out.float64_reference = f"failed: {type(err).__name__}: {first_line(err, 200)}"
            out.note(f"the float64 run of the reference failed "
                     f"({type(err).__name__}: {first_line(err, 160)}): "
                     "judged against the float32 reference only")


def _nonfinite_notes(out: References, sets: dict, runner: TorchRunner | None) -> None:
    """A note per input set whose reference output holds NaN/Inf, naming the first module at fault."""
    for s, outs in out.refs.items():
        bad = [n for n, o in outs if np.asarray(o).dtype.kind == "f" and not np.isfinite(o).all()]
        if bad:
            where = runner.first_nonfinite_module(sets[s]) if runner is not None else None
            at = f"; the first module with a NaN/Inf output is '{where}'" if where else ""
            out.note(f"the reference itself is non-finite on input set '{s}' (output {', '.join(bad)}){at}: "
                     "nothing can be verified against it")


def _gpu_device(providers: Iterable[str]) -> str | None:
    """The torch device of the first requested provider that runs on a CUDA GPU here, if any."""
    import torch

    for p in providers:
        spec = PROVIDERS[p]
        if spec.torch_device and spec.torch_device.startswith("cuda") and torch.cuda.is_available() \
                and unavailable_reason(spec) is None:
            return spec.torch_device
    return None


def _gpu_outputs(out: References, reference, sets: dict, providers: Iterable[str]) -> None:
    """The reference once more on the GPU (TF32 off) for a GPU provider's comparisons: computed once,
    here, before any session exists; not when the reference already ran on a GPU."""
    dev = _gpu_device(providers)
    if dev is None or out.device.startswith("cuda"):
        return
    with TorchRunner(reference, device=dev, allow_tf32=False) as runner:
        out.by_device[dev] = {s: runner.infer(f) for s, f in sets.items()}


def _float64_runner(reference, max_bytes: int, borrow: bool = False):
    """(TorchRunner in float64, None) or (None, why not)."""
    import torch

    dtype, _ = model_dtype_device(reference)
    if dtype == torch.float64:
        return None, "the reference is float64 already"
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None, f"the reference is {dtype}, not floating point"
    n = sum(t.numel() for t in [*reference.parameters(), *reference.buffers()] if t.is_floating_point())
    if n * 8 > max_bytes:
        return None, (f"a float64 copy of the reference would take {n * 8 / 1e9:.2f} GB "
                      f"(bound {max_bytes / 1e9:.2f} GB): judged against the {str(dtype).replace('torch.', '')} reference only")
    return TorchRunner(reference, dtype=torch.float64, allow_tf32=False, target="reference-float64", borrow=borrow), None


# -------------------------------------------------------------------------- the one loop
def _compare_into(report: VerifyReport, references: References, candidates: Iterable, sets: dict, tolerance: Tolerance) -> VerifyReport:
    """The comparator loop: every candidate runner on every input set against the reference outputs for
    its device (and the float64 ones, for the noise floor)."""
    for c in candidates:
        against, device = references.against(c.device, c.level)
        for s, f in sets.items():
            outs = tolerance.compare(against[s], c.infer(f), references.refs64.get(s))
            report.runs.append(Run(c.target, c.provider, c.level, s, all(outs), outs, device=c.device, reference_device=device))
        if c.target != "folded-module" and c.provider not in report.providers_run:
            report.providers_run.append(c.provider)
    return report


def _new_report(references: References, tolerance: Tolerance) -> VerifyReport:
    tolerance.check_names(references.output_names())
    return VerifyReport(float64_reference=references.float64_reference, noise_k=tolerance.noise_k,
                        notes=list(references.notes))  # note() keeps them unique


def compare_runners(reference, candidates, inputs, *, reference64=None, tolerance: Tolerance | None = None, **keywords) -> VerifyReport:
    """The comparator loop for any runners (a runner: ``infer(feeds) -> [(name, ndarray)]`` and the
    attributes ``target``, ``provider``, ``level``, ``device``): every candidate on every input set
    against ``reference`` (and ``reference64``, a float64 runner, for the noise floor). The tolerance:
    ``tolerance=Tolerance(...)`` or its keywords ``atol``, ``rtol``, ``noise_k``.

    This is how a runtime bnfold does not ship (TensorRT's own API, ExecuTorch, ...) is verified:
    write one runner class and pass it here. ``verify`` is this loop over bnfold's own runners.
    """
    tol = _group(Tolerance, tolerance, keywords, "tolerance")
    _no_more(keywords, "compare_runners")
    sets = _input_sets(inputs)
    refs = References({s: reference.infer(f) for s, f in sets.items()}, reference.device)
    if reference64 is not None:
        refs.refs64 = {s: reference64.infer(f) for s, f in sets.items()}
    refs.float64_reference = "ran" if refs.refs64 else None
    report = _compare_into(_new_report(refs, tol), refs, candidates, sets, tol)
    _noise_notes(report)
    return report


def check_folded(folded, inputs, references: References, *, tolerance: Tolerance | None = None, **keywords) -> list[Run]:
    """The folded PyTorch module against ``references`` (taken before a fold in place), on its own:
    the caller may then drop the module before the sessions exist. Returns the Runs."""
    tol = _group(Tolerance, tolerance, keywords, "tolerance")
    _no_more(keywords, "check_folded")
    with TorchRunner(folded, allow_tf32=False, target="folded-module") as runner:
        return _compare_into(VerifyReport(), references, [runner], _input_sets(inputs), tol).runs


def _unavailable(report: VerifyReport, provider: str, why: str, required: Iterable[str]) -> None:
    report.providers_unavailable.append({"provider": provider, "reason": why})
    if provider in required:
        raise ProviderError(f"required provider '{provider}' cannot run here: {why}",
                            "run on a machine where it works, or drop --require-providers")


def _sessions(report: VerifyReport, onnx_path: Path, settings: VerifySettings) -> Iterator[OrtRunner]:
    """The ONNX file on every requested provider that really runs, at every level: each session used in
    a ``with`` block and released before the next one is made. A provider that cannot run is recorded
    (an error when required); onnxruntime's messages become notes."""
    for provider in settings.providers:
        for i, level in enumerate(settings.levels):
            progress.current().step("verify", f"{provider} {LEVEL_NAMES.get(level, level)}")
            try:
                runner = OrtRunner(onnx_path, provider, level, verbose=settings.verbose)
            except RunnerUnavailable as err:
                _unavailable(report, provider, str(err) if i == 0 else f"{level}: {err}", settings.require_providers)
                if i == 0:
                    break
                continue
            with runner:
                for msg in runner.messages:
                    report.note(f"onnxruntime ({provider}, {level}): {msg}")
                yield runner


def verify(reference, onnx_path: str | Path, inputs, *, folded=None, references: References | None = None,
           tolerance: Tolerance | None = None, settings: VerifySettings | None = None, **keywords) -> VerifyReport:
    """Compare ``onnx_path`` (and ``folded``, a PyTorch module) against ``reference``.

    ``reference``: the original nn.Module (eval mode is used, the module is not changed) or the path
    of an original .onnx file. ``inputs``: a tensor, a tuple of tensors, or {name: tuple} for several
    input sets. ``references``: outputs taken earlier with ``reference_outputs`` (then ``reference``
    may be None).

    The tolerance is ``tolerance=Tolerance(...)`` or its keywords: ``atol``/``rtol`` (a number, or
    {output_name: number, "*": default}), ``noise_k``. The rest is ``settings=VerifySettings(...)`` or
    its keywords: ``providers``, ``require_providers``, ``levels``, ``float64_reference`` (also run a
    PyTorch reference in float64 when it fits in ``float64_max_bytes``, and judge against the float32
    model's own noise), ``verbose`` (onnxruntime's warnings reach stderr; otherwise they go to the notes).

    Returns a VerifyReport (truthy when every run passed and at least one ONNX run happened).
    Raises ProviderError when no requested provider (or a required one) can run.
    """
    tol = _group(Tolerance, tolerance, keywords, "tolerance")
    cfg = _group(VerifySettings, settings, keywords, "settings")
    _no_more(keywords, "verify")
    if reference is None and references is None:
        raise BadInputError("verify needs a reference model or reference outputs", "pass the original model (or references=)")
    if reference is not None:
        check_statistics(reference)
    sets = _input_sets(inputs)
    if references is None:
        references = _take_references(reference, sets, cfg)
    elif set(references.refs) != set(sets):
        raise BadInputError(f"references cover input sets {sorted(references.refs)}, not {sorted(sets)}",
                            "take the references with the same inputs")
    report = _new_report(references, tol)
    report.providers_available = available_providers()
    if folded is not None:
        report.runs += check_folded(folded, sets, references, tolerance=tol)
    with contextlib.closing(_sessions(report, Path(onnx_path), cfg)) as sessions:
        _compare_into(report, references, sessions, sets, tol)
    if not report.providers_run:
        why = "; ".join(f"{u['provider']}: {u['reason']}" for u in report.providers_unavailable)
        raise ProviderError(f"none of the requested providers ({', '.join(cfg.providers)}) can run here, so the ONNX file "
                            f"was never compared ({why})", "add cpu (--providers cpu,cuda), or run where the provider works")
    _noise_notes(report)
    return report


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
        if o.tolerance_given and o.atol < FLOAT32_EPS:  # the tolerance, not the model: each failure says so (compare.py)
            continue
        report.note(
            f"the model is ill-conditioned in float32: output '{name}' of its float32 run is {o.noise_floor:.3g} away from "
            f"its float64 run, beyond the tolerance (atol {o.atol:.3g}, rtol {o.rtol:.3g}); the artifact is at most "
            f"{o.max_abs_error_float64:.3g} away from the float64 run ({ratio:.2f}× the model's own error; the limit is "
            f"{report.noise_k:g}×{' and a given tolerance is used as it is' if o.tolerance_given else ''})"
        )
