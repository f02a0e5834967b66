"""Strict JSON for every file and stdout bnfold writes: never a NaN, Infinity or -Infinity literal.

Python's ``json`` writes ``NaN``/``Infinity``, which strict parsers (``jq``, JavaScript, Go, Rust serde)
reject. ``dumps`` replaces every non-finite float — also numpy and torch scalars, and tensors/arrays
turned into lists — by ``null``; anything else unknown goes through ``default`` (``str``).
"""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any

__all__ = ["dumps", "loads", "loads_strict", "sanitize"]


def sanitize(obj: Any) -> Any:
    """A copy of ``obj`` made of JSON types only, with non-finite floats as None."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {(k if isinstance(k, str) else str(k)): sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [sanitize(v) for v in obj]
    tolist = getattr(obj, "tolist", None)  # numpy / torch scalars and arrays
    if callable(tolist) and type(obj).__module__.split(".")[0] in ("numpy", "torch"):
        with contextlib.suppress(Exception):
            return sanitize(tolist())
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        with contextlib.suppress(Exception):
            return sanitize(obj.to_dict())
    if hasattr(obj, "__fspath__"):
        return str(obj)
    return obj


def dumps(obj: Any, **kw: Any) -> str:
    """``json.dumps`` that never emits NaN/Infinity (they become null) and renders unknowns with str."""
    kw.setdefault("default", str)
    kw["allow_nan"] = False
    return json.dumps(sanitize(obj), **kw)


def loads(text: str | bytes, **kw: Any) -> Any:
    """``json.loads`` (reads old files that hold NaN/Infinity too): a drop-in for ``import json``."""
    return json.loads(text, **kw)


def loads_strict(text: str | bytes) -> Any:
    """Strict ``json.loads``: NaN/Infinity literals are an error, as for any strict reader."""

    def bad(name: str):
        raise ValueError(f"non-standard JSON literal {name}")

    return json.loads(text, parse_constant=bad)
