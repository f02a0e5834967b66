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
from typing import List, Optional

import typer

from bnfold import __version__
from bnfold.errors import EXIT_MODEL, BadInputError, BnfoldError

app = typer.Typer(
    name="bnfold",
    help="Recompute BatchNorm statistics, fold BatchNorm into conv/linear weights, export to ONNX and "
    "prove with onnxruntime that the outputs still match.\n\n"
    "Exit codes: 0 ok · 1 verification failed · 2 bad input · 3 model cannot be traced/folded/exported.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

STATE = {"quiet": False, "verbose": False, "debug": False, "json": False}


def _console(stderr: bool = False):
    from rich.console import Console

    from bnfold.usercode import stdout

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
    from bnfold.paths import begin_run, written_message
    from bnfold.usercode import as_error, stdout_to_stderr

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
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        sys.stderr.write(f"bnfold: error: unexpected {type(err).__name__} while processing the model: {first[:300]}. "
                         "Rerun with --debug for the traceback and report it if the model is valid\n")
        raise typer.Exit(EXIT_MODEL)


def _version(value: bool):
    if value:
        typer.echo(f"bnfold {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only errors (and the result line)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="List every BatchNorm layer, even in large models."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
):
    STATE.update(quiet=quiet, verbose=verbose, debug=debug)


# ------------------------------------------------------------------------------------ helpers
def _tolerance(values: Optional[List[str]], what: str):
    """['1e-4', 'logits=1e-3'] -> 1e-4 or {'*': 1e-4, 'logits': 1e-3}."""
    if not values:
        return None
    out: dict = {}
    for v in values:
        name, sep, num = v.rpartition("=")
        key = name.strip() if sep else "*"
        try:
            f = float(num)
        except ValueError:
            raise BadInputError(f"--{what} '{v}' is not a number", f"pass --{what} 1e-4 or --{what} OUTPUT=1e-4") from None
        if not f >= 0 or f == float("inf"):
            raise BadInputError(f"--{what} {v} is negative or not finite", f"pass a non-negative number, e.g. --{what} 1e-4")
        out[key] = f
    return out["*"] if list(out) == ["*"] else out


def _shapes(values: Optional[List[str]]):
    from bnfold.load import parse_shape

    return [parse_shape(v) for v in values or []]


def _load_torch(model: str, weights: Optional[Path], trust_pickle: bool):
    from bnfold.load import load_model, parse_model_spec

    spec = parse_model_spec(model)
    if spec.kind == "onnx":
        return spec, None
    if weights is None and not STATE["quiet"]:
        _console(stderr=True).print("note: no --weights given: using the weights the factory creates")
    return spec, load_model(spec, weights, trust_pickle=trust_pickle)


def _source(model: str, weights, trust_pickle: bool, input_shape, seed: int):
    """(what to convert or verify: an .onnx path or the loaded nn.Module, its example inputs)."""
    shapes = _shapes(input_shape)
    spec, m = _load_torch(model, weights, trust_pickle)
    if spec.kind == "onnx":
        return spec.target, (shapes or None)
    return m, _example(m, shapes, seed)


def _example(model_obj, shapes, seed: int):
    from bnfold.data import model_dtype_device
    from bnfold.pipeline import random_inputs

    if not shapes:
        raise BadInputError("no --input-shape given", "pass one --input-shape per model input, e.g. --input-shape 1,3,224,224")
    dtype, _ = model_dtype_device(model_obj)
    return random_inputs(shapes, dtype, seed)


def _print_json(obj) -> None:
    from bnfold import _json as json
    from bnfold.usercode import stdout

    stdout().write(json.dumps(obj, indent=2, default=str) + "\n")


# ------------------------------------------------------------------------------------ convert
@app.command(epilog="Example: bnfold convert samples/digits/model.py:build --weights samples/digits/weights.pt "
                    "--input-shape 1,1,8,8 --calib samples/digits/calib.npz -o digits.onnx --report report.json")
def convert(
    model: Optional[str] = typer.Argument(None, help="path/file.py:factory, package.module:factory, or a .onnx file."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="The .onnx file to write."),
    weights: Optional[Path] = typer.Option(None, "--weights", "-w", help="state_dict checkpoint (loaded with weights_only=True)."),
    input_shape: Optional[List[str]] = typer.Option(None, "--input-shape", "-s", help="e.g. 1,3,224,224; once per model input."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration data (.npz/.npy/.pt or module:fn): recompute BN statistics first."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Cut calibration arrays into batches of this size (the paper's batch)."),
    estimator: str = typer.Option("paper", "--estimator", help="paper (BN paper, default) or pooled."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset (default: the exporter's)."),
    dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="Export with a dynamic batch dimension; verify at batch 1 and 4."),
    atol: Optional[List[str]] = typer.Option(None, "--atol", help="Absolute tolerance, global (1e-4) or per output (output.0=1e-3)."),
    rtol: Optional[List[str]] = typer.Option(None, "--rtol", help="Relative tolerance, global or per output."),
    providers: str = typer.Option("cpu,cuda", "--providers", help="onnxruntime providers to verify on (those that cannot run are reported)."),
    require_providers: Optional[str] = typer.Option(None, "--require-providers", help="Providers that must really run (e.g. cuda), else exit 2."),
    report: Optional[str] = typer.Option(None, "--report", "-r", help="Write the JSON report here."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow unpickling a checkpoint that holds Python objects. Only for files you trust."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip verification (the report says so)."),
    no_overwrite: bool = typer.Option(False, "--no-overwrite", help="Refuse to replace an existing output (default: replace it)."),
    keep_failed: bool = typer.Option(False, "--keep-failed", help="Write the output even when verification fails."),
    json_out: bool = typer.Option(False, "--json", help="Print the JSON report on stdout instead of tables."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random verification inputs."),
    config: Optional[Path] = typer.Option(None, "--config", help="Run every [[conversion]] of a TOML file."),
    jobs: int = typer.Option(1, "--jobs", "-j", help="Parallel processes for --config."),
    skip_unchanged: bool = typer.Option(False, "--skip-unchanged", help="With --config: skip conversions whose manifest matches."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only the result line (same as bnfold --quiet)."),
):
    """Fold (and optionally calibrate), export to ONNX and verify the result."""
    STATE["quiet"] = STATE["quiet"] or quiet

    def work():
        if config is not None:
            return _run_config(config, report, jobs, skip_unchanged, json_out)
        if not model:
            raise BadInputError("no MODEL given", "pass path/file.py:factory, module:factory or a .onnx file (or --config)")
        if output is None:
            raise BadInputError("no output path", "pass -o OUT.onnx")
        import bnfold
        from bnfold.paths import check_run_paths, spec_files

        check_run_paths({"model": spec_files(model), "--weights": weights, "--calib": spec_files(calib)},
                        {"-o": output, "--report": report}, no_overwrite=["-o"] if no_overwrite else [], sidecars={"-o": [".data"]})
        a, r = _tolerance(atol, "atol"), _tolerance(rtol, "rtol")
        source, example = _source(model, weights, trust_pickle, input_shape, seed)
        rep = bnfold.convert(
            source, example, output, calib=calib, batch_size=batch_size,
            estimator=estimator, opset=opset, dynamic_batch=dynamic_batch, atol=a, rtol=r, providers=providers,
            require_providers=require_providers or (), verify=not no_verify, report=report, force=not no_overwrite,
            keep_failed=keep_failed, progress=not STATE["quiet"] and sys.stderr.isatty(), seed=seed, model_name=model,
        )
        d = rep.to_dict()
        _show_convert(d, json_out)
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


def _run_config(config: Path, report: Optional[Path], jobs: int, skip_unchanged: bool, json_out: bool):
    from bnfold.batch import run_config
    from bnfold.report import markdown_summary

    summary = run_config(config, jobs=jobs, skip_unchanged=skip_unchanged, report=report,
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
            t.add_row(e["name"], e["model"], e["output"], res, bn, e.get("error") or "")
        _console().print(t)
    step = os.environ.get("GITHUB_STEP_SUMMARY")
    if step:
        from bnfold._io import append_text_or_warn

        append_text_or_warn(step, markdown_summary(summary["conversions"]), "GITHUB_STEP_SUMMARY")
    raise typer.Exit(summary["exit_code"])


# ---------------------------------------------------------------------------------- calibrate
@app.command(epilog="Example: bnfold calibrate samples/digits/model.py:build --weights samples/digits/weights.pt "
                    "--calib samples/digits/calib.npz --batch-size 64 -o calibrated.pt\n\n"
                    "Several processes: torchrun --nproc-per-node 2 -m bnfold calibrate ... (each rank takes every N-th batch).")
def calibrate(
    model: str = typer.Argument(..., help="path/file.py:factory or package.module:factory."),
    calib: str = typer.Option(..., "--calib", help="Calibration data (.npz/.npy/.pt or module:fn)."),
    output: str = typer.Option(..., "--output", "-o", help="Write the calibrated state_dict (.pt) here."),
    weights: Optional[Path] = typer.Option(None, "--weights", "-w", help="state_dict checkpoint to start from."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Cut arrays into batches of this size."),
    estimator: str = typer.Option("paper", "--estimator", help="paper (default) or pooled."),
    report: Optional[str] = typer.Option(None, "--report", "-r", help="Write the calibration summary (JSON) here."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow unpickling a checkpoint that holds Python objects."),
    no_overwrite: bool = typer.Option(False, "--no-overwrite", help="Refuse to replace an existing output."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or table (same as bnfold --quiet)."),
):
    """Recompute BatchNorm population statistics (BN paper, §3.1) and save the state_dict."""
    STATE["quiet"] = STATE["quiet"] or quiet

    def work():
        import io

        import torch

        from bnfold import _json as json
        from bnfold._io import OutputSet, write_bytes_atomic, write_text_atomic
        from bnfold.paths import check_run_paths, spec_files
        from bnfold.calibration import run_calibration
        from bnfold.data import load_batches
        from bnfold.load import parse_model_spec

        if parse_model_spec(model).kind == "onnx":
            raise BadInputError("calibration needs the PyTorch model", "pass path/file.py:factory, not a .onnx file")
        check_run_paths({"model": spec_files(model), "--weights": weights, "--calib": spec_files(calib)},
                        {"-o": output, "--report": report}, no_overwrite=["-o"] if no_overwrite else [])
        _, m = _load_torch(model, weights, trust_pickle)
        batches = load_batches(calib, batch_size)
        rank, world = _maybe_init_distributed()
        try:
            if world > 1:
                batches = batches[rank::world]
            calibrated, summary = run_calibration(m, batches, estimator=estimator, inplace=True,
                                                  progress=not STATE["quiet"] and sys.stderr.isatty() and rank == 0)
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
            if report is not None:
                write_text_atomic(report, json.dumps({"calibration": d, "output": str(output)}, indent=2) + "\n")
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
                    "--input-shape 1,1,8,8 --calib samples/digits/calib.npz")
def verify(
    model: str = typer.Argument(..., help="The source: path/file.py:factory, module:factory, or the original .onnx."),
    onnx_file: Path = typer.Argument(..., help="The ONNX artifact to check."),
    weights: Optional[Path] = typer.Option(None, "--weights", "-w"),
    input_shape: Optional[List[str]] = typer.Option(None, "--input-shape", "-s", help="Once per model input."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibrate the reference as convert --calib did; its samples join the inputs."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b"),
    estimator: str = typer.Option("paper", "--estimator"),
    dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="Verify at batch 1 and 4."),
    atol: Optional[List[str]] = typer.Option(None, "--atol"),
    rtol: Optional[List[str]] = typer.Option(None, "--rtol"),
    providers: str = typer.Option("cpu,cuda", "--providers"),
    require_providers: Optional[str] = typer.Option(None, "--require-providers"),
    report: Optional[str] = typer.Option(None, "--report", "-r"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle"),
    json_out: bool = typer.Option(False, "--json"),
    seed: int = typer.Option(0, "--seed"),
):
    """Check an existing ONNX file against its source. Exit 0 when it matches, 1 when it does not."""

    def work():
        from bnfold import _json as json
        from bnfold._io import write_text_atomic
        from bnfold.paths import check_run_paths, spec_files
        from bnfold.pipeline import check_artifact

        check_run_paths({"model": spec_files(model), "the ONNX file": onnx_file, "--weights": weights, "--calib": spec_files(calib)},
                        {"--report": report})
        a, r = _tolerance(atol, "atol"), _tolerance(rtol, "rtol")
        source, example = _source(model, weights, trust_pickle, input_shape, seed)
        vr = check_artifact(source, onnx_file, example, calib=calib, batch_size=batch_size,
                            estimator=estimator, dynamic_batch=dynamic_batch, atol=a, rtol=r, providers=providers,
                            require_providers=require_providers or (), seed=seed)
        from bnfold.pipeline import SCHEMA_VERSION, versions

        d = {"schema_version": SCHEMA_VERSION, "model": model, "onnx": str(onnx_file), **vr.to_dict(), "versions": versions()}
        if report is not None:
            write_text_atomic(report, json.dumps(d, indent=2, default=str) + "\n")
        if json_out:
            _print_json(d)
        else:
            from bnfold.report import render_verify

            render_verify(d, _console())
        raise typer.Exit(0 if vr.passed else 1)

    _guard(work)


# ------------------------------------------------------------------------------------ inspect
@app.command(epilog="Example: bnfold inspect samples/digits/model.py:build --input-shape 1,1,8,8")
def inspect(
    model: str = typer.Argument(..., help="path/file.py:factory, module:factory, or a .onnx file."),
    weights: Optional[Path] = typer.Option(None, "--weights", "-w"),
    input_shape: Optional[List[str]] = typer.Option(None, "--input-shape", "-s", help="Enables shape checks and the torch.export fallback."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle"),
    json_out: bool = typer.Option(False, "--json"),
):
    """Show every BatchNorm layer's fate: folded backward/forward into what, or why it stays."""

    def work():
        shapes = _shapes(input_shape)
        spec, m = _load_torch(model, weights, trust_pickle)
        if spec.kind == "onnx":
            from bnfold.onnx_fold import fold_onnx_proto, load_onnx

            plan = fold_onnx_proto(load_onnx(spec.target))
        else:
            import bnfold

            plan = bnfold.inspect(m, _example(m, shapes, 0) if shapes else None)
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
