"""The `bnfold` command line: parses options, calls bnfold's public API, renders the result.

User errors (bnfold.BnfoldError) are rendered here, once, as one line on stderr with their exit code;
`--debug` shows the traceback instead. Heavy libraries are imported inside the commands so that
`bnfold --help` is instant.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from bnfold._version import __version__
from bnfold.errors import BadInputError, BnfoldError, EXIT_MODEL, first_line
from bnfold.options import OPTIONS

app = typer.Typer(
    name="bnfold",
    help="Recompute BatchNorm statistics, fold BatchNorm into conv/linear weights, export to ONNX and "
    "prove with onnxruntime that the outputs still match.\n\n"
    "Exit codes: 0 ok · 1 verification failed · 2 bad input · 3 model cannot be traced/folded/exported.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: no markup eats "[[conversion]]", flags show no "<bool>"
)

STATE = {"quiet": False, "verbose": False, "debug": False, "json": False}


def _console(stderr: bool = False):
    from rich.console import Console

    from bnfold.edges.usercode import stdout

    out = sys.stderr if stderr else stdout()
    no_color = bool(os.environ.get("NO_COLOR")) or not out.isatty()
    return Console(file=out, no_color=no_color, highlight=False, soft_wrap=False, width=None if not no_color else 160)


def _fail(err: BaseException, code: int) -> None:
    if STATE["debug"]:
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    text = " ".join(str(err).split())
    sys.stderr.write(f"bnfold: error: {text}\n")
    raise typer.Exit(code)


def _guard(fn):
    """Run ``fn``; render bnfold errors as one line with their exit code."""
    from bnfold.edges.paths import begin_run, written_message
    from bnfold.edges.usercode import as_error, stdout_to_stderr

    begin_run()
    try:
        with stdout_to_stderr():  # stdout carries only bnfold's result (usercode.stdout())
            return fn()
    except typer.Exit:
        raise
    except BnfoldError as err:
        _fail(err, err.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write(f"bnfold: interrupted; {written_message()}\n")
        raise typer.Exit(130)
    except (SystemExit, GeneratorExit) as err:  # user code (a model's forward) ending the process
        _fail(as_error(err, "the model's code"), EXIT_MODEL)
    except Exception as err:  # a bug in bnfold, or a model that breaks in an unforeseen way
        if STATE["debug"]:
            traceback.print_exc()
        first = first_line(err, empty="")
        sys.stderr.write(f"bnfold: error: unexpected {type(err).__name__} while processing the model: {first[:300]}. "
                         "Rerun with --debug for the traceback and report it if the model is valid\n")
        raise typer.Exit(EXIT_MODEL)


def _version(value: bool):
    if value:
        typer.echo(f"bnfold {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors (and the result line).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="List every BatchNorm layer, even in large models.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
):
    STATE.update(quiet=quiet, verbose=verbose, debug=debug)


# ------------------------------------------------------------------------- shared options
# Every conversion option is declared once, from bnfold.options.OPTIONS (flag, short name, help);
# the commands share these Annotated types. Values stay raw (None = not given) and are parsed and
# validated in one place: ConvertOptions.build.
def _opt(key: str, metavar: str | None = None):
    o = OPTIONS[key]
    decls = [o.flag] + ([o.short] if o.short else [])
    return typer.Option(*decls, help=o.help, metavar=metavar, show_default=False)


Weights = Annotated[Optional[str], _opt("weights", "FILE")]
TrustPickle = Annotated[Optional[bool], _opt("trust_pickle", "")]
InputShape = Annotated[Optional[List[str]], _opt("input_shape", "SHAPE")]
Calib = Annotated[Optional[str], _opt("calib", "DATA")]
BatchSize = Annotated[Optional[str], _opt("batch_size", "N")]
EstimatorOpt = Annotated[Optional[str], _opt("estimator", "paper|pooled")]
Opset = Annotated[Optional[str], _opt("opset", "N")]
DynamicBatch = Annotated[Optional[bool], _opt("dynamic_batch", "")]
Atol = Annotated[Optional[List[str]], _opt("atol", "[OUTPUT=]TOL")]
Rtol = Annotated[Optional[List[str]], _opt("rtol", "[OUTPUT=]TOL")]
MinTop1 = Annotated[Optional[List[str]], _opt("min_top1", "[OUTPUT=]SHARE")]
Explain = Annotated[Optional[bool], _opt("explain", "")]
Providers = Annotated[Optional[str], _opt("providers", "cpu,cuda")]
RequireProviders = Annotated[Optional[str], _opt("require_providers", "cpu,cuda")]
VerifyFlag = Annotated[Optional[bool], _opt("verify", "")]
Report = Annotated[Optional[str], _opt("report", "FILE")]
Overwrite = Annotated[Optional[bool], _opt("overwrite", "")]
KeepFailed = Annotated[Optional[bool], _opt("keep_failed", "")]
Seed = Annotated[Optional[str], _opt("seed", "N")]
AllowTf32 = Annotated[Optional[bool], _opt("allow_tf32", "")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the JSON report on stdout (and nothing else there).", show_default=False)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only the result line (same as bnfold --quiet).", show_default=False)]
ModelArg = Annotated[Optional[str], typer.Argument(metavar="MODEL", help="path/file.py:factory, package.module:factory, or a .onnx file.", show_default=False)]


def _build(command: str, values: dict):
    """The command's flags as one validated ConvertOptions (errors name the flags)."""
    from bnfold.options import CLI, ConvertOptions

    values = dict(values)
    if "progress" in OPTIONS and command in OPTIONS["progress"].commands:
        values["progress"] = (not STATE["quiet"] and sys.stderr.isatty()) or None
    return ConvertOptions.build(values, via=CLI, command=command)


def _note_weights(model: str, opts) -> None:
    if opts.weights is None and not model.lower().endswith(".onnx") and not STATE["quiet"] and not STATE["json"]:
        _console(stderr=True).print("note: no --weights given: using the weights the factory creates")


def _print_json(obj) -> None:
    from bnfold.edges import jsonio as json
    from bnfold.edges.usercode import stdout

    stdout().write(json.dumps(obj, indent=2, default=str) + "\n")


# ------------------------------------------------------------------------------------ convert
@app.command(epilog="Example: bnfold convert samples/digits/model.py:build --weights samples/digits/weights.pt "
                    "--input-shape 1,1,8,8 --calib samples/digits/calib.npz --batch-size 64 -o digits.onnx --report digits.report.json")
def convert(
    model: ModelArg = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", metavar="FILE", help="The .onnx file to write.", show_default=False)] = None,
    weights: Weights = None,
    input_shape: InputShape = None,
    calib: Calib = None,
    batch_size: BatchSize = None,
    estimator: EstimatorOpt = None,
    allow_tf32: AllowTf32 = None,
    opset: Opset = None,
    dynamic_batch: DynamicBatch = None,
    atol: Atol = None,
    rtol: Rtol = None,
    min_top1: MinTop1 = None,
    explain: Explain = None,
    providers: Providers = None,
    require_providers: RequireProviders = None,
    report: Report = None,
    trust_pickle: TrustPickle = None,
    verify: VerifyFlag = None,
    overwrite: Overwrite = None,
    keep_failed: KeepFailed = None,
    seed: Seed = None,
    json_out: JsonOut = False,
    config: Annotated[Optional[Path], typer.Option("--config", metavar="TOML", show_default=False,
                                                   help="Run every [[conversion]] table of a TOML file (keys mirror these flags; see the README).")] = None,
    jobs: Annotated[Optional[int], typer.Option("--jobs", "-j", metavar="N", show_default=False, help="With --config: run conversions in N processes.")] = None,
    skip_unchanged: Annotated[bool, typer.Option("--skip-unchanged", show_default=False, help="With --config: skip conversions whose manifest still matches.")] = False,
    quiet: Quiet = False,
):
    """Fold (and optionally calibrate), export to ONNX and verify the result."""
    STATE["quiet"] = STATE["quiet"] or quiet
    STATE["json"] = json_out
    values = dict(weights=weights, input_shape=input_shape, calib=calib, batch_size=batch_size, estimator=estimator,
                  opset=opset, dynamic_batch=dynamic_batch, atol=atol, rtol=rtol, min_top1=min_top1, explain=explain, providers=providers,
                  require_providers=require_providers, trust_pickle=trust_pickle, verify=verify,
                  overwrite=overwrite, keep_failed=keep_failed, seed=seed, allow_tf32=allow_tf32)

    def work():
        if config is not None:
            given = [OPTIONS[k].flag.split("/")[0] for k, v in values.items() if v is not None]
            if model:
                given.insert(0, "MODEL")
            if output is not None:
                given.insert(0, "-o")
            if given:
                raise BadInputError(f"--config runs the conversions its file describes; {', '.join(given)} would be ignored",
                                    "put them in the file's [[conversion]] or [defaults] tables")
            return _run_config(config, report, jobs, skip_unchanged, json_out)
        for flag, v in (("--jobs", jobs), ("--skip-unchanged", skip_unchanged or None)):
            if v is not None:
                raise BadInputError(f"{flag} applies to --config runs only", "drop it, or use --config")
        if not model:
            raise BadInputError("no MODEL given", "pass path/file.py:factory, module:factory or a .onnx file (or --config)")
        if output is None:
            raise BadInputError("no output path", "pass -o OUT.onnx")
        import bnfold

        opts = _build("convert", {**values, "report": report})
        _note_weights(model, opts)
        rep = bnfold.convert(model, None, output, options=opts)
        _show_convert(rep.to_dict(), json_out)
        raise typer.Exit(rep.exit_code)

    _guard(work)


def _show_convert(d: dict, json_out: bool) -> None:
    if json_out:
        _print_json(d)
        return
    from bnfold.report import render_convert

    console = _console()
    if STATE["quiet"]:
        ok = "PASSED" if d["passed"] else "FAILED"
        console.print(f"{ok} {d.get('model')}: {len(d['folded'])}/{len(d['folded']) + len(d['unfolded'])} BatchNorm folded")
    else:
        render_convert(d, console, verbose=STATE["verbose"])


def _run_config(config: Path, report: Optional[str], jobs: Optional[int], skip_unchanged: bool, json_out: bool):
    from bnfold.batch import run_config
    from bnfold.report import markdown_summary

    if jobs is not None and jobs < 1:
        raise BadInputError(f"--jobs {jobs} is not positive", "pass --jobs 1 or more")
    summary = run_config(config, jobs=1 if jobs is None else jobs, skip_unchanged=skip_unchanged, report=report,
                         debug=STATE["debug"], progress=not STATE["quiet"])
    if json_out:
        _print_json(summary)
    else:
        from rich.table import Table

        t = Table(title=f"bnfold conversions ({config})", title_justify="left")
        for col in ("name", "model", "output", "result", "BN folded", "detail"):
            t.add_column(col, overflow="fold")
        for e in summary["conversions"]:
            rep = e.get("report") or {}
            bn = f"{len(rep.get('folded', []))}/{len(rep.get('folded', [])) + len(rep.get('unfolded', []))}" if rep else "-"
            res = "skipped (unchanged)" if e.get("skipped") else {0: "PASSED", 1: "FAILED"}.get(e["exit_code"], f"ERROR {e['exit_code']}")
            t.add_row(e["name"], e["model"], e["output"], res, bn, e.get("error") or e.get("detail") or "")
        _console().print(t)
    step = os.environ.get("GITHUB_STEP_SUMMARY")
    if step:
        from bnfold.edges.files import append_text_or_warn

        append_text_or_warn(step, markdown_summary(summary["conversions"]), "GITHUB_STEP_SUMMARY")
    raise typer.Exit(summary["exit_code"])


# ---------------------------------------------------------------------------------- calibrate
@app.command(epilog="Example: bnfold calibrate samples/digits/model.py:build --weights samples/digits/weights.pt "
                    "--calib samples/digits/calib.npz --batch-size 64 -o calibrated.pt\n\n"
                    "Several processes: torchrun --nproc-per-node 2 -m bnfold calibrate ... (each rank takes every N-th batch).")
def calibrate(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="path/file.py:factory or package.module:factory.", show_default=False)],
    output: Annotated[str, typer.Option("--output", "-o", metavar="FILE", help="Write the calibrated state_dict (.pt) here.", show_default=False)],
    calib: Calib = None,
    weights: Weights = None,
    batch_size: BatchSize = None,
    estimator: EstimatorOpt = None,
    allow_tf32: AllowTf32 = None,
    report: Report = None,
    trust_pickle: TrustPickle = None,
    overwrite: Overwrite = None,
    json_out: JsonOut = False,
    quiet: Quiet = False,
):
    """Recompute BatchNorm population statistics (BN paper, §3.1) and save the state_dict."""
    STATE["quiet"] = STATE["quiet"] or quiet
    STATE["json"] = json_out

    def work():
        import io

        import torch

        from bnfold.edges import jsonio as json
        from bnfold.edges.files import OutputSet, write_bytes_atomic, write_text_atomic
        from bnfold.edges.paths import check_run_paths, spec_files
        from bnfold.calibration.population import run_calibration
        from bnfold.edges.data import load_batches
        from bnfold.edges.load import load_model, parse_model_spec

        opts = _build("calibrate", dict(calib=calib, weights=weights, batch_size=batch_size, estimator=estimator,
                                        report=report, trust_pickle=trust_pickle, overwrite=overwrite, allow_tf32=allow_tf32))
        if opts.calib is None:
            raise BadInputError("no calibration data", "pass --calib DATA (.npz/.npy/.pt or module:fn)")
        if parse_model_spec(model).kind == "onnx":
            raise BadInputError("calibration needs the PyTorch model", "pass path/file.py:factory, not a .onnx file")
        check_run_paths({"model": spec_files(model), "--weights": None if opts.weights is None else str(opts.weights),
                         "--calib": spec_files(opts.calib)},
                        {"-o": output, "--report": None if opts.report is None else str(opts.report)},
                        no_overwrite=[] if opts.overwrite else ["-o"])
        _note_weights(model, opts)
        m = load_model(model, opts.weights, trust_pickle=opts.trust_pickle)
        batches = load_batches(opts.calib, opts.batch_size)
        rank, world = _maybe_init_distributed()
        try:
            if world > 1:
                batches = batches[rank::world]
            calibrated, summary = run_calibration(m, batches, estimator=opts.estimator.value, inplace=True,
                                                  progress=opts.progress and rank == 0, allow_tf32=opts.allow_tf32)
        finally:
            if world > 1:
                import torch.distributed as dist

                dist.destroy_process_group()
        if rank != 0:
            return
        buf = io.BytesIO()
        torch.save(calibrated.state_dict(), buf)
        d = summary.to_dict()
        with OutputSet():  # the state_dict and the report land together or not at all
            write_bytes_atomic(output, buf.getvalue())
            if opts.report is not None:
                write_text_atomic(opts.report, json.dumps({"calibration": d, "output": str(output)}, indent=2) + "\n")
        if json_out:
            _print_json(d)
        elif not STATE["quiet"]:
            from rich.table import Table

            t = Table(title=f"Calibration: {d['estimator']}, {d['batches']} batches, {d['samples']} samples", title_justify="left")
            for col in ("BatchNorm", "values/channel", "mean change", "var change"):
                t.add_column(col)
            for layer in d["layers"]:
                vpc = layer.get("values_per_channel") or ["-"]
                fmt = lambda x: "-" if x is None else f"{x:.3g}"  # noqa: E731
                t.add_row(layer["name"], "not reached" if not layer["reached"] else f"{vpc[0]}–{vpc[1]}",
                          fmt(layer.get("mean_change")), fmt(layer.get("var_change")))
            _console().print(t)
            _console().print(f"wrote {output}")

    _guard(work)


def _maybe_init_distributed():
    """Under torchrun (WORLD_SIZE > 1) join the process group; (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() and os.environ.get("BNFOLD_DIST_BACKEND") == "nccl" else "gloo")
    return dist.get_rank(), dist.get_world_size()


# ------------------------------------------------------------------------------------- verify
@app.command(epilog="Example: bnfold verify samples/digits/model.py:build digits.onnx --weights samples/digits/weights.pt "
                    "--input-shape 1,1,8,8 --calib samples/digits/calib.npz (batch size, estimator and tolerances "
                    "default to the ones the artifact records).")
def verify(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="The source: path/file.py:factory, module:factory, or the original .onnx.", show_default=False)],
    onnx_file: Annotated[str, typer.Argument(metavar="ONNX", help="The ONNX artifact to check.", show_default=False)],
    weights: Weights = None,
    input_shape: InputShape = None,
    calib: Calib = None,
    batch_size: BatchSize = None,
    estimator: EstimatorOpt = None,
    allow_tf32: AllowTf32 = None,
    dynamic_batch: DynamicBatch = None,
    atol: Atol = None,
    rtol: Rtol = None,
    min_top1: MinTop1 = None,
    explain: Explain = None,
    providers: Providers = None,
    require_providers: RequireProviders = None,
    report: Report = None,
    trust_pickle: TrustPickle = None,
    seed: Seed = None,
    json_out: JsonOut = False,
):
    """Check an existing ONNX file against its source. Exit 0 when it matches, 1 when it does not."""
    STATE["json"] = json_out

    def work():
        from bnfold.pipeline import check_artifact

        opts = _build("verify", dict(weights=weights, input_shape=input_shape, calib=calib, batch_size=batch_size,
                                     estimator=estimator, dynamic_batch=dynamic_batch, atol=atol, rtol=rtol,
                                     min_top1=min_top1, explain=explain, providers=providers, require_providers=require_providers, report=report,
                                     trust_pickle=trust_pickle, seed=seed, allow_tf32=allow_tf32))
        _note_weights(model, opts)
        check = check_artifact(model, onnx_file, options=opts)
        d = check.to_dict()
        if json_out:
            _print_json(d)
        else:
            from bnfold.report import render_verify

            render_verify(d, _console())
        raise typer.Exit(0 if check.passed else 1)

    _guard(work)


# ------------------------------------------------------------------------------------ inspect
@app.command(epilog="Example: bnfold inspect samples/digits/model.py:build --input-shape 1,1,8,8")
def inspect(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="path/file.py:factory, module:factory, or a .onnx file.", show_default=False)],
    weights: Weights = None,
    input_shape: InputShape = None,
    trust_pickle: TrustPickle = None,
    json_out: JsonOut = False,
):
    """Show every BatchNorm layer's fate: folded backward/forward into what, or why it stays."""
    STATE["json"] = json_out

    def work():
        from bnfold.edges.load import load_model, parse_model_spec

        opts = _build("inspect", dict(weights=weights, input_shape=input_shape, trust_pickle=trust_pickle))
        spec = parse_model_spec(model)
        if spec.kind == "onnx":
            from bnfold.onnx_pass.fold import fold_onnx_proto
            from bnfold.onnx_pass.io import load_onnx

            for key in ("weights", "trust_pickle", "input_shape"):
                if key in opts.given:
                    raise BadInputError(f"{OPTIONS[key].flag} has no meaning for an ONNX model", "drop it")

            plan = fold_onnx_proto(load_onnx(spec.target))
        else:
            import bnfold
            from bnfold.edges.data import model_dtype_device
            from bnfold.pipeline import random_inputs

            _note_weights(model, opts)
            m = load_model(spec, opts.weights, trust_pickle=opts.trust_pickle)
            example = random_inputs(opts.input_shape, model_dtype_device(m)[0]) if opts.input_shape else None
            plan = bnfold.inspect(m, example)
        d = plan.to_dict()
        if json_out:
            _print_json(d)
            return
        from bnfold.report import plan_table

        console = _console()
        console.print(plan_table(d["folded"], d["unfolded"]))
        if plan.trace_error:
            console.print(f"trace: {plan.trace_error}")
        console.print(f"{len(plan.folded)}/{plan.bn_count} BatchNorm layers foldable (tracer: {plan.tracer})")

    _guard(work)


def _on_sigterm(signum, frame):
    # Turn SIGTERM into the same clean unwinding as Ctrl-C: temporary files are removed.
    raise KeyboardInterrupt


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _on_sigterm)
    app(prog_name="bnfold")


if __name__ == "__main__":
    main()
