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

from . import _json as json
from ._io import OutputSet, sha256_file, write_text_atomic
from .errors import EXIT_BAD_INPUT, EXIT_MODEL, BnfoldError, ConfigError

# key -> accepted python types
KEYS: dict[str, tuple] = {
    "name": (str,),
    "model": (str,),
    "output": (str,),
    "weights": (str,),
    "input_shape": (str, list),
    "input_shapes": (list,),
    "calib": (str,),
    "batch_size": (int,),
    "estimator": (str,),
    "opset": (int,),
    "dynamic_batch": (bool,),
    "atol": (float, int, dict),
    "rtol": (float, int, dict),
    "providers": (str, list),
    "require_providers": (str, list),
    "report": (str,),
    "trust_pickle": (bool,),
    "verify": (bool,),
    "keep_failed": (bool,),
    "seed": (int,),
}
REQUIRED = ("model", "output")
MANIFEST_SUFFIX = ".manifest.json"


def _where(path: Path, i: int | None, key: str | None = None) -> str:
    loc = f"{path}" + (f": conversion #{i + 1}" if i is not None else "")
    return loc + (f", key '{key}'" if key else "")


def load_config(path: str | Path) -> list[dict[str, Any]]:
    """Parse and validate; return one normalised dict per conversion (paths made absolute)."""
    import tomllib

    from .load import parse_model_spec, parse_shape
    from .verification import parse_providers

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist", "check --config")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid TOML: {err}", "fix the syntax") from err
    unknown_top = [k for k in doc if k not in ("conversion", "defaults")]
    if unknown_top:
        raise ConfigError(f"{path}: unknown top-level key '{unknown_top[0]}'", "use [[conversion]] tables and an optional [defaults] table")
    convs = doc.get("conversion")
    if not isinstance(convs, list) or not convs:
        raise ConfigError(f"{path} has no [[conversion]] tables", "add at least one [[conversion]] with model and output")
    defaults = doc.get("defaults", {})
    base = path.resolve().parent
    entries, outputs = [], {}
    for i, raw in enumerate(convs):
        entry = {**defaults, **raw}
        for k, v in entry.items():
            if k not in KEYS:
                close = difflib.get_close_matches(k, KEYS, n=1)
                raise ConfigError(f"{_where(path, i, k)} is unknown", f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(KEYS)}")
            if not isinstance(v, KEYS[k]) or (isinstance(v, bool) and bool not in KEYS[k]):
                raise ConfigError(f"{_where(path, i, k)} is a {type(v).__name__}", f"expected {' or '.join(t.__name__ for t in KEYS[k])}")
        for k in REQUIRED:
            if k not in entry:
                raise ConfigError(f"{_where(path, i)} has no '{k}'", f"add {k} = \"...\"")
        try:
            spec = parse_model_spec(entry["model"])
            if spec.kind in ("file", "onnx"):
                target = (base / spec.target).resolve()
                if not target.is_file():
                    raise ConfigError(f"{_where(path, i, 'model')}: '{target}' does not exist", "paths are relative to the config file's folder")
                entry["model"] = str(target) + (f":{spec.attr}" if spec.attr else "")
            shapes = entry.pop("input_shapes", None) or entry.pop("input_shape", None)
            if isinstance(shapes, str):
                shapes = [shapes]
            entry["input_shapes"] = [list(parse_shape(s)) if isinstance(s, str) else list(parse_shape(",".join(map(str, s)))) for s in (shapes or [])]
            if spec.kind != "onnx" and not entry["input_shapes"]:
                raise ConfigError(f"{_where(path, i)} has no input_shape", "add input_shape = \"1,3,224,224\"")
            for key in ("providers", "require_providers"):
                if key in entry:
                    val = entry[key]
                    entry[key] = parse_providers(val if isinstance(val, str) else ",".join(val))
            for key in ("atol", "rtol"):
                if key in entry:
                    from .verification import check_tolerance

                    check_tolerance(entry[key], key)
        except ConfigError:
            raise
        except BnfoldError as err:
            raise ConfigError(f"{_where(path, i)}: {err}") from err
        for key in ("weights", "calib", "output", "report"):
            if key in entry and not (key == "calib" and ":" in entry[key] and not Path(entry[key]).suffix):
                entry[key] = str((base / entry[key]).resolve()) + ("/" if entry[key].endswith(("/", os.sep)) else "")
        for key in ("weights", "calib"):
            if key in entry and Path(entry[key]).suffix and not Path(entry[key]).is_file():
                raise ConfigError(f"{_where(path, i, key)}: '{entry[key]}' does not exist", "paths are relative to the config file's folder")
        if entry["output"] in outputs:
            raise ConfigError(f"{_where(path, i, 'output')}: '{entry['output']}' is also written by conversion #{outputs[entry['output']] + 1}", "give each conversion its own output")
        outputs[entry["output"]] = i
        entry.setdefault("name", Path(entry["output"]).stem)
        entries.append(entry)
    return entries


def _model_source(model: str) -> str | None:
    from .load import parse_model_spec

    spec = parse_model_spec(model)
    if spec.kind in ("file", "onnx"):
        return spec.target
    import importlib.util

    try:
        found = importlib.util.find_spec(spec.target)
    except (ImportError, ValueError):
        return None
    return found.origin if found and found.origin and os.path.isfile(found.origin) else None


def fingerprint(entry: dict[str, Any]) -> dict[str, Any]:
    """What decides a conversion's result: input file hashes, options, versions."""
    from .pipeline import versions

    files = {}
    src = _model_source(entry["model"])
    files["model_source"] = sha256_file(src) if src else None
    for key in ("weights", "calib"):
        if key in entry and Path(entry[key]).is_file():
            files[key] = sha256_file(entry[key])
    options = {k: v for k, v in sorted(entry.items()) if k not in ("name", "report")}
    return {"inputs": files, "options": options, "versions": versions()}


def manifest_path(output: str | Path) -> Path:
    return Path(str(output) + MANIFEST_SUFFIX)


def is_unchanged(entry: dict[str, Any]) -> bool:
    mpath, out = manifest_path(entry["output"]), Path(entry["output"])
    if not (mpath.is_file() and out.is_file()):
        return False
    try:
        old = json.loads(mpath.read_text())
    except (OSError, ValueError):
        return False
    now = fingerprint(entry)
    return all(old.get(k) == now[k] for k in now) and old.get("onnx_sha256") == sha256_file(out)


def run_one(entry: dict[str, Any], debug: bool = False, threads: int | None = None) -> dict[str, Any]:
    """One conversion; never raises for user errors: returns {name, exit_code, error, report, …}."""
    result: dict[str, Any] = {"name": entry["name"], "model": entry["model"], "output": entry["output"],
                              "exit_code": 0, "error": None, "report": None, "skipped": False}
    try:
        import torch

        if threads:
            torch.set_num_threads(threads)
        from .load import load_model, parse_model_spec
        from .pipeline import convert, random_inputs
        from .data import model_dtype_device

        spec = parse_model_spec(entry["model"])
        if spec.kind == "onnx":
            model, example = spec.target, (entry["input_shapes"] or None)
        else:
            model = load_model(spec, entry.get("weights"), trust_pickle=entry.get("trust_pickle", False))
            dtype, _ = model_dtype_device(model)
            example = random_inputs(entry["input_shapes"], dtype, entry.get("seed", 0))
        with OutputSet():  # the ONNX file, its data, its report and its manifest: together or not at all
            rep = convert(model, example, entry["output"], calib=entry.get("calib"), batch_size=entry.get("batch_size"),
                          estimator=entry.get("estimator", "paper"), opset=entry.get("opset"),
                          dynamic_batch=entry.get("dynamic_batch", False), atol=entry.get("atol"), rtol=entry.get("rtol"),
                          providers=entry.get("providers", ("cpu", "cuda")), require_providers=entry.get("require_providers", ()),
                          verify=entry.get("verify", True), report=entry.get("report"), keep_failed=entry.get("keep_failed", False),
                          seed=entry.get("seed", 0), model_name=entry["model"])
            result["report"] = rep.to_dict()
            result["exit_code"] = rep.exit_code
            if rep.passed and rep.export.get("path"):
                manifest = {**fingerprint(entry), "onnx_sha256": rep.export.get("sha256"), "output": entry["output"]}
                write_text_atomic(manifest_path(entry["output"]), json.dumps(manifest, indent=2, default=str) + "\n")
    except BnfoldError as err:
        result["exit_code"], result["error"] = err.exit_code, " ".join(str(err).split())
    except KeyboardInterrupt:
        raise
    except (SystemExit, GeneratorExit) as err:  # user code (a model's forward) ending the process
        from .usercode import as_error

        err2 = as_error(err, "the model's code")
        result["exit_code"], result["error"] = EXIT_MODEL, " ".join(str(err2).split())
    except Exception as err:  # keep the other conversions going
        if debug:
            import traceback

            traceback.print_exc()
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        result["exit_code"], result["error"] = EXIT_MODEL, f"unexpected {type(err).__name__}: {first[:300]}"
    return result


def run_config(config: str | Path, *, jobs: int = 1, skip_unchanged: bool = False, report: str | Path | None = None,
               debug: bool = False, progress: bool = False) -> dict[str, Any]:
    """Validate ``config``, run every conversion, return (and optionally write) the summary."""
    from .pipeline import SCHEMA_VERSION, versions

    if jobs < 1:
        raise ConfigError(f"--jobs {jobs} is not positive", "pass --jobs 1 or more")
    entries = load_config(config)
    from .paths import check_config_paths

    check_config_paths(config, entries, report)
    results: list[dict[str, Any] | None] = [None] * len(entries)
    todo = []
    for i, e in enumerate(entries):
        if skip_unchanged and is_unchanged(e):
            results[i] = {"name": e["name"], "model": e["model"], "output": e["output"], "exit_code": 0,
                          "error": None, "report": None, "skipped": True}
        else:
            todo.append(i)
    if jobs == 1 or len(todo) <= 1:
        for i in todo:
            results[i] = run_one(entries[i], debug)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        threads = max(1, (os.cpu_count() or 1) // min(jobs, len(todo)))
        from .usercode import worker_died, worker_init

        with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=mp.get_context("spawn"), initializer=worker_init) as pool:
            futures = {i: pool.submit(run_one, entries[i], debug, threads) for i in todo}
            for i, fut in futures.items():
                results[i] = worker_died(fut, entries[i])
    codes = [r["exit_code"] for r in results if r]
    summary = {"schema_version": SCHEMA_VERSION, "config": str(config), "exit_code": max(codes) if codes else EXIT_BAD_INPUT,
               "conversions": results, "versions": versions()}
    if report is not None:
        write_text_atomic(report, json.dumps(summary, indent=2, default=str) + "\n")
    return summary
