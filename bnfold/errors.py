"""Typed exceptions. The CLI renders these once, as one line, with their exit code.

Exit codes (also in the README):
    0  success
    1  verification failed: outputs differ beyond tolerance
    2  bad input or usage (a file, a flag, a data set, a missing provider that was required)
    3  the model itself could not be traced, folded or exported
  130  interrupted (SIGINT / Ctrl-C, or SIGTERM); the message says which outputs were written

User code (factories, data functions, a model's forward) cannot choose bnfold's exit code: whatever
it raises or exits with becomes one of these errors (bnfold.edges.usercode). The environment's errors while
writing (disk full, name too long, read-only file system, permissions) and sizes that cannot be
allocated are bad input (exit 2, OutputPathError / BadInputError naming the path or the size).

A failed verification is not an exception: ``verify`` and ``convert`` return reports that are
falsy when they failed, and the CLI exits 1. Anything that is not a ``BnfoldError`` is a bug in
bnfold (or a model that breaks in an unforeseen way) and is shown with a traceback under --debug.
"""

from __future__ import annotations

import re

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_MODEL = 3
EXIT_INTERRUPTED = 130

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(err: BaseException | str, limit: int = 300, *, empty: str | None = None) -> str:
    """The first non-blank line of an error (or text), colour codes removed and whitespace collapsed,
    cut to ``limit`` characters. An empty message gives ``empty``, by default the exception's type
    name ("" for text). Never raises, whatever the message holds."""
    text = _ANSI.sub("", str(err))
    line = next((" ".join(ln.split()) for ln in text.splitlines() if ln.strip()), "")
    if not line:
        return empty if empty is not None else ("" if isinstance(err, str) else type(err).__name__)
    return line[:limit]


def cause(err: BaseException, limit: int = 240) -> str:
    """``Type: first line`` of an error and, when it has a chain of causes, of the innermost one."""
    chain = [err]
    while chain[-1].__cause__ is not None and len(chain) < 10:
        chain.append(chain[-1].__cause__)
    ends = (chain[0], chain[-1]) if len(chain) > 1 else (chain[0],)
    return " ← ".join(f"{type(e).__name__}: {first_line(e, limit, empty='')}" for e in ends)


class BnfoldError(Exception):
    """Base class of every error a user can cause. ``str(err)`` is the one line to show."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        if fix:
            fix = fix[0].upper() + fix[1:]
        super().__init__(f"{problem}. {fix}" if fix else problem)


class BadInputError(BnfoldError):
    """A file, spec, flag or data set that cannot be used as given (exit 2)."""


class ModelSpecError(BadInputError):
    """The model spec or its factory is wrong (exit 2)."""


class WeightsError(BadInputError):
    """The checkpoint cannot be read or does not fit the model (exit 2)."""


class DataError(BadInputError):
    """Calibration or verification data is unusable (exit 2)."""


class CalibrationError(DataError):
    """Calibration could not produce finite statistics (exit 2)."""


class OutputPathError(BadInputError):
    """The output path cannot be written (exit 2)."""


class ProviderError(BadInputError):
    """An unknown provider, or a required provider that cannot run here (exit 2)."""


class ConfigError(BadInputError):
    """A batch-conversion config file is invalid (exit 2)."""


class ModelError(BnfoldError):
    """The model could not be traced, folded or exported (exit 3)."""

    exit_code = EXIT_MODEL


class ExportError(ModelError):
    """torch.onnx.export or onnx.checker failed (exit 3)."""


def inputs_rejected(inputs, err: BaseException, what: str = "inputs", fix: str | None = None) -> BadInputError:
    """The one error for a model that refuses the inputs it was given (its forward raised on them):
    bad input (exit 2) naming their shapes and the model's own first line, for ``convert``, ``inspect``
    and the API's ``verify`` alike. ``inputs``: the tensors (anything with ``.shape``)."""
    shapes = ", ".join(str(list(t.shape)) for t in inputs if hasattr(t, "shape")) or "(none)"
    return BadInputError(f"the model rejected {what} of shape {shapes}: {first_line(err, 200)}",
                         fix or "pass inputs the model accepts (rank, channels, size)")

