"""Atomic file writes and hashing, shared by every stage that writes.

A file is written to a hidden temporary file in the target folder and renamed into place, so a
reader (or a crash, SIGINT or SIGTERM) never sees half a file. The temporary file is removed on any
failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import OutputPathError


def check_output_path(path: str | Path, *, force: bool = True, what: str = "output") -> Path:
    """Fail early (before any work) when ``path`` cannot be written."""
    p = Path(path)
    if str(path).strip() == "":
        raise OutputPathError(f"empty {what} path", "pass a file name")
    if p.is_dir():
        raise OutputPathError(f"{what} path '{p}' is a folder", "pass a file name inside it")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise OutputPathError(f"folder '{parent}' for the {what} does not exist", "create it first")
    if not parent.is_dir():
        raise OutputPathError(f"'{parent}' is not a folder", f"choose another {what} path")
    try:  # a real probe: os.access() says yes to root even where writing fails
        fd, probe = tempfile.mkstemp(prefix=".bnfold-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError:
        raise OutputPathError(f"folder '{parent}' is not writable", f"choose a writable folder for the {what}") from None
    if p.exists() and not force:
        raise OutputPathError(f"{what} '{p}' already exists", "pass --force to overwrite it")
    return p


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds."""
    path = Path(path)
    # one leading dot only: onnx refuses external-data locations that contain ".."
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.lstrip('.')}.", suffix=suffix + ".tmp", dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_with(path: str | Path, writer: Callable[[Path], None]) -> Path:
    """Let ``writer`` fill a temporary file, then rename it into place."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
