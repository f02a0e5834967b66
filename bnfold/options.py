"""One options type for every way into bnfold: API keywords, CLI flags and TOML keys.

``OPTIONS`` is the table: one row per option with its key (the API keyword and the TOML key), its
CLI flag, the commands it belongs to, its default, its help text and the one function that parses
and validates it. ``ConvertOptions`` is generated from it (one field per row, the row's default), and
``ConvertOptions.build`` is the only place an option value is checked; the CLI,
the config loader and ``bnfold.convert``/``bnfold.verify`` all go through it, and differ only in how
an error names the option (``--input-shape`` on the command line, ``input_shape=`` in Python,
``conversions.toml: conversion #2, key 'input_shape'`` in a config file).

This module imports nothing heavy: ``bnfold --help`` builds its options from this table.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Mapping

from bnfold.errors import BadInputError, BnfoldError, ProviderError
from bnfold.report import PLOT_FORMATS, need_matplotlib
from bnfold.verification.providers import parse_providers, PROVIDERS
from bnfold.edges.load import INT64_MAX, parse_shape, relocate_spec, spec_kind


class _Choice(str, Enum):
    def __str__(self) -> str:
        return self.value


class Estimator(_Choice):
    PAPER = "paper"
    POOLED = "pooled"


# every provider of the registry (bnfold.verification.providers) at import; --providers also takes
# those added later with ``register_provider``
Provider = _Choice("Provider", {key.upper(): key for key in PROVIDERS}, module=__name__)


# --------------------------------------------------------------------------- interfaces
class Via:
    """How an interface names an option in its error messages."""

    name = "api"

    def key(self, key: str) -> str:
        return f"{key}="


class CliVia(Via):
    name = "cli"

    def key(self, key: str) -> str:
        opt = OPTIONS.get(key)
        return opt.flag.split("/")[0] if opt and opt.flag else key.replace("_", "-").upper()


@dataclass
class ConfigVia(Via):
    path: str
    index: int | None = None
    table: str | None = None
    name = "config"

    def key(self, key: str) -> str:
        return f"key '{key}'"

    def where(self) -> str:
        loc = self.path
        if self.table:
            loc += f": [{self.table}]"
        elif self.index is not None:
            loc += f": conversion #{self.index + 1}"
        return loc


API, CLI = Via(), CliVia()


class OptionError(BadInputError):
    """An option value that cannot be used (exit 2), worded for the interface that passed it."""

    def __init__(self, via: Via, key: str | None, problem: str, fix: str | None = None):
        named = via.key(key) if key else ""
        if isinstance(via, ConfigVia):
            text = f"{via.where()}, {named} {problem}" if key else f"{via.where()}: {problem}"
        else:
            text = f"{named} {problem}".strip() if key else problem
        super().__init__(text, fix)


# ------------------------------------------------------------------------------ parsers
# Each parser: (value, via, key) -> normalised value; raises OptionError.


def _p_bool(v, via, key):
    if isinstance(v, bool):
        return v
    raise OptionError(via, key, f"is {type(v).__name__} {v!r}, not true/false", None)


def _p_int(minimum: int, maximum: int | None = None):
    def p(v, via, key):
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, str) and via.name == "cli" and re.fullmatch(r"\s*[+-]?\d+\s*", v):
                v = int(v)
            else:
                raise OptionError(via, key, f"is {type(v).__name__} {v!r}, not an integer", None)
        if v < minimum:
            raise OptionError(via, key, f"is {v}, not positive" if minimum == 1 else f"is {v}, negative", f"use {minimum} or more")
        if maximum is not None and v > maximum:
            top = "2**63-1" if maximum == INT64_MAX else str(maximum)
            raise OptionError(via, key, f"{v} is outside {minimum}..{top}", f"pass an integer from {minimum} to {top}")
        return v
    return p


OPSET_MIN = 7  # the lowest opset torch's TorchScript exporter writes


def opset_range() -> tuple[int, int]:
    """(lowest, highest) opset bnfold writes: from the TorchScript exporter's lowest to onnx's highest."""
    import onnx

    return OPSET_MIN, int(onnx.defs.onnx_opset_version())


def _p_opset(v, via, key):
    v = _p_int(1)(v, via, key)
    lo, hi = opset_range()
    if not lo <= v <= hi:
        raise OptionError(via, key, f"{v} is outside the opsets bnfold writes ({lo}..{hi})", f"pass an opset from {lo} to {hi}")
    return v


def _p_out_path(v, via, key):
    """An output file path; a trailing separator names a folder, which is refused (trust rule "no output on an input")."""
    if isinstance(v, str) and v.strip() and v.endswith(("/", os.sep)):
        raise OptionError(via, key, f"'{v}' names a folder (it ends with '/')", "give a file name, e.g. report.json")
    return _p_path(v, via, key)


def _p_plot(v, via, key):
    """The drift plot's path: .png or .svg, and matplotlib installed (checked here: before any work)."""
    path = _p_out_path(v, via, key)
    if path.suffix.lower() not in PLOT_FORMATS:
        raise OptionError(via, key, f"'{path}' is not a .png or .svg file", "name the plot e.g. drift.png or drift.svg")
    need_matplotlib()
    return path


def _p_path(v, via, key):
    if isinstance(v, Path):
        return v
    if isinstance(v, str) and v.strip():
        return Path(v)
    raise OptionError(via, key, f"is {type(v).__name__} {v!r}, not a file path", None)


def _p_enum(enum: type[Enum]):
    choices = ", ".join(e.value for e in enum)

    def p(v, via, key):
        if isinstance(v, enum):
            return v
        if isinstance(v, str):
            try:
                return enum(v.strip().lower())
            except ValueError:
                pass
        raise OptionError(via, key, f"{v!r}: unknown {key}", f"use one of {choices}")
    return p


def _p_providers(v, via, key):
    """'cpu,cuda', ['cpu', 'CUDAExecutionProvider'] or Provider values -> tuple of registry keys
    (bnfold.providers: cpu, cuda, tensorrt, rocm, ... and any ``register_provider``), no repeats."""

    items = v.split(",") if isinstance(v, str) else v  # a Provider is a str: its value is split
    if not isinstance(items, (list, tuple)):
        raise OptionError(via, key, f"is {type(v).__name__} {v!r}, not a list of providers", "use cpu, cuda or cpu,cuda")
    names = [n for n in (str(item).strip() for item in items) if n]  # str(Provider.CPU) is "cpu"
    if not names:
        if key == "providers":
            raise OptionError(via, key, "names no provider", "use cpu, cuda or cpu,cuda")
        return ()
    try:
        return tuple(parse_providers(names))
    except ProviderError as err:
        bad = next((n for n in names if n.lower().replace("executionprovider", "") not in PROVIDERS
                    and n.lower() not in {s.ort_name.lower() for s in PROVIDERS.values()}), names[0])
        raise OptionError(via, key, f"names unknown provider {bad!r}", f"use one or more of {', '.join(PROVIDERS)}") from err


_SHAPE_FIX = "write a shape as 1,3,224,224 or [1, 3, 224, 224]"


def _is_dims(v) -> bool:
    """A shape written as integers: [1, 3, 224, 224], (1, 10), torch.Size."""
    return isinstance(v, (list, tuple)) and bool(v) and all(
        isinstance(d, int) and not isinstance(d, bool) for d in v)


def _shape_of(v, via, key) -> tuple[int, ...]:
    if isinstance(v, str):
        try:
            return parse_shape(v)
        except BadInputError as err:
            raise OptionError(via, key, err.problem.replace("input shape ", "", 1), _SHAPE_FIX) from None
    if _is_dims(v):
        if any(d <= 0 for d in v) or len(v) > 8:
            raise OptionError(via, key, f"{list(v)} needs 1 to 8 positive dimensions", _SHAPE_FIX)
        return tuple(int(d) for d in v)
    raise OptionError(via, key, f"{v!r} is not a shape", _SHAPE_FIX)


def _p_shapes(v, via, key):
    """One shape ('1,3,8,8', [1, 3, 8, 8], torch.Size) or several (['1,3,8,8', '1,10'], [[1, 3, 8, 8], [1, 10]])."""
    if isinstance(v, str) or _is_dims(v):
        return (_shape_of(v, via, key),)
    if isinstance(v, (list, tuple)) and v:
        return tuple(_shape_of(s, via, key) for s in v)
    raise OptionError(via, key, f"{v!r} is not a shape or a list of shapes", "write 1,3,224,224, [1, 3, 224, 224], or one per model input")


def _number(text, via, key) -> float:
    try:
        f = float(text)
    except (TypeError, ValueError):
        raise OptionError(via, key, f"{text!r} is not a number", "use a number (1e-4) or OUTPUT=number") from None
    if isinstance(text, bool) or not (f >= 0) or math.isinf(f):
        raise OptionError(via, key, f"{text!r} is negative or not finite", "use a non-negative number, e.g. 1e-4")
    return f


def _p_tolerance(v, via, key):
    """1e-4 | '1e-4' | 'logits=1e-3' | ['1e-4', 'logits=1e-3'] | {'*': 1e-4, 'logits': 1e-3} -> float or dict."""
    out: dict[str, float] = {}
    if isinstance(v, Mapping):
        if not v:
            raise OptionError(via, key, "is an empty table", "give at least one OUTPUT = number")
        out = {str(name): _number(num, via, key) for name, num in v.items()}
    else:
        items = [v] if isinstance(v, (str, int, float)) and not isinstance(v, bool) else v
        if not isinstance(items, (list, tuple)) or not items:
            raise OptionError(via, key, f"{v!r} is not a tolerance", "use a number (1e-4) or OUTPUT=number")
        for item in items:
            if isinstance(item, str) and "=" in item:
                name, _, num = item.rpartition("=")
                if not name.strip():
                    raise OptionError(via, key, f"{item!r} names no output", "use OUTPUT=number, e.g. output.logits=1e-3")
                _set_once(out, name.strip(), _number(num, via, key), via, key)
            else:
                _set_once(out, "*", _number(item, via, key), via, key)
    return out["*"] if list(out) == ["*"] else out


def _set_once(out: dict, name: str, value: float, via, key) -> None:
    """A repeated option may say the same thing twice, never two things (no last-wins)."""
    if name in out and out[name] != value:
        what = "the global value" if name == "*" else f"output '{name}'"
        raise OptionError(via, key, f"gives {what} two values ({out[name]:g} and {value:g})", "give each output one value")
    out[name] = value


def _p_share(v, via, key):
    """A tolerance form whose values are shares (0..1): 0.999 | 'logits=0.999' | {'*': 0.99}."""
    out = _p_tolerance(v, via, key)
    for x in (out.values() if isinstance(out, dict) else [out]):
        if x > 1:
            raise OptionError(via, key, f"{x:g} is not a share between 0 and 1", "use e.g. 0.999 or OUTPUT=0.999")
    return out


def _p_calib(v, via, key):
    if isinstance(v, (str, Path)):
        if not str(v).strip():
            raise OptionError(via, key, "is empty", "give a data file or module:fn")
        return v if isinstance(v, Path) else v.strip()
    if via.name == "config":
        raise OptionError(via, key, f"is {type(v).__name__}, not a string", "give a data file (.npz/.npy/.pt) or file.py:fn")
    return v  # in-memory data: normalised by bnfold.data.DataSource


def _p_str(v, via, key):
    if isinstance(v, str) and v.strip():
        return v.strip()
    raise OptionError(via, key, f"is {type(v).__name__} {v!r}, not a non-empty string", None)


# ------------------------------------------------------------------------------- the table
CONVERT, VERIFY, CALIBRATE, INSPECT = "convert", "verify", "calibrate", "inspect"


@dataclass(frozen=True)
class Option:
    key: str  # API keyword and TOML key
    flag: str | None  # the CLI flag (None: API only)
    parse: Callable
    default: Any
    help: str
    commands: frozenset
    short: str | None = None
    metavar: str = ""  # the value's name in --help ("" for an on/off flag)
    repeat: bool = False  # the CLI flag may be given more than once
    config: bool = True  # a TOML key
    needs: tuple = ()  # "an option that has no effect is an error": the options it is meaningless without
    path: bool = False  # relative to the config file's folder
    models: frozenset = frozenset({"torch", "onnx"})  # the kinds of model it has an effect on


TORCH = frozenset({"torch"})  # an option of the PyTorch model: no effect on an ONNX one


def _o(key, flag, parse, default, help, commands, needs_calib=False, **kw):
    if needs_calib:
        kw["needs"] = ("calib",) + tuple(kw.get("needs", ()))
    return Option(key, flag, parse, default, help, frozenset(commands), **kw)


def model_kind(model: Any) -> str | None:
    """"onnx" or "torch" for a model as any interface passes it (spec, path, module); None: unknown."""
    if model is None:
        return None
    return "onnx" if isinstance(model, (str, Path)) and spec_kind(str(model)).kind == "onnx" else "torch"


_ALL = (CONVERT, VERIFY, CALIBRATE, INSPECT)
_CV = (CONVERT, VERIFY)
OPTIONS: dict[str, Option] = {o.key: o for o in (
    _o("weights", "--weights", _p_path, None, "state_dict checkpoint, read with torch.load(weights_only=True).", _ALL, short="-w", path=True, metavar="FILE", models=TORCH),
    _o("trust_pickle", "--trust-pickle", _p_bool, False, "Allow unpickling a checkpoint that holds Python objects (runs code: only for files you trust).", _ALL, needs=("weights",), models=TORCH),
    _o("input_shape", "--input-shape", _p_shapes, (), "Shape of one model input, e.g. 1,3,224,224; once per input.", (CONVERT, VERIFY, INSPECT), short="-s", metavar="SHAPE", repeat=True),
    _o("calib", "--calib", _p_calib, None, "Calibration data: .npz/.npy/.pt, module:fn or file.py:fn returning batches. BN statistics are recomputed from it (convert and verify also check the first samples).", (CONVERT, VERIFY, CALIBRATE), metavar="DATA"),
    _o("batch_size", "--batch-size", _p_int(1), None, "Cut calibration arrays into batches of this many samples (the paper's batch). Without it a whole array is one batch (a warning says so); module:fn data yields its own batches.", (CONVERT, VERIFY, CALIBRATE), short="-b", needs_calib=True, metavar="N", models=TORCH),
    _o("estimator", "--estimator", _p_enum(Estimator), Estimator.PAPER, "Population statistics: paper (the BN paper's, over batches) or pooled (over all samples).", (CONVERT, VERIFY, CALIBRATE), needs_calib=True, metavar="paper|pooled", models=TORCH),
    _o("opset", "--opset", _p_opset, None, "ONNX opset of the output, 7 to onnx's newest (default: the exporter's; for an .onnx input, its own); below 18 via the TorchScript exporter when dynamo cannot convert down.", (CONVERT,), metavar="N"),
    _o("dynamic_batch", "--dynamic-batch", _p_bool, False, "Dynamic first (batch) dimension: convert exports the file so; convert and verify check it at batch 1 and 4.", _CV, models=TORCH),
    _o("atol", "--atol", _p_tolerance, None, "Absolute tolerance: global (1e-4) or per output (output.logits=1e-3); repeatable.", _CV, metavar="[OUTPUT=]TOL", repeat=True),
    _o("rtol", "--rtol", _p_tolerance, None, "Relative tolerance: global or per output; repeatable.", _CV, metavar="[OUTPUT=]TOL", repeat=True),
    _o("min_top1", "--min-top1", _p_share, None, "Judge logits-shaped outputs (batch x classes) on top-1 agreement instead of atol: pass when at least this share of argmaxes agree (0.999, or per output logits=0.999); repeatable.", _CV, metavar="[OUTPUT=]SHARE", repeat=True),
    _o("explain", "--explain", _p_bool, False, "Name the first layer where the ONNX file leaves the reference beyond its float32 noise (done anyway when verification fails).", _CV),
    _o("providers", "--providers", _p_providers, None, "onnxruntime providers to verify on: cpu, cuda, tensorrt, rocm, migraphx, openvino, dml, coreml (default: those this onnxruntime build has; one asked for that cannot run here is reported).", _CV, metavar="cpu,cuda"),
    _o("require_providers", "--require-providers", _p_providers, (), "Providers that must really run (e.g. cuda), else exit 2.", _CV, metavar="cpu,cuda"),
    _o("verify", "--verify/--no-verify", _p_bool, True, "Verify the output or skip it (the report says so).", (CONVERT,)),
    _o("report", "--report", _p_out_path, None, "Write the JSON report here.", (CONVERT, VERIFY, CALIBRATE), short="-r", path=True, metavar="FILE"),
    _o("plot", "--plot", _p_plot, None, "Draw the BatchNorm layers whose stored running statistics drifted most from the population statistics "
       "as a bar chart (.png or .svg; needs matplotlib: pip install 'bnfold[plot]').", (CONVERT, CALIBRATE), needs_calib=True, path=True, metavar="FILE", models=TORCH),
    _o("overwrite", "--overwrite/--no-overwrite", _p_bool, True, "Replace an existing output (atomically) or refuse.", (CONVERT, CALIBRATE)),
    _o("keep_failed", "--keep-failed", _p_bool, False, "Write the output even when verification fails.", (CONVERT,)),
    _o("seed", "--seed", _p_int(0, INT64_MAX), 0, "Seed of the random verification inputs.", _CV, metavar="N"),
    _o("allow_tf32", "--allow-tf32", _p_bool, False,
       "On CUDA, let calibration use TF32 convolutions and matmuls (about 1.6x faster on an H200 for ResNet-50). "
       "Statistics then move by ~1e-4 relative, about 100x less than their sampling noise; the default keeps exact "
       "fp32 so GPU and CPU calibrations agree to ~1e-7. Verification always runs in true fp32.",
       (CONVERT, VERIFY, CALIBRATE), needs_calib=True, models=TORCH),
    _o("progress", None, _p_bool, False, "Show what each stage is doing on stderr (bnfold.progress): load, calibrate n/N, fold, export, verify.", (CONVERT, VERIFY, CALIBRATE), config=False),
)}
# config-only keys of a [[conversion]] table (positional arguments elsewhere)
ENTRY_KEYS = {"name": _p_str, "model": _p_str, "output": _p_str}
ALIASES = {"input_shapes": "input_shape"}  # accepted in config files, as the README documented


def _flag_table() -> dict[str, tuple[str, Any]]:
    table = {}
    for key, o in OPTIONS.items():
        if not o.flag:
            continue
        on, _, off = o.flag.partition("/")
        table[on] = (key, True if o.parse is _p_bool else None)
        if off:
            table[off] = (key, False)
    return table


def reword(err: BaseException, via: Via) -> BaseException:
    """Name options the way ``via`` spells them in a BnfoldError raised below the interface
    (``check --weights`` becomes ``check weights=`` for the API, ``key 'weights'`` for a config)."""

    if not isinstance(err, BnfoldError) or isinstance(err, OptionError) or not err.args:
        return err
    table = _flag_table()

    def sub(m):
        hit = table.get(m.group(0))
        if hit is None or via.name == "cli":
            return m.group(0)
        key, value = hit
        if via.name == "config":
            return f"{key} = {str(value).lower()}" if isinstance(value, bool) else f"key '{key}'"
        return f"{key}={value}" if isinstance(value, bool) else f"{key}="

    text = re.sub(r"--[a-z][a-z0-9-]*", sub, str(err))
    if text != str(err):
        err.args = (text,)
    return err


def parse_option(key: str, value: Any, via: Via | None = None):
    """One option's value through the table's parser (for public functions that take it alone,
    e.g. ``load_batches(batch_size=)``): the same check as ``ConvertOptions.build``."""
    return OPTIONS[key].parse(value, via or API, key)


def _fields_from_table(cls):
    """The dataclass of ``OPTIONS``: one field per option, its default from the table."""
    cls.__annotations__ = {**{key: "Any" for key in OPTIONS}, "given": "frozenset", "via": "Via"}
    for key, opt in OPTIONS.items():
        setattr(cls, key, opt.default)
    cls.given = field(default=frozenset(), compare=False, repr=False)  # keys set explicitly
    cls.via = field(default=API, compare=False, repr=False)
    return dataclass(frozen=True)(cls)


@_fields_from_table
class ConvertOptions:
    """Every convert/verify/calibrate/inspect option, typed and validated: one field per row of
    ``OPTIONS`` (``opts.batch_size``, ``opts.allow_tf32``, ...), with the table's default."""

    @classmethod
    def build(cls, values: Mapping[str, Any], *, via: Via = API, command: str = CONVERT, base: Path | None = None,
              model: Any = None) -> "ConvertOptions":
        """The one validation of options: unknown, misplaced, ill-typed or ignored options are errors.

        ``values``: key -> value for the options that were given (None means "not given").
        ``base``: the folder relative paths resolve against (config files). ``model``: the model the
        options are for (a spec, a path or a module), when known: options without effect on it are errors.
        """
        parsed: dict[str, Any] = {}
        for key, value in values.items():
            if value is None:
                continue
            opt = OPTIONS.get(key)
            if opt is None or (via.name == "config" and not opt.config):
                known = [k for k, o in OPTIONS.items() if command in o.commands and (o.config or via.name != "config")]
                close = difflib.get_close_matches(key, known, n=1)
                raise OptionError(via, key, "is unknown" if via.name != "api" else "is not an option",
                                  f"did you mean '{close[0]}'?" if close else f"known: {', '.join(known)}")
            if command not in opt.commands:
                raise OptionError(via, key, f"has no meaning for {command}", f"{command} takes {', '.join(via.key(k).strip() for k, o in OPTIONS.items() if command in o.commands and o.config)}")
            v = opt.parse(value, via, key)
            if opt.path and base is not None and isinstance(v, Path) and not v.is_absolute():
                v = base / v
            parsed[key] = v
        if "calib" in parsed and base is not None:
            parsed["calib"] = relocate_spec(parsed["calib"], base)
        if not (isinstance(via, ConfigVia) and via.table == "defaults"):  # [defaults] are checked with each table
            _check_effect(parsed, via, model_kind(model))
        if "require_providers" in parsed:
            extra = [p for p in parsed["require_providers"] if p not in (parsed.get("providers") or ())]
            if extra and "providers" in parsed:
                raise OptionError(via, "require_providers", f"names {', '.join(map(str, extra))}, which providers leaves out",
                                  "add it to providers too")
        if parsed.get("verify") is False:
            for key in ("atol", "rtol", "min_top1", "explain", "providers", "require_providers", "keep_failed"):
                if key in parsed:
                    raise OptionError(via, key, "has no effect when verification is off, so it would be ignored", "drop one of them")
        return cls(**parsed, given=frozenset(parsed), via=via)

    @classmethod
    def resolve(cls, options: "ConvertOptions | None", kw: Mapping[str, Any], command: str, model: Any = None) -> "ConvertOptions":
        """A public function's options: one ConvertOptions (``options=``) or its keywords, not both."""
        if options is not None and kw:
            raise BadInputError(f"options= and keywords ({', '.join(kw)}) were both given", "pass one ConvertOptions or keywords, not both")
        if options is None:
            return cls.build(kw, via=API, command=command, model=model)
        if not isinstance(options, cls):
            raise BadInputError(f"options= is a {type(options).__name__}", "pass a bnfold.ConvertOptions or keywords")
        _check_effect({k: getattr(options, k) for k in options.given}, options.via, model_kind(model))
        return options

    def with_defaults(self, defaults: Mapping[str, Any]) -> "ConvertOptions":
        """Options not given explicitly take ``defaults`` (already parsed values, e.g. an artifact's provenance)."""
        upd = {k: v for k, v in defaults.items() if k not in self.given and k in OPTIONS}
        return replace(self, **upd) if upd else self

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly values of every option but ``progress`` (enums and paths as strings)."""
        return {key: _plain(getattr(self, key)) for key in OPTIONS if key != "progress"}


def applies(key: str, model: Any) -> bool:
    """Whether option ``key`` has an effect on ``model`` (a spec, path or module; None: unknown)."""
    kind = model_kind(model)
    return kind is None or kind in OPTIONS[key].models


def _check_effect(parsed: Mapping[str, Any], via: Via, kind: str | None) -> None:
    """"An option that has no effect is an error" (docs/trust.md), from the table's data: an option
    for another kind of model (``models``), or one given without the option it needs (``needs``)."""
    for key in parsed:
        opt = OPTIONS[key]
        if kind is not None and kind not in opt.models:
            raise OptionError(via, key, "has no meaning for an ONNX model, so it would be ignored", "drop it, or pass the PyTorch model spec")
        missing = next((n for n in opt.needs if n not in parsed), None)
        if missing == "calib":
            raise OptionError(via, key, "is given without calibration data, so it would be ignored",
                              f"add {via.key('calib').strip()} DATA or drop it" if via.name == "cli" else "add calib or drop it")
        if missing is not None:
            named = via.key(missing).strip()
            raise OptionError(via, key, f"is given without {named}, so it would be ignored", f"add {named} or drop it")


def _plain(v):
    if isinstance(v, Enum):
        return v.value
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, (str, int, float, bool, dict)) or v is None:
        return v
    return f"<{type(v).__name__}>"  # in-memory calibration data
