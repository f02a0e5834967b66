"""Runners: one object per way of computing a model's outputs (Polygraphy style).

A runner has ``infer(feeds) -> [(name, ndarray), ...]`` for one input set ``feeds`` (a
``bnfold.edges.data.Batch`` of torch tensors) and a few descriptive attributes (``target``,
``provider``, ``level``, ``device``) that the report shows. The comparator (compare.py) never sees
how the outputs were made; ``verify`` is one comparator loop over runners (verify.py). A new runtime
(TensorRT's Python API, a TorchScript or ExecuTorch runtime, ...) is one class with those attributes
and ``infer``.

bnfold's runners are context managers: ``with OrtRunner(...) as r:`` releases the session (and
``with TorchRunner(...)`` a copy or a cast) at the end of the block, so that one session is alive at
a time.

* ``TorchRunner``: an nn.Module in eval mode on a device and dtype, TF32 policy explicit.
* ``OrtRunner``: an ONNX file on one onnxruntime provider (providers.py) at one graph
  optimisation level; the session is created once and reused for every input set. Sessions are quiet:
  onnxruntime's log lines never reach the terminal unless ``verbose``; what it printed while a session
  was created is kept in ``runner.messages`` (the report's notes).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping, Protocol, runtime_checkable

import numpy as np

from bnfold.errors import BadInputError, BnfoldError, first_line, inputs_rejected
from bnfold.edges.data import Batch, call_model, eval_mode, model_dtype_device, prepare
from bnfold.edges.isolate import runtime
from bnfold.verification.providers import PROVIDERS, unavailable_reason
from bnfold.edges.load import onnx_error, tensor_to_numpy
from bnfold.report import LEVEL_NAMES

LEVELS = ("disable_all", "default")
Outputs = list  # list[tuple[str, np.ndarray]]


@runtime_checkable
class Runner(Protocol):
    target: str  # "onnx", "folded-module", "reference", ...
    provider: str  # "cpu", "cuda", ... or "pytorch"
    level: str | None  # onnxruntime optimisation level, None elsewhere
    device: str | None

    def infer(self, feeds) -> Outputs: ...


class RunnerUnavailable(Exception):
    """This runner cannot run here (the reason is the message); not a user error by itself."""


class Released:
    """``with runner:`` closes the runner at the end of the block (whatever happens inside)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------------------- helpers
def flatten_outputs(out: Any, prefix: str = "output") -> list[tuple[str, Any]]:
    """Tensors of a (nested) output in a stable order with stable names."""
    import torch

    if isinstance(out, torch.Tensor):
        return [(prefix, out)]
    if isinstance(out, (Mapping, tuple, list)):
        items = out.items() if isinstance(out, Mapping) else enumerate(out)
        return [x for k, v in items for x in flatten_outputs(v, f"{prefix}.{k}")]
    if out is None:
        return []
    return [(prefix, torch.as_tensor(out))]


def to_numpy(t) -> np.ndarray:
    return t if isinstance(t, np.ndarray) else tensor_to_numpy(t)


def positional_batch(inputs) -> Batch:
    """A Batch from a Batch, a tensor or a sequence of tensors (its positional arguments)."""
    import torch

    if isinstance(inputs, Batch):
        return inputs
    return Batch((inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs), {})


def as_feeds(feeds):
    """``positional_batch``, or a Batch from an (args, kwargs) pair."""
    if isinstance(feeds, tuple) and len(feeds) == 2 and isinstance(feeds[1], Mapping) and isinstance(feeds[0], tuple):
        return Batch(feeds[0], dict(feeds[1]))
    return positional_batch(feeds)


@contextlib.contextmanager
def hooks_removed(handles: list):
    """The hooks of ``handles`` (a list, which may still grow inside the block) removed at the end of
    the block, whatever happens inside."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def tf32(allow: bool | None):
    """TF32 for CUDA matmuls and cuDNN convolutions on (True) or off (False) inside the block;
    None leaves torch's own flags as they are. Flags are restored afterwards."""
    import torch

    if allow is None:
        yield
        return
    # cuDNN's flags through its context manager (every other flag None: left as it is), which works
    # under torch.backends.disable_global_flags() (PyTorch's test harness freezes them)
    cudnn = dict.fromkeys(inspect.signature(torch.backends.cudnn.flags).parameters)
    cudnn["allow_tf32"] = bool(allow)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = bool(allow)
    try:
        with torch.backends.cudnn.flags(**cudnn):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


# ----------------------------------------------------------------------------- PyTorch runner
class TorchRunner(Released):
    """Runs an nn.Module (in eval mode, flags restored) on ``device`` in ``dtype``.

    The module is used as it is when it already lives on ``device`` in ``dtype``; otherwise a deep
    copy is moved/cast once (the user's module is never changed). Floating inputs are cast to
    ``dtype``; outputs come back as numpy arrays. ``allow_tf32=False`` (the default) makes CUDA
    convolutions and matmuls true fp32; None keeps torch's current flags.
    """

    provider = "pytorch"
    level = None

    def __init__(self, model, *, device=None, dtype=None, allow_tf32: bool | None = False, target: str = "reference",
                 borrow: bool = False):
        import torch

        m_dtype, m_device = model_dtype_device(model)
        self.dtype = dtype or m_dtype
        self.torch_device = torch.device(device) if device is not None else m_device
        self.allow_tf32 = allow_tf32
        self.target = target
        same = self.dtype == m_dtype and self.torch_device == m_device
        self._restore: list | None = None
        if same:
            self.model = model
        elif borrow:  # the caller's own module, cast in place and cast back by close(): no second copy
            self.model, self._restore = model, _cast_in_place(model, self.torch_device, self.dtype)
        else:
            self.model = copy.deepcopy(model).to(device=self.torch_device, dtype=self.dtype)
        self.copied = not same and not borrow
        self.device = str(self.torch_device)

    def _prepare(self, feeds):
        b = as_feeds(feeds)  # passed as given (an example, never bound as the user's data: data=False)
        return prepare(Batch(b.args, b.kwargs), self.dtype, self.torch_device)

    def _call(self, batch):
        import torch

        with torch.no_grad(), eval_mode(self.model), tf32(self.allow_tf32):
            return call_model(self.model, batch)

    def infer(self, feeds) -> Outputs:
        batch = self._prepare(feeds)
        try:
            out = self._call(batch)
        except BnfoldError:
            raise
        except Exception as err:  # the model refuses these inputs: bad input (exit 2), never a bare RuntimeError
            raise inputs_rejected([*batch.args, *batch.kwargs.values()], err) from err
        return [(n, to_numpy(t)) for n, t in flatten_outputs(out)]

    def first_nonfinite_module(self, feeds) -> str | None:
        """The first module (in execution order) whose output holds NaN/Inf for ``feeds``, if any."""
        import torch

        found: list[str] = []

        def hook(name):
            def fn(mod, args, out):
                if not found and any(t.is_floating_point() and not bool(torch.isfinite(t).all())
                                     for _, t in flatten_outputs(out)):
                    found.append(name)
            return fn

        hooks = [m.register_forward_hook(hook(n)) for n, m in self.model.named_modules() if n and not list(m.children())]
        with hooks_removed(hooks), contextlib.suppress(Exception):  # a diagnosis, never a new failure
            self._call(self._prepare(feeds))
        return found[0] if found else None

    def close(self) -> None:
        if self._restore is not None:  # back to the exact original dtypes and devices
            _uncast(self._restore)
            self._restore = None
        if self.copied:
            self.model = None


def _cast_in_place(model, device, dtype) -> list:
    """Cast ``model``'s floating parameters (in place, through ``.data``) and buffers to ``dtype``
    on ``device``; returns what ``_uncast`` needs to put every tensor back exactly (a float32,
    float16 or bfloat16 value survives a round trip through float64 unchanged). Buffers keep their
    original tensors aside (they are small); parameters are cast back, so only one copy exists."""
    import torch

    undo: list = []
    try:
        for p in model.parameters():
            if p.is_floating_point():
                undo.append(("param", p, p.dtype, p.device))
                p.data = p.data.to(device=device, dtype=dtype)
        cache: dict[int, torch.Tensor] = {}
        for m in model.modules():
            for name, b in list(m._buffers.items()):
                if b is not None and b.is_floating_point():
                    undo.append(("buffer", m, name, b))
                    m._buffers[name] = cache.setdefault(id(b), b.to(device=device, dtype=dtype))
    except BaseException:
        _uncast(undo)
        raise
    return undo


def _uncast(undo: list) -> None:
    for kind, a, b, c in reversed(undo):
        if kind == "param":
            a.data = a.data.to(device=c, dtype=b)
        else:
            a._buffers[b] = c


# ------------------------------------------------------------------------- onnxruntime runner
@contextlib.contextmanager
def _captured_stderr(lines: list[str]):
    """Capture what native code writes to fd 2 (onnxruntime's logger) into ``lines``."""
    fd = 2  # native code writes to fd 2 whatever sys.stderr is
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    try:
        saved = os.dup(fd)
    except OSError:
        yield
        return
    try:  # the saved descriptor is closed whatever fails below
        with tempfile.TemporaryFile(mode="w+b") as tmp:
            os.dup2(tmp.fileno(), fd)
            try:
                yield
            finally:
                with contextlib.suppress(Exception):
                    sys.stderr.flush()
                os.dup2(saved, fd)
                tmp.seek(0)
                text = tmp.read().decode("utf-8", "replace")
                lines += [ln.strip() for ln in text.splitlines() if ln.strip()]
    finally:
        os.close(saved)


def ort_severity(verbose: bool = False) -> int:
    """onnxruntime's log severity: WARNING (2) with --verbose, else FATAL (4) only: its own coloured
    ``[E:onnxruntime:…]`` lines never precede bnfold's one-line error (bnfold reports the error itself)."""
    return 2 if verbose else 4


class OrtRunner(Released):
    """An ONNX file on one onnxruntime provider at one graph optimisation level.

    Raises RunnerUnavailable (with the reason) when the provider cannot really run here, and
    BadInputError when the CPU provider cannot load the file (then the file itself is at fault).
    """

    def __init__(self, onnx_path: str | Path, provider: str = "cpu", level: str = "disable_all", *, verbose: bool = False,
                 target: str = "onnx"):
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, not {level!r}")
        self.spec = PROVIDERS[provider]
        self.provider, self.level, self.target = provider, level, target
        self.path = Path(onnx_path)
        self.messages: list[str] = []
        self.device = self.spec.torch_device or "cpu"
        why = unavailable_reason(self.spec)
        if why:
            raise RunnerUnavailable(why)
        if self.spec.needs_torch_cuda:
            import torch  # noqa: F401  (loads CUDA/cuDNN libraries before onnxruntime looks for them)
        import onnxruntime as ort

        severity = ort_severity(verbose)
        ort.set_default_logger_severity(severity)  # the default logger: set before any session
        so = ort.SessionOptions()
        so.log_severity_level = severity
        self.run_options = ort.RunOptions()
        self.run_options.log_severity_level = severity
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVEL_NAMES[level])
        quiet = contextlib.nullcontext() if verbose else _captured_stderr(self.messages)
        try:
            with quiet, self._running():
                self.session = ort.InferenceSession(str(self.path), sess_options=so, providers=self.spec.provider_list())
        except Exception as err:
            if provider == "cpu":
                raise onnx_error(self.path, err, "load") from err
            why = f"creating a {self.spec.ort_name} session failed: {first_line(err)}"
            raise RunnerUnavailable(why) from err
        ok, why = self.spec.really_runs(self.session)
        if not ok:
            self.session = None
            raise RunnerUnavailable(why)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def feed_dict(self, feeds) -> dict[str, np.ndarray]:
        b = as_feeds(feeds)
        pos = iter([to_numpy(t) for t in b.args])
        out = {}
        for n in self.input_names:
            if n in b.kwargs:
                out[n] = to_numpy(b.kwargs[n])
                continue
            try:
                out[n] = next(pos)
            except StopIteration:
                raise BadInputError(f"the ONNX model needs input '{n}', which was not given",
                                    "pass one --input-shape per model input") from None
        return out

    def infer(self, feeds) -> Outputs:
        feed = self.feed_dict(feeds)
        try:
            with self._running():
                got = self.session.run(None, feed, self.run_options)
        except Exception as err:  # onnxruntime's own errors: the file does not fit these inputs
            text = " ".join(str(err).split())[:300] or type(err).__name__
            shapes = ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in feed.items())
            raise BadInputError(f"onnxruntime ({self.provider}) cannot run '{self.path.name}' on inputs {shapes}: {text}",
                                "check that the ONNX file belongs to this model and fits the input shapes") from err
        if len(got) == 1:
            return [("output", got[0])]
        return [(f"output.{i}", g) for i, g in enumerate(got)]

    def _running(self):
        """A crash of onnxruntime inside the block is named: runtime, provider, level, file (edges.isolate)."""
        return runtime("onnxruntime", self.spec.ort_name, LEVEL_NAMES[self.level], self.path)

    def close(self) -> None:
        self.session = None
