"""Verify stage: run the reference and the candidate(s) on the same inputs and compare every output.

Runners (Polygraphy-style, kept apart from the comparator):

* the reference: the original PyTorch model in eval mode (on the GPU too, where torch has CUDA and
  the CUDA provider runs), or for ONNX-in folding the original ONNX file on CPU at ``ORT_DISABLE_ALL``;
* the folded PyTorch module (when given);
* the ONNX file on onnxruntime, for each provider that really runs, at ``ORT_DISABLE_ALL`` (the graph
  as written) and at the default level (``ORT_ENABLE_ALL``, where onnxruntime rewrites the graph).

A provider counts only when a session was created and ``session.get_providers()`` names it first;
otherwise it is listed under ``providers_unavailable`` with the reason. TF32 is switched off on both
sides of a CUDA comparison.

Pass criterion per element (numpy.allclose): |candidate − reference| ≤ atol + rtol·|reference|, plus
equal shapes, equal dtypes and the same NaN/Inf pattern. The default atol is the dtype's base value
times max(1, max|reference|): rounding in a deep network grows with the size of the values summed,
not with each output element, so an output whose values reach 1e5 gets atol 10 (float32). Given
tolerances are used as they are.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from .errors import BadInputError, ProviderError

KNOWN_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
LEVELS = ("disable_all", "default")

# dtype → (atol, rtol). Folding changes rounding, never more: these bound it with margin.
DEFAULT_TOLERANCES = {
    "float64": (1e-9, 1e-7),
    "float32": (1e-4, 1e-4),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}


def default_tolerance(dtype_name: str) -> tuple[float, float]:
    return DEFAULT_TOLERANCES.get(dtype_name, (0.0, 0.0))


# ------------------------------------------------------------------------------------- results
@dataclass
class OutputComparison:
    name: str
    passed: bool
    shape: list | None
    dtype: str | None
    atol: float
    rtol: float
    max_abs_error: float | None = None
    mean_abs_error: float | None = None
    median_abs_error: float | None = None
    max_rel_error: float | None = None
    cosine_similarity: float | None = None
    required_atol: float | None = None
    nonfinite_reference: int = 0
    nonfinite_candidate: int = 0
    problem: str | None = None

    def __bool__(self) -> bool:
        return self.passed


@dataclass
class Run:
    target: str  # "onnx" or "folded-module"
    provider: str  # "cpu", "cuda" or "pytorch"
    graph_optimization: str | None  # "disable_all", "default" (onnxruntime), None for PyTorch
    inputs: str  # name of the input set
    passed: bool
    outputs: list[OutputComparison] = field(default_factory=list)
    device: str | None = None

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


@dataclass
class VerifyReport:
    runs: list[Run] = field(default_factory=list)
    providers_unavailable: list[dict[str, str]] = field(default_factory=list)
    providers_run: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.runs) and all(r.passed for r in self.runs)

    def __bool__(self) -> bool:
        return self.passed

    def failures(self) -> list[tuple[Run, OutputComparison]]:
        return [(r, o) for r in self.runs for o in r.outputs if not o.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "providers_run": self.providers_run,
            "providers_unavailable": self.providers_unavailable,
            "runs": [
                {**{k: v for k, v in asdict(r).items() if k != "outputs"},
                 "max_abs_error": r.max_abs_error, "max_rel_error": r.max_rel_error,
                 "outputs": [asdict(o) for o in r.outputs]}
                for r in self.runs
            ],
        }


# ------------------------------------------------------------------------------------ compare
def _tol(value, name: str, fallback: float) -> float:
    if value is None:
        return fallback
    if isinstance(value, Mapping):
        v = value.get(name, value.get("*"))
        return fallback if v is None else float(v)
    return float(value)


def check_tolerance(value, what: str) -> None:
    vals = value.values() if isinstance(value, Mapping) else ([] if value is None else [value])
    for v in vals:
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise BadInputError(f"{what} '{v}' is not a number", f"pass a non-negative number, e.g. --{what} 1e-4") from None
        if not np.isfinite(f) or f < 0:
            raise BadInputError(f"{what} {v} is negative or not finite", f"pass a non-negative number, e.g. --{what} 1e-4")


def compare(name: str, reference: np.ndarray, candidate: np.ndarray, atol=None, rtol=None) -> OutputComparison:
    ref = np.asarray(reference)
    got = np.asarray(candidate)
    dtype = str(ref.dtype) if ref.dtype != np.dtype("V2") else "bfloat16"
    d_atol, d_rtol = default_tolerance(dtype)
    if ref.dtype.kind == "f" and ref.size:
        finite = np.abs(ref[np.isfinite(ref)])
        d_atol *= max(1.0, float(finite.max()) if finite.size else 1.0)
    a, r = _tol(atol, name, d_atol), _tol(rtol, name, d_rtol)
    res = OutputComparison(name=name, passed=False, shape=list(ref.shape), dtype=dtype, atol=a, rtol=r)
    if ref.shape != got.shape:
        res.problem = f"shape {list(got.shape)} != reference {list(ref.shape)}"
        return res
    if ref.dtype != got.dtype:
        res.problem = f"dtype {got.dtype} != reference {ref.dtype}"
        return res
    if ref.size == 0:
        res.passed = True
        return res
    r64, g64 = ref.astype(np.float64), got.astype(np.float64)
    fin_r, fin_g = np.isfinite(r64), np.isfinite(g64)
    res.nonfinite_reference = int((~fin_r).sum())
    res.nonfinite_candidate = int((~fin_g).sum())
    both = fin_r & fin_g
    same_nonfinite = np.array_equal(fin_r, fin_g) and np.array_equal(
        np.nan_to_num(r64[~fin_r], nan=0.0), np.nan_to_num(g64[~fin_g], nan=0.0)
    )
    diff = np.abs(g64[both] - r64[both])
    absr = np.abs(r64[both])
    if diff.size:
        res.max_abs_error = float(diff.max())
        res.mean_abs_error = float(diff.mean())
        res.median_abs_error = float(np.median(diff))
        nonzero = absr > 0  # relative error is undefined where the reference is 0
        res.max_rel_error = float((diff[nonzero] / absr[nonzero]).max()) if nonzero.any() else 0.0
        res.required_atol = float(max((diff - r * absr).max(), 0.0))
        rn, gn = r64[both].ravel(), g64[both].ravel()
        denom = np.linalg.norm(rn) * np.linalg.norm(gn)
        res.cosine_similarity = float(rn @ gn / denom) if denom > 0 else (1.0 if np.array_equal(rn, gn) else 0.0)
        within = bool((diff <= a + r * absr).all())
    else:
        res.max_abs_error = res.mean_abs_error = res.median_abs_error = res.max_rel_error = 0.0
        within = True
    if not same_nonfinite:
        res.problem = f"NaN/Inf differ: reference has {res.nonfinite_reference}, candidate {res.nonfinite_candidate}"
    elif not within:
        res.problem = f"max abs error {res.max_abs_error:.3g} exceeds atol {a:g} + rtol {r:g}·|ref|"
    res.passed = same_nonfinite and within
    return res


# ------------------------------------------------------------------------------- flattening I/O
def flatten_outputs(out: Any, prefix: str = "output") -> list[tuple[str, Any]]:
    """Tensors of a (nested) output in a stable order with stable names."""
    import torch

    if isinstance(out, torch.Tensor):
        return [(prefix, out)]
    if isinstance(out, Mapping):
        items: list = []
        for k in out:
            items += flatten_outputs(out[k], f"{prefix}.{k}")
        return items
    if isinstance(out, (tuple, list)):
        items = []
        for i, v in enumerate(out):
            items += flatten_outputs(v, f"{prefix}.{i}")
        return items
    if out is None:
        return []
    return [(prefix, torch.as_tensor(out))]


def _to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.float().numpy()
    return t.numpy()


# ------------------------------------------------------------------------------------ runners
def parse_providers(providers: Iterable[str] | str | None) -> list[str]:
    if providers is None:
        return list(KNOWN_PROVIDERS)
    if isinstance(providers, str):
        providers = [p for p in providers.split(",")]
    out = []
    for p in providers:
        key = p.strip().lower().replace("executionprovider", "")
        if key not in KNOWN_PROVIDERS:
            raise ProviderError(f"unknown provider '{p.strip()}'", f"use one or more of {', '.join(KNOWN_PROVIDERS)}")
        if key not in out:
            out.append(key)
    if not out:
        raise ProviderError("no provider given", "use --providers cpu,cuda")
    return out


def make_session(onnx_path: str | Path, provider: str, level: str):
    """(session, None) or (None, reason) — the reason why ``provider`` cannot really run here."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL if level == "disable_all" else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    name = KNOWN_PROVIDERS[provider]
    if name not in ort.get_available_providers():
        hint = " (install onnxruntime-gpu instead of onnxruntime)" if provider == "cuda" else ""
        return None, f"this onnxruntime build ({ort.__version__}) has no {name}{hint}"
    if provider == "cuda":
        plist = [(name, {"use_tf32": "0", "device_id": "0"}), "CPUExecutionProvider"]
    else:
        plist = [name]
    try:
        sess = ort.InferenceSession(str(onnx_path), sess_options=so, providers=plist)
    except Exception as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if provider == "cpu":
            from .load import onnx_error

            raise onnx_error(onnx_path, err, "load") from err
        return None, f"creating a {name} session failed: {text}"
    if sess.get_providers()[0] != name:
        return None, f"{name} is listed but did not load (session fell back to {sess.get_providers()[0]}; CUDA/cuDNN libraries missing?)"
    return sess, None


def run_session(sess, inputs: tuple, kwargs: Mapping | None = None) -> list[np.ndarray]:
    feeds = {}
    names = [i.name for i in sess.get_inputs()]
    kwargs = dict(kwargs or {})
    flat = [_to_numpy(t) for t in inputs]
    pos = iter(flat)
    for n in names:
        if n in kwargs:
            feeds[n] = _to_numpy(kwargs[n])
        else:
            try:
                feeds[n] = next(pos)
            except StopIteration:
                raise BadInputError(f"the ONNX model needs input '{n}', which was not given", "pass one --input-shape per model input") from None
    return sess.run(None, feeds)


@contextlib.contextmanager
def tf32_off():
    """Switch TF32 off in torch (restored afterwards) so CUDA matmuls/convs are true fp32."""
    import torch

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _torch_outputs(model, args: tuple, kwargs: Mapping, device=None) -> list[tuple[str, Any]]:
    import torch

    from .data import Batch, call_model

    if device is None:  # inputs go where the model lives (a CUDA model gets CUDA inputs)
        from .data import model_dtype_device

        device = model_dtype_device(model)[1]
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with torch.no_grad():
        out = call_model(model, Batch(tuple(args), dict(kwargs)))
    return [(n, _to_numpy(t)) for n, t in flatten_outputs(out)]


def _compare_lists(ref: list[tuple[str, np.ndarray]], got: list[np.ndarray], atol, rtol) -> list[OutputComparison]:
    if len(ref) != len(got):
        return [OutputComparison(name="outputs", passed=False, shape=None, dtype=None, atol=0, rtol=0,
                                 problem=f"candidate has {len(got)} outputs, reference {len(ref)}")]
    return [compare(n, r, g, atol, rtol) for (n, r), g in zip(ref, got)]


def _input_sets(inputs) -> dict[str, tuple[tuple, dict]]:
    """Normalise to {name: (args, kwargs)}."""
    import torch

    from .data import Batch

    if isinstance(inputs, torch.Tensor):
        return {"inputs": ((inputs,), {})}
    if isinstance(inputs, Batch):
        return {"inputs": (inputs.args, inputs.kwargs)}
    if isinstance(inputs, Mapping):
        out = {}
        for k, v in inputs.items():
            if isinstance(v, Batch):
                out[k] = (v.args, v.kwargs)
            elif isinstance(v, torch.Tensor):
                out[k] = ((v,), {})
            else:
                out[k] = (tuple(v), {})
        return out
    return {"inputs": (tuple(inputs), {})}


def verify(
    reference,
    onnx_path: str | Path,
    inputs,
    *,
    atol=None,
    rtol=None,
    providers=("cpu", "cuda"),
    folded=None,
    require_providers: Iterable[str] = (),
    levels: Iterable[str] = LEVELS,
) -> VerifyReport:
    """Compare ``onnx_path`` (and ``folded``, a PyTorch module) against ``reference``.

    ``reference``: the original nn.Module (eval mode is used, the module is not changed) or the path
    of an original .onnx file. ``inputs``: a tensor, a tuple of tensors, or {name: tuple} for several
    input sets. ``atol``/``rtol``: a number, or {output_name: number, "*": default}.
    Returns a VerifyReport (truthy when every run passed).
    """
    from .data import eval_mode

    check_tolerance(atol, "atol")
    check_tolerance(rtol, "rtol")
    wanted = parse_providers(providers)
    required = parse_providers(require_providers) if require_providers else []
    for p in required:
        if p not in wanted:
            wanted.append(p)
    report = VerifyReport()
    sets = _input_sets(inputs)
    onnx_ref = isinstance(reference, (str, Path))
    with contextlib.ExitStack() as stack:
        if not onnx_ref:
            stack.enter_context(eval_mode(reference))  # no copy of the weights: flags restored
        if folded is not None:
            stack.enter_context(eval_mode(folded))
        return _verify(report, reference, onnx_ref, onnx_path, sets, atol, rtol, wanted, required, folded, tuple(levels))


def _verify(report, reference, onnx_ref, onnx_path, sets, atol, rtol, wanted, required, folded, levels):
    import torch

    # references on CPU (computed once per input set)
    cpu_ref: dict[str, list] = {}
    ref_sess = None
    if onnx_ref:
        ref_sess, why = make_session(reference, "cpu", "disable_all")
    for sname, (args, kwargs) in sets.items():
        if onnx_ref:
            outs = run_session(ref_sess, args, kwargs)
            cpu_ref[sname] = [(f"output.{i}" if len(outs) > 1 else "output", o) for i, o in enumerate(outs)]
        else:
            with tf32_off():  # a model that lives on the GPU is still compared in true fp32
                cpu_ref[sname] = _torch_outputs(reference, args, kwargs)

    if folded is not None:
        for sname, (args, kwargs) in sets.items():
            with tf32_off():
                got = [o for _, o in _torch_outputs(folded, args, kwargs)]
            outs = _compare_lists(cpu_ref[sname], got, atol, rtol)
            report.runs.append(Run("folded-module", "pytorch", None, sname, all(outs), outs,
                                   device=str(next(folded.parameters(), torch.empty(0)).device)))

    for provider in wanted:
        # one session at a time (a large model is loaded once per level, never twice at once)
        sess, why = make_session(onnx_path, provider, levels[0])
        if sess is None:
            report.providers_unavailable.append({"provider": provider, "reason": why})
            if provider in required:
                raise ProviderError(f"required provider '{provider}' cannot run here: {why}", "run on a machine where it works, or drop --require-providers")
            continue
        report.providers_run.append(provider)
        gpu_ref = provider == "cuda" and not onnx_ref and torch.cuda.is_available()
        ctx = tf32_off() if gpu_ref else contextlib.nullcontext()
        with ctx:
            on_gpu = gpu_ref and any(p.is_cuda for p in reference.parameters())
            ref_model = (reference if on_gpu else copy.deepcopy(reference).to("cuda")) if gpu_ref else None
            refs = {s: (_torch_outputs(ref_model, a, k, device="cuda") if gpu_ref else cpu_ref[s]) for s, (a, k) in sets.items()}
            del ref_model
            for i, level in enumerate(levels):
                if i:
                    sess, why = make_session(onnx_path, provider, level)
                    if sess is None:
                        report.providers_unavailable.append({"provider": provider, "reason": f"{level}: {why}"})
                        continue
                for sname, (args, kwargs) in sets.items():
                    got = run_session(sess, args, kwargs)
                    outs = _compare_lists(refs[sname], got, atol, rtol)
                    report.runs.append(Run("onnx", provider, level, sname, all(outs), outs,
                                           device="cuda" if gpu_ref else "cpu"))
                del sess
    return report
