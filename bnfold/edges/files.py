"""Every file bnfold writes goes through here: atomic writes, one transaction per run, honest errors.

* **Atomic**: a file is written under a hidden temporary name beside its target and renamed into place,
  so a reader (or a crash, SIGINT or SIGTERM) never sees half a file. Temporary names are short
  (derived from a hash, never longer than the target's name allows).
* **All or nothing** (trust rule "outputs commit together"): inside ``with OutputSet() as outs:`` every write — the ONNX file,
  its external data, the report, the manifest — lands in a private staging folder beside its target
  (``.bnfold-XXXX/<final name>``, so an ONNX model finds its external data by its final name) and is
  renamed onto its target only when the block ends without an error. On an error or an interruption
  every staged file is removed and nothing is replaced. ``write_bytes_atomic`` & co. join the innermost
  open ``OutputSet`` by themselves; nested sets commit with the outermost one.
* **The environment's errors are bad input** (trust rule "environment errors are bad input"): ENOSPC, EDQUOT, EFBIG, ENAMETOOLONG, EROFS,
  EACCES, EPERM… while writing become ``OutputPathError`` (exit 2) naming the final path and the cause.
* **True messages**: the one record of what a run wrote (``watch``, ``written_message``): what this
  process renamed into place, and which watched outputs changed on disk whichever process wrote them;
  errors raised inside an ``OutputSet`` name final paths, never staging names.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import hashlib
import os
import secrets
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from bnfold.errors import BnfoldError, OutputPathError

# errno -> what to tell the user
ENV_ERRNOS: dict[int, str] = {
    _errno.ENOSPC: "free some disk space or write to another disk",
    _errno.EDQUOT: "free some of your disk quota or write elsewhere",
    _errno.EFBIG: "the file system cannot hold a file this large: write to another one",
    _errno.ENAMETOOLONG: "use a shorter file name",
    _errno.EROFS: "the file system is read-only: write to another folder",
    _errno.EACCES: "check the permissions, or write to another folder",
    _errno.EPERM: "check the permissions, or write to another folder",
    _errno.ENOENT: "the folder disappeared while bnfold was writing: check the path",
    _errno.ENOTDIR: "a part of the path is not a folder: check the path",
    _errno.EISDIR: "the path is a folder: pass a file name",
    _errno.EIO: "the disk reported an I/O error: check it, or write elsewhere",
    _errno.EMLINK: "the folder holds too many entries: write elsewhere",
    _errno.ETXTBSY: "the file is in use: close what uses it",
    _errno.EBUSY: "the file is in use: close what uses it",
    _errno.EXDEV: "write beside the target (the staging folder must be on the same file system)",
}

_NAME_MAX = 255
_COMMITTED: list[Path] = []  # final paths renamed into place by this process, in order
_WATCHED: dict[str, tuple | None] = {}  # a run's output (real path) -> its identity before the run (None: absent)
_OPEN_SETS: list["OutputSet"] = []
_INPUTS: dict[str, tuple[str, tuple | None]] = {}  # every input of this command's runs: real path -> (label, (dev, inode))


def env_error(err: OSError, path: str | Path, what: str = "") -> OutputPathError:
    """The one-line bad-input error for an OSError met while writing ``path``."""
    code = err.errno
    name = _errno.errorcode.get(code, str(code)) if code is not None else type(err).__name__
    why = os.strerror(code) if code is not None else str(err)
    fix = ENV_ERRNOS.get(code, "check the path and the disk")
    e = OutputPathError(f"cannot write {what + ' ' if what else ''}'{path}': {why} ({name})", fix)
    e.__cause__ = err
    return e


def is_env_error(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in ENV_ERRNOS


@contextlib.contextmanager
def env_errors(path: str | Path, what: str = "") -> Iterator[None]:
    """Turn the environment's OSErrors inside the block into OutputPathError naming ``path``."""
    try:
        yield
    except OSError as err:
        if is_env_error(err):
            raise env_error(err, path, what) from err
        raise


def temp_name(target: str | Path, suffix: str = ".tmp") -> str:
    """A hidden temporary file name for ``target`` that fits NAME_MAX whatever the target's length."""
    name = Path(target).name.lstrip(".")
    tag = secrets.token_hex(4)
    # one leading dot only: onnx refuses external-data locations that contain ".."
    keep = _NAME_MAX - len(suffix) - len(tag) - 4 - 17
    if len(name.encode()) > keep:
        name = name.encode()[: max(8, keep // 2)].decode("utf-8", "ignore") + "-" + hashlib.sha256(name.encode()).hexdigest()[:16]
    return f".{name}.{tag}{suffix}"


# ------------------------------------------------------------------------------ output checks
def check_output_path(path: str | Path, *, force: bool = True, what: str = "output") -> Path:
    """Fail early (before any work) when ``path`` cannot be written as a regular file."""
    raw = str(path)
    if raw.strip() == "":
        raise OutputPathError(f"empty {what} path", "pass a file name")
    if raw.endswith(("/", os.sep, "/.", "/..")) or raw in (".", ".."):
        raise OutputPathError(f"{what} path '{raw}' names a folder, not a file", "pass a file name inside it")
    p = Path(path)
    if len(p.name.encode()) > _NAME_MAX:
        raise OutputPathError(f"{what} file name '{p.name[:40]}…' is {len(p.name.encode())} bytes long, beyond the 255 a file system allows",
                              "use a shorter file name")
    try:
        st = os.stat(p)  # follows symlinks: what a write would reach
    except FileNotFoundError:
        st = None
    except OSError as err:
        raise env_error(err, p, what) from err
    if os.path.islink(p):  # bnfold renames a new file onto its target: that would replace the link itself
        raise OutputPathError(f"{what} path '{p}' is a symbolic link (-> {os.path.realpath(p)}), not a regular file",
                              "pass the path of a regular file (bnfold never stages in, or renames onto, a link or a special file)")
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise OutputPathError(f"{what} path '{p}' is a folder", "pass a file name inside it")
        if not stat.S_ISREG(st.st_mode):
            kind = _kind(st.st_mode)
            target = os.path.realpath(p)
            raise OutputPathError(f"{what} path '{p}'{'' if target == os.path.abspath(p) else f' (-> {target})'} is {kind}, not a regular file",
                                  "pass the path of a regular file (bnfold never writes to special files)")
    parent = p.parent  # Path("x").parent is Path("."), never ""
    if not parent.exists():
        raise OutputPathError(f"folder '{parent}' for the {what} does not exist", "create it first")
    if not parent.is_dir():
        raise OutputPathError(f"'{parent}' is not a folder", f"choose another {what} path")
    try:  # a real probe: os.access() says yes to root even where writing fails
        fd, probe = tempfile.mkstemp(prefix=".bnfold-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        if err.errno in (_errno.EACCES, _errno.EPERM, _errno.EROFS):
            raise OutputPathError(f"folder '{parent}' is not writable ({os.strerror(err.errno)})",
                                  f"choose a writable folder for the {what}") from None
        raise env_error(err, parent, f"in the folder of the {what}") from None
    if st is not None and not force:
        raise OutputPathError(f"{what} '{p}' already exists and --no-overwrite is set",
                              "remove it, choose another path, or drop --no-overwrite")
    return p


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


# ------------------------------------------------------------------------------ the transaction
class OutputSet:
    """Files staged together and committed (renamed into place) together; see the module docstring."""

    def __init__(self) -> None:
        self._dirs: list[tuple[Path, Path]] = []  # (target folder, staging folder created by us)
        self._staged: dict[Path, Path] = {}  # final path -> staged path, in staging order
        self._discarded: set[Path] = set()
        self.committed: list[Path] = []
        self._parent: OutputSet | None = None
        self._locks: list[int] = []  # one held lock per staging folder: it says "alive" to other runs

    # --- context
    def __enter__(self) -> "OutputSet":
        self._parent = _OPEN_SETS[-1] if _OPEN_SETS else None
        _OPEN_SETS.append(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        _OPEN_SETS.remove(self)
        if exc is not None:
            self._rename_in_error(exc)
            self.rollback()
        elif self._parent is not None:
            self._parent._adopt(self)
        else:
            self.commit()
        return False

    # --- staging
    def _staging_dir(self, folder: Path) -> Path:
        for f, d in self._dirs:
            if f == folder:
                return d
        sweep_stale_staging(folder)
        try:
            d = tempfile.mkdtemp(prefix=_staging_prefix(), dir=folder)
        except OSError as err:
            raise env_error(err, folder, "a staging folder in") from err
        try:
            self._locks.append(_hold_lock(d))
        except OSError as err:
            shutil.rmtree(d, ignore_errors=True)
            raise env_error(err, folder, "a staging folder in") from err
        staging = folder / os.path.basename(d)
        self._dirs.append((folder, staging))
        return staging

    def reserve(self, final: str | Path) -> Path:
        """The path to write ``final``'s new content to (same file name, in the staging folder)."""
        final = Path(final)
        if final in self._staged:
            return self._staged[final]
        staged = self._staging_dir(final.parent) / final.name
        self._staged[final] = staged
        self._discarded.discard(final)
        return staged

    def discard(self, *finals: str | Path) -> None:
        """Drop staged files (e.g. an ONNX file that failed verification): they will not be committed."""
        for f in map(Path, finals):
            if f not in self._staged:  # also accept a staged path
                f = next((final for final, staged in self._staged.items() if staged == f), f)
            staged = self._staged.pop(f, None)
            if staged is not None:
                self._discarded.add(f)
                with contextlib.suppress(FileNotFoundError):
                    staged.unlink()
            else:
                for folder, d in self._dirs:  # a sidecar written into a staging folder unregistered
                    if f.parent in (d, folder):
                        with contextlib.suppress(FileNotFoundError):
                            (d / f.name).unlink()
                        self._discarded.add(folder / f.name)

    def _adopt(self, child: "OutputSet") -> None:
        """A nested set ended well: its files commit with this one."""
        self._dirs.extend(child._dirs)
        self._locks.extend(child._locks)
        child._locks = []
        for final, staged in child._staged.items():
            self._staged.pop(final, None)
            self._staged[final] = staged
        self._discarded |= child._discarded

    def staged_files(self) -> list[tuple[Path, Path]]:
        """(staged, final) pairs to commit: registered files, plus unregistered ones (an ONNX model's
        external data) written into a staging folder, first."""
        registered = set(self._staged.values())
        extra = [(child, folder / child.name) for folder, d in self._dirs if d.is_dir()
                 for child in sorted(d.iterdir())
                 if child not in registered and not child.name.startswith(".") and child.is_file()
                 and folder / child.name not in self._discarded]
        return extra + [(s, f) for f, s in self._staged.items() if s.exists()]

    def commit(self) -> list[Path]:
        """Rename every staged file onto its target; returns (and records) what was committed."""
        try:
            for staged, final in self.staged_files():
                with contextlib.suppress(OSError):
                    os.chmod(staged, 0o644)
                try:
                    os.replace(staged, final)
                except OSError as err:
                    done = ", ".join(map(str, self.committed)) or "nothing"
                    e = env_error(err, final)
                    raise OutputPathError(f"{e.problem}; already in place: {done}", e.fix) from err
                self.committed.append(final)
                _COMMITTED.append(final)
        finally:
            self._remove_dirs()
        return self.committed

    def rollback(self) -> None:
        self._staged.clear()
        self._remove_dirs()

    def _remove_dirs(self) -> None:
        for _, d in self._dirs:
            shutil.rmtree(d, ignore_errors=True)
        self._dirs.clear()
        for fd in self._locks:  # after the folders are gone: never "dead" while they exist
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._locks.clear()

    def _rename_in_error(self, exc: BaseException) -> None:
        """Errors name the final paths the user gave, never staging names."""
        if isinstance(exc, KeyboardInterrupt) or not self._dirs:
            return
        subs = sorted(((form + os.sep, (str(folder) + os.sep) if str(folder) not in ("", ".") else "")
                       for folder, d in self._dirs
                       for form in {str(d), os.path.abspath(d), os.path.realpath(d)}),
                      key=lambda s: -len(s[0]))

        def fix(text):
            if not isinstance(text, str):
                return text
            for a, b in subs:
                text = text.replace(a, b)
            return text

        try:
            if isinstance(exc, BnfoldError):
                exc.problem, exc.fix = fix(exc.problem), fix(exc.fix)
            if isinstance(exc, OSError):
                exc.filename, exc.filename2 = fix(exc.filename), fix(exc.filename2)
            exc.args = tuple(fix(a) for a in exc.args)
        except Exception:  # an exception type that refuses new args: keep it as it is
            pass


def _staging_prefix(pid: int | None = None) -> str:
    """``.bnfold-<host>-<pid>-``: names a staging folder for people; liveness is its lock (``_hold_lock``)."""
    import socket

    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
    return f".bnfold-{host}-{os.getpid() if pid is None else pid}-"


STAGING_LOCK = ".lock"


def _hold_lock(folder: str | Path) -> int:
    """"A staging folder's owner holds its lock" (docs/trust.md): an exclusive ``flock`` on
    ``<folder>/.lock``, held (the fd stays open) for the folder's whole life. The kernel releases it
    when the owner exits however it dies (SIGKILL, ``os._exit``, the OOM killer), whatever its pid
    namespace or host: a lock that can be taken is the only proof that the owner is gone."""
    import fcntl

    # locked under a private name, then renamed: no other run ever sees the lock file unlocked
    private = os.path.join(folder, f"{STAGING_LOCK}.{secrets.token_hex(4)}")
    fd = os.open(private, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (_errno.ENOLCK, _errno.EOPNOTSUPP, _errno.ENOSYS):  # no locks here: the folder is
            return -1  # never provably dead to another run, so only this one removes it
        raise
    try:
        os.rename(private, os.path.join(folder, STAGING_LOCK))
    except OSError:
        os.close(fd)
        raise
    return fd


def _owner_gone(folder: str) -> bool:
    """True only when the folder's lock can be taken (its owner is provably gone). A folder without a
    lock file (being created, or made by something else) or whose lock is held is left alone."""
    import fcntl

    try:
        fd = os.open(os.path.join(folder, STAGING_LOCK), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def sweep_stale_staging(folder: str | Path) -> list[Path]:
    """Remove staging folders in ``folder`` whose owner is provably gone (its lock can be taken: a bnfold
    process killed by SIGKILL, ``os._exit`` in user code, the OOM killer, on any host or pid namespace
    sharing the folder). A live owner's folder is never touched. Returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(folder if str(folder) else "."))
    except OSError:
        return removed
    for e in entries:
        if not e.name.startswith(".bnfold-") or not e.is_dir(follow_symlinks=False) or not _owner_gone(e.path):
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        removed.append(Path(e.path))
    return removed


# ------------------------------------------------------------------------------ what a run wrote
def file_identity(path: str) -> tuple | None:
    """(device, inode, size, mtime) of ``path``; None when it does not exist. A change: it was written."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def begin_run() -> None:
    """Forget earlier runs of this process (the CLI calls it once per command)."""
    _WATCHED.clear()
    _COMMITTED.clear()
    _INPUTS.clear()


def note_inputs(inputs: dict[str, tuple[str, tuple | None]]) -> None:
    """Remember inputs of this command (``paths.check_run_paths`` collects them): what it appends to
    at the end (``paths.check_appendable``) is checked against every one of them."""
    for real, info in inputs.items():
        _INPUTS.setdefault(real, info)


def run_inputs() -> dict[str, tuple[str, tuple | None]]:
    """This command's inputs, and its outputs (``watch``): real path -> (label, (dev, inode))."""
    outputs = {real: (f"the output '{real}'", before[:2] if before else None) for real, before in _WATCHED.items()}
    return {**outputs, **_INPUTS}


def watch(real: str) -> None:
    """Remember an output of this run (a resolved path) as it is before any work."""
    _WATCHED.setdefault(real, file_identity(real))


def written() -> list[str]:
    """What this process committed (in that order), then the watched outputs that changed on disk."""
    seen = dict.fromkeys(os.path.realpath(os.path.abspath(p)) for p in _COMMITTED)
    seen.update(dict.fromkeys(real for real, before in _WATCHED.items()
                              if file_identity(real) not in (before, None)))
    return list(seen)


def written_message() -> str:
    """What an interruption message says about the outputs: true whichever process wrote them."""
    done = written()
    if not done:
        return "no output was written"
    shown = ", ".join(done[:6]) + (f" (+{len(done) - 6} more)" if len(done) > 6 else "")
    return f"written before the interruption: {shown}; nothing else was written"


def not_written_note(output: str | Path, why: str = "verification failed") -> str:
    """The note for an output that was not (re)written: true about an older file at that path."""
    p = Path(output)
    if p.is_file():
        return (f"{why}: {p} was NOT replaced; the file there is an older one from an earlier run, "
                "not checked by this run (use --keep-failed to write the new one)")
    return f"{why}: nothing was written to {p} (use --keep-failed to keep it)"


# ------------------------------------------------------------------------------ atomic writes
@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    Inside an open ``OutputSet`` the file is staged instead and renamed when the set commits."""
    path = Path(path)
    outs = _OPEN_SETS[-1] if _OPEN_SETS else None  # the innermost open OutputSet
    target = outs.reserve(path) if outs is not None and not _inside_staging(path) else path
    tmp_path = target.parent / temp_name(target, suffix + ".tmp")
    try:
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as err:
        raise env_error(err, path) from err
    os.close(fd)
    try:
        with env_errors(path):
            yield tmp_path
            os.chmod(tmp_path, 0o644)
            os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _inside_staging(path: Path) -> bool:
    return path.parent.name.startswith(".bnfold-") and any(
        path.parent == d for s in _OPEN_SETS for _, d in s._dirs)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _same_file(st: os.stat_result, fd: int) -> bool:
    try:
        return os.path.samestat(st, os.fstat(fd))
    except OSError:
        return False


def append_text_or_warn(path: str | Path, text: str, what: str) -> bool:
    """Append ``text`` to a file that is not bnfold's result (e.g. $GITHUB_STEP_SUMMARY): a failure is a
    warning on stderr, never a failed run. Returns whether it was written."""
    def cannot(why: str) -> bool:
        sys.stderr.write(f"bnfold: warning: cannot write {what} '{path}': {why}; the results above stand\n")
        return False

    try:
        st = os.stat(path)
        std = next((name for fd, name in ((1, "output"), (2, "error")) if _same_file(st, fd)), None)
        if std is not None:  # e.g. /dev/stdout: stdout carries only what was asked for (a --json report)
            sys.stderr.write(f"bnfold: warning: {what} '{path}' is this process's standard {std}: nothing was "
                             "appended to it; the results above stand\n")
            return False
        if stat.S_ISDIR(st.st_mode) or stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode):
            # a folder cannot be appended to; a FIFO without a reader would block bnfold forever
            return cannot(f"it is {_kind(st.st_mode)}")
    except FileNotFoundError:
        pass
    except OSError as err:
        return cannot(os.strerror(err.errno or 0))
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as err:
        return cannot(os.strerror(err.errno) if err.errno else str(err))
    return True
