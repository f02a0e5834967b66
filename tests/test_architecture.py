"""The house rules of issue 21, checked on the source: no import cycle in bnfold/ and cli/
(module-level and function-level imports both count), no import of bnfold's own modules inside a
function (only heavy third-party libraries are imported lazily, for an instant ``--help``), no
function over 80 lines and none with more than 10 parameters (typer command signatures aside), and
the stage folders the architecture page names."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

MAX_LINES, MAX_PARAMS = 80, 10


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted((ROOT / "bnfold").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    for path in sorted((ROOT / "cli").glob("*.py")):
        stem = path.stem
        mods["bnfold_cli" + ("" if stem == "__init__" else "." + stem)] = path
    return mods


MODULES = _modules()


def _resolve(importer: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The project modules an import statement loads (a name that is a submodule counts as one)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    base = node.module or ""
    if node.level:
        pkg = importer.split(".")
        is_pkg = MODULES[importer].name == "__init__.py"
        pkg = pkg if is_pkg else pkg[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([base] if base else []))
    out = []
    for a in node.names:
        sub = f"{base}.{a.name}"
        if sub in MODULES:
            out.append(sub)
        elif base in MODULES:
            out.append(base)
    return out


def _graph() -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    inner: list[tuple[str, int, str]] = []
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text())
        funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        in_func = {id(s) for f in funcs for s in ast.walk(f) if isinstance(s, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = _resolve(mod, node)
                edges[mod].update(t for t in targets if t != mod)
                if targets and id(node) in in_func:
                    inner.append((mod, node.lineno, ", ".join(targets)))
    return edges, inner


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    edges, _ = _graph()
    assert _cycles(edges) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_project_import_inside_a_function():
    _, inner = _graph()
    assert inner == []


def test_no_module_imports_the_package_itself():
    """``bnfold/__init__`` lazily imports every stage; a stage importing ``bnfold`` would close a cycle."""
    edges, _ = _graph()
    assert [m for m, ts in edges.items() if "bnfold" in ts and m.startswith("bnfold.")] == []


def _is_typer_command(fn: ast.FunctionDef) -> bool:
    return any(isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr in ("command", "callback")
               for d in fn.decorator_list)


def test_function_size_and_parameters():
    long, wide = [], []
    for mod, path in MODULES.items():
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            lines = fn.end_lineno - fn.lineno + 1
            a = fn.args
            params = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs] + [p.arg for p in (a.vararg, a.kwarg) if p]
            params = [p for p in params if p not in ("self", "cls")]
            if lines > MAX_LINES:
                long.append(f"{mod}.{fn.name}: {lines} lines")
            if len(params) > MAX_PARAMS and not _is_typer_command(fn):
                wide.append(f"{mod}.{fn.name}: {len(params)} parameters")
    assert long == [] and wide == []


def test_stage_folders():
    for pkg in ("edges", "calibration", "torch_pass", "onnx_pass", "verification"):
        assert (ROOT / "bnfold" / pkg / "__init__.py").is_file(), pkg
    for mod in ("plan", "options", "fold_math", "pipeline", "report", "errors"):
        assert (ROOT / "bnfold" / f"{mod}.py").is_file(), mod
