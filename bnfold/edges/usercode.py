"""The user-code guard: factories, data functions and data iterators run inside bnfold, not instead of it.

Trust rules "exit codes are bnfold's" and "stdout carries only what was asked for" (docs/trust.md). Whatever user code does — ``sys.exit(0)``, ``raise SystemExit("msg")``, a stray
``GeneratorExit``, ``print`` — bnfold keeps its exit codes and its stdout:

* ``run_user(fn, *args, what=...)`` / ``with user_code(what):`` run user code with stdout redirected to
  stderr (both ``sys.stdout`` and file descriptor 1, so C extensions and subprocesses follow) and turn
  any ``BaseException`` except ``KeyboardInterrupt`` into a one-line ``BnfoldError`` (``ModelSpecError``
  by default, ``DataError`` for data) naming the user code. ``BnfoldError`` raised inside passes through.
* ``guard_iter(iterable, what=...)`` does the same for each step of iterating a user's generator,
  DataLoader or dataset.
* ``stdout_to_stderr()`` is the same redirection for a whole command (``--json``: stdout carries only
  the JSON); ``stdout()`` is the real stdout to print the result on while it is active.

What a guard cannot catch — ``os._exit``, a segfault — is for the supervised child process the CLI
runs user code in (``bnfold.edges.isolate``): every guarded block is marked there as running
``what``, so that a death inside it is named.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import Any, Callable, Iterable, Iterator

from bnfold.errors import EXIT_MODEL, BnfoldError, DataError, first_line, ModelSpecError
from bnfold.edges.isolate import running

__all__ = ["run_user", "user_code", "guard_iter", "as_error", "stdout_to_stderr", "stdout"]

_real_stdout: list[Any] = []  # stack of the stdout streams saved by active redirections


def as_error(err: BaseException, what: str, error: type[BnfoldError] = ModelSpecError) -> BnfoldError:
    """The one-line error for ``err`` escaping from user code described by ``what``."""
    if isinstance(err, BnfoldError):
        return err
    if isinstance(err, SystemExit):
        code = err.code
        if code is None or isinstance(code, int):
            problem = f"{what} called sys.exit({'' if code is None else code})"
        else:
            problem = f"{what} exited with SystemExit: {first_line(err, empty='') or type(code).__name__}"
        new = error(problem, "user code must return (or raise an exception), not exit the process")
        # user code that tries to end the process failed to do its job, whichever it was: exit 3, as for an
        # os._exit the supervised child reports (bnfold.edges.isolate); the error keeps its kind (data, spec)
        new.exit_code = EXIT_MODEL
    else:
        msg = first_line(err, empty="")
        problem = f"{what} raised {type(err).__name__}" + (f": {msg}" if msg else "")
        fix = "fix the data function" if issubclass(error, DataError) else "fix the model code"
        new = error(problem, fix)
    new.__cause__ = err
    return new


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout (Python and fd 1) to stderr until the block ends. Reentrant."""
    saved_sys = sys.stdout
    fd_err = _fileno(sys.stderr)
    fd_err = 2 if fd_err is None else fd_err
    saved_fd = None
    real: Any = saved_sys
    with contextlib.suppress(Exception):
        saved_sys.flush()
    if fd_err != 1:
        try:
            saved_fd = os.dup(1)  # fd 1 itself goes to stderr: C code and subprocesses write there
            os.dup2(fd_err, 1)
        except OSError:
            if saved_fd is not None:  # dup worked, dup2 did not: fd 1 is untouched, the copy is not needed
                os.close(saved_fd)
            saved_fd = None
    if saved_fd is not None and _fileno(saved_sys) == 1:  # bnfold's own results: the saved fd 1
        enc = getattr(saved_sys, "encoding", None) or "utf-8"
        real = io.TextIOWrapper(io.FileIO(saved_fd, "w", closefd=False), encoding=enc, errors="replace",
                                line_buffering=True, write_through=True)
    _real_stdout.append(real)
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        sys.stdout = saved_sys
        _real_stdout.pop()
        if saved_fd is not None:
            with contextlib.suppress(Exception):
                real.flush()
            os.dup2(saved_fd, 1)
            os.close(saved_fd)


def stdout():
    """The stream that is stdout for bnfold's own results (the real one while redirected)."""
    return _real_stdout[-1] if _real_stdout else sys.stdout


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


@contextlib.contextmanager
def user_code(what: str, error: type[BnfoldError] = ModelSpecError) -> Iterator[None]:
    """Run the block as user code: stdout → stderr, any escape except KeyboardInterrupt → ``error``."""
    with stdout_to_stderr(), running(what):  # a death inside is named after ``what`` (edges.isolate)
        try:
            yield
        except (KeyboardInterrupt, BnfoldError):
            raise
        except BaseException as err:  # SystemExit, GeneratorExit, anything
            raise as_error(err, what, error) from err


def run_user(fn: Callable[..., Any], *args: Any, what: str, error: type[BnfoldError] = ModelSpecError, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` as user code (see ``user_code``)."""
    with user_code(what, error):
        return fn(*args, **kwargs)


def guard_iter(iterable: Iterable[Any], what: str, error: type[BnfoldError] = DataError) -> Iterator[Any]:
    """Iterate ``iterable`` with every step (``iter()`` and each ``next()``) run as user code."""
    with user_code(what, error):
        it = iter(iterable)
    while True:
        with user_code(what, error):
            try:
                item = next(it)
            except StopIteration:
                return
        yield item
