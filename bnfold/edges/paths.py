"""Trust rule "no output on an input" (docs/trust.md): no output on an input, on another output, or on a special file.

``check_run_paths(inputs, outputs)`` is called once per run, before any work: it resolves every path
(symlinks, ``..``, hard links through device and inode), refuses any output that is the same file as an
input or another output, and any output that exists and is not a regular file (FIFO, device, socket,
folder) or names a folder (trailing ``/``). Each refusal is ``OutputPathError`` (exit 2) naming both
paths. It also has ``files.watch`` remember the outputs as they were, so that an interruption can say
truthfully which of them this run replaced (``files.written_message``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Union

from bnfold.edges.files import check_output_path, watch
from bnfold.edges.load import spec_kind
from bnfold.errors import ConfigError, OutputPathError

PathLike = Union[str, "os.PathLike[str]"]

class _Ref:
    __slots__ = ("label", "raw", "real", "inode")

    def __init__(self, label: str, raw: PathLike):
        self.label = label
        self.raw = str(raw)
        self.real = os.path.realpath(os.path.abspath(os.fspath(raw)))
        try:
            st = os.stat(self.real)
            self.inode = (st.st_dev, st.st_ino)
        except OSError:
            self.inode = None

    def same(self, other: "_Ref") -> bool:
        if self.real == other.real:
            return True
        return self.inode is not None and self.inode == other.inode

    def __str__(self) -> str:
        shown = f"'{self.raw}'"
        if self.real != os.path.abspath(self.raw):
            shown += f" (-> {self.real})"
        return f"{self.label} {shown}"


def spec_files(spec: str | None) -> list[str]:
    """The files a model or data spec reads: ``x.py:fn`` → x.py, ``x.onnx`` → x.onnx and its data, a data file."""
    if not spec or not isinstance(spec, (str, os.PathLike)):
        return []
    text = os.fspath(spec)
    parts = spec_kind(text)
    if parts.kind == "onnx":
        return [text, *onnx_data_files(text)]
    if parts.kind in ("data", "file"):
        return [parts.target]
    return [text] if os.path.exists(text) else []


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
    found: list[str] = []

    def visit(tensors):
        for t in tensors:
            for e in t.external_data:
                if e.key == "location":
                    f = os.path.join(folder, e.value)
                    if f not in found:
                        found.append(f)

    visit(m.graph.initializer)
    for n in m.graph.node:
        for a in n.attribute:
            if a.HasField("t"):
                visit([a.t])
    return found


def _items(mapping: Mapping[str, PathLike | Iterable[PathLike] | None]) -> list[tuple[str, PathLike]]:
    out = []
    for label, value in mapping.items():
        if value is None:
            continue
        if isinstance(value, (str, os.PathLike)):
            out.append((label, value))
        else:
            out.extend((label, v) for v in value if v is not None)
    return out


def check_run_paths(
    inputs: Mapping[str, PathLike | Iterable[PathLike] | None],
    outputs: Mapping[str, PathLike | None],
    *,
    no_overwrite: Iterable[str] = (),
    sidecars: Mapping[str, Iterable[str]] | None = None,
) -> dict[str, Path]:
    """Check a run's paths before any work; returns {output label: Path}.

    ``inputs``: label → path (or list of paths, or None) of every file the run reads.
    ``outputs``: label → path (or None) of every file the run writes. ``no_overwrite``: the output
    labels that must not exist yet (--no-overwrite). ``sidecars``: output label → suffixes
    of files written beside it (``[".data"]`` for an ONNX file's external data), checked as outputs too.
    """
    outs = [(label, raw) for label, raw in _items(outputs)]
    checked: dict[str, Path] = {}
    for label, raw in outs:
        checked[label] = check_output_path(raw, force=label not in set(no_overwrite), what=label)
    out_refs = [_Ref(label, raw) for label, raw in outs]
    for label, suffixes in (sidecars or {}).items():
        if label in checked:
            for suf in suffixes:
                out_refs.append(_Ref(f"{label} {suf} file", str(checked[label]) + suf))
    in_refs = [_Ref(label, raw) for label, raw in _items(inputs)]
    for i, a in enumerate(out_refs):
        for b in out_refs[:i]:
            if a.same(b):
                raise OutputPathError(f"{a} and {b} are the same file", "give every output its own path")
        for b in in_refs:
            if a.same(b):
                raise OutputPathError(f"{a} is the same file as {b}: bnfold would overwrite its input",
                                      "write the output somewhere else")
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
