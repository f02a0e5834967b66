"""Data for calibration and verification: files cut into batches, or any iterable of batches.

Accepted: ``.npz`` (one array per model input, in file order; first axis = samples), ``.npy`` (one
input), ``.pt`` (a tensor, a tuple/list of tensors, or a dict of named tensors; read with
``weights_only=True``), or ``module:fn`` / ``file.py:fn`` returning an iterable of batches. A batch is a
tensor, a tuple/list of tensors (positional inputs, possibly followed by labels) or a dict (keyword
inputs); ``model_inputs`` decides, in one place, which items of a batch are the model's inputs.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from bnfold.errors import DataError, first_line
from bnfold.edges.isolate import running
from bnfold.edges.usercode import guard_iter, run_user
from bnfold.edges.load import DATA_SUFFIXES, parse_model_spec, resolve_factory, tensor_to_numpy
from bnfold.options import parse_option

FORMS = ".npz, .npy, .pt, or module:fn returning batches"


@dataclass
class Batch:
    args: tuple
    kwargs: dict
    data: bool = False  # read from the user's data: its items are bound to forward() by ``model_inputs``

    @property
    def size(self) -> int:
        import torch

        return next((int(t.shape[0]) for t in itertools.chain(self.args, self.kwargs.values())
                     if isinstance(t, torch.Tensor) and t.dim() > 0), 1)


def as_batch(item: Any) -> Batch:
    import numpy as np
    import torch

    def tens(x):
        return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x

    if isinstance(item, Batch):
        return item
    if isinstance(item, (torch.Tensor, np.ndarray)):
        return Batch((tens(item),), {}, data=True)
    if isinstance(item, (tuple, list)):
        return Batch(tuple(tens(x) for x in item), {}, data=True)
    if isinstance(item, dict):
        return Batch((), {k: tens(v) for k, v in item.items()}, data=True)
    raise DataError(f"a batch is a {type(item).__name__}", "yield tensors, tuples of tensors or dicts of tensors")


def _check_arrays(arrays: list, where: str) -> None:
    import numpy as np

    if not arrays:
        raise DataError(f"{where} holds no arrays", "save one array per model input")
    n = None
    for i, a in enumerate(arrays):
        if a.dtype.kind not in "fiub":
            raise DataError(f"{where}: array {i} has dtype {a.dtype}, not numeric", "save float or integer arrays")
        if a.ndim == 0:
            raise DataError(f"{where}: array {i} is a scalar", "the first axis must count samples")
        if a.shape[0] == 0:
            raise DataError(f"{where}: array {i} is empty (0 samples)", "provide at least two samples")
        if n is not None and a.shape[0] != n:
            raise DataError(f"{where}: arrays have {n} and {a.shape[0]} samples", "give every input the same number of samples")
        n = a.shape[0]
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise DataError(f"{where}: array {i} contains NaN or Inf", "clean the data")


def _read_arrays(path: Path) -> tuple[list, list | None]:
    """(arrays, names) of a data file (one of DATA_SUFFIXES); names only for dict-like sources (keyword inputs)."""
    import numpy as np
    import torch

    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return [z[k] for k in z.files], None
        if suffix == ".npy":
            return [np.load(path, allow_pickle=False)], None
        obj = torch.load(path, map_location="cpu", weights_only=True)  # .pt, .pth
        if isinstance(obj, torch.Tensor):
            return [tensor_to_numpy(obj)], None
        if isinstance(obj, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in obj):
            return [tensor_to_numpy(t) for t in obj], None
        if isinstance(obj, dict) and all(isinstance(t, torch.Tensor) for t in obj.values()):
            return [tensor_to_numpy(t) for t in obj.values()], list(obj)
    except Exception as err:
        raise DataError(f"cannot read data file '{path}': {first_line(err)}",
                        "check that the file is complete and of the type its suffix says") from err
    raise DataError(f"'{path}' holds a {type(obj).__name__}, not tensors",
                    "save a tensor, a tuple or a dict of tensors")


def load_batches(spec: str | Path | Iterable, batch_size: int | None = None) -> list[Batch]:
    """Materialise calibration/verification data as a list of batches (checked, non-empty)."""
    if isinstance(spec, (str, Path)):
        text = str(spec)
        path = Path(text)
        if path.suffix.lower() in DATA_SUFFIXES:
            if not path.is_file():
                raise DataError(f"data file '{path}' does not exist", "check the path of the calibration data")
            arrays, names = _read_arrays(path)
            return split_arrays(arrays, batch_size, names, f"'{path}'")
        if ":" in text:
            try:
                fn = resolve_factory(parse_model_spec(text))
            except Exception as err:
                raise DataError(f"data spec '{text}': {err}", f"use {FORMS}") from err
            source = run_user(fn, what=f"data function '{text}'", error=DataError)
            return collect(source, where=f"'{text}'")
        raise DataError(f"data '{text}' is not a known form", f"use {FORMS}")
    return collect(spec, where="the data")


def _samples(data: Any) -> tuple[list, list | None] | None:
    """(arrays, names) of a tensor or array of samples, or of a dict of them (named inputs); None for any
    other form. Tensors become numpy arrays as a .pt file's do (bfloat16 upcast)."""
    import numpy as np
    import torch

    arraylike = (torch.Tensor, np.ndarray)
    named = isinstance(data, dict) and data and all(isinstance(v, arraylike) for v in data.values())
    if not (named or isinstance(data, arraylike)):
        return None
    values = data.values() if named else [data]
    return [tensor_to_numpy(v) if isinstance(v, torch.Tensor) else v for v in values], list(data) if named else None


def split_arrays(arrays: list, batch_size: int | None, names: list | None, where: str) -> list[Batch]:
    """Checked arrays of samples (``where`` names them) cut into batches; keyword inputs when ``names``."""
    import numpy as np
    import torch

    _check_arrays(arrays, where)
    n = arrays[0].shape[0]
    if batch_size is not None:
        batch_size = parse_option("batch_size", batch_size)
    bs = batch_size or n
    batches = []
    for start in range(0, n, bs):
        parts = [torch.from_numpy(np.ascontiguousarray(a[start:start + bs])) for a in arrays]
        batches.append(Batch((), dict(zip(names, parts)), data=True) if names else Batch(tuple(parts), {}, data=True))
    return batches


def collect(source: Any, where: str = "the data") -> list[Batch]:
    import torch

    if isinstance(source, torch.Tensor) or not hasattr(source, "__iter__"):
        raise DataError(f"{where} is a {type(source).__name__}, not an iterable of batches", "return a list, generator or DataLoader")
    batches = [as_batch(b) for b in guard_iter(source, what=f"iterating {where}")]
    if not batches:
        raise DataError(f"{where} is empty: it yielded no batches", "provide at least one batch")
    return batches


class DataSource:
    """Calibration or verification data, normalised once: a re-iterable source of ``Batch``es.

    Accepts every form (files, ``module:fn``/``file.py:fn``, a tensor or array, a list or tuple of
    batches, (input, label) pairs, dicts of named inputs, DataLoaders, IterableDatasets, one-shot
    generators and iterators). A one-shot source is read exactly once: the samples verification
    needs (``head``) and the content fingerprint are taken during that single pass. Which items of a
    batch reach the model (inputs, labels) is ``model_inputs``'s decision, made where it is fed.
    """

    def __init__(self, data: Any, batch_size: int | None = None, *, what: str = "the data",
                 fingerprint: bool = False):
        self.what = what
        self._list: list[Batch] | None = None
        self._iterable = None
        self._consumed = False
        self._head: Batch | None = None
        self._want = 0
        self.fingerprint: str | None = None  # sha256 of the samples, when asked for (convert's provenance)
        self._want_fingerprint = fingerprint
        self.batches = 0
        self.one_shot = False  # an iterator that is its own iter(): it can be read only once
        if isinstance(data, DataSource):
            raise TypeError("already a DataSource")
        if isinstance(data, (str, Path)):
            self._list = load_batches(data, batch_size)
            return
        samples = _samples(data)
        if samples is not None:  # arrays of samples, cut like a file's
            self._list = split_arrays(samples[0], batch_size, samples[1], what)
            return
        if batch_size is not None:
            raise DataError(f"batch_size cuts arrays into batches, but {what} is a {type(data).__name__} that yields its own batches",
                            "drop batch_size, or pass one array of samples")
        if not hasattr(data, "__iter__") or isinstance(data, (bytes, bytearray)):
            raise DataError(f"{what} is a {type(data).__name__}, not an iterable of batches",
                            "pass a data file, a tensor of samples, a list of batches, a DataLoader or a generator")
        if isinstance(data, (list, tuple)):
            self._list = collect(data, where=what)
            return
        self._iterable = data
        self.one_shot = hasattr(data, "__next__") and iter(data) is data

    def length(self) -> int | None:
        """How many batches, when known before they are read (a file, an array, a list, a DataLoader)."""
        if self._list is not None:
            return len(self._list)
        try:
            return len(self._iterable)
        except (TypeError, NotImplementedError):  # a generator, an IterableDataset: known only once read
            return None

    def want_head(self, n: int) -> None:
        """Keep the first ``n`` samples while the data is iterated (for verification)."""
        self._want = max(self._want, n)

    def __iter__(self):
        import hashlib

        if self.one_shot:
            if self._consumed:
                raise DataError(f"{self.what} is a one-shot iterator that was already read", "pass a list, a DataLoader or a function that returns a new iterator")
            self._consumed = True
        src = self._list if self._list is not None else self._iterable
        hashes: dict = {}
        hashable = self._want_fingerprint
        count = 0
        kept: list[Batch] = []
        have = 0
        for raw in src:
            b = as_batch(raw)
            count += 1
            hashable = hashable and _hash_batch(hashes, b)  # only where wanted: it reads every batch's bytes
            if self._head is None and have < self._want:
                kept.append(b)
                have += b.size
            yield b
        if count == 0:
            raise DataError(f"{self.what} is empty: it yielded no batches", "provide at least one batch")
        self.batches = count
        joined = "".join(f"{name}:{hashes[name].hexdigest()};" for name in sorted(hashes))
        self.fingerprint = hashlib.sha256(joined.encode()).hexdigest() if hashable else None
        if self._head is None and kept:
            self._head = _concat_head(kept, self._want)

    def head(self, n: int) -> Batch | None:
        """The first ``n`` samples as one batch (fewer when the data holds fewer); None if unreadable."""
        if self.one_shot:
            if not self._consumed:  # not read yet: this is its single pass
                self.want_head(n)
                for _ in self:
                    pass
            return None if self._head is None else _slice(self._head, n)
        if self._head is not None and self._head.size >= n:
            return _slice(self._head, n)
        kept, have = [], 0
        for raw in (self._list if self._list is not None else self._iterable):
            b = as_batch(raw)
            kept.append(b)
            have += b.size
            if have >= n:
                break
        return _concat_head(kept, n) if kept else None


def _hash_batch(hashes: dict, b: Batch) -> bool:
    """One running hash per input (positional index or name) over dtype, sample shape and bytes:
    the same samples give the same fingerprint whatever the batch size. Tensors already on an
    accelerator are not copied back to hash them (that would sync once per batch): False then,
    and the data has no fingerprint."""
    import hashlib

    import numpy as np
    import torch

    for name, t in [(str(i), t) for i, t in enumerate(b.args)] + sorted(b.kwargs.items()):
        if isinstance(t, torch.Tensor):
            if t.device.type != "cpu":
                return False
            a = np.ascontiguousarray(tensor_to_numpy(t))
            h = hashes.setdefault(f"{name}:{a.dtype}{a.shape[1:]}", hashlib.sha256())
            h.update(memoryview(a).cast("B"))
        else:
            hashes.setdefault(f"{name}:{type(t).__name__}", hashlib.sha256()).update(repr(t).encode())
    return True


def _slice(b: Batch, n: int) -> Batch:
    import torch

    cut = lambda v: v[:n] if isinstance(v, torch.Tensor) and v.dim() else v  # noqa: E731
    return Batch(tuple(cut(v) for v in b.args), {k: cut(v) for k, v in b.kwargs.items()}, b.data)


def _concat_head(kept: list[Batch], n: int) -> Batch:
    import torch

    first = kept[0]
    if len(kept) == 1 or any(len(b.args) != len(first.args) or b.kwargs.keys() != first.kwargs.keys()
                             for b in kept):
        return _slice(first, n)

    def cat(vals):
        if all(isinstance(v, torch.Tensor) and v.dim() for v in vals) and len({v.shape[1:] for v in vals}) == 1:
            return torch.cat(vals)[:n]
        return vals[0]

    return Batch(tuple(cat([b.args[i] for b in kept]) for i in range(len(first.args))),
                 {k: cat([b.kwargs[k] for b in kept]) for k in first.kwargs}, first.data)


def as_source(data: Any, batch_size: int | None = None, *, what: str = "the calibration data",
              fingerprint: bool = False) -> DataSource:
    return data if isinstance(data, DataSource) else DataSource(data, batch_size, what=what, fingerprint=fingerprint)


def model_dtype_device(model):
    """The dtype of the model's first floating parameter (or buffer) and its device."""
    import torch

    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.float32, torch.device("cpu")


def prepare(batch: Batch, dtype, device) -> Batch:
    """Floating tensors cast to the model's dtype; everything moved to its device."""
    import torch

    def conv(x):
        if isinstance(x, torch.Tensor):
            x = x.to(device)
            return x.to(dtype) if x.is_floating_point() else x
        return x

    return Batch(tuple(conv(a) for a in batch.args), {k: conv(v) for k, v in batch.kwargs.items()}, batch.data)


@contextlib.contextmanager
def eval_mode(model):
    """Run ``model`` in eval mode without copying it; every module's flag is restored after."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag


def _positional(model) -> tuple[list[str], int, bool] | None:
    """forward()'s positional parameters: (names, how many are required, whether it takes *args);
    None when the signature cannot be read."""
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    pos = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = sum(p.default is p.empty for p in pos)
    return [p.name for p in pos], required, any(p.kind is p.VAR_POSITIONAL for p in params)


def model_inputs(model, batch: Batch) -> tuple:
    """Which items of a data batch are the model's inputs ("the data goes where the user meant",
    docs/trust.md): decided here, once, for every way data arrives.

    A batch's first ``required`` items (forward's positional parameters without a default, at least
    one) are inputs. Items beyond every positional parameter are labels, and dropped. An item that
    could bind an *optional* parameter (``forward(x, scale=None)`` fed ``(x, label)``) is ambiguous:
    refused (exit 2), never guessed: optional inputs are fed by name (a dict batch)."""
    args = batch.args
    sig = _positional(model) if batch.data else None
    if sig is None:
        return args
    names, required, var = sig
    need = max(required, 1)
    if len(args) <= need:
        return args
    if not var and len(names) <= need:  # no parameter can take the extra items: labels
        return args[:need]
    optional = names[need] if need < len(names) else "*args"
    raise DataError(f"a data batch holds {len(args)} items but forward({', '.join(names) or '*args'}) requires {need}: "
                    f"item {need + 1} could be a label or the optional input '{optional}', and bnfold does not guess",
                    f"yield only the model's inputs (drop the label), or dicts of named inputs to feed '{optional}' "
                    f"(e.g. {{'{names[0] if names else 'x'}': x, '{optional.lstrip('*')}': v}})")


def call_model(model, batch: Batch):
    """model(*inputs, **kwargs): a data batch's inputs as ``model_inputs`` decides; an example's as given."""
    with running("the model's forward"):  # a death inside is named (edges.isolate)
        return model(*model_inputs(model, batch), **batch.kwargs)
