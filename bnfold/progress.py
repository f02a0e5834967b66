"""The one progress reporter: what bnfold is doing now, on stderr, with the time since the run began.

A run (``bnfold convert``, ``bnfold verify``, ``bnfold calibrate``, a ``--config`` run) opens a
reporter with ``reporting(enabled)``; the stages report through ``current()``, which is silent when
no reporter is open (the API's default: ``progress=False``). Every line is

    ``  12.3s  stage detail``

(the elapsed time since the run began, the stage, what it is working on), written when the stage
begins. ``count`` reports n/N of a long loop (calibration batches) with its rate and ETA.

Where stderr is a terminal, a count updates its own line in place; elsewhere (CI logs, a pipe) every
line is a plain line, never a carriage return, and a count prints at each tenth of its total (at most
one line per ``PLAIN_TENTH_S``: a loop of under a second prints its start and its end), or every
``PLAIN_EVERY_S`` seconds when the total is unknown, and once when it ends. Lines are cut to the
terminal's width (``COLUMNS``; 80 when unknown). stdout is never written.
"""

from __future__ import annotations

import contextlib
import contextvars
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from typing import IO

PLAIN_EVERY_S = 5.0  # a count of unknown total, in a log: one line at most this often
PLAIN_TENTH_S = 1.0  # a count's tenths, in a log: one line at most this often
LIVE_EVERY_S = 0.1  # a count on a terminal: redrawn at most this often


def _seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f}s"
    m, s = divmod(round(s), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m{s:02d}s"


class Reporter:
    """Progress lines on ``stream`` (stderr); ``live`` (default: ``stream.isatty()``) redraws counts in place."""

    def __init__(self, stream: IO[str] | None = None, *, live: bool | None = None, width: int | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.stream = sys.stderr if stream is None else stream
        if live is None:
            isatty = getattr(self.stream, "isatty", None)
            live = bool(isatty and isatty())
        self.live = live
        self.width = width or shutil.get_terminal_size((80, 24)).columns
        self.clock = clock
        self.start = clock()
        self._open = False  # a live line is drawn and not yet ended

    def elapsed(self) -> float:
        return self.clock() - self.start

    def _text(self, stage: str, detail: str) -> str:
        line = f"{_seconds(self.elapsed()):>7}  {stage}" + (f" {detail}" if detail else "")
        return line if len(line) <= self.width - 1 else line[:self.width - 2] + "…"

    def _write(self, text: str, *, redraw: bool = False) -> None:
        """A line; ``redraw`` (terminal only): draw over the current line instead, left open."""
        if redraw:
            self.stream.write("\r" + text + "\x1b[K")
        else:
            self.stream.write(("\n" if self._open else "") + text + "\n")
        self._open = redraw
        self.stream.flush()

    def step(self, stage: str, detail: str = "") -> None:
        """A stage begins (load, calibrate, fold, export, verify cpu ORT_ENABLE_ALL, ...)."""
        self._write(self._text(stage, detail))

    def note(self, text: str) -> None:
        """Something the user should know now (e.g. no weights given), as a ``note:`` line."""
        self.step("note:", text)

    def count(self, stage: str, total: int | None, unit: str) -> Counter:
        """n/N of a loop: ``advance()`` after each item, ``done()`` at the end."""
        return Counter(self, stage, total, unit)

    def close(self) -> None:
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


class Silent(Reporter):
    """No reporter open: every call does nothing."""

    def __init__(self):  # no stream: no line is ever open
        self.live = False
        self._open = False

    def step(self, stage: str, detail: str = "") -> None:
        pass


class Counter:
    """n/N with rate and ETA: a redrawn line on a terminal, a line per tenth (at most one a second) in a log."""

    def __init__(self, reporter: Reporter, stage: str, total: int | None, unit: str):
        self.r, self.stage, self.total, self.unit = reporter, stage, total, unit
        self.n = 0
        self.silent = isinstance(reporter, Silent)
        if self.silent:
            return
        self.t0 = reporter.clock()
        self.shown_tenth = 0
        self._show()

    def _detail(self, final: bool = False) -> str:
        took = self.r.clock() - self.t0
        text = f"{self.n}/{self.total if self.total is not None else '?'} {self.unit}"
        if self.n and took > 0:
            text += f", {self.n / took:.1f}/s"
            if final:
                text += f", took {_seconds(took)}"
            elif self.total:
                text += f", ETA {_seconds((self.total - self.n) * took / self.n)}"
        return text

    def _show(self, final: bool = False) -> None:
        line = self.r._text(self.stage, self._detail(final))
        self.r._write(line, redraw=self.r.live)
        if final:  # a live line ends here (a plain line already has)
            self.r.close()
        self.shown_at = self.r.clock()

    def advance(self, k: int = 1) -> None:
        self.n += k
        if self.silent:
            return
        now = self.r.clock()
        if self.r.live:
            if now - self.shown_at >= LIVE_EVERY_S and self.n != self.total:  # the last one: done() draws it
                self._show()
        elif self.total:
            tenth = self.n * 10 // self.total
            if tenth > self.shown_tenth and self.n < self.total and now - self.shown_at >= PLAIN_TENTH_S:
                self.shown_tenth = tenth
                self._show()
        elif now - self.shown_at >= PLAIN_EVERY_S:
            self._show()

    def done(self) -> None:
        if not self.silent:
            self._show(final=True)


SILENT = Silent()
_current: contextvars.ContextVar[Reporter] = contextvars.ContextVar("bnfold_progress", default=SILENT)


def current() -> Reporter:
    """The open reporter, or the silent one."""
    return _current.get()


@contextlib.contextmanager
def reporting(enabled: bool | Reporter | None) -> Iterator[Reporter]:
    """The reporter for the block: when ``enabled`` (True, or a Reporter), the open one or else a new
    one on stderr; when not, the silent one (a conversion of a ``--config`` run reports
    only its one line)."""
    if enabled and current() is not SILENT:
        yield current()  # a run inside a run reports on the same lines
        return
    rep = SILENT if not enabled else enabled if isinstance(enabled, Reporter) else Reporter()
    token = _current.set(rep)
    try:
        yield rep
    finally:
        rep.close()
        _current.reset(token)
