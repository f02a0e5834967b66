"""Trust rule "no output on an input" (docs/trust.md): no output on an input, on another output, or on a special file.

``check_run_paths(inputs, outputs)`` is called once per run, before any work: it resolves every path
(symlinks, ``..``, hard links through device and inode), refuses any output that is the same file as an
input or another output, and any output that exists and is not a regular file (FIFO, device, socket,
folder) or names a folder (trailing ``/``). Each refusal is ``OutputPathError`` (exit 2) naming both
paths. It also has ``files.watch`` remember the outputs as they were, so that an interruption can say
truthfully which of them this run replaced (``files.written_message``).

"Inputs are inputs, wherever they come from" (docs/trust.md): the inputs of a run are collected here,
once — a model or data spec's source file (``file.py:fn`` and ``pkg.mod:fn`` alike, found without
importing it), weights, calibration files, the config, an ONNX file *and its external data* — and
every output (``-o``, ``--report``, a calibrated state_dict, a config's outputs, and what is appended
to, like ``$GITHUB_STEP_SUMMARY``: ``check_appendable``) is checked against them in ``check_run_paths``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterable, Mapping, Self, Union

from bnfold.edges.files import check_output_path, file_identity, note_inputs, run_inputs, watch
from bnfold.edges.load import spec_kind
from bnfold.errors import ConfigError, OutputPathError

PathLike = Union[str, "os.PathLike[str]"]

class _Ref:
    __slots__ = ("label", "raw", "real", "inode")

    def __init__(self, label: str, raw: PathLike):
        self.label = label
        self.raw = str(raw)
        self.real = os.path.realpath(os.path.abspath(os.fspath(raw)))
        ident = file_identity(self.real)
        self.inode = ident[:2] if ident else None

    def same(self, other: "_Ref") -> bool:
        return self.real == other.real or (self.inode is not None and self.inode == other.inode)

    def __str__(self) -> str:
        shown = f"'{self.raw}'"
        if self.real != os.path.abspath(self.raw):
            shown += f" (-> {self.real})"
        return f"{self.label} {shown}"


def spec_files(spec: str | None) -> list[str]:
    """The files a model or data spec reads: ``x.py:fn`` → x.py, ``x.onnx`` → x.onnx and its data, a data file."""
    if not isinstance(spec, (str, os.PathLike)) or not spec:  # in-memory data (a tensor has no truth value)
        return []
    text = os.fspath(spec)
    parts = spec_kind(text)
    if parts.kind == "onnx":
        return [text, *onnx_data_files(text)]
    if parts.kind in ("data", "file"):
        return [parts.target]
    if parts.kind == "module":
        found = module_source(parts.target)
        return [found] if found else []
    return [text] if os.path.exists(text) else []


def module_source(name: str) -> str | None:
    """The source file the import system would find for a dotted module name, searched along
    ``sys.path`` without importing anything (so a check before any work runs no user code)."""
    rel = name.split(".")
    for entry in sys.path:
        folder = os.path.join(entry or os.getcwd(), *rel)
        for candidate in (folder + ".py", os.path.join(folder, "__init__.py")):
            if os.path.isfile(candidate):
                return candidate
    return None


def onnx_data_files(path: PathLike) -> list[str]:
    """The external-data files an ONNX model reads (they are inputs too); [] when unreadable."""
    try:
        if not os.path.isfile(path):
            return []
        import onnx

        m = onnx.load(os.fspath(path), load_external_data=False)
    except Exception:
        return []
    folder = os.path.dirname(os.fspath(path))
    tensors = [*m.graph.initializer, *(a.t for n in m.graph.node for a in n.attribute if a.HasField("t"))]
    found = (os.path.join(folder, e.value) for t in tensors for e in t.external_data if e.key == "location")
    return list(dict.fromkeys(found))


def _items(mapping: Mapping[str, PathLike | Iterable[PathLike] | None]) -> list[tuple[str, PathLike]]:
    return [(label, v) for label, value in mapping.items() if value is not None
            for v in ([value] if isinstance(value, (str, os.PathLike)) else value) if v is not None]


def _input_refs(inputs: Mapping[str, PathLike | Iterable[PathLike] | None]) -> list[_Ref]:
    """Every file the run reads: the given ones, and the external data of every ONNX file among them."""
    refs = []
    for label, raw in _items(inputs):
        refs.append(_Ref(label, raw))
        if os.fspath(raw).lower().endswith(".onnx"):
            refs.extend(_Ref(f"{label}'s external data", f) for f in onnx_data_files(raw) if f != os.fspath(raw))
    return refs


def check_appendable(path: PathLike, what: str) -> bool:
    """A file bnfold appends to at the end of a run (``$GITHUB_STEP_SUMMARY``) that is one of the run's
    inputs or outputs is left alone, with a warning on stderr: True when it may be appended to."""
    ref = _Ref(what, path)
    hit = next((label for real, (label, inode) in run_inputs().items()
                if ref.real == real or (ref.inode is not None and ref.inode == inode)), None)
    if hit is None:
        return True
    sys.stderr.write(f"bnfold: warning: {ref} is the same file as {hit}, a file of this run: "
                     "nothing was appended to it; the results above stand\n")
    return False


def check_run_paths(
    inputs: Mapping[str, PathLike | Iterable[PathLike] | None],
    outputs: Mapping[str, PathLike | None],
    *,
    no_overwrite: bool = False,
    sidecars: Mapping[str, Iterable[str]] | None = None,
) -> dict[str, Path]:
    """Check a run's paths before any work; returns {output label: Path}.

    ``inputs``: label → path (or list of paths, or None) of every file the run reads (an ONNX file's
    external data is added here). ``outputs``: label → path (or None) of every file the run writes.
    ``no_overwrite``: --no-overwrite, which protects *every* output. ``sidecars``: output label → suffixes
    of files written beside it (``[".data"]`` for an ONNX file's external data), checked as outputs too.
    """
    outs = _items(outputs)
    out_refs = [_Ref(label, raw) for label, raw in outs]
    for label, suffixes in (sidecars or {}).items():
        raw = dict(outs).get(label)
        if raw is not None:
            out_refs.extend(_Ref(f"{label} {suf} file", os.fspath(raw) + suf) for suf in suffixes)
    in_refs = _input_refs(inputs)
    note_inputs({r.real: (f"{r.label} '{r.raw}'", r.inode) for r in in_refs})
    for i, a in enumerate(out_refs):
        for b in out_refs[:i]:
            if a.same(b):
                raise OutputPathError(f"{a} and {b} are the same file", "give every output its own path")
        for b in in_refs:
            if a.same(b):
                raise OutputPathError(f"{a} is the same file as {b}: bnfold would overwrite its input",
                                      "write the output somewhere else")
    force = not no_overwrite
    checked = {label: check_output_path(raw, force=force, what=label) for label, raw in outs}
    for r in out_refs[len(outs):]:  # sidecars: only --no-overwrite concerns them
        if not force and os.path.lexists(r.raw):
            raise OutputPathError(f"{r} already exists and --no-overwrite is set", "remove it, choose another path, or drop --no-overwrite")
    for r in out_refs:
        watch(r.real)
    return checked


def check_config_paths(config: PathLike, entries: list[dict], report: PathLike | None = None) -> None:
    """``check_run_paths`` for a whole batch: every entry's inputs and outputs (ONNX file, its external
    data, report, manifest, plot), the config file and the summary report, checked against each other."""

    inputs: dict[str, object] = {"the config file": config}
    outputs: dict[str, object] = {}
    sidecars: dict[str, list[str]] = {}
    for i, e in enumerate(entries):
        tag, opts = f"conversion #{i + 1} ({e['name']})", e["options"]
        inputs.update({f"{tag} model": spec_files(e["model"]), f"{tag} weights": opts.weights, f"{tag} calib": spec_files(opts.calib)})
        outputs.update({f"{tag} output": e["output"], f"{tag} report": opts.report, f"{tag} plot": opts.plot})
        sidecars[f"{tag} output"] = [".data", ".manifest.json"]
    outputs["--report"] = report
    try:
        check_run_paths(inputs, outputs, sidecars=sidecars)
    except OutputPathError as err:
        raise ConfigError(f"{config}: {err.problem}", err.fix) from err


# ------------------------------------------------------------------------------ what a run read
_RECORDING: list[dict[str, None]] = []  # open recorders (innermost last): path -> None, in order of first read
_HOOKED: list[bool] = []


_SYSTEM_FOLDERS = ("/proc/", "/sys/", "/dev/", "/etc/", "/usr/", "/lib/", "/lib64/", "/bin/", "/sbin/")


def _system_file(real: str) -> bool:
    """A file of the Python installation, an installed package, bnfold itself or the kernel: versions
    (recorded apart) say when those change, so they are not a run's inputs."""
    parts = real.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts or real.startswith(_SYSTEM_FOLDERS):
        return True
    own = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]  # the bnfold package, and its CLI
    cli = getattr(sys.modules.get("bnfold_cli"), "__file__", None)
    own += [os.path.dirname(cli)] if isinstance(cli, str) else []
    prefixes = {os.path.realpath(p) + os.sep for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, *own)}
    return real.startswith(tuple(prefixes)) or any(p.startswith(".bnfold-") for p in parts)


def _audit(event: str, args: tuple) -> None:
    if event != "open" or not _RECORDING:
        return
    path, mode, flags = (tuple(args) + (None, None, None))[:3]
    if not isinstance(path, (str, bytes, os.PathLike)):
        return
    writes = any(c in mode for c in "wax+") if isinstance(mode, str) else isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR))
    if not writes:
        real = os.path.realpath(os.fsdecode(path))
        for rec in _RECORDING:
            rec.setdefault(real, None)


class RunReads:
    """``with RunReads() as reads:`` — every file this process opens for reading inside the block
    (through Python: ``open``, ``np.load``, ``torch.load``, imports); ``reads.files()`` adds the file of
    every module in ``sys.modules`` (imported earlier, so not opened again), and leaves out the Python
    installation, installed packages, bnfold and system folders. The inputs of "change detection that
    sees every input" (docs/ci.md): more files than needed means a run too many, never a skip too many."""

    def __enter__(self) -> Self:
        if not _HOOKED:
            sys.addaudithook(_audit)  # for the life of the process: it does nothing outside a block
            _HOOKED.append(True)
        self.seen: dict[str, None] = {}
        _RECORDING.append(self.seen)
        return self

    def __exit__(self, *exc) -> None:
        _RECORDING.remove(self.seen)

    def files(self) -> list[str]:
        found = dict(self.seen)
        for mod in list(sys.modules.values()):
            f = getattr(mod, "__file__", None)
            if isinstance(f, str):
                found.setdefault(os.path.realpath(f), None)
        return [f for f in found if not _system_file(f) and os.path.isfile(f)]
