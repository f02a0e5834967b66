"""Process isolation: user code and runtimes die without taking bnfold with them.

Trust rule "a death is not a verdict" (docs/trust.md). The CLI runs each command, and ``--config``
each conversion, in a supervised child process (``supervise``). The parent owns the exit code, the
message and the cleanup:

* The child marks what it is running now — a model factory, a data function, the model's
  ``forward``, an onnxruntime session — with ``running(what)`` blocks, in a slot of shared memory
  (no system call; a no-op outside a supervised child), and sends its result over a pipe at the end.
* A child that ends without sending its result (``os._exit(n)`` of any ``n``, SIGKILL, a segfault in
  onnxruntime) becomes ONE line naming what died and while doing what
  (``onnxruntime crashed (SIGSEGV) running m.onnx on CPUExecutionProvider at ORT_ENABLE_ALL``),
  exit 3; the staging folders it left are removed, and the message says truthfully what was written.
* SIGINT/SIGTERM to the parent are forwarded to the children (which unwind like Ctrl-C: staged files
  removed); no queued task starts after the signal; then the parent raises ``KeyboardInterrupt``.

The child is forked: by the CLI before torch is imported (nearly free), by ``--config`` from a
parent that imported torch but never ran it (``warm_up``). A process that may have run torch
(OpenMP's thread pool does not survive a fork: ``can_fork``) forks its children from
multiprocessing's fork server instead. The Python API (``bnfold.convert``, and ``run_config`` with
one job, in a process that already uses torch) runs in the caller's process, as before.

Test hook (private, for bnfold's own tests only): ``BNFOLD_TEST_CRASH=<text>`` makes a supervised
child kill itself with SIGSEGV when it enters a ``running`` block whose description contains
``<text>`` — a runtime crash without a real crash bug.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bnfold.edges.files import file_identity, sweep_stale_staging, watch
from bnfold.errors import ModelError, first_line

__all__ = ["Task", "can_fork", "death_error", "enable", "running", "runtime", "supervise", "warm_up"]

_CHANNEL: list[Any] = []  # in a supervised child: [the shared stage slot]
_SLOT = 4096  # bytes of shared memory holding the child's current stage
_SEP = "\x1f"
_STAGES: list[bytes] = []  # in a supervised child: what runs now, innermost last (encoded)
_STATE = {"fork_safe": False}  # the CLI parent: never runs torch, so children may be forked from it
GRACE_S = 20.0  # how long interrupted children may take to unwind before SIGKILL
_HOOK = "BNFOLD_TEST_CRASH"


# ------------------------------------------------------------------------ the child's side
@contextlib.contextmanager
def running(what: str, rt: tuple | None = None):
    """Mark the block as running ``what`` (user code: "model factory 'm.py:build'"; or a runtime,
    ``rt`` = (runtime, provider, level, file)) so that a death inside it is named. Free outside a
    supervised child."""
    if not _CHANNEL:
        yield
        return
    stage = _SEP.join((what[:1000],) + tuple(rt or ())).encode("utf-8", "replace")[:_SLOT - 4]
    _STAGES.append(stage)
    _mark(stage)
    hook = os.environ.get(_HOOK)
    if hook and hook in what:
        os.kill(os.getpid(), signal.SIGSEGV)
    try:
        yield
    finally:
        _STAGES.pop()
        _mark(_STAGES[-1] if _STAGES else b"")


def runtime(name: str, provider: str, level: str, path) -> contextlib.AbstractContextManager:
    """``running`` for a runtime session: a crash says which runtime, provider, level and file."""
    folder, base = os.path.split(str(path))
    if os.path.basename(folder).startswith(".bnfold-"):  # a staged file: named by its final path
        path = os.path.join(os.path.dirname(folder), base)
    return running(f"{name} {provider} {level} {base}", (name, provider, level, str(path)))


def _mark(stage: bytes) -> None:
    """The child's current stage into shared memory (no system call: a mark costs about a microsecond)."""
    slot = _CHANNEL[0]
    slot[4:4 + len(stage)] = stage
    slot[:4] = len(stage).to_bytes(4, "little")


def _read_stage(slot) -> tuple | None:
    """(what, runtime tuple or None) from a dead child's stage slot; None outside any stage."""
    n = int.from_bytes(bytes(slot[:4]), "little")
    if not 0 < n <= _SLOT - 4:
        return None
    parts = bytes(slot[4:4 + n]).decode("utf-8", "replace").split(_SEP)
    return parts[0], (tuple(parts[1:5]) if len(parts) == 5 else None)


def _stop_child(signum, frame):
    """A child's first SIGINT/SIGTERM unwinds like Ctrl-C; the next ones (the terminal's SIGINT and
    the parent's forwarded SIGTERM) are ignored so that the unwinding is not cut short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _end_with_parent() -> None:
    """Linux: SIGTERM to this child when its parent dies (even by SIGKILL), so that no orphan goes on
    writing outputs that nobody reports."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def _child_main(conn, slot, fn: Callable, args: tuple, cwd: str, env: dict) -> None:
    if os.getcwd() != cwd:  # a fork server's child starts in the server's folder and environment
        os.chdir(cwd)
    if os.environ != env:
        os.environ.clear()
        os.environ.update(env)
    _CHANNEL[:] = [slot]
    signal.signal(signal.SIGINT, _stop_child)
    signal.signal(signal.SIGTERM, _stop_child)
    _end_with_parent()
    try:
        payload = ("ok", fn(*args))
    except KeyboardInterrupt:
        payload = ("interrupted", None)
    except BaseException as err:  # noqa: BLE001 - the parent turns it into one line
        payload = ("error", f"{type(err).__name__}: {first_line(err, empty='')}")
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(OSError):  # OSError: the parent is gone, nobody to tell
        try:
            conn.send_bytes(b"R" + pickle.dumps(payload))
        except (pickle.PicklingError, TypeError, AttributeError) as err:
            conn.send_bytes(b"R" + pickle.dumps(("error", f"the result could not be sent: {first_line(err)}")))
        conn.close()


# ------------------------------------------------------------------------ the parent's side
@dataclass
class Task:
    """One unit of supervised work: ``fn(*args)`` in a child; ``outputs`` are the files it may write
    (their folders are swept of its staging folders if it dies, and its message says which of them
    changed on disk)."""

    fn: Callable
    args: tuple = ()
    outputs: tuple = ()
    status: str = "queued"  # queued, running, ok, interrupted, error, died
    result: Any = None
    exitcode: int | None = None
    stage: tuple | None = None  # (what, runtime) the child was running when it ended
    slot: Any = None
    before: dict = field(default_factory=dict)

    def changed(self) -> list[str]:
        """The outputs of this task that changed on disk since it was queued."""
        return [p for p, ident in self.before.items() if file_identity(p) not in (ident, None)]


def enable() -> None:
    """Called by the CLI's entry point: this process never runs torch, so children may be forked from it."""
    _STATE["fork_safe"] = True


def warm_up(modules: tuple[str, ...], then: Callable[[], None]) -> None:
    """Import the heavy libraries once in a fork-safe parent (and run ``then``, which must not run
    torch), so that its children start warm."""
    import importlib

    if _STATE["fork_safe"] and hasattr(os, "fork"):
        for name in modules:
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
        then()


def can_fork() -> bool:
    """Whether children may be forked from this process: the CLI, or a process without torch yet."""
    return hasattr(os, "fork") and (_STATE["fork_safe"] or "torch" not in sys.modules)


def _context():
    import multiprocessing as mp

    if can_fork():
        return mp.get_context("fork")
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "onnx", "onnxruntime", "bnfold.pipeline"])
        return ctx
    return mp.get_context("spawn")


class _Stop:
    """SIGINT/SIGTERM while supervising: remember, forward SIGTERM to the live children."""

    def __init__(self, live: dict):
        self.live, self.when, self.saved, self.told = live, None, {}, set()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.when is None:
            self.when = time.monotonic()
        self.forward()

    def forward(self, sig: int = signal.SIGTERM) -> None:
        for proc in list(self.live):
            if (proc, sig) not in self.told and proc.pid is not None:
                self.told.add((proc, sig))
                with contextlib.suppress(OSError, ValueError):
                    os.kill(proc.pid, sig)

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


def supervise(tasks: list[Task], jobs: int = 1, on_done: Callable[[Task], None] | None = None) -> bool:
    """Run every task in its own child, at most ``jobs`` at once; fills each task's status, result,
    exit code and last stage. Returns False when SIGINT/SIGTERM stopped the run (tasks not started
    stay "queued"); the caller then reports the interruption."""
    from multiprocessing.connection import wait

    ctx = _context()
    queue, live = list(tasks), {}
    for t in tasks:
        for p in t.outputs:
            real = os.path.realpath(os.path.abspath(p))
            t.before[real] = file_identity(real)
            watch(real)
    with _Stop(live) as stop:
        while queue or live:
            while queue and len(live) < jobs and stop.when is None:
                _start(ctx, queue.pop(0), live)
            if not live:
                break
            if stop.when is not None:
                stop.forward(signal.SIGTERM if time.monotonic() - stop.when < GRACE_S else signal.SIGKILL)
            ready = wait([c for c, _ in live.values()] + [p.sentinel for p in live], timeout=0.5)
            if _collect(live, ready, on_done) and stop.when is None:
                stop._handle(signal.SIGINT, None)  # a child was interrupted (Ctrl-C reached it): stop them all
    return stop.when is None


def _collect(live: dict, ready: list, on_done) -> bool:
    """Read the children that sent something; finish those whose pipe closed or that ended. True
    when one of them was interrupted."""
    stopped = False
    for proc in list(live):
        conn, task = live[proc]
        if conn not in ready and proc.sentinel not in ready:
            continue
        if _pump(conn, task) or (proc.sentinel in ready and not conn.poll()):
            conn.close()  # a pipe a grandchild still holds open is not waited for
            _finish(proc, live.pop(proc)[1], on_done)
            stopped = stopped or task.status == "interrupted"
    return stopped


def _start(ctx, task: Task, live: dict) -> None:
    reader, writer = ctx.Pipe(duplex=False)
    task.slot = ctx.RawArray("c", _SLOT)
    proc = ctx.Process(target=_child_main, args=(writer, task.slot, task.fn, task.args, os.getcwd(), dict(os.environ)), daemon=False)
    proc.start()
    writer.close()
    task.status = "running"
    live[proc] = (reader, task)


def _pump(conn, task: Task) -> bool:
    """Read what the child sent; True once its pipe is closed (it finished or died)."""
    try:
        while conn.poll():
            task.status, task.result = pickle.loads(conn.recv_bytes()[1:])
    except (EOFError, OSError, pickle.UnpicklingError, ValueError):  # _collect closes the pipe
        return True
    return False


def _finish(proc, task: Task, on_done) -> None:
    proc.join()
    task.exitcode = proc.exitcode
    task.stage = _read_stage(task.slot)
    if task.status == "running":
        task.status = "died"
        for p in task.outputs:  # what the dead child had staged
            sweep_stale_staging(os.path.dirname(os.path.abspath(p)))
    if on_done is not None:
        on_done(task)


def death_error(task: Task) -> ModelError:
    """The one-line error (exit 3) for a task whose child died without sending its result."""
    code = task.exitcode or 0
    sig = _signame(-code) if code < 0 else None
    what, rt = task.stage or (None, None)
    if rt is not None:
        name, provider, level, path = rt
        how = f"crashed ({sig})" if sig else f"ended the process (exit status {code})"
        problem = f"{name} {how} running {path} on {provider} at {level}"
        fix = f"verify with another provider (--providers), and report the crash to {name}: the file may well be valid"
    elif what is not None:
        how = f"died ({sig})" if sig else f"ended the process with exit status {code} (os._exit or a native exit) instead of returning"
        problem = f"{what} {how}"
        fix = "user code must return (or raise an exception), not end the process"
    else:
        problem = f"the process running bnfold died ({sig or f'exit status {code}'}) outside user code"
        fix = "check free memory (the out-of-memory killer sends SIGKILL), or rerun with --debug and report it"
    changed = task.changed()
    tail = f"written before it died: {', '.join(changed)}" if changed else "nothing was written"
    return ModelError(f"{problem}; {tail}", fix)


def _signame(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"

