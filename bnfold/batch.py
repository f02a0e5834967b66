"""Batch conversion for CI: a TOML file of ``[[conversion]]`` tables, run in one call.

The whole config is validated (keys, types, files, shapes) before anything converts. Each
conversion runs the same ``convert`` as the CLI, in this process or in ``jobs`` worker processes; a
conversion that fails does not stop the others. Beside each output goes a manifest
(``OUT.onnx.manifest.json``) with the hashes of its inputs, the options, the tool and library
versions and the ONNX SHA-256; ``skip_unchanged`` skips a conversion whose manifest still matches.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

from bnfold import progress as progress_lines
from bnfold.edges import jsonio as json
from bnfold.edges.files import check_output_path, OutputSet, sha256_file, write_text_atomic
from bnfold.errors import BnfoldError, ConfigError, EXIT_BAD_INPUT, EXIT_MODEL, first_line
from bnfold.options import ALIASES, applies, ConfigVia, CONVERT, ConvertOptions, ENTRY_KEYS, OptionError, OPTIONS, reword
from bnfold.edges.load import cwd_on_path, parse_model_spec, spec_kind
from bnfold.pipeline import convert, versions
from bnfold.report import SCHEMA_VERSION, conversion_result
from bnfold.edges.isolate import can_fork, death_error, supervise, Task, warm_up
from bnfold.onnx_pass.export import warm_exporter
from bnfold.edges.usercode import as_error
from bnfold.edges.paths import check_config_paths, module_source, RunReads, spec_files

REQUIRED = ("model", "output")
MANIFEST_SUFFIX = ".manifest.json"


def _table(path: Path, key: str, i: int | None = None) -> ConfigError:
    return ConfigError(f"{path}: {key}{f' #{i + 1}' if i is not None else ''} is not a table",
                       "write [defaults] and [[conversion]] tables (see the README's CI section)")


def load_config(path: str | Path) -> list[dict[str, Any]]:
    """Parse and validate the whole file; one entry per conversion: name, model, output (absolute)
    and ``options`` (a validated ConvertOptions). Nothing converts before every table is valid."""

    try:
        return _load_config(Path(path))
    except OptionError as err:  # the option table's errors already name the file, table and key
        raise ConfigError(err.problem, err.fix) from err


def _read_tables(path: Path) -> tuple[list, dict]:
    """The file's [[conversion]] tables and its [defaults] table, checked for shape only."""
    import tomllib

    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist", "check the path of the config file")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid TOML: {err}", "fix the syntax") from err
    unknown_top = [k for k in doc if k not in ("conversion", "defaults")]
    if unknown_top:
        raise ConfigError(f"{path}: unknown top-level key '{unknown_top[0]}'", "use [[conversion]] tables and an optional [defaults] table")
    convs = doc.get("conversion")
    if "conversion" in doc and not isinstance(convs, list):
        raise _table(path, "conversion")
    if not convs:
        raise ConfigError(f"{path} has no [[conversion]] tables", "add at least one [[conversion]] with model and output")
    defaults = doc.get("defaults", {})
    if not isinstance(defaults, dict):
        raise _table(path, "defaults")
    return convs, defaults


OPTION_KEYS = [k for k, o in OPTIONS.items() if o.config and CONVERT in o.commands]


def _split(table: dict, via: ConfigVia) -> tuple[dict, dict]:
    """A table's entry keys (name, model, output; parsed) and its option keys (raw)."""
    entry, opts = {}, {}
    for k, v in table.items():
        key = ALIASES.get(k, k)
        if key in ENTRY_KEYS:
            entry[key] = ENTRY_KEYS[key](v, via, k)
        elif key in OPTION_KEYS:
            if key in opts:
                raise OptionError(via, k, f"repeats '{key}'", "keep one of them")
            opts[key] = v
        else:
            known = list(ENTRY_KEYS) + OPTION_KEYS
            close = difflib.get_close_matches(k, known, n=1)
            raise OptionError(via, k, "is unknown", f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}")
    return entry, opts


def _load_config(path: Path) -> list[dict[str, Any]]:
    convs, defaults = _read_tables(path)
    base = path.resolve().parent
    d_entry, d_opts = _split(defaults, ConfigVia(str(path), table="defaults"))
    if "name" in d_entry or "output" in d_entry:
        raise ConfigError(f"{path}: [defaults], key '{'name' if 'name' in d_entry else 'output'}' would be shared by every conversion",
                          "give each [[conversion]] its own")
    ConvertOptions.build(d_opts, via=ConfigVia(str(path), table="defaults"), base=base)  # errors name [defaults]
    entries, outputs = [], {}
    for i, raw in enumerate(convs):
        via = ConfigVia(str(path), i)
        if not isinstance(raw, dict):
            raise _table(path, "conversion", i)
        r_entry, r_opts = _split(raw, via)
        given = {**d_opts, **r_opts}
        if given.get("verify") is False:  # [defaults]' verification settings do not apply to a table that turns it off
            given = {k: v for k, v in given.items() if k in r_opts or k not in ("atol", "rtol", "providers", "require_providers", "keep_failed")}
        model = {**d_entry, **r_entry}.get("model")
        given = {k: v for k, v in given.items() if k in r_opts or applies(k, model)}  # nor those for another kind of model
        entry = _entry({**d_entry, **r_entry}, given, via, base)
        if entry["output"] in outputs:
            raise ConfigError(f"{via.where()}, key 'output': '{entry['output']}' is also written by conversion #{outputs[entry['output']] + 1}", "give each conversion its own output")
        outputs[entry["output"]] = i
        entries.append(entry)
    return entries


def _entry(entry: dict, given: dict, via: ConfigVia, base: Path) -> dict[str, Any]:
    """One conversion, checked: its options, its model and the files it reads; paths made absolute."""
    for k in REQUIRED:
        if k not in entry:
            raise ConfigError(f"{via.where()} has no '{k}'", f"add {k} = \"...\"")
    opts = ConvertOptions.build(given, via=via, base=base, model=entry["model"])
    try:
        spec = parse_model_spec(entry["model"])
    except BnfoldError as err:
        raise ConfigError(f"{via.where()}, key 'model': {err.problem}", err.fix) from err
    if spec.kind in ("file", "onnx"):
        target = Path(spec.target) if Path(spec.target).is_absolute() else (base / spec.target).resolve()
        if not target.is_file():
            raise ConfigError(f"{via.where()}, key 'model': '{target}' does not exist", "paths are relative to the config file's folder")
        entry["model"] = str(target) + (f":{spec.attr}" if spec.attr else "")
    if spec.kind != "onnx" and not opts.input_shape:
        raise ConfigError(f"{via.where()} has no input_shape", "add input_shape = \"1,3,224,224\" (or [1, 3, 224, 224])")
    calib = spec_kind(opts.calib) if opts.calib is not None else None  # a config's calib is a path or a spec
    for key, parts in (("model", spec), ("calib", calib)):
        if parts is not None and parts.kind == "module" and not _module_exists(parts.target):
            raise ConfigError(f"{via.where()}, key '{key}': module '{parts.target}' not found",
                              "install it, or use path/to/file.py:fn (relative to the config file's folder)")
    files = {"weights": opts.weights}
    if calib is not None and calib.kind in ("data", "file"):
        files["calib"] = Path(calib.target)
    for key, file in files.items():
        if file is not None and not file.is_file():
            raise ConfigError(f"{via.where()}, key '{key}': '{file}' does not exist", "paths are relative to the config file's folder")
    out = Path(entry["output"])
    entry["output"] = str(out if out.is_absolute() else (base / out).resolve())
    entry.setdefault("name", Path(entry["output"]).stem)
    entry["options"] = opts
    return entry


def _module_exists(name: str) -> bool:
    """Whether ``pkg.mod`` can be imported, judged without importing it (so a config is checked whole
    before any user code runs): its source along sys.path, or an importable top-level package."""
    import importlib.util

    cwd_on_path()  # found where the conversion will import it from
    try:
        return module_source(name) is not None or importlib.util.find_spec(name.split(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def fingerprint(entry: dict[str, Any]) -> dict[str, Any]:
    """What decides a conversion's result and is known before it runs: the hashes of the files its
    specs name (model source, weights, calibration data or its function's module), every option
    (the report path included), the outputs it writes, versions. What the run read besides
    (``RunReads``) is recorded in the manifest's ``reads``."""

    opts = entry["options"]
    files = {}
    for key, value in (("model_source", entry["model"]), ("weights", opts.weights), ("calib", opts.calib)):
        target = next(iter(spec_files(value)), None) if isinstance(value, (str, Path)) else None
        files[key] = sha256_file(target) if target and Path(target).is_file() else None
    options = dict(sorted(opts.to_dict().items()))
    return {"inputs": files, "options": {"model": entry["model"], **options}, "outputs": _outputs(entry), "versions": versions()}


def _outputs(entry: dict[str, Any]) -> list[str]:
    """Every file a conversion is asked to write (the ONNX file, the report, the plot)."""
    opts = entry["options"]
    return [str(entry["output"])] + [str(p) for p in (opts.report, opts.plot) if p is not None]


def _read_hashes(reads: RunReads, entry: dict[str, Any]) -> dict[str, str]:
    """The files a conversion read (``RunReads``) and the local modules of its specs, hashed; its own
    outputs and their manifest left out."""
    own = {os.path.realpath(p) for p in _outputs(entry) + [str(manifest_path(entry["output"]))]}
    return {f: sha256_file(f) for f in reads.files() if f not in own}


def manifest_path(output: str | Path) -> Path:
    return Path(str(output) + MANIFEST_SUFFIX)


def unchanged_manifest(entry: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of the recorded run when a conversion may be skipped (a skipped conversion keeps
    its report in the summary), else None. Skip only when everything that can change the result is
    unchanged (docs/ci.md): the fingerprint, every file the recorded run read, and every requested
    output is there. When in doubt, run."""
    mpath, out = manifest_path(entry["output"]), Path(entry["output"])
    if not mpath.is_file() or not all(Path(p).is_file() for p in _outputs(entry)):
        return None
    try:
        old = json.loads(mpath.read_text())
    except (OSError, ValueError):
        return None
    now = json.loads(json.dumps(fingerprint(entry), default=str))
    if not all(old.get(k) == now[k] for k in now) or old.get("onnx_sha256") != sha256_file(out):
        return None
    reads = old.get("reads")
    if not isinstance(reads, dict):  # a manifest from before reads were recorded
        return None
    try:
        return old if all(Path(f).is_file() and sha256_file(f) == h for f, h in reads.items()) else None
    except OSError:
        return None


def _failure_detail(rep) -> str | None:
    """One line saying why a conversion did not pass (the summary's detail column)."""
    ver = rep.verification or {}
    for run in ver.get("runs", []):
        for o in run.get("outputs", []):
            if not o.get("passed"):
                return (f"verification failed: {run['target']} {run['provider']} {run.get('graph_optimization') or ''} "
                        f"{run['inputs']} {o['name']}: {o.get('problem') or 'not within tolerance'}").replace("  ", " ")
    return "verification failed" if rep.passed is False else None


def _result(entry: dict[str, Any], **kw) -> dict[str, Any]:
    """A conversion's line of the summary (``kw`` overrides a pass with nothing written yet)."""
    return {"name": entry["name"], "model": entry["model"], "output": entry["output"], "exit_code": 0,
            "error": None, "detail": None, "report": None, "skipped": False, **kw}


def run_one(entry: dict[str, Any], debug: bool = False, threads: int | None = None) -> dict[str, Any]:
    """One conversion; never raises for user errors: returns {name, exit_code, error, report, …}."""
    result = _result(entry)
    try:
        import torch

        if threads:
            torch.set_num_threads(threads)

        with OutputSet():  # the ONNX file, its data, its report and its manifest: together or not at all
            with RunReads() as reads:  # what the conversion reads decides whether a later run may skip it
                rep = convert(entry["model"], None, entry["output"], options=entry["options"])
            result.update(report=rep.to_dict(), exit_code=rep.exit_code, detail=_failure_detail(rep))
            if rep and rep.export.get("path"):  # passed, or written, not verified
                manifest = {**fingerprint(entry), "reads": _read_hashes(reads, entry), "onnx_sha256": rep.export.get("sha256"),
                            "output": entry["output"], "report": result["report"]}
                write_text_atomic(manifest_path(entry["output"]), json.dumps(manifest, indent=2, default=str) + "\n")
        return result
    except BnfoldError as err:
        code, error = err.exit_code, str(err)
    except (SystemExit, GeneratorExit) as err:  # user code (a model's forward) ending the process
        code, error = EXIT_MODEL, str(as_error(err, "the model's code"))
    except Exception as err:  # keep the other conversions going
        if debug:
            import traceback

            traceback.print_exc()
        code, error = EXIT_MODEL, f"unexpected {type(err).__name__}: {first_line(err, empty='')}"
    error = " ".join(error.split())
    result.update(exit_code=code, error=error, detail=error)
    return result


def _supervised_outputs(entry: dict[str, Any]) -> tuple:
    """``_outputs`` and the files beside the ONNX file: its external data and its manifest."""
    out = str(entry["output"])
    return (*_outputs(entry), out + ".data", str(manifest_path(out)))


def _run_isolated(entries: list, todo: list[int], results: list, jobs: int, debug: bool, done) -> None:
    """Each conversion in its own supervised child process, ``jobs`` at once (bnfold.edges.isolate):
    one that dies fails alone, with its own line; SIGINT/SIGTERM starts nothing new and raises
    KeyboardInterrupt once the running ones have unwound. One job in a process that already ran
    torch (the API in a user's program) runs in this process. ``done(result)`` as each one finishes."""
    n = min(jobs, len(todo)) or 1
    if n == 1 and not can_fork():  # the API in a process that already ran torch: in this process
        for i in todo:
            results[i] = run_one(entries[i], debug)
            done(results[i])
        return
    threads = max(1, (os.cpu_count() or 1) // n) if n > 1 else None
    if len(todo) > 1:
        # imported once here, not once per child; the exporter's table too (onnx_pass/export.py)
        warm_up(("torch", "onnx", "onnxruntime", "torch.onnx", "bnfold.pipeline"), then=warm_exporter)
    tasks = {i: Task(run_one, (entries[i], debug, threads), outputs=_supervised_outputs(entries[i])) for i in todo}

    def finished_one(task: Task) -> None:
        i = next(i for i, t in tasks.items() if t is task)
        results[i] = _task_result(entries[i], task)
        if results[i] is not None:
            done(results[i])

    if not supervise(list(tasks.values()), jobs=n, on_done=finished_one):
        raise KeyboardInterrupt


def _task_result(entry: dict[str, Any], task: Task) -> dict[str, Any] | None:
    """A supervised conversion's line: its own result, or the error of a child that died or failed
    (None when it was interrupted)."""
    if task.status == "ok":
        return task.result
    if task.status == "died":
        err = death_error(task)
        return _result(entry, exit_code=err.exit_code, error=f"the worker process running this conversion ended: {err}", detail=str(err))
    if task.status == "error":
        return _result(entry, exit_code=EXIT_MODEL, error=f"unexpected {task.result}", detail=f"unexpected {task.result}")
    return None


def _make_parent(path) -> None:
    parent = Path(path).parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"cannot create folder '{parent}': {err.strerror}", "choose a writable output folder") from err


def _finished(lines, results: list, result: dict[str, Any]) -> None:
    """The progress line of a conversion as it finishes: [k/N] name RESULT (why)."""
    done = sum(r is not None for r in results)
    why = "" if result.get("skipped") or result["exit_code"] == 0 else f" ({result.get('error') or result.get('detail') or ''})"
    lines.step(f"[{done}/{len(results)}]", f"{result['name']} {conversion_result(result)}{why}")


def run_config(config: str | Path, *, jobs: int = 1, skip_unchanged: bool = False, report: str | Path | None = None,
               debug: bool = False, progress: bool = False) -> dict[str, Any]:
    """Validate ``config``, run every conversion, return (and optionally write) the summary.
    ``progress``: a line on stderr as each conversion finishes (bnfold.progress)."""
    with progress_lines.reporting(progress) as lines:
        return _run_config(config, jobs, skip_unchanged, report, debug, lines)


def _run_config(config, jobs: int, skip_unchanged: bool, report, debug: bool, lines) -> dict[str, Any]:

    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs {jobs!r} is not a positive integer", "run 1 or more jobs")
    entries = load_config(config)
    # a CI run on a fresh clone: the folders the config writes into are created (after validation)
    for i, e in enumerate(entries):
        rpath = e["options"].report
        for key, target in (("output", e["output"]), ("output", manifest_path(e["output"])), ("report", rpath), ("plot", e["options"].plot)):
            if target is None:
                continue
            try:
                _make_parent(target)
                check_output_path(target, force=e["options"].overwrite, what=key)  # overwrite = false protects every output
            except BnfoldError as err:
                # options named as a config spells them (overwrite = false, not --no-overwrite)
                raise reword(ConfigError(f"{config}: conversion #{i + 1}, key '{key}': {err.problem}", err.fix), ConfigVia(str(config), i)) from err
    if report is not None:
        _make_parent(report)

    check_config_paths(config, entries, report)  # no output on an input, on another output or on a special file
    results: list[dict[str, Any] | None] = [None] * len(entries)
    todo = []
    for i, e in enumerate(entries):
        old = unchanged_manifest(e) if skip_unchanged else None
        if old is not None:
            results[i] = _result(e, detail="unchanged since the run its manifest records",
                                 report=old.get("report"), skipped=True)
            _finished(lines, results, results[i])
        else:
            todo.append(i)
    if todo:
        lines.step("convert", f"{len(todo)} of {len(entries)} conversions" + (f", {min(jobs, len(todo))} jobs" if jobs > 1 else ""))
    _run_isolated(entries, todo, results, jobs, debug, lambda r: _finished(lines, results, r))
    codes = [r["exit_code"] for r in results if r]
    summary = {"schema_version": SCHEMA_VERSION, "config": str(config), "exit_code": max(codes) if codes else EXIT_BAD_INPUT,
               "conversions": results, "versions": versions()}
    if report is not None:
        write_text_atomic(report, json.dumps(summary, indent=2, default=str) + "\n")
    return summary
