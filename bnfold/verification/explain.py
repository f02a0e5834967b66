"""A verdict that explains itself: the first place where the candidate leaves the reference.

``explain(reference, onnx_path, inputs)`` compares the candidate ONNX file with its reference value
by value, in the order the reference computes them, and names the first place whose difference is
beyond that place's own float32 noise floor, the way the user knows it:

    diverges first at `layer3.1.conv2` (ONNX node `node_Conv_18`, Conv; BatchNorm `layer3.1.bn2`
    folded into it): max abs 4.1e-02 vs floor 3.0e-06 (limit 1.3e-05); everything before it matches

**A PyTorch reference.** The compared places are the outputs of the reference's modules (forward
hooks on the original module in eval mode, each module's output cloned as it is produced) that are
called once, return one floating tensor, and compute the same function before and after the fold:

* a BN folded *backward* into its producer (conv → BN) disappears, and the producer's output in the
  file is the BN's output: that place is compared against the BN's reference output and named after
  the producer (``folded`` lists the BN); the producer's own output no longer exists;
* a BN folded *forward* (BN → conv) disappears too; the consumer's output is unchanged and compared;
* the submodules of a folded BN (timm's ``BatchNormAct2d``: ``drop``, ``act``) are compared through the
  BN's own output, which is the remainder's output;
* the modules a BN was folded into by the other rules (concat, reshape, identity-branch, ...) hold
  part of a BN and are not compared; the blocks around them are.

The value of a module in the ONNX file is the last value (in the file's topological order) that a
node in the module's scope produced. Which node came from which module: the file's own node names
when the TorchScript exporter wrote it (``/layer1/layer1.0/conv1/Conv``); otherwise (the dynamo
exporter, whose ``name_scopes`` metadata bnfold strips from the written file) the mapping is taken
from a fresh export of a folded copy of the reference, kept in memory with its metadata: the dynamo
exporter names values after the traced graph, so the written file and the fresh export share the
value names (``conv2d_7``, ``relu_3``, ``getitem_2``). A value the fresh export does not have, or
whose shape differs from the module's output, is not compared.

The noise floor of a place is that place's own float32 error: max |reference − reference64| from a
float64 run of the reference with the same hooks; the candidate is beyond it when max |candidate −
reference64| > K·floor + K·eps32·max|reference64| (``compare.divergence``). Without a float64 run
(too large, not floating), the comparator's default tolerance for the dtype is the limit.

**An ONNX reference** (ONNX-in folding): every value of the folded file that the original file also
has (the fold keeps producer output names; a folded BN's output name is taken over by its producer)
is compared, in the folded file's order, judged with the comparator's default tolerance (no float64
run exists for an ONNX file).

Both files are run on copies that expose the compared values as extra graph outputs; the written
file is never changed. The candidate runs on one provider (CPU by default; the provider of the first
failing run when ``explain_report`` picks it) at ``ORT_DISABLE_ALL``; a GPU provider's reference runs
on its GPU (TF32 off). The cost (one float32 and one float64 run of the reference with every module's
output kept, an export of a folded copy, one session with extra outputs) is paid only when asked or
when verification failed. Any error while explaining gives ``status: "unavailable"`` with the reason:
an explanation never changes a verdict.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping

import numpy as np

from bnfold.errors import first_line
from bnfold.onnx_pass.export import _dynamo_ir, _module_of, _scope_paths
from bnfold.onnx_pass.io import node_label
from bnfold.torch_pass.fold import fold_with_plan, inspect
from bnfold.verification.compare import NOISE_K, Record, divergence
from bnfold.verification.providers import PROVIDERS
from bnfold.verification.runners import OrtRunner, TorchRunner, as_feeds, hooks_removed, to_numpy
from bnfold.verification.verify import FLOAT64_MAX_BYTES, VerifyReport, _float64_runner, _input_sets

# rules whose target modules keep their own output function (the BN sits before them)
_SAME_FUNCTION_RULES = ("forward", "pool-head")


@dataclass
class Point:
    """One compared place: a module's output (PyTorch reference) or an ONNX value (ONNX reference)."""

    value: str  # the ONNX value compared
    module: str | None = None  # the PyTorch module it is the output of (the producer, for a BN folded into it)
    onnx_node: str | None = None  # the node of the candidate file that produces it
    op_type: str | None = None
    folded: list = field(default_factory=list)  # BatchNorm layers folded into this place
    original_node: str | None = None  # ONNX reference: the original file's node that produced this value
    max_abs_error: float | None = None  # max |candidate − reference|
    max_abs_error_float64: float | None = None  # max |candidate − reference64|
    noise_floor: float | None = None  # max |reference − reference64|: this place's own float32 error
    limit: float | None = None  # the difference allowed here (K·floor + resolution, or the default atol)
    diverged: bool = False

    def where(self) -> str:
        node = f"ONNX node `{self.onnx_node}`" + (f", {self.op_type}" if self.op_type else "")
        if self.module is None:
            orig = f"; {self.original_node} in the original" if self.original_node else ""
            return f"{node} (value `{self.value}`{orig})"
        bns = f"; BatchNorm {', '.join(f'`{b}`' for b in self.folded)} folded into it" if self.folded else ""
        return f"`{self.module}` ({node}{bns})"


@dataclass
class Explanation(Record):
    """Where the candidate first leaves the reference. ``status``: "diverged" (``first`` names the
    place), "matches" (no compared place is beyond its floor) or "unavailable" (``message`` says why)."""

    status: str
    message: str
    reference: str | None = None  # "pytorch" or "onnx"
    provider: str | None = None  # where the candidate ran
    inputs: str | None = None  # the input set explained
    floor: str | None = None  # "float64": each place's own float32 noise; "tolerance": the default atol
    noise_k: float = NOISE_K
    first: Point | None = None
    points: list = field(default_factory=list)  # every compared place, in order

    def __str__(self) -> str:
        return self.message

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Explanation":
        return super().from_dict(d, first=Point(**d["first"]) if d.get("first") else None,
                                 points=[Point(**p) for p in d.get("points", [])])


# ----------------------------------------------------------------------------- the entry points
def explain(reference, onnx_path: str | Path, inputs, *, provider: str = "cpu", inputs_name: str | None = None,
            noise_k: float = NOISE_K, float64_max_bytes: int = FLOAT64_MAX_BYTES) -> Explanation:
    """Where ``onnx_path`` first leaves ``reference`` (an nn.Module, or the path of the original
    .onnx file) on one input set of ``inputs`` (``inputs_name``, default the first). Never raises
    for a model it cannot explain: the Explanation then says why (``status == "unavailable"``)."""
    sets = _input_sets(inputs)
    name = inputs_name if inputs_name in sets else next(iter(sets))
    try:
        if isinstance(reference, (str, Path)):
            exp = _explain_onnx(Path(reference), Path(onnx_path), sets[name], provider)
        else:
            exp = _explain_module(reference, Path(onnx_path), sets[name], provider, noise_k, float64_max_bytes)
    except Exception as err:  # noqa: BLE001 — a diagnosis, never a new failure
        exp = Explanation("unavailable", f"no explanation: {type(err).__name__}: {first_line(err)}")
    exp.provider, exp.inputs, exp.noise_k = provider, name, noise_k
    return exp


def explain_report(report: VerifyReport, reference, onnx_path: str | Path, inputs, **keywords) -> Explanation:
    """``explain`` on the input set and provider of ``report``'s first failing ONNX run (its first
    ONNX run when all passed), recorded in ``report.explanation``."""
    onnx_runs = [r for r in report.runs if r.target != "folded-module"]
    run = next((r for r in onnx_runs if not r.passed), onnx_runs[0] if onnx_runs else None)
    if run is not None:
        keywords.setdefault("provider", run.provider)
        keywords.setdefault("inputs_name", run.inputs)
    exp = explain(reference, onnx_path, inputs, **keywords)
    if exp.status == "matches" and run is not None and not run.passed:
        exp.message += ": the difference arises after the last of them, or in the outputs themselves"
    report.explanation = exp.to_dict()
    return exp


def _explanation(points: list[Point], reference: str, floor: str) -> Explanation:
    """The Explanation of the judged ``points``: the first that diverged, in words."""
    first = next((p for p in points if p.diverged), None)
    status, message = _message(points, first, floor)
    return Explanation(status, message, reference=reference, floor=floor, first=first, points=points)


def _message(points: list[Point], first: Point | None, floor: str) -> tuple[str, str]:
    if not points:
        return "unavailable", "no explanation: no place of the reference could be matched with a value of the ONNX file"
    f64 = floor == "float64"
    if first is None:
        return "matches", (f"no compared place leaves the reference beyond its "
                           f"{'float32 noise floor' if f64 else 'tolerance'} ({len(points)} places compared)")
    before = points.index(first)
    what, size = ("floor", first.noise_floor) if f64 else ("tolerance", first.limit)
    err = (first.max_abs_error_float64 if f64 and first.max_abs_error_float64 is not None
           else first.max_abs_error)
    tail = (f"everything before it matches ({before} place{'s' if before != 1 else ''} compared before it, {len(points)} in all)"
            if before else f"it is the first of the {len(points)} places compared")
    return "diverged", f"diverges first at {first.where()}: max abs {_g(err)} vs {what} {_g(size)} (limit {_g(first.limit)}); {tail}"


def _g(x) -> str:
    return "-" if x is None else f"{x:.2g}"


def _judge(points: list[Point], ref: dict, cand: dict, ref64: dict | None, keys: list[str], k: float) -> list[Point]:
    """Each point judged against its reference value; the points that could be compared, in order."""
    out = []
    for p, key in zip(points, keys):
        got, want = cand.get(p.value), ref.get(key)
        if (got is None or want is None or got.shape != want.shape or got.dtype.kind != "f"
                or not np.isfinite(want).all()):
            continue
        t64 = ref64.get(key) if ref64 is not None else None
        if t64 is not None and not np.isfinite(t64).all():
            t64 = None
        d = divergence(want, got, t64, k)
        p.max_abs_error, p.max_abs_error_float64, p.noise_floor, p.limit = (d["max_abs_error"], d["max_abs_error_float64"],
                                                                              d["noise_floor"], d["limit"])
        p.diverged = bool(d["beyond"])
        out.append(p)
    return out


# ------------------------------------------------------------------------------ PyTorch reference
def _explain_module(model, onnx_path: Path, feeds, provider: str, k: float, float64_max_bytes: int) -> Explanation:
    example = tuple(as_feeds(feeds).args)
    nodes = _file_nodes(onnx_path)
    value_module, plan = _value_modules(model, nodes, example)
    device = PROVIDERS[provider].torch_device or "cpu"
    with TorchRunner(model, device=device, allow_tf32=False) as runner:
        order, calls, ref = _capture(runner, feeds)
    ref64 = None
    runner64, _ = _float64_runner(model, float64_max_bytes)
    if runner64 is not None:
        with runner64:
            _, _, ref64 = _capture(runner64, feeds)
    points, keys = _module_points(order, calls, plan, value_module, nodes)
    cand = _onnx_values(onnx_path, [p.value for p in points], feeds, provider)
    floor = "float64" if ref64 is not None else "tolerance"
    return _explanation(_judge(points, ref, cand, ref64, keys, k), "pytorch", floor)


def _capture(runner: TorchRunner, feeds) -> tuple[list[str], dict[str, int], dict[str, np.ndarray]]:
    """Run ``runner`` once with a forward hook on every submodule: (names in the order their
    outputs were produced, calls per name, each floating single-tensor output as numpy, copied
    when produced: later in-place operations do not change it)."""
    import torch

    order: list[str] = []
    calls: dict[str, int] = {}
    outs: dict[str, np.ndarray] = {}

    def hook(name):
        def fn(mod, args, out):
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == 1:
                order.append(name)
                if isinstance(out, torch.Tensor) and out.is_floating_point():
                    outs[name] = to_numpy(out.detach().to("cpu", copy=True))
        return fn

    hooks = [m.register_forward_hook(hook(n)) for n, m in runner.model.named_modules() if n]
    with hooks_removed(hooks):
        runner.infer(feeds)
    return order, calls, outs


def _in_scope(module: str | None, scope: str) -> bool:
    return module is not None and (module == scope or module.startswith(scope + "."))


def _module_points(order: list[str], calls: dict, plan, value_module: dict[str, str], nodes: list) -> tuple[list[Point], list[str]]:
    """The places to compare, in the reference's order, with the reference output each is compared
    against (a key of the captured outputs): see the module docstring for which places count."""
    folded = {f.bn: f for f in plan.folded}
    changed = {i for f in plan.folded if f.rule not in _SAME_FUNCTION_RULES for i in f.into}
    produced = [(v, n) for n in nodes for v in n["outputs"] if v in value_module]
    points, keys = [], []
    for name in order:
        if calls.get(name) != 1 or name in changed or any(name.startswith(bn + ".") for bn in folded):
            continue  # (what remains of a folded BN, e.g. timm's act, is compared as the BN's output)
        f = folded.get(name)
        scopes, label, bns = [name], name, []
        if f is not None and f.rule == "backward" and len(f.into) == 1:
            scopes, label, bns = [name, f.into[0]], f.into[0], [name]
        hit = next(((v, n) for v, n in reversed(produced)  # the last value produced in scope
                    if any(_in_scope(value_module[v], s) for s in scopes)), None)
        if hit is None:
            continue
        points.append(Point(hit[0], module=label, onnx_node=hit[1]["name"], op_type=hit[1]["op_type"], folded=bns))
        keys.append(name)
    return points, keys


def _value_modules(model, nodes: list, example: tuple) -> tuple[dict[str, str], Any]:
    """({value name of the file: module path}, fold plan of the reference): from the file's own node
    names (TorchScript exporter), else from a fresh dynamo export of a folded copy (its metadata kept)."""
    scopes = _scope_paths(model)
    named = {}
    for n in nodes:
        view = SimpleNamespace(name=n["name"], op_type=n["op_type"], metadata_props={},
                               inputs=[SimpleNamespace(name=i) for i in n["inputs"]])  # what _module_of reads
        mod = _module_of(view, scopes)
        if mod is not None:
            named.update({v: mod for v in n["outputs"]})
    ops = [n for n in nodes if n["op_type"] != "Constant"]
    if ops and sum(1 for n in ops if any(v in named for v in n["outputs"])) * 2 >= len(ops):
        return named, inspect(model, example)
    folded, plan = fold_with_plan(model, example)
    ir_model = _dynamo_ir(folded, example, opset=None, dynamic_batch=False, optimize=False)
    del folded
    out = {}
    for node in ir_model.graph:  # top-level nodes: the file's values are compared at the top level only
        mod = _module_of(node, {})
        if mod is not None:
            out.update({v.name: mod for v in node.outputs if v is not None and v.name})
    return out, plan


# ------------------------------------------------------------------------------ the ONNX side
def _file_nodes(path: Path) -> list[dict]:
    """The top-level nodes of an ONNX file in order: name, op_type, input and output value names."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return [{"name": node_label(n), "op_type": n.op_type, "inputs": list(n.input),
             "outputs": [o for o in n.output if o]} for n in proto.graph.node]


def _onnx_values(path: Path, names: list[str], feeds, provider: str) -> dict[str, np.ndarray]:
    """The values ``names`` of ``path`` for ``feeds``: a copy of the file with them as extra graph
    outputs, run on ``provider`` at ORT_DISABLE_ALL (the file itself is not touched)."""
    import onnx

    proto = onnx.load(str(path))
    have = {o.name for o in proto.graph.output}
    wanted = list(dict.fromkeys(names))
    proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in wanted if n not in have)
    with tempfile.TemporaryDirectory(prefix="bnfold-explain-") as tmp:
        copy_path = Path(tmp) / "explain.onnx"
        # weights beside it (any size; not save_onnx: inside convert, its writes wait for the OutputSet's commit)
        onnx.save_model(proto, str(copy_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="explain.onnx.data", size_threshold=1024)
        del proto
        with OrtRunner(copy_path, provider, "disable_all", target="explain") as runner:
            got = runner.session.run(wanted, runner.feed_dict(feeds))
    return {n: np.asarray(g) for n, g in zip(wanted, got) if isinstance(g, np.ndarray)}


# ------------------------------------------------------------------------------ ONNX reference
def _explain_onnx(original: Path, candidate: Path, feeds, provider: str) -> Explanation:
    orig_nodes = {v: n for n in _file_nodes(original) for v in n["outputs"]}
    points = [Point(v, onnx_node=n["name"], op_type=n["op_type"],
                    original_node=f"{orig_nodes[v]['op_type']} `{orig_nodes[v]['name']}`")
              for n in _file_nodes(candidate) for v in n["outputs"] if v in orig_nodes]
    names = [p.value for p in points]
    ref = _onnx_values(original, names, feeds, "cpu")
    cand = _onnx_values(candidate, names, feeds, provider)
    return _explanation(_judge(points, ref, cand, None, names, NOISE_K), "onnx", "tolerance")
