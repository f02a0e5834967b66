"""The `bnfold` command line: a thin skin over bnfold's public API. It parses flags into one
``ConvertOptions`` (``bnfold.options``), calls ``bnfold.convert``, ``run_config``,
``calibrate_checkpoint``, ``check_artifact`` or ``inspect_spec``, and renders the result (``bnfold.report``).

User errors (bnfold.BnfoldError) are rendered here, once, as one line on stderr with their exit code;
`--debug` shows the traceback instead. Only light modules are imported here; the stages (and torch,
onnx, onnxruntime) load on first use of bnfold's public names, so that `bnfold --help` is instant.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from inspect import Parameter, Signature, signature
from pathlib import Path
from typing import Annotated, List, Optional

import typer

import bnfold
from bnfold._version import __version__
from bnfold.edges import isolate
from bnfold.edges import jsonio as json
from bnfold.edges.files import append_text_or_warn, begin_run, written_message
from bnfold.edges.paths import check_appendable
from bnfold.edges.usercode import as_error, stdout, stdout_to_stderr
from bnfold.errors import BadInputError, BnfoldError, EXIT_INTERRUPTED, EXIT_MODEL, first_line, ModelError
from bnfold.options import CLI, ConvertOptions, OPTIONS
from bnfold.progress import reporting
from bnfold.report import batch_warning, calibration_table, config_lines, config_result_line, config_table, markdown_summary, relative, render_convert, render_inspect, render_verify

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

STATE = {"quiet": False, "verbose": False, "debug": False, "json": False, "isolate": False}


class _Argument(typer.core.TyperArgument):
    """An argument as click writes it: MODEL (or [MODEL]) in the usage line, no "<str>" beside its help."""

    def _usage_display_name(self) -> str:
        return self.display_name_raw if self.required else f"[{self.display_name_raw}]"

    def display_type_rich(self, ctx) -> None:
        return None


class _Command(typer.core.TyperCommand):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        for p in self.params:
            if type(p) is typer.core.TyperArgument:
                p.__class__ = _Argument


def _console(stderr: bool = False):
    from rich.console import Console

    out = sys.stderr if stderr else stdout()
    no_color = bool(os.environ.get("NO_COLOR")) or not out.isatty()
    # a terminal's width, or $COLUMNS (rich reads it); 160 when neither says
    width = None if out.isatty() or os.environ.get("COLUMNS", "").isdigit() else 160
    return Console(file=out, no_color=no_color, highlight=False, soft_wrap=False, width=width)


def _json_error(code: int, error: str, fix: str | None) -> None:
    """Under --json, an error is one JSON object on stdout too (CI scripts parse stdout); stderr keeps the line."""
    if STATE["json"]:
        _print_json({"exit_code": code, "error": " ".join(error.split()), "fix": fix})


def _fail(err: BaseException, code: int, traced: BaseException | None = None) -> None:
    """``err`` as one line on stderr (and JSON under --json), exit ``code``; --debug first prints the
    traceback of ``traced`` (default ``err``)."""
    if STATE["debug"]:
        traced = traced or err
        traceback.print_exception(type(traced), traced, traced.__traceback__, file=sys.stderr)
    text = " ".join(str(err).split())
    sys.stderr.write(f"bnfold: error: {text}\n")
    _json_error(code, getattr(err, "problem", text), getattr(err, "fix", None))
    raise typer.Exit(code)


def _interrupted() -> None:
    message = f"interrupted; {written_message()}"
    sys.stderr.write(f"bnfold: {message}\n")
    _json_error(EXIT_INTERRUPTED, message, None)
    raise typer.Exit(EXIT_INTERRUPTED)


def _guard(fn, outputs=(), isolated: bool = True):
    """Run ``fn``; render bnfold errors as one line with their exit code. From the entry point
    (``main``) it runs in a supervised child process (bnfold.edges.isolate), unless ``isolated`` is
    False: user code or a runtime that kills its process becomes a one-line error, exit 3."""
    begin_run()
    if isolated and STATE.get("isolate"):
        _supervised(fn, [p for p in outputs if p])
    _run_guarded(fn)


def _exit_code_of(fn) -> int:
    """In the child: the guarded command's exit code."""
    try:
        _run_guarded(fn)
    except typer.Exit as done:
        return done.exit_code
    return 0


def _supervised(fn, outputs: list) -> None:
    """Run the command in a child; its death is this process's one-line error (always raises typer.Exit)."""
    task = isolate.Task(_exit_code_of, (fn,), outputs=tuple(outputs) + tuple(f"{p}.data" for p in outputs))
    stopped = not isolate.supervise([task])
    if task.status == "ok":
        raise typer.Exit(task.result)
    if stopped or task.status == "interrupted":
        _interrupted()
    if task.status == "error":
        _fail(ModelError(f"unexpected error in the process running bnfold: {task.result}", "rerun with --debug and report it"), EXIT_MODEL)
    _fail(isolate.death_error(task), EXIT_MODEL)


def _run_guarded(fn):
    try:
        # stdout carries only bnfold's result (usercode.stdout()); progress lines go to stderr unless -q
        shown = not STATE["quiet"] and os.environ.get("RANK", "0") == "0"  # one torchrun process reports
        with stdout_to_stderr(), reporting(shown) as lines:
            lines.step("start", "importing torch, onnx, onnxruntime")
            return fn()
    except typer.Exit:
        raise
    except BnfoldError as err:
        _fail(err, err.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except (SystemExit, GeneratorExit) as err:  # user code (a model's forward) ending the process
        _fail(as_error(err, "the model's code"), EXIT_MODEL)
    except Exception as err:  # a bug in bnfold, or a model that breaks in an unforeseen way
        problem = f"unexpected {type(err).__name__} while processing the model: {first_line(err, empty='')}"
        fix = "rerun with --debug for the traceback and report it if the model is valid"
        _fail(ModelError(problem, fix), EXIT_MODEL, err)


def _version(value: bool):
    if value:
        typer.echo(f"bnfold {__version__}")
        raise typer.Exit()


# The global flags: before the command (bnfold -q convert ...) or after it (bnfold convert ... -q), as
# people type them; ``_table_options`` adds them to every command, the callback reads them before one.
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors and the result line.", show_default=False)]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Full tables: every verification figure, every BatchNorm layer, every path.",
                                       show_default=False)]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.", show_default=False)]
GLOBAL_FLAGS = {"quiet": Quiet, "verbose": Verbose, "debug": Debug}


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
    debug: Debug = False,
):
    STATE.update(quiet=quiet, verbose=verbose, debug=debug, json=False)


# ------------------------------------------------------------------------- shared options
# Every conversion option comes from bnfold.options.OPTIONS (flag, short name, help, metavar): a
# command declares its own parameters only, and ``_table_options`` adds the table's options of that
# command to the signature typer reads, before ``--json``. The command receives them as one dict
# (key -> raw value, None = not given), parsed and validated in one place: ConvertOptions.build.
JsonOut = Annotated[bool, typer.Option("--json", help="Print the JSON report on stdout (and nothing else there).", show_default=False)]
ModelArg = Annotated[Optional[str], typer.Argument(metavar="MODEL", help="path/file.py:factory, package.module:factory, or a .onnx file.", show_default=False)]
# the order --help lists them in (an option not named here comes last)
HELP_ORDER = ("weights", "input_shape", "calib", "batch_size", "estimator", "allow_tf32", "opset", "dynamic_batch", "atol", "rtol",
              "providers", "require_providers", "report", "trust_pickle", "verify", "overwrite", "keep_failed", "seed")


def _default_text(o) -> str | None:
    """An option's default as --help shows it ("[default: cpu,cuda]"); None when there is none to show."""
    d = o.default
    if isinstance(d, bool):
        return (o.flag.split("/")[0 if d else 1].lstrip("-")) if "/" in o.flag else None
    if isinstance(d, tuple):
        return ",".join(str(x) for x in d) or None
    return None if d is None else str(d)


def _option_parameter(key: str) -> Parameter:
    o = OPTIONS[key]
    # every value kept, so that a repeat is judged, not last-wins (an on-only flag cannot conflict)
    kind = (List[bool] if "/" in o.flag else bool) if isinstance(o.default, bool) else List[str]
    decls = [o.flag] + ([o.short] if o.short else [])
    default = _default_text(o)
    info = typer.Option(*decls, help=o.help + (f"  [default: {default}]" if default else ""), metavar=o.metavar, show_default=False)
    return Parameter(key, Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=Annotated[Optional[kind], info])


def _table_options(command: str, first: tuple = ()):
    """Decorate a command ``fn(values, ...)``: typer sees the table's options of ``command`` as flags
    (``first`` listed first in --help)."""
    keys = [k for k, o in OPTIONS.items() if command in o.commands and o.flag]
    shown = sorted(keys, key=lambda k: (k not in first, HELP_ORDER.index(k) if k in HELP_ORDER else len(HELP_ORDER)))

    def decorate(fn):
        own = list(signature(fn, eval_str=True).parameters.values())[1:]  # after ``values``
        at = next(i for i, p in enumerate(own) if p.name == "json_out")

        @functools.wraps(fn)
        def typer_command(**kw):
            for flag in GLOBAL_FLAGS:  # given before or after the command
                STATE[flag] = kw.pop(flag) or STATE[flag]
            STATE["json"] = bool(kw.get("json_out"))  # an error below is one JSON object too
            try:
                values = {k: _once(k, kw.pop(k)) for k in keys}
            except BadInputError as err:
                _fail(err, err.exit_code)
            return fn(values, **kw)

        flags = [Parameter(k, Parameter.KEYWORD_ONLY, default=False, annotation=a) for k, a in GLOBAL_FLAGS.items()]
        typer_command.__signature__ = Signature(own[:at] + [_option_parameter(k) for k in shown] + own[at:] + flags)
        return typer_command
    return decorate


def _once(key: str, given):
    """A flag given several times: repeatable ones keep every value (their parser judges conflicts);
    the others may repeat the same value, never two different ones (no last-wins)."""
    if not isinstance(given, list) or OPTIONS[key].repeat:
        return given
    distinct = list(dict.fromkeys(given))
    if len(distinct) > 1:
        flags = OPTIONS[key].flag.split("/")
        said = [(flags[0] if v else flags[-1]) if isinstance(v, bool) else v for v in distinct]
        raise BadInputError(f"{CLI.key(key)} is given {len(given)} times with different values ({', '.join(said)})",
                            "give it once")
    return distinct[0] if distinct else None


def _build(command: str, values: dict, model: str) -> ConvertOptions:
    """The command's flags as one validated ConvertOptions (errors name the flags)."""
    values = dict(values)
    if command in OPTIONS["progress"].commands:
        values["progress"] = (not STATE["quiet"]) or None  # bnfold.progress: lines on stderr, plain where it is not a terminal
    return ConvertOptions.build(values, via=CLI, command=command, model=model)


def _examples(*lines: str) -> str:
    """A command's --help epilog: the examples, kept as written (click does not rewrap a \\b paragraph)."""
    return "Examples:\n\n\b\n" + "\n".join("  " + ln for ln in "\n".join(lines).splitlines())


def _print_json(obj) -> None:
    stdout().write(json.dumps(obj, indent=2, default=str) + "\n")


def _show(result, json_out: bool, render, **kw) -> None:
    """A command's result: its JSON object under --json, else ``render``'s tables (-q: the last line)."""
    if json_out:
        _print_json(result.to_dict())
    else:
        render(result.to_dict(), _console(), quiet=STATE["quiet"], **kw)


# ------------------------------------------------------------------------------------ convert
@app.command(cls=_Command, epilog=_examples(
    "bnfold convert samples/digits/model.py:build -w samples/digits/weights.pt \\\n"
    "    -s 1,1,8,8 --calib samples/digits/calib.npz -b 64 -o digits.onnx",
    "# an .onnx file: fold its BatchNormalization nodes, verify against it",
    "bnfold convert digits.onnx -o folded.onnx",
    "# every [[conversion]] of a TOML file, 2 at a time (docs/ci.md)",
    "bnfold convert --config samples/ci/conversions.toml --jobs 2"))
@_table_options("convert")
def convert(
    values: dict,
    model: ModelArg = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", metavar="FILE", help="The .onnx file to write.", show_default=False)] = None,
    json_out: JsonOut = False,
    config: Annotated[Optional[Path], typer.Option("--config", metavar="TOML", show_default=False,
                                                   help="Run every [[conversion]] table of a TOML file (keys mirror these flags; see the README).")] = None,
    jobs: Annotated[Optional[int], typer.Option("--jobs", "-j", metavar="N", show_default=False, help="With --config: run conversions in N processes.  [default: 1]")] = None,
    skip_unchanged: Annotated[bool, typer.Option("--skip-unchanged", show_default=False, help="With --config: skip conversions whose manifest still matches.")] = False,
):
    """Fold (and optionally calibrate), export to ONNX and verify the result."""
    def work():
        if config is not None:
            given = [CLI.key(k) for k, v in values.items() if v is not None and k != "report"]
            given = ["-o"] * (output is not None) + ["MODEL"] * bool(model) + given
            if given:
                raise BadInputError(f"--config runs the conversions its file describes; {', '.join(given)} would be ignored",
                                    "put them in the file's [[conversion]] or [defaults] tables")
            return _run_config(config, values["report"], jobs, skip_unchanged, json_out)
        for flag, v in (("--jobs", jobs), ("--skip-unchanged", skip_unchanged or None)):
            if v is not None:
                raise BadInputError(f"{flag} applies to --config runs only", "drop it, or use --config")
        if not model:
            raise BadInputError("no MODEL given", "pass path/file.py:factory, module:factory or a .onnx file (or --config)")
        if output is None:
            raise BadInputError("no output path", "pass -o OUT.onnx")
        opts = _build("convert", values, model)
        rep = bnfold.convert(model, None, output, options=opts)
        _show(rep, json_out, render_convert, verbose=STATE["verbose"])
        raise typer.Exit(rep.exit_code)

    _guard(work, (output, values["report"], values.get("plot")), isolated=config is None)  # --config isolates each conversion


def _run_config(config: Path, report: Optional[str], jobs: Optional[int], skip_unchanged: bool, json_out: bool):
    if jobs is not None and jobs < 1:
        raise BadInputError(f"--jobs {jobs} is not positive", "pass --jobs 1 or more")
    summary = bnfold.run_config(config, jobs=1 if jobs is None else jobs, skip_unchanged=skip_unchanged, report=report,
                                debug=STATE["debug"], progress=not STATE["quiet"])
    if json_out:
        _print_json(summary)
    elif STATE["quiet"]:
        _console().print(config_result_line(summary), markup=False)
    else:
        _console().print(config_table(summary, config, verbose=STATE["verbose"]))
        for line in config_lines(summary):
            _console().print(line, markup=False)
    step = os.environ.get("GITHUB_STEP_SUMMARY")
    if step and check_appendable(step, "GITHUB_STEP_SUMMARY"):  # never appended to an input (the config)
        append_text_or_warn(step, markdown_summary(summary["conversions"]), "GITHUB_STEP_SUMMARY")
    raise typer.Exit(summary["exit_code"])


# ---------------------------------------------------------------------------------- calibrate
@app.command(cls=_Command, epilog=_examples(
    "bnfold calibrate samples/digits/model.py:build \\\n"
    "    -w samples/digits/weights.pt --calib samples/digits/calib.npz -b 64 \\\n"
    "    -o calibrated.pt",
    "# several processes, each rank takes every N-th batch",
    "torchrun --nproc-per-node 2 -m bnfold calibrate ..."))
@_table_options("calibrate", first=("calib",))
def calibrate(
    values: dict,
    model: Annotated[str, typer.Argument(metavar="MODEL", help="path/file.py:factory or package.module:factory.", show_default=False)],
    output: Annotated[str, typer.Option("--output", "-o", metavar="FILE", help="Write the calibrated state_dict (.pt) here.", show_default=False)],
    json_out: JsonOut = False,
):
    """Recompute BatchNorm population statistics (BN paper, §3.1) and save the state_dict."""
    def work():
        opts = _build("calibrate", values, model)
        summary = bnfold.calibrate_checkpoint(model, output, options=opts)
        if summary is None:  # another process of a torchrun job: rank 0 reports
            return
        if json_out:
            _print_json(summary.to_dict())
            return
        if warning := batch_warning(summary.to_dict(), opts.to_dict()):
            _console(stderr=True).print(warning, markup=False)
        if not STATE["quiet"]:
            _console().print(calibration_table(summary.to_dict()))
        _console().print(f"wrote {relative(output)}", markup=False)

    _guard(work, (output, values.get("report"), values.get("plot")))


# ------------------------------------------------------------------------------------- verify
@app.command(cls=_Command, epilog=_examples(
    "# batch size, estimator, tolerances: by default those the file records",
    "bnfold verify samples/digits/model.py:build digits.onnx \\\n"
    "    -w samples/digits/weights.pt -s 1,1,8,8 --calib samples/digits/calib.npz",
    "# an .onnx source: the original file",
    "bnfold verify digits.onnx folded.onnx"))
@_table_options("verify")
def verify(
    values: dict,
    model: Annotated[str, typer.Argument(metavar="MODEL", help="The source: path/file.py:factory, module:factory, or the original .onnx.", show_default=False)],
    onnx_file: Annotated[str, typer.Argument(metavar="ONNX", help="The ONNX artifact to check.", show_default=False)],
    json_out: JsonOut = False,
):
    """Check an existing ONNX file against its source. Exit 0 when it matches, 1 when it does not."""
    def work():
        opts = _build("verify", values, model)
        check = bnfold.check_artifact(model, onnx_file, options=opts)
        _show(check, json_out, render_verify, verbose=STATE["verbose"])
        raise typer.Exit(check.exit_code)

    _guard(work, (values.get("report"),))


# ------------------------------------------------------------------------------------ inspect
@app.command(cls=_Command, epilog=_examples(
    "bnfold inspect samples/digits/model.py:build -s 1,1,8,8",
    "bnfold inspect digits.onnx"))
@_table_options("inspect")
def inspect(
    values: dict,
    model: Annotated[str, typer.Argument(metavar="MODEL", help="path/file.py:factory, module:factory, or a .onnx file.", show_default=False)],
    json_out: JsonOut = False,
):
    """Show every BatchNorm layer's fate: folded backward/forward into what, or why it stays."""
    def work():
        opts = _build("inspect", values, model)
        _show(bnfold.inspect_spec(model, options=opts), json_out, render_inspect)

    _guard(work)


def _on_sigterm(signum, frame):
    # Turn SIGTERM into the same clean unwinding as Ctrl-C: temporary files are removed.
    raise KeyboardInterrupt


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _on_sigterm)
    STATE["isolate"] = True  # each command runs in a supervised child (bnfold.edges.isolate)
    isolate.enable()
    if "--json" not in sys.argv[1:]:
        app(prog_name="bnfold")
        return
    try:  # the click typer vendors (typer 0.2x)
        from typer._click import exceptions as click_errors
    except ImportError:
        from click import exceptions as click_errors
    try:  # under --json a usage error is one JSON object on stdout too
        code = app(prog_name="bnfold", standalone_mode=False)
    except click_errors.ClickException as err:
        _print_json({"exit_code": err.exit_code, "error": err.format_message(), "fix": f"see {err.ctx.command_path if getattr(err, 'ctx', None) else 'bnfold'} --help"})
        err.show()
        sys.exit(err.exit_code)
    except click_errors.Abort:
        sys.stderr.write("Aborted!\n")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
