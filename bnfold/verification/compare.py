"""The comparator: two runners' outputs in, one ``OutputComparison`` per output out.

A comparison is truthy when it passed and carries max/mean/median absolute errors, the largest
relative error, the cosine similarity and the atol that would have been needed.

Pass rule for one output (all must hold):

1. same shape and dtype;
2. the reference is finite everywhere — a NaN/Inf reference proves nothing, whatever the candidate
   does (``problem`` says so; ``verify`` adds where the first NaN/Inf appeared);
3. the candidate is finite wherever the reference is;
4. |candidate − reference| ≤ atol + rtol·|reference| everywhere (numpy.allclose), **or**, when a
   float64 run of the reference is available and the tolerance is bnfold's default (a tolerance the
   user gives is a contract, used as it is), the candidate is as close to the float64 truth as the
   float32 model itself is:

       |candidate − ref64| ≤ atol + rtol·|ref64| + K·floor      everywhere,

   where ``floor`` = max |reference − ref64| is the float32 model's own rounding error on this output
   (its *noise floor*) and K = ``NOISE_K`` = 4. A correct fold is one more float32 evaluation of the
   same function: its error against float64 is of the same size as the reference's own (measured
   ratio 0.3–1.5 on deep ill-conditioned nets, tests/test_verification.py), so K = 4 leaves margin;
   a wrong fold moves the output by more than rounding does and fails. The max-based floor is used
   because elementwise, two equally good float32 runs differ by more than 4× in ~15% of elements.

Agreement (for outputs shaped like logits: 2-D, batch × classes): ``top1`` is the share of rows
whose candidate argmax is the reference's argmax, ``top5`` the share whose reference argmax is among
the candidate's five largest (top-k accuracy with the reference's class as the label); None for
other outputs (and ``top5`` for fewer than 5 classes). ``min_top1`` (a number, or per output like
atol) judges an output on agreement instead of atol: it passes when top1 ≥ min_top1 (verdict
"agreement"), fails below, whatever the atol figures say; outputs it does not name are judged as above.
Without ``min_top1`` the verdict is unchanged.

Zero values compared is not a pass (``nothing_compared``): a run whose outputs are all empty (``x[:, :0]``),
or that has no outputs, fails with that reason; an empty output beside others passes as "empty".

When the floor itself exceeds the tolerance (``ill_conditioned``) no float32 artifact could meet the
tolerance against the float32 reference: the report says "the model is ill-conditioned in float32"
with the figures, and judges the candidate against the float64 run instead (trust rule "PASSED means compared",
docs/trust.md).

Default tolerances: the dtype's base (atol, rtol) with atol scaled by max(1, max|reference|):
rounding in a deep network grows with the size of the values summed. Given tolerances are used as
they are; per-output tolerances are ``{output_name: value, "*": default}`` and a name that matches
no output is an error (``check_tolerance_keys``). ``Tolerance`` holds atol, rtol and K together.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Mapping

import numpy as np

from bnfold.errors import BadInputError

NOISE_K = 4.0
FLOAT32_EPS = float(np.finfo(np.float32).eps)  # float32 resolution near 1.0: a smaller atol cannot be met in float32

# dtype → (atol, rtol). Folding changes rounding, never more: these bound it with margin.
DEFAULT_TOLERANCES = {
    "float64": (1e-9, 1e-7),
    "float32": (1e-4, 1e-4),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}


class Record:
    """A dataclass that is its JSON: ``to_dict`` writes it, ``from_dict`` reads it back (keys that are
    not fields ignored; ``given``: fields the caller builds itself)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **given):
        names = {f.name for f in fields(cls)} - set(given)
        return cls(**{k: v for k, v in d.items() if k in names}, **given)


@dataclass
class OutputComparison(Record):
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
    # against the float64 run of the reference (None when there was none)
    noise_floor: float | None = None  # max |reference − reference64|: the float32 model's own error
    max_abs_error_float64: float | None = None  # max |candidate − reference64|
    noise_k: float | None = None
    ill_conditioned: bool = False  # the noise floor alone exceeds the tolerance
    tolerance_given: bool = False  # atol/rtol set by the user for this output: used as given
    # agreement, for logits-shaped outputs (2-D: batch × classes); None elsewhere
    top1: float | None = None  # share of rows whose argmax agrees
    top5: float | None = None  # share of rows whose reference argmax is in the candidate's top 5
    min_top1: float | None = None  # judged on agreement: passes when top1 ≥ min_top1
    verdict: str | None = None  # "tolerance" | "noise-floor" | "agreement" | "empty" (passed by which rule) | None (failed)
    problem: str | None = None

    def __bool__(self) -> bool:
        return self.passed


# ---------------------------------------------------------------------------------- tolerances
def tolerance_for(value, name: str, fallback: float) -> float:
    if value is None:
        return fallback
    if isinstance(value, Mapping):
        v = value.get(name, value.get("*"))
        return fallback if v is None else float(v)
    return float(value)


def tolerance_given(value, name: str) -> bool:
    """Did the user set this output's tolerance (a number, its name or "*")?"""
    if value is None:
        return False
    if isinstance(value, Mapping):
        return name in value or "*" in value
    return True


def check_tolerance(value, what: str) -> None:
    vals = value.values() if isinstance(value, Mapping) else ([] if value is None else [value])
    for v in vals:
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise BadInputError(f"{what} '{v}' is not a number", f"pass a non-negative number, e.g. --{what} 1e-4") from None
        if not np.isfinite(f) or f < 0:
            raise BadInputError(f"{what} {v} is negative or not finite", f"pass a non-negative number, e.g. --{what} 1e-4")


def check_agreement(value) -> None:
    """``min_top1``: a share between 0 and 1 (or per output, like atol)."""
    vals = value.values() if isinstance(value, Mapping) else ([] if value is None else [value])
    for v in vals:
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = float("nan")
        if not 0.0 <= f <= 1.0:
            raise BadInputError(f"min_top1 {v!r} is not a share between 0 and 1", "pass e.g. --min-top1 0.999")


def check_tolerance_keys(value, what: str, output_names: Iterable[str]) -> None:
    """Per-output tolerance keys must name an output (or be "*"): a typo must not pass silently."""
    if not isinstance(value, Mapping):
        return
    names = list(dict.fromkeys(output_names))
    unknown = [k for k in value if k != "*" and k not in names]
    if unknown:
        raise BadInputError(f"--{what} names output '{unknown[0]}', which the model does not have",
                            f"use one of {', '.join(names) or '(no outputs)'} or '*' (e.g. --{what} {names[0] if names else 'output'}=1e-3)")


@dataclass(frozen=True)
class Tolerance:
    """How close is close enough, in one object, checked when made (a negative or non-number value is
    bad input): ``atol`` and ``rtol`` are None (the output dtype's default, atol scaled by the output's
    magnitude), a number, or per output ``{name: number, "*": default}``; ``noise_k`` is K, the multiple
    of the float32 model's own error a candidate may be from the float64 run (default tolerances only)."""

    atol: Any = None
    rtol: Any = None
    noise_k: float = NOISE_K
    min_top1: Any = None  # judge logits-shaped outputs on top-1 agreement instead (a share, or per output)

    def __post_init__(self) -> None:
        check_tolerance(self.atol, "atol")
        check_tolerance(self.rtol, "rtol")
        check_agreement(self.min_top1)

    def check_names(self, output_names: Iterable[str]) -> None:
        """Per-output keys must name one of ``output_names`` (or be "*")."""
        names = list(output_names)
        check_tolerance_keys(self.atol, "atol", names)
        check_tolerance_keys(self.rtol, "rtol", names)
        check_tolerance_keys(self.min_top1, "min-top1", names)

    def compare(self, reference: list, candidate: list, reference64: list | None = None) -> list[OutputComparison]:
        """``compare_outputs`` with this tolerance."""
        return compare_outputs(reference, candidate, self.atol, self.rtol, reference64=reference64, k=self.noise_k,
                               min_top1=self.min_top1)


# ---------------------------------------------------------------------------------- comparator
def compare(name: str, reference, candidate, atol=None, rtol=None, *, reference64=None, k: float = NOISE_K,
            min_top1=None) -> OutputComparison:
    """Compare one output. ``reference64``: the same output from a float64 run of the reference;
    ``min_top1``: judge it on top-1 agreement instead of atol (a share, or per output)."""
    res = _compare_values(name, reference, candidate, atol, rtol, reference64=reference64, k=k)
    _agreement(res, np.asarray(reference), np.asarray(candidate), tolerance_for(min_top1, name, None),
               named=isinstance(min_top1, Mapping) and name in min_top1)
    return res


def topk_agreement(reference, candidate) -> tuple[float | None, float | None]:
    """(top1, top5) for a logits-shaped pair (2-D, batch × classes; finite): the share of rows whose
    candidate argmax is the reference's, and whose reference argmax is among the candidate's five
    largest; (None, None) for other shapes, top5 None below 5 classes."""
    ref, got = np.asarray(reference), np.asarray(candidate)
    if ref.ndim != 2 or ref.shape != got.shape or ref.shape[0] == 0 or ref.shape[1] < 2 or ref.dtype.kind != "f" \
            or got.dtype.kind != "f" or not (np.isfinite(ref).all() and np.isfinite(got).all()):
        return None, None
    label = ref.argmax(axis=1)
    top1 = float((got.argmax(axis=1) == label).mean())
    if ref.shape[1] < 5:
        return top1, None
    top = np.argpartition(-got.astype(np.float64), 4, axis=1)[:, :5]
    return top1, float((top == label[:, None]).any(axis=1).mean())


def _agreement(res: OutputComparison, ref: np.ndarray, got: np.ndarray, min_top1: float | None, named: bool) -> None:
    """Top-1/top-5 agreement into ``res``; with ``min_top1``, the verdict on agreement."""
    if res.problem and res.max_abs_error is None:  # shape or dtype differ: nothing to agree on
        return
    res.top1, res.top5 = topk_agreement(ref, got)
    if min_top1 is None or res.nonfinite_reference or res.nonfinite_candidate:
        return
    res.min_top1 = float(min_top1)
    if res.top1 is None:
        if named:  # asked for this output by name: it must be logits-shaped
            res.passed, res.verdict = False, None
            res.problem = f"min_top1 is given for output '{res.name}', which is not shaped (batch, classes): {res.shape}"
        return
    res.passed = res.top1 >= res.min_top1
    res.verdict = "agreement" if res.passed else None
    res.problem = None if res.passed else (f"top-1 agreement {res.top1:.4g} is below min_top1 {res.min_top1:g} "
                                           f"(max abs error {res.max_abs_error:.3g})")


def _compare_values(name: str, reference, candidate, atol=None, rtol=None, *, reference64=None, k: float = NOISE_K) -> OutputComparison:
    ref = np.asarray(reference)
    got = np.asarray(candidate)
    dtype = str(ref.dtype) if ref.dtype != np.dtype("V2") else "bfloat16"
    d_atol, d_rtol = DEFAULT_TOLERANCES.get(dtype, (0.0, 0.0))
    if ref.dtype.kind == "f" and ref.size:
        finite = np.abs(ref[np.isfinite(ref)])
        d_atol *= max(1.0, float(finite.max()) if finite.size else 1.0)
    a, r = tolerance_for(atol, name, d_atol), tolerance_for(rtol, name, d_rtol)
    given = tolerance_given(atol, name) or tolerance_given(rtol, name)
    res = OutputComparison(name=name, passed=False, shape=list(ref.shape), dtype=dtype, atol=a, rtol=r, tolerance_given=given)
    if ref.shape != got.shape:
        res.problem = f"shape {list(got.shape)} != reference {list(ref.shape)}"
        return res
    if ref.dtype != got.dtype:
        res.problem = f"dtype {got.dtype} != reference {ref.dtype}"
        return res
    if ref.size == 0:  # nothing to compare here; a run must compare something elsewhere (compare_outputs)
        res.passed, res.verdict = True, "empty"
        return res
    r64, g64 = ref.astype(np.float64), got.astype(np.float64)
    fin_r, fin_g = np.isfinite(r64), np.isfinite(g64)
    res.nonfinite_reference = int((~fin_r).sum())
    res.nonfinite_candidate = int((~fin_g).sum())
    both = fin_r & fin_g
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

    if res.nonfinite_reference:
        res.problem = (f"the reference itself is non-finite: {res.nonfinite_reference} of {ref.size} values are NaN/Inf, "
                       "so nothing can be verified")
        return res
    if res.nonfinite_candidate:
        res.problem = f"the candidate has {res.nonfinite_candidate} NaN/Inf values where the reference is finite"
        return res

    within_noise = False
    if reference64 is not None and ref.dtype.kind == "f":
        t64 = np.asarray(reference64, dtype=np.float64)
        if t64.shape == ref.shape and np.isfinite(t64).all():
            floor = float(np.abs(r64 - t64).max())
            err64 = np.abs(g64 - t64)
            res.noise_floor, res.noise_k = floor, k
            res.max_abs_error_float64 = float(err64.max())
            res.ill_conditioned = not bool((np.abs(r64 - t64) <= a + r * np.abs(t64)).all())
            within_noise = bool((err64 <= a + r * np.abs(t64) + k * floor).all())

    if within:
        res.passed, res.verdict = True, "tolerance"
    elif within_noise and not given:
        res.passed, res.verdict = True, "noise-floor"
    elif res.ill_conditioned and given and a < FLOAT32_EPS:  # the tolerance, not the model, is the problem
        res.problem = (f"the given atol {a:.3g} is below float32 resolution ({FLOAT32_EPS:.2g} near 1.0): no float32 run can meet it, "
                       f"not even the model's own, {res.noise_floor:.3g} away from its float64 run; this artifact is "
                       f"{res.max_abs_error_float64:.3g} away. Give an atol above that, or none (the default scales with the outputs)")
    elif res.ill_conditioned:
        res.problem = (f"the model is ill-conditioned in float32: its own float32 run is {res.noise_floor:.3g} away from its "
                       f"float64 run (beyond {'the given' if given else 'the'} atol {a:.3g} + rtol {r:.3g}·|ref|), and this artifact is "
                       f"{res.max_abs_error_float64:.3g} away, {'within' if within_noise else 'more than'} {k:g}× that")
        if given and within_noise:
            res.problem += "; a given tolerance is used as it is: without --atol/--rtol it would be judged against the float64 run"
    else:
        res.problem = f"max abs error {res.max_abs_error:.3g} exceeds atol {a:.3g} + rtol {r:.3g}·|ref|"
        if res.noise_floor is not None:
            res.problem += f" (and {res.max_abs_error_float64:.3g} vs the float64 run exceeds {k:g}× the float32 model's own {res.noise_floor:.3g})"
    return res


def compare_outputs(reference: list, candidate: list, atol=None, rtol=None, *, reference64: list | None = None,
                    k: float = NOISE_K, min_top1=None) -> list[OutputComparison]:
    """Pairwise by position; names come from the reference. ``reference64`` pairs with ``reference``."""
    if len(reference) != len(candidate):
        return [OutputComparison(name="outputs", passed=False, shape=None, dtype=None, atol=0, rtol=0,
                                 problem=f"candidate has {len(candidate)} outputs, reference {len(reference)}")]
    r64 = [o for _, o in reference64] if reference64 is not None and len(reference64) == len(reference) else [None] * len(reference)
    out = [compare(n, r, g, atol, rtol, reference64=t, k=k, min_top1=min_top1) for (n, r), (_, g), t in zip(reference, candidate, r64)]
    return nothing_compared(out)


def nothing_compared(outs: list[OutputComparison]) -> list[OutputComparison]:
    """A run that compared zero values is not a pass (trust rule "PASSED means compared"): no outputs at
    all, or every output empty, fails with that reason. An empty output beside compared ones passes
    ("empty"): the run compared the others."""
    if not outs:
        return [OutputComparison(name="outputs", passed=False, shape=None, dtype=None, atol=0, rtol=0,
                                 problem="the model has no outputs: nothing was compared, so nothing is verified")]
    if all(o.verdict == "empty" for o in outs):
        for o in outs:
            o.passed, o.verdict = False, None
            o.problem = (f"output '{o.name}' is empty (shape {o.shape}) like every output: zero values were compared, "
                         "so nothing is verified")
    return outs


# ------------------------------------------------------------------------ one intermediate value
def divergence(reference, candidate, reference64=None, k: float = NOISE_K) -> dict[str, Any]:
    """How far ``candidate`` is from ``reference`` at one intermediate value (``explain``'s test).

    With ``reference64`` (the same value from a float64 run): the place's own noise floor is
    max |reference − reference64|, and the candidate is beyond it when
    max |candidate − reference64| > K·floor + K·eps32·max|reference64| (the last term: float32's
    resolution at this magnitude, so that a value the float32 run gets exactly still has room for
    one rounding). Without it: the comparator's default tolerance for the dtype (``compare``).
    Returns {max_abs_error, max_abs_error_float64, noise_floor, limit, beyond}."""
    ref, got = np.asarray(reference, dtype=np.float64), np.asarray(candidate, dtype=np.float64)
    out: dict[str, Any] = {"max_abs_error": None, "max_abs_error_float64": None, "noise_floor": None, "limit": None, "beyond": True}
    if ref.shape != got.shape:
        return out
    if not np.isfinite(got).all():
        out["max_abs_error"] = float("inf")
        return out
    out["max_abs_error"] = float(np.abs(got - ref).max()) if ref.size else 0.0
    if reference64 is not None:
        t64 = np.asarray(reference64, dtype=np.float64)
        floor = float(np.abs(ref - t64).max()) if t64.size else 0.0
        err = float(np.abs(got - t64).max()) if t64.size else 0.0
        limit = k * floor + k * FLOAT32_EPS * (float(np.abs(t64).max()) if t64.size else 0.0)
        out.update(max_abs_error_float64=err, noise_floor=floor, limit=limit, beyond=err > limit)
        return out
    res = _compare_values("value", np.asarray(reference), np.asarray(candidate))
    out.update(limit=res.atol, beyond=not res.passed)
    return out
