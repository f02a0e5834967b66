"""Report stage: tables for people (rich), Markdown for CI summaries. JSON comes from ``to_dict``.

Works on the plain dicts of ``ConvertReport.to_dict()`` so that reports read back from JSON (batch
conversions run in worker processes) render the same way.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

from bnfold.edges.files import atomic_path
from bnfold.errors import EXIT_OK, EXIT_VERIFY_FAILED, BadInputError

SCHEMA_VERSION = 1


@dataclass
class ConvertReport:
    """What ``convert`` did. One schema: ``to_dict`` writes it, ``from_dict`` reads it back.

    ``verification`` is ``VerifyReport.to_dict()`` (the same schema ``bnfold verify --report``
    writes), or None when verification was skipped. Three states: verified and passed (``passed``
    True), verified and failed (False), written, not verified (``verify=False``: ``passed`` None,
    ``verified`` False, exit 0). Truthy unless verification failed.
    """

    model: str
    output: str | None
    passed: bool | None = False  # None: not verified (never PASSED, never FAILED)
    verified: bool = True
    exit_code: int = EXIT_OK
    folded: list = field(default_factory=list)
    unfolded: list = field(default_factory=list)
    fold: dict = field(default_factory=dict)
    calibration: dict | None = None
    export: dict = field(default_factory=dict)
    verification: dict | None = None
    providers_unavailable: list = field(default_factory=list)
    options: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    # per stage: seconds, RSS at its end and peak RSS (MiB, with how the peak was read); the process peak
    resources: dict = field(default_factory=lambda: {"stages": {}, "peak_rss_mb": None})
    versions: dict = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.passed is not False

    def mark_unverified(self) -> None:
        """Written, not verified: its own state, neither PASSED nor FAILED."""
        self.passed, self.verified = None, False
        self.notes.append("written, not verified (verification was switched off)")

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, **{f.name: getattr(self, f.name) for f in fields(self)}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ConvertReport":
        if d.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise ValueError(f"report schema_version {d.get('schema_version')} is not {SCHEMA_VERSION}")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def __repr__(self) -> str:
        out = relative(self.export.get("path") or self.output)
        worst = _worst_error(self.to_dict())
        return (f"<ConvertReport {plain_status(self.passed)} {relative(self.model)} → {out}: "
                f"{bn_folded(self.to_dict())} BatchNorm folded{f', max abs {_fmt(worst)}' if worst is not None else ''}>")

    def print(self, *, verbose: bool = False, file=None, width: int | None = None) -> None:
        """Print what ``bnfold convert`` prints (``verbose``: as with -v) on ``file`` (default stdout), ``width``
        columns (default: the terminal's, or 100)."""
        show(render_convert, self.to_dict(), verbose=verbose, file=file, width=width)

    def _repr_html_(self) -> str:  # notebooks
        return html(render_convert, self.to_dict())

    def explain(self) -> dict | None:
        """Where the ONNX file first leaves the reference (``verification["explanation"]``, see
        bnfold/verification/explain.py); computed now when the run did not (it passed without
        ``explain``). None when verification was skipped."""
        if not self.verification:
            return None
        if self.verification.get("explanation") is None and getattr(self, "_explain_later", None) is not None:
            self._explain_later()
        return self.verification.get("explanation")


@dataclass
class CheckReport:
    """What ``check_artifact`` (``bnfold verify``) found: the verification and the artifact's provenance."""

    model: str
    onnx: str
    verification: Any  # bnfold.verification.VerifyReport
    provenance: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    differences: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    versions: dict = field(default_factory=dict)
    from_file: dict = field(default_factory=dict)  # settings taken from the file's provenance (how to rebuild inputs)

    @property
    def passed(self) -> bool:
        return bool(self.verification)

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.passed else EXIT_VERIFY_FAILED

    def __bool__(self) -> bool:
        return self.passed

    def failures(self):
        return self.verification.failures()

    def explain(self) -> dict | None:
        """Where the ONNX file first leaves the reference (``verification.explanation``); computed now
        when the check did not (it passed without ``explain``)."""
        if self.verification.explanation is None and getattr(self, "_explain_later", None) is not None:
            self._explain_later()
        return self.verification.explanation

    def __repr__(self) -> str:
        return f"<CheckReport {plain_status(self.passed)} {relative(self.onnx)} against {relative(self.model)}>"

    def print(self, *, verbose: bool = False, file=None, width: int | None = None) -> None:
        """Print what ``bnfold verify`` prints (``verbose``: as with -v) on ``file`` (default stdout)."""
        show(render_verify, self.to_dict(), verbose=verbose, file=file, width=width)

    def _repr_html_(self) -> str:  # notebooks
        return html(render_verify, self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "model": self.model, "onnx": self.onnx, "passed": self.passed,
                "verification": self.verification.to_dict(), "provenance": self.provenance, "options": self.options,
                "differences": self.differences, "notes": self.notes, "versions": self.versions, "from_file": self.from_file}


# the tables' style: no frame (narrow, and copies cleanly into docs and logs)
LIGHT = {"box": None, "show_edge": False, "pad_edge": False}
LEVEL_NAMES = {"disable_all": "ORT_DISABLE_ALL", "default": "ORT_ENABLE_ALL", None: "-"}


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"{x:.2e}"


UNVERIFIED = "written, not verified"


def _status(ok: bool | None) -> str:
    """``plain_status`` in colour (rich markup)."""
    colour = "yellow" if ok is None else "green" if ok else "bold red"
    return f"[{colour}]{plain_status(ok)}[/]"


def plain_status(ok: bool | None) -> str:
    """The verdict word of every report (PASSED, FAILED, UNVERIFIED), in one place."""
    return UNVERIFIED.upper() if ok is None else "PASSED" if ok else "FAILED"


def bn_folded(rep: dict[str, Any]) -> str:
    """'folded/total' BatchNorm layers of a report (or a plan's dict)."""
    folded = len(rep.get("folded", []))
    return f"{folded}/{folded + len(rep.get('unfolded', []))}"


def plan_table(folded: list[dict], unfolded: list[dict], title: str = "BatchNorm layers"):
    from rich.table import Table

    t = Table(title=title, title_justify="left", **LIGHT)
    t.add_column("BatchNorm")
    t.add_column("fate")
    t.add_column("into / reason", overflow="fold")
    for f in folded:
        fold_pass = " (onnx pass)" if f.get("pass") == "onnx" else ""
        into = ", ".join(f"{i} ({ty})" for i, ty in zip(f["into"], f["into_type"]))
        t.add_row(f["bn"], f"folded {f['rule']}{fold_pass}", into)
    for u in unfolded:
        t.add_row(u["bn"], "[yellow]left[/]", u["reason"])
    return t


def verification_table(verification: dict[str, Any]):
    from rich.table import Table

    t = Table(title="Verification", title_justify="left", **LIGHT)
    # top-1/top-5 agreement beside max abs, when an output is shaped like logits (batch × classes)
    agree = any(o.get("top1") is not None for run in verification.get("runs", []) for o in run["outputs"])
    for col in ("target", "provider", "graph opt.", "inputs", "output", "max abs", *(("top-1/5",) if agree else ()),
                "max rel", "cosine", "needs atol", "fp32 noise", "result"):
        t.add_column(col, overflow="fold")
    for run in verification.get("runs", []):
        for o in run["outputs"]:
            cos = "-" if o.get("cosine_similarity") is None else f"{o['cosine_similarity']:.9f}"
            result = _status(o["passed"])
            if o.get("problem") and not o["passed"]:
                result += f"\n{o['problem']}"
            top = (_agreement(o),) if agree else ()
            t.add_row(run["target"], run["provider"], LEVEL_NAMES.get(run["graph_optimization"], run["graph_optimization"]),
                      run["inputs"], o["name"], _fmt(o.get("max_abs_error")), *top, _fmt(o.get("max_rel_error")), cos,
                      _fmt(o.get("required_atol")), _fmt(o.get("noise_floor")), result)
    return t


def _agreement(o: dict[str, Any]) -> str:
    if o.get("top1") is None:
        return "-"
    return f"{o['top1']:.3f}/" + ("-" if o.get("top5") is None else f"{o['top5']:.3f}")


def _print_explanation(verification: dict[str, Any] | None, console) -> None:
    exp = (verification or {}).get("explanation")
    if exp:
        console.print(f"explanation: {exp['message']}", markup=False)


def relative(path: Any) -> str:
    """``path`` relative to the current folder when it lies under it (as the user would type it), else as it is.
    A model spec keeps its ``:factory``."""
    import os

    if path is None:
        return "-"
    text = str(path)
    file, colon, rest = text.rpartition(":") if ":" in text and not text.lower().endswith(".onnx") else (text, "", "")
    if not os.path.isabs(file):
        return text
    try:
        rel = os.path.relpath(file)
    except ValueError:  # another drive
        return text
    return (file if rel.startswith("..") else rel) + colon + rest


def _checked(run: dict[str, Any]) -> str:
    """What a run checked, in a few words: 'folded module', 'onnx cpu opt=off'."""
    if run["target"] == "folded-module":
        return "folded module"
    level = {"disable_all": "off", "default": "all"}.get(run.get("graph_optimization"), run.get("graph_optimization") or "-")
    return f"{run['target']} {run['provider']} opt={level}"


def _against(o: dict[str, Any]) -> tuple[str, bool]:
    """(what was needed / what was allowed, judged against the float64 run). The atol needed under the rtol
    (``required_atol``) passes when it is at most atol; the float64 judgement and top-1 agreement say their own."""
    if o.get("min_top1") is not None and o.get("top1") is not None:
        return f"top-1 {o['top1']:.4g} / {o['min_top1']:g}", False
    if o.get("verdict") == "noise-floor" and o.get("noise_floor") is not None:
        k = o.get("noise_k") or 0
        return f"{_fmt(o.get('max_abs_error_float64'))} / {_fmt(o['atol'] + k * o['noise_floor'])} *", True
    if o.get("required_atol") is None:
        return "-", False
    return f"{_fmt(o.get('required_atol'))} / {_fmt(o.get('atol'))}", False


def compact_verification_table(verification: dict[str, Any]):
    """The default view (fits 80 columns): per run and output what was checked, on what inputs, the worst
    error, the atol it needed (under the rtol) against the atol given, and the result. Failure reasons go
    below it (``failure_lines``)."""
    from rich.table import Table

    runs = verification.get("runs", [])
    names = {o["name"] for run in runs for o in run["outputs"]}
    agree = any(o.get("top1") is not None for run in runs for o in run["outputs"])  # logits-shaped outputs
    t = Table(title="Verification", title_justify="left", **LIGHT)
    for col in ("checked", "on", *(("output",) if len(names) > 1 else ()), "max abs", *(("top-1",) if agree else ()), "needs / atol", "result"):
        t.add_column(col, overflow="fold")
    float64 = False
    for run in runs:
        for o in run["outputs"]:
            against, vs64 = _against(o)
            float64 |= vs64
            top1 = ("-" if o.get("top1") is None else f"{o['top1']:.3f}",) if agree else ()
            t.add_row(_checked(run), run["inputs"], *((o["name"],) if len(names) > 1 else ()), _fmt(o.get("max_abs_error")),
                      *top1, against, _status(o["passed"]))
    if float64:
        k = next((f"{o['noise_k']:g}" for run in runs for o in run["outputs"] if o.get("noise_k")), "K")
        t.caption = f"* against the float64 run: atol + {k} x the model's own float32 error"
        t.caption_justify = "left"
    return t


def failure_lines(verification: dict[str, Any]) -> list[str]:
    """One line per distinct failure reason: which runs, on what, which output, and why (below the compact table)."""
    where: dict[tuple, list[str]] = {}
    for run in verification.get("runs", []):
        for o in run["outputs"]:
            if not o["passed"]:
                where.setdefault((run["inputs"], o["name"], o.get("problem") or "beyond tolerance"), []).append(_checked(run))
    return [f"FAILED {', '.join(dict.fromkeys(runs))} on {inputs}, output '{name}': {problem}"
            for (inputs, name, problem), runs in where.items()]


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def before_after(rep: dict[str, Any]) -> str | None:
    """The onnxslim-style line: BatchNorm nodes, nodes, bytes and opset before → after (None without an export).
    'Before' is the input .onnx file, or for a PyTorch model its BatchNorm layers and weight bytes."""
    exp = rep.get("export") or {}
    if exp.get("nodes") is None:
        return None
    before = exp.get("before") or {}

    def arrow(a, b, f=str) -> str:
        return f(b) if a is None else f"{f(a)} → {f(b)}"

    bn_before = before.get("batchnorm_nodes", (rep.get("fold") or {}).get("batchnorm_layers"))
    return " · ".join((f"before → after: BatchNorm {arrow(bn_before, exp.get('batchnorm_nodes', 0))}",
                       f"nodes {arrow(before.get('nodes'), exp['nodes'])}",
                       f"{arrow(before.get('bytes'), exp.get('bytes'), _human_bytes)}", f"opset {arrow(before.get('opset'), exp.get('opset'))}"))


def batch_warning(cal: dict[str, Any] | None, options: dict[str, Any] | None) -> str | None:
    """A warning when calibration arrays became one batch because no batch size was given."""
    if not cal or (options or {}).get("batch_size") is not None or cal.get("batches") != 1 or (cal.get("samples") or 0) < 2:
        return None
    return (f"warning: without --batch-size the whole calibration array is one batch ({cal['samples']} samples); "
            "pass --batch-size N for the paper's estimator over batches of N")


def not_run_lines(unavailable: list[dict[str, Any]], options: dict[str, Any] | None) -> list[str]:
    """The warning for each provider the user asked for (providers, require_providers) that did not run;
    a default one that did not (onnxruntime lists CUDA where its libraries are missing) is in the report only."""
    options = options or {}
    asked = set(options.get("providers") or ()) | set(options.get("require_providers") or ())
    return [f"[yellow]provider {u['provider']} not run[/]: {u['reason']}" for u in unavailable if u["provider"] in asked]


def render_convert(rep: dict[str, Any], console, *, verbose: bool = False, quiet: bool = False) -> None:
    if quiet:
        console.print(f"{plain_status(rep['passed'])} {relative(rep.get('model'))}: {bn_folded(rep)} BatchNorm folded")
        return
    folded, unfolded = rep.get("folded", []), rep.get("unfolded", [])
    if folded or unfolded:
        if verbose or len(folded) + len(unfolded) <= 40:
            console.print(plan_table(folded, unfolded))
        else:
            console.print(plan_table([], unfolded, title=f"BatchNorm layers left ({len(folded)} folded, not listed; --verbose lists them)"))
    cal = rep.get("calibration")
    if cal:
        if verbose:
            console.print(calibration_table(cal))
        console.print(f"calibration: {cal['estimator']} estimator, {cal['batches']} batches, {cal['samples']} samples"
                      + (f", {cal['world_size']} processes" if cal.get("world_size", 1) > 1 else ""))
        if not verbose and (effect := _effect_line(cal)):
            console.print(effect, markup=False)
    if warning := batch_warning(cal, rep.get("options")):
        console.print(f"[yellow]{warning}[/]")
    if rep.get("verification"):
        _print_verification(rep["verification"], console, verbose)
    for line in not_run_lines(rep.get("providers_unavailable", []), rep.get("options")):
        console.print(line)
    for note in rep.get("notes", []):
        console.print(f"note: {note}", markup=False)
    _print_explanation(rep.get("verification"), console)
    if line := before_after(rep):
        console.print(line)
    exp = rep.get("export") or {}
    summary = f"{bn_folded(rep)} BatchNorm folded"
    if exp.get("path"):
        summary += f" · wrote {relative(exp['path'])} (sha256 {str(exp.get('sha256'))[:12]}…)"
    console.print(f"{_status(rep['passed'])} {relative(rep.get('model', ''))}: {summary}")


def _print_verification(vr: dict[str, Any], console, verbose: bool) -> None:
    """The compact table and its failure reasons, or the full table with ``verbose``."""
    if verbose:
        console.print(verification_table(vr))
        return
    console.print(compact_verification_table(vr))
    for line in failure_lines(vr):
        from rich.text import Text

        console.print(Text.assemble(("FAILED", "bold red"), line[len("FAILED"):]))


def render_verify(check: dict[str, Any], console, *, verbose: bool = False, quiet: bool = False) -> None:
    if quiet:
        console.print(f"{plain_status(check['passed'])} {relative(check.get('onnx', ''))}")
        return
    vr = check["verification"]
    _print_verification(vr, console, verbose)
    for line in not_run_lines(vr.get("providers_unavailable", []), check.get("options")):
        console.print(line)
    notes = list(vr.get("notes", []))
    notes += [n for n in check.get("notes", []) if n not in notes]
    for note in notes:
        console.print(f"note: {note}", markup=False)
    if check.get("from_file"):
        taken = ", ".join(f"{k} {v}" for k, v in check["from_file"].items())
        console.print(f"from the file's provenance: {taken} (how the inputs are rebuilt; never the tolerance)", markup=False)
    for diff in check.get("differences", []):
        console.print(f"[yellow]differs from how the artifact was made[/]: {diff}")
    _print_explanation(vr, console)
    console.print(f"{_status(check['passed'])} {relative(check.get('onnx', ''))}")


def render_verification(vr: dict[str, Any], console, *, verbose: bool = False) -> None:
    """A ``VerifyReport.to_dict()`` on its own (``bnfold.verify``'s result): table, notes, result line."""
    _print_verification(vr, console, verbose)
    for u in vr.get("providers_unavailable", []):
        console.print(f"[yellow]provider {u['provider']} not run[/]: {u['reason']}")
    for note in vr.get("notes", []):
        console.print(f"note: {note}", markup=False)
    _print_explanation(vr, console)
    console.print(_status(vr["passed"]))


def show(render, data: dict[str, Any], *, verbose: bool = False, file=None, width: int | None = None) -> None:
    """``render(data, console)`` on ``file`` (default stdout), coloured on a terminal: a report's ``print()``."""
    import sys

    from rich.console import Console

    out = file or sys.stdout
    tty = hasattr(out, "isatty") and out.isatty()
    width = width or (None if tty else 160 if verbose else 100)  # the full table needs about 150 columns
    render(data, Console(file=out, no_color=not tty, highlight=False, width=width), verbose=verbose)


def html(render, data: dict[str, Any]) -> str:
    """``render(data, console)`` as HTML (a report's ``_repr_html_`` in notebooks)."""
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), record=True, highlight=False, width=100)
    render(data, console)
    return console.export_html(inline_styles=True, code_format="<pre style=\"font-family:monospace\">{code}</pre>")


def render_inspect(plan: dict[str, Any], console, *, quiet: bool = False) -> None:
    """``FoldPlan.to_dict()`` as ``bnfold inspect`` shows it (``quiet``: the last line only)."""
    if not quiet:
        console.print(plan_table(plan["folded"], plan["unfolded"]))
    if plan.get("trace_error") and not quiet:
        console.print(f"trace: {plan['trace_error']}")
    console.print(f"{bn_folded(plan)} BatchNorm layers foldable (tracer: {plan['tracer']})")


def _effect_line(cal: dict[str, Any]) -> str | None:
    """How far the outputs moved between the running and the population statistics (``output_effect``)."""
    eff = cal.get("output_effect")
    if not eff:
        return None
    if eff.get("problem"):
        return f"output effect: {eff['problem']}"
    line = f"outputs on {eff['samples']} calibration samples, running → population statistics:\n  max abs change {_fmt(eff['max_abs'])}"
    line += f" (largest |output| {_fmt(eff['scale'])})" if eff.get("scale") is not None else ""
    return line + (f", top-1 agreement {eff['top1_agreement']:.3f}" if eff.get("top1_agreement") is not None else "")


def by_drift(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Layers sorted by ``drift``, largest first: those whose stored statistics were unusable (``stored_problem``:
    NaN, a negative variance) before all, those without a drift (not reached, no running statistics) last."""
    def key(layer):
        if layer.get("stored_problem"):
            return (0, 0.0)
        return (1, -layer["drift"]) if layer.get("drift") is not None else (2, 0.0)
    return sorted(layers, key=key)


def calibration_table(cal: dict[str, Any]):
    """``CalibrationSummary.to_dict()``: one row per BatchNorm layer, the most drifted first (fits 80 columns);
    layers whose stored statistics were unusable and the outputs' move are lines below the table."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    t = Table(title=f"Calibration: {cal['estimator']}, {cal['batches']} batches, {cal['samples']} samples", title_justify="left", **LIGHT)
    t.add_column("BatchNorm")
    for col in ("values/ch", "Δmean", "Δvar", "shift/σ", "var ratio", "drift"):
        t.add_column(col, justify="right")
    fmt = lambda x: "-" if x is None else f"{x:.3g}"  # noqa: E731
    below = []
    for layer in by_drift(cal["layers"]):
        vpc = layer.get("values_per_channel") or ["-"]
        problem = layer.get("stored_problem")
        if problem:
            below.append(f"{layer['name']}: drift ∞ (stored: {problem})")
        t.add_row(layer["name"], "not reached" if not layer["reached"] else f"{vpc[0]}–{vpc[1]}",
                  fmt(layer.get("mean_change")), fmt(layer.get("var_change")), fmt(layer.get("mean_shift_std")),
                  fmt(layer.get("var_ratio")), "∞" if problem else fmt(layer.get("drift")))
    effect = _effect_line(cal)
    # plain text: an error message in it may hold [brackets]
    return Group(t, *(Text(line) for line in below + ([effect] if effect else [])))


def conversion_result(e: dict[str, Any]) -> str:
    """A ``run_config`` conversion's result word: PASSED, FAILED, ERROR <exit code>, skipped (unchanged), or
    UNVERIFIED ("written, not verified": verification was off)."""
    rep = e.get("report") or {}
    res = "skipped (unchanged)" if e.get("skipped") else {0: "PASSED", 1: "FAILED"}.get(e["exit_code"], f"ERROR {e['exit_code']}")
    if e["exit_code"] == 0 and not e.get("skipped") and rep and rep.get("passed", True) is None:
        res = UNVERIFIED
    return res


PLOT_FORMATS = (".png", ".svg")
PLOT_TOP = 20  # layers in the drift plot


def need_matplotlib() -> None:
    """The drift plot's one dependency, checked before any work (``--plot``)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BadInputError("the plot needs matplotlib: pip install 'bnfold[plot]'") from None


def write_drift_plot(cal: dict[str, Any], path: str | Path, top: int = PLOT_TOP) -> Path:
    """A horizontal bar chart of the ``top`` most drifted BatchNorm layers of ``CalibrationSummary.to_dict()``
    (drift, labelled with the mean shift and the variance ratio), written atomically to ``path`` (.png or .svg;
    inside an open OutputSet it commits with the run's other outputs)."""
    need_matplotlib()
    from matplotlib.figure import Figure

    layers = [layer for layer in by_drift(cal["layers"]) if layer.get("drift") is not None or layer.get("stored_problem")][:top][::-1]
    fig = Figure(figsize=(8, 1.2 + 0.32 * max(len(layers), 1)), layout="constrained")
    ax = fig.add_subplot()
    # the most drifted at the top; unusable stored statistics (infinitely stale) as a full-length hatched red bar
    longest = max((layer["drift"] for layer in layers if layer.get("drift") is not None), default=1.0) or 1.0
    bars = ax.barh([layer["name"] for layer in layers], [longest if layer.get("stored_problem") else layer["drift"] for layer in layers],
                   color=["tab:red" if layer.get("stored_problem") else "tab:orange" for layer in layers])
    for bar, layer in zip(bars, layers):
        bar.set_hatch("//" if layer.get("stored_problem") else None)
    g = lambda x, spec: "-" if x is None else format(x, spec)
    labels = [f" ∞: stored {layer['stored_problem']}" if layer.get("stored_problem")
              else f" shift {g(layer['mean_shift_std'], '.2g')}σ, var ×{g(layer['var_ratio'], '.3g')}" for layer in layers]
    ax.bar_label(bars, labels, fontsize=8)
    ax.margins(x=0.35)
    ax.set_xlabel("drift: RMS change of the normalised activation (max over channels)")
    title = f"BatchNorm drift, running vs population statistics ({cal['estimator']}, {cal['samples']} samples)"
    if not layers:
        ax.text(0.5, 0.5, "no layer had running statistics to compare", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(textwrap.fill(title + (f"; {_effect_line(cal)}" if _effect_line(cal) else ""), 110), fontsize=9, loc="left")
    fmt = Path(path).suffix.lower().lstrip(".")
    with atomic_path(path, suffix=f".{fmt}") as tmp:
        fig.savefig(tmp, format=fmt, dpi=120)
    return Path(path)


def _worst_error(rep: dict[str, Any]) -> float | None:
    errs = [r.get("max_abs_error") for r in (rep.get("verification") or {}).get("runs", []) if r.get("max_abs_error") is not None]
    return max(errs) if errs else None


def config_table(summary: dict[str, Any], config: Any, *, verbose: bool = False):
    """A ``run_config`` summary: one row per conversion, paths relative to the current folder. The default
    fits 80 columns (errors and details go below it: ``config_lines``); ``verbose`` adds the model and the detail."""
    from rich.table import Table

    t = Table(title=f"bnfold conversions ({relative(config)})", title_justify="left", **LIGHT)
    cols = ("name", *(("model",) if verbose else ()), "output", "result", "BN folded", "max abs", *(("detail",) if verbose else ()))
    for col in cols:
        t.add_column(col, overflow="fold")
    for e in summary["conversions"]:
        rep = e.get("report") or {}
        t.add_row(e["name"], *((relative(e["model"]),) if verbose else ()), relative(e["output"]), conversion_result(e),
                  bn_folded(rep) if rep else "-", _fmt(_worst_error(rep)), *((e.get("error") or e.get("detail") or "",) if verbose else ()))
    return t


def config_lines(summary: dict[str, Any]) -> list[str]:
    """Below the compact config table: each conversion's error or detail, then the totals."""
    out = [f"{e['name']}: {e.get('error') or e.get('detail')}" for e in summary["conversions"] if e.get("error") or e.get("detail")]
    return out + [config_result_line(summary)]


def config_result_line(summary: dict[str, Any]) -> str:
    """'PASSED 3 conversions' or 'FAILED 1 of 3 conversions (digits-strict)': what ``-q`` prints."""
    entries = summary["conversions"]
    bad = [e["name"] for e in entries if e["exit_code"] != 0 and not e.get("skipped")]
    unverified = [e["name"] for e in entries if conversion_result(e) == UNVERIFIED]
    if not bad:
        return f"PASSED {len(entries)} conversion{'s' * (len(entries) != 1)}" + (
            f" ({len(unverified)} {UNVERIFIED}: {', '.join(unverified)})" if unverified else "")
    return f"FAILED {len(bad)} of {len(entries)} conversions ({', '.join(bad)})"


def markdown_summary(entries: Iterable[dict[str, Any]]) -> str:
    """A Markdown table of conversions (for $GITHUB_STEP_SUMMARY)."""
    lines = ["## bnfold conversions", "", "| model | output | result | BN folded | max abs error | providers | note |",
             "|---|---|---|---|---|---|---|"]
    for e in entries:
        rep = e.get("report") or {}
        bn = bn_folded(rep) if rep else "-"
        provs = ", ".join((rep.get("verification") or {}).get("providers_run", [])) or "-"
        result = {"PASSED": "passed", "FAILED": "**FAILED**", "skipped (unchanged)": "unchanged (skipped)",
                  UNVERIFIED: UNVERIFIED}.get(conversion_result(e), f"**error {e['exit_code']}**")
        note = (e.get("error") or e.get("detail") or "").replace("|", "\\|")
        lines.append(f"| {e.get('model', '')} | {e.get('output', '')} | {result} | {bn} | "
                     f"{_fmt(_worst_error(rep))} | {provs} | {note} |")
    return "\n".join(lines) + "\n"
