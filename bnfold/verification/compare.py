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

# dtype → (atol, rtol). Folding changes rounding, never more: these bound it with margin.
DEFAULT_TOLERANCES = {
    "float64": (1e-9, 1e-7),
    "float32": (1e-4, 1e-4),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}


def default_tolerance(dtype_name: str) -> tuple[float, float]:
    return DEFAULT_TOLERANCES.get(dtype_name, (0.0, 0.0))


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
    # against the float64 run of the reference (None when there was none)
    noise_floor: float | None = None  # max |reference − reference64|: the float32 model's own error
    max_abs_error_float64: float | None = None  # max |candidate − reference64|
    noise_k: float | None = None
    ill_conditioned: bool = False  # the noise floor alone exceeds the tolerance
    tolerance_given: bool = False  # atol/rtol set by the user for this output: used as given
    verdict: str | None = None  # "tolerance" | "noise-floor" (passed by which rule) | None (failed)
    problem: str | None = None

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "OutputComparison":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


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

    def __post_init__(self) -> None:
        check_tolerance(self.atol, "atol")
        check_tolerance(self.rtol, "rtol")

    def check_names(self, output_names: Iterable[str]) -> None:
        """Per-output keys must name one of ``output_names`` (or be "*")."""
        names = list(output_names)
        check_tolerance_keys(self.atol, "atol", names)
        check_tolerance_keys(self.rtol, "rtol", names)

    def compare(self, reference: list, candidate: list, reference64: list | None = None) -> list[OutputComparison]:
        """``compare_outputs`` with this tolerance."""
        return compare_outputs(reference, candidate, self.atol, self.rtol, reference64=reference64, k=self.noise_k)


# ---------------------------------------------------------------------------------- comparator
def _dtype_name(a: np.ndarray) -> str:
    return str(a.dtype) if a.dtype != np.dtype("V2") else "bfloat16"


def compare(name: str, reference, candidate, atol=None, rtol=None, *, reference64=None, k: float = NOISE_K) -> OutputComparison:
    """Compare one output. ``reference64``: the same output from a float64 run of the reference."""
    ref = np.asarray(reference)
    got = np.asarray(candidate)
    dtype = _dtype_name(ref)
    d_atol, d_rtol = default_tolerance(dtype)
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
    if ref.size == 0:
        res.passed, res.verdict = True, "tolerance"
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
                    k: float = NOISE_K) -> list[OutputComparison]:
    """Pairwise by position; names come from the reference. ``reference64`` pairs with ``reference``."""
    if len(reference) != len(candidate):
        return [OutputComparison(name="outputs", passed=False, shape=None, dtype=None, atol=0, rtol=0,
                                 problem=f"candidate has {len(candidate)} outputs, reference {len(reference)}")]
    r64 = [o for _, o in reference64] if reference64 is not None and len(reference64) == len(reference) else [None] * len(reference)
    return [compare(n, r, g, atol, rtol, reference64=t, k=k) for (n, r), (_, g), t in zip(reference, candidate, r64)]
