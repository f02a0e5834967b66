"""Load stage: model and data specs, factories, checkpoints, input shapes.

A model spec is ``path/to/file.py:fn``, ``pkg.module:fn`` (``fn`` returns an ``nn.Module``) or a
``.onnx`` file; a data spec is a data file (``DATA_SUFFIXES``) or a function spec of the same forms.
Both are parsed here only (``parse_model_spec``, ``spec_kind``). Checkpoints are read with
``torch.load(weights_only=True)``; a pickled whole model is only unpickled with ``trust_pickle=True``.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from bnfold import progress
from bnfold.errors import BadInputError, DataError, first_line, ModelSpecError, WeightsError
from bnfold.edges.usercode import run_user, user_code

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module", "ema", "model_ema")
_PREFIXES = ("module.", "_orig_mod.")
DATA_SUFFIXES = (".npz", ".npy", ".pt", ".pth")  # data files (DATA): every other data spec is a function


@dataclass(frozen=True)
class ModelSpec:
    kind: str  # "file", "module" or "onnx"
    target: str  # file path or dotted module name
    attr: str | None = None  # factory name

    def __str__(self) -> str:
        return f"{self.target}:{self.attr}" if self.attr else self.target


def parse_model_spec(spec: str) -> ModelSpec:
    """Parse without importing anything. Raises ModelSpecError naming the accepted forms."""
    forms = "use path/to/file.py:factory, package.module:factory or model.onnx"
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError("empty model spec", forms)
    spec = spec.strip()
    if spec.lower().endswith(".onnx"):
        return ModelSpec("onnx", spec)
    if ":" not in spec:
        raise ModelSpecError(f"model spec '{spec}' names no factory", forms)
    target, _, attr = spec.rpartition(":")
    if not target or not attr or not _IDENT.match(attr):
        raise ModelSpecError(f"model spec '{spec}' is malformed", forms)
    if target.endswith(".py") or "/" in target or "\\" in target:
        return ModelSpec("file", target, attr)
    if not _IDENT.match(target):
        raise ModelSpecError(f"model spec '{spec}': '{target}' is neither a .py file nor a module name", forms)
    return ModelSpec("module", target, attr)


def spec_kind(spec: str | Path) -> ModelSpec:
    """A model or data spec's parts without importing anything, never raising: a data file is kind
    "data", a text ``parse_model_spec`` refuses is kind "path" (the text itself)."""
    text = str(spec)
    if Path(text).suffix.lower() in DATA_SUFFIXES:
        return ModelSpec("data", text)
    try:
        return parse_model_spec(text)
    except ModelSpecError:
        return ModelSpec("path", text)


def relocate_spec(spec: Any, base: Path) -> Any:
    """A model or data spec whose file is relative to ``base`` (a config file's folder) made absolute:
    ``file.py:fn`` stays a string, a file becomes a Path; ``pkg.mod:fn`` and in-memory data stay as they are."""
    if not isinstance(spec, (str, Path)):
        return spec
    parts = spec_kind(spec)
    if parts.kind == "module":
        return str(spec)
    p = Path(parts.target if parts.kind == "file" else str(spec))
    p = p if p.is_absolute() else base / p
    return f"{p}:{parts.attr}" if parts.kind == "file" else p


def _import_file(path: Path):
    if not path.is_file():
        raise ModelSpecError(f"model file '{path}' does not exist", "check the path before ':'")
    # Import under the file's own name (as `python file.py` users' pickles refer to it) unless that
    # name is taken by another module; then under a stable name derived from the path.
    name = path.stem
    taken = sys.modules.get(name)
    if not name.isidentifier() or (taken is not None and getattr(taken, "__file__", None) != str(path.resolve())):
        import hashlib

        name = "bnfold_user_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelSpecError(f"cannot import '{path}' as Python", "point at a .py file")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    if folder not in sys.path:  # the file imports its neighbours, at import time and later (lazily, in its
        sys.path.insert(0, folder)  # factory's body): on the path for the run, as `python file.py` puts it
    dont_write = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # leave no __pycache__ in the user's folder
    try:
        sys.modules[name] = module
        with user_code(f"importing model file '{path}'"):
            spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        sys.dont_write_bytecode = dont_write
    return module


def cwd_on_path() -> None:
    """The current folder first on ``sys.path``, as ``python -m`` puts it, for the rest of the run: a
    ``module:fn`` spec resolves from where the command runs, and a factory's own (lazy) imports of
    its neighbours work too. The ``bnfold`` script itself has only its bin folder there."""
    here = os.getcwd()
    if not any(p in ("", ".") or os.path.abspath(p) == here for p in sys.path):
        sys.path.insert(0, here)


def resolve_factory(spec: ModelSpec):
    if spec.kind == "file":
        module = _import_file(Path(spec.target))
    elif spec.kind == "module":
        cwd_on_path()
        with user_code(f"importing module '{spec.target}'"):
            try:
                module = importlib.import_module(spec.target)
            except ModuleNotFoundError as err:
                if err.name and (spec.target == err.name or spec.target.startswith(err.name + ".")):
                    raise ModelSpecError(f"module '{spec.target}' not found ({first_line(err)})", "install it or use path/to/file.py:factory") from err
                raise
    else:
        raise ModelSpecError(f"'{spec}' is an ONNX file, not a factory", "use it where an ONNX model is accepted")
    obj: Any = module
    for part in spec.attr.split("."):
        if not hasattr(obj, part):
            raise ModelSpecError(f"'{spec.target}' has no attribute '{spec.attr}'", "check the name after ':'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelSpecError(f"'{spec}' is a {type(obj).__name__}, not a callable", "point at a function or class that returns an nn.Module")
    return obj


def load_model(spec: str | ModelSpec, weights: str | Path | None = None, *, trust_pickle: bool = False):
    """Build the model from its factory and load ``weights`` into it. Returns an nn.Module in eval mode."""
    from torch import nn

    spec = parse_model_spec(spec) if isinstance(spec, str) else spec
    progress.current().step("load", str(spec))
    factory = resolve_factory(spec)
    model = run_user(factory, what=f"model factory '{spec}'")
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"factory '{spec}' returned {type(model).__name__}, not a torch.nn.Module", "return the model object")
    if weights is not None:
        load_weights(model, weights, trust_pickle=trust_pickle)
    else:
        meta = _meta_names(model)
        if meta:
            raise ModelSpecError(f"factory '{spec}' built the model on the meta device (no values, e.g. {meta[0]})",
                                 "pass --weights with a checkpoint for it, or build it on the CPU")
        progress.current().note("no weights given: using the weights the factory creates")
    return model.eval()


def read_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> Mapping[str, Any]:
    """Read a state_dict from ``path``, unwrapping the usual containers and DDP prefixes."""
    import torch
    from torch import nn

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file '{path}' does not exist" if not path.exists() else f"weights path '{path}' is not a file", "check --weights")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise WeightsError("reading .safetensors needs the safetensors package", "pip install safetensors") from err
        try:
            obj: Any = load_file(str(path))
        except Exception as err:
            raise WeightsError(f"cannot read '{path}': {first_line(err)}", "check the file is complete") from err
    else:
        obj = _torch_load(path, trust_pickle)
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    for _ in range(3):  # {"state_dict": {...}}, {"model": {"state_dict": ...}}
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], (Mapping, nn.Module))), None)
            if inner is not None and not any(isinstance(v, torch.Tensor) for v in obj.values()):
                obj = inner.state_dict() if isinstance(inner, nn.Module) else inner
                continue
        break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"'{path}' is not a state_dict (a mapping of names to tensors)", "save model.state_dict()")
    sd = dict(obj)
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _is_pickle(path: Path) -> bool:
    """A complete pickle opcode stream (read, never executed)."""
    import pickletools

    try:
        with open(path, "rb") as fh:
            if fh.read(1) != b"\x80":
                return False
            fh.seek(0)
            return any(op.name == "STOP" for op, _, _ in pickletools.genops(fh))
    except Exception:
        return False


def _torch_load(path: Path, trust_pickle: bool):
    """torch.load with weights_only=True; pickles (torch's or plain) only with ``trust_pickle``."""
    import pickle
    import warnings
    import zipfile

    import torch

    with warnings.catch_warnings():  # torch warns about pickle protocols and weights_only: the message below says it
        warnings.simplefilter("ignore")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            safe_err = err
        msg = str(safe_err)
        zipped = zipfile.is_zipfile(path)  # False for a file it cannot read
        pickled = "Unsupported global" in msg or "GLOBAL " in msg or (
            "Weights only load failed" in msg and (zipped or _is_pickle(path)))
        if not pickled:
            why = "not a torch.save() file" if "Weights only load failed" in msg else first_line(safe_err)
            raise WeightsError(
                f"cannot read checkpoint '{path}': {why}",
                "check that it is a complete torch.save() file (it may be truncated or corrupt)",
            ) from safe_err
        kind = ("a torch.save() file holding pickled Python objects (e.g. a whole model)" if zipped
                else "a Python pickle")
        if not trust_pickle:
            raise WeightsError(
                f"'{path}' is {kind}; loading it would run code from the file, which safe loading refuses",
                "re-save it with torch.save(model.state_dict(), ...), or pass --trust-pickle (trust_pickle=True) if you trust the file",
            ) from safe_err
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            torch_err = err
        if not zipped:  # pickle.dump() output: not a torch.save() file, but a trusted pickle
            try:
                with open(path, "rb") as fh:
                    return pickle.load(fh)
            except Exception as err:
                torch_err = err
        raise WeightsError(f"cannot unpickle '{path}' (--trust-pickle): {type(torch_err).__name__}: {first_line(torch_err)}",
                           "check the file and that the classes it needs can be imported") from torch_err


def load_weights(model, path: str | Path, *, trust_pickle: bool = False) -> None:
    sd = read_checkpoint(path, trust_pickle=trust_pickle)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    keys = [f"{what} keys {_few(names)}" for what, names in (("missing", missing), ("unexpected", unexpected))
            if names]
    misfit = _few(shapes) if shapes else "; ".join(keys)
    if misfit:
        raise WeightsError(f"'{path}' does not fit the model: {misfit}",
                           "use the checkpoint trained for this factory")
    meta = bool(_meta_names(model))
    model.load_state_dict(sd, strict=True, assign=meta)  # a meta-device model takes the checkpoint's tensors
    left = _meta_names(model)
    if left:
        raise WeightsError(f"the model was built on the meta device and '{path}' does not hold {_few(left)}",
                           "build the model on the CPU, or save every buffer in the checkpoint")


def _meta_names(model) -> list[str]:
    """The parameters and buffers of ``model`` on the meta device (no values)."""
    return [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]


def _few(items: list[str]) -> str:
    return ", ".join(items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")


INT64_MAX = 2**63 - 1
# A conversion holds an input tensor several times over: bnfold draws it in float64 and casts it, the
# model's activations are at least its size, and PyTorch and onnxruntime each run it (twice over for the
# graph-optimisation levels). Refused up front when this many float copies exceed the available memory.
ALLOC_COPIES = 8


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' (or '1x3x224x224') → (1, 3, 224, 224); every dimension a positive int64. (Whether
    such a tensor fits in memory is ``check_alloc``'s job, where bnfold allocates it.)"""
    fix = "write it as comma-separated positive integers, e.g. --input-shape 1,3,224,224"
    if not isinstance(text, str) or not text.strip():
        raise BadInputError("empty input shape", fix)
    body = text.strip()
    if body.startswith("[") and body.endswith("]"):  # the documented bracket form, [1, 3, 224, 224], everywhere
        body = body[1:-1]
    parts = [p.strip() for p in re.split(r"[,x×]", body)]
    dims = []
    for p in parts:
        if not re.fullmatch(r"[+-]?\d+", p):
            raise BadInputError(f"input shape '{text}' has a non-integer dimension '{p}'", fix)
        d = int(p)
        if d <= 0:
            raise BadInputError(f"input shape '{text}' has a {'zero' if d == 0 else 'negative'} dimension {d}", fix)
        if d > INT64_MAX:
            raise BadInputError(f"input shape '{text}': dimension {d} is beyond 2**63-1", fix)
        dims.append(d)
    if len(dims) > 8:
        raise BadInputError(f"input shape '{text}' has {len(dims)} dimensions", fix)
    return tuple(dims)


def check_seed(seed: Any, what: str = "--seed", *, slack: int = 0) -> int:
    """A seed is an integer in [0, 2**63-1] (numpy refuses negatives, torch overflows beyond uint64).
    ``slack``: derived seeds (seed + k) may exceed the bound by this much."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise BadInputError(f"{what} {seed!r} is not an integer", "pass an integer from 0 to 2**63-1")
    if not 0 <= seed <= INT64_MAX + slack:
        raise BadInputError(f"{what} {seed} is outside 0..2**63-1", "pass an integer from 0 to 2**63-1")
    return seed


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (MemAvailable), None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_alloc(shape, dtype: Any = "float32", what: str = "input") -> int:
    """Refuse (BadInputError, exit 2) a tensor of ``shape`` whose conversion would not fit in memory.

    Returns the tensor's size in bytes. ``dtype``: numpy/torch dtype or name (itemsize)."""
    import math

    import numpy as np

    dims = [int(d) for d in shape]
    n = math.prod(dims)
    try:
        itemsize = np.dtype(str(dtype).replace("torch.", "")).itemsize
    except TypeError:
        itemsize = 4
    nbytes = n * itemsize
    dims_text = "×".join(map(str, dims))
    if n > INT64_MAX:
        raise BadInputError(f"{what} ({dims_text}) has {n:.3g} elements, beyond what a tensor can index", "pass a smaller shape")
    need = n * 8 + nbytes * ALLOC_COPIES  # the float64 draw plus the copies a conversion holds
    avail = available_memory()
    if avail is not None and need > avail:
        raise BadInputError(
            f"{what} ({dims_text}, {str(dtype).replace('torch.', '')}) "
            f"has {n:,} elements: {_gb(nbytes)} per tensor, about {_gb(need)} for a conversion, "
            f"but only {_gb(avail)} of memory is available",
            "pass a smaller shape (the batch dimension can usually be 1)",
        )
    return nbytes


def _onnx_elem_dtype(elem_type: int):
    from onnx import TensorProto, helper

    if elem_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    try:
        dt = helper.tensor_dtype_to_np_dtype(elem_type)
    except Exception:
        return None
    return dt if dt.kind in "fiub" else None


@dataclass(frozen=True)
class OnnxInput:
    name: str
    dims: tuple  # fixed size, or None for a dynamic dimension
    shape: tuple  # the shape bnfold feeds (dynamic dims from overrides, else 1)
    dtype: Any  # numpy dtype


def onnx_inputs(model_or_path, overrides=None) -> list[OnnxInput]:
    """The graph inputs of an ONNX model as bnfold can feed them: numeric tensors of a known rank and no
    zero-size dimension, small enough to allocate. Anything else is BadInputError (exit 2)."""
    import onnx

    if isinstance(model_or_path, (str, Path)):
        m = onnx.load(str(model_or_path), load_external_data=False)
        where = f"'{model_or_path}'"
    else:
        m, where = model_or_path, "the ONNX model"
    inits = {i.name for i in m.graph.initializer}
    ins = [i for i in m.graph.input if i.name not in inits]
    if overrides is not None and len(overrides) != len(ins):
        raise BadInputError(f"the ONNX model has {len(ins)} inputs but {len(overrides)} input shapes were given", "pass one --input-shape per model input")
    out = []
    for k, i in enumerate(ins):
        kind = i.type.WhichOneof("value")
        if kind != "tensor_type":
            raise BadInputError(f"ONNX input '{i.name}' of {where} is a {kind or 'typeless value'}, not a tensor",
                                "bnfold verifies models whose inputs are numeric tensors")
        tt = i.type.tensor_type
        dt = _onnx_elem_dtype(tt.elem_type)
        if dt is None:
            tname = onnx.TensorProto.DataType.Name(tt.elem_type) if tt.elem_type in onnx.TensorProto.DataType.values() else str(tt.elem_type)
            raise BadInputError(f"ONNX input '{i.name}' of {where} holds {tname} elements, which bnfold cannot feed",
                                "bnfold verifies models whose inputs are numeric tensors")
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        shown = ["?" if d is None else d for d in dims]
        if any(d is not None and d <= 0 for d in dims):
            raise BadInputError(f"ONNX input '{i.name}' of {where} has a zero-size dimension {shown}: there is nothing to run",
                                "export the model with a non-empty input")
        if overrides is not None:
            shape = tuple(int(s) for s in overrides[k])
            if len(shape) != len(dims) or any(d is not None and d != s for d, s in zip(dims, shape)):
                raise BadInputError(f"input shape {list(shape)} does not fit ONNX input '{i.name}' {shown}", "match the fixed dimensions of the model input")
        else:
            shape = tuple(d if d else 1 for d in dims)
        check_alloc(shape, dt, f"ONNX input '{i.name}'")
        out.append(OnnxInput(i.name, dims, shape, dt))
    return out


def check_onnx_sample(inputs: list[OnnxInput], arrays, what: str = "the calibration data", *, with_batch: bool = False) -> None:
    """Refuse (DataError) data whose tensors do not fit the ONNX inputs' count, rank or fixed sizes."""

    arrays = list(arrays)
    if len(arrays) != len(inputs):
        raise DataError(f"{what} has {len(arrays)} inputs but the ONNX model takes {len(inputs)} ({', '.join(i.name for i in inputs)})",
                        "give one array per model input")
    for a, inp in zip(arrays, inputs):
        shape = tuple(a.shape)
        shown = ["?" if d is None else d for d in inp.dims]
        if len(shape) != len(inp.dims) or any(d is not None and d != s for d, s in list(zip(inp.dims, shape))[0 if with_batch else 1:]):
            raise DataError(f"{what} has shape {list(shape)} but ONNX input '{inp.name}' expects {shown}",
                            "check the data's channels and size against the model")


def tensor_to_numpy(t):
    """A tensor read from a user's file as a numpy array: detached (requires_grad), on the CPU, and
    upcast to float32 where numpy has no such dtype (bfloat16, float8)."""
    import torch

    t = t.detach().cpu()
    if t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64):
        t = t.to(torch.float32)
    if t.is_conj():
        t = t.resolve_conj()
    return t.numpy()


_ONNX_EXTERNAL = re.compile(r"should be stored in (?P<path>.+?), but (?P<why>it doesn't exist|it is not regular file|.*?)(\.|$)")
_ORT_NO_KERNEL = re.compile(r"Could not find an implementation for (?P<op>[A-Za-z0-9_]+)\((?P<ver>\d+)\)")


def onnx_error(path: str | Path, err: BaseException, action: str = "read") -> BadInputError:
    """One precise line for an ONNX file that onnx or onnxruntime cannot load: a missing external-data
    file, an operator with no kernel for the model's element type (float64 Conv on the CPU provider),
    or (otherwise) a file that is not a complete ONNX model."""
    text = " ".join(str(err).split()) or type(err).__name__
    m = _ONNX_EXTERNAL.search(text)
    if m or isinstance(err, FileNotFoundError):
        data = m.group("path") if m else getattr(err, "filename", None) or "?"
        why = "is missing" if (not m or "exist" in m.group("why") or not Path(data).exists()) else "is not a regular file"
        return BadInputError(f"the external data file '{data}' of ONNX model '{path}' {why}",
                             "keep the .data file beside the model under the name it was saved with")
    m = _ORT_NO_KERNEL.search(text)
    if m:
        op = m.group("op")
        return BadInputError(
            f"onnxruntime cannot {action} '{path}': it has no kernel for {op}({m.group('ver')}) with the element types of this "
            f"model (e.g. its CPU provider has no float64 {op})",
            "convert the model in float32 (model.float()), or pass --no-verify to skip the onnxruntime check")
    first = text[:300]
    return BadInputError(f"onnxruntime cannot {action} '{path}': {first}" if "ONNXRuntime" in text or "onnxruntime" in text.lower()
                         else f"'{path}' is not a readable ONNX model ({type(err).__name__}: {first}); it may be truncated or another format",
                         "check that the file is a complete, valid ONNX model")
