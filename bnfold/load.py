"""Load stage: model specs, factories, checkpoints, input shapes.

A model spec is ``path/to/file.py:fn``, ``pkg.module:fn`` (``fn`` returns an ``nn.Module``) or a
``.onnx`` file. Checkpoints are read with ``torch.load(weights_only=True)``; a pickled whole model is
only unpickled with ``trust_pickle=True``.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .errors import ModelSpecError, WeightsError, BadInputError

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module", "ema", "model_ema")
_PREFIXES = ("module.", "_orig_mod.")


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
    sys.path.insert(0, folder)  # let the file import its neighbours
    dont_write = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # leave no __pycache__ in the user's folder
    try:
        sys.modules[name] = module
        spec.loader.exec_module(module)
    except BaseException as err:
        sys.modules.pop(name, None)
        if isinstance(err, KeyboardInterrupt):
            raise
        raise ModelSpecError(f"importing '{path}' failed: {type(err).__name__}: {_first_line(err)}", "fix the model file") from err
    finally:
        sys.dont_write_bytecode = dont_write
        if sys.path and sys.path[0] == folder:
            sys.path.pop(0)
    return module


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def resolve_factory(spec: ModelSpec):
    if spec.kind == "file":
        module = _import_file(Path(spec.target))
    elif spec.kind == "module":
        try:
            module = importlib.import_module(spec.target)
        except ModuleNotFoundError as err:
            raise ModelSpecError(f"module '{spec.target}' not found ({_first_line(err)})", "install it or use path/to/file.py:factory") from err
        except Exception as err:
            raise ModelSpecError(f"importing '{spec.target}' failed: {type(err).__name__}: {_first_line(err)}", "fix the module") from err
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
    factory = resolve_factory(spec)
    try:
        model = factory()
    except Exception as err:
        raise ModelSpecError(f"factory '{spec}' raised {type(err).__name__}: {_first_line(err)}", "fix the factory, or call it with no arguments") from err
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"factory '{spec}' returned {type(model).__name__}, not a torch.nn.Module", "return the model object")
    if weights is not None:
        load_weights(model, weights, trust_pickle=trust_pickle)
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
            raise WeightsError(f"cannot read '{path}': {_first_line(err)}", "check the file is complete") from err
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            msg = str(err)
            if "Unsupported global" in msg or "GLOBAL " in msg:
                if not trust_pickle:
                    raise WeightsError(
                        f"'{path}' holds pickled Python objects (e.g. a whole model), which safe loading refuses",
                        "re-save it with torch.save(model.state_dict(), ...) or pass --trust-pickle if you trust the file",
                    ) from err
                try:
                    obj = torch.load(path, map_location="cpu", weights_only=False)
                except Exception as err2:
                    raise WeightsError(f"cannot unpickle '{path}': {_first_line(err2)}", "check the file and the classes it needs") from err2
            else:
                raise WeightsError(
                    f"cannot read checkpoint '{path}': {_first_line(err)}",
                    "check that it is a complete torch.save() file (it may be truncated or corrupt)",
                ) from err
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


def load_weights(model, path: str | Path, *, trust_pickle: bool = False) -> None:
    sd = read_checkpoint(path, trust_pickle=trust_pickle)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]

    def few(items):
        return ", ".join(items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")

    if shapes:
        raise WeightsError(f"'{path}' does not fit the model: {few(shapes)}", "use the checkpoint trained for this factory")
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {few(unexpected)}")
        raise WeightsError(f"'{path}' does not fit the model: {'; '.join(parts)}", "use the checkpoint trained for this factory")
    model.load_state_dict(sd, strict=True)


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' (or '1x3x224x224') → (1, 3, 224, 224); every dimension a positive integer."""
    fix = "write it as comma-separated positive integers, e.g. --input-shape 1,3,224,224"
    if not isinstance(text, str) or not text.strip():
        raise BadInputError("empty input shape", fix)
    parts = [p.strip() for p in re.split(r"[,x×]", text.strip())]
    dims = []
    for p in parts:
        if not re.fullmatch(r"[+-]?\d+", p):
            raise BadInputError(f"input shape '{text}' has a non-integer dimension '{p}'", fix)
        d = int(p)
        if d <= 0:
            raise BadInputError(f"input shape '{text}' has a {'zero' if d == 0 else 'negative'} dimension {d}", fix)
        dims.append(d)
    if len(dims) > 8:
        raise BadInputError(f"input shape '{text}' has {len(dims)} dimensions", fix)
    return tuple(dims)
