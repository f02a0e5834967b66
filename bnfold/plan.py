"""The plan: every BatchNorm's fate, from both fold passes.

Each BN appears exactly once: ``Folded`` (by which rule, into what, in which pass: ``pytorch`` or
``onnx``) or ``Unfolded`` (with the reasons of every pass that looked at it). The PyTorch pass writes
``Edit`` records (what to apply to which module); the ONNX pass folds nodes directly. ``merge_plans``
joins the PyTorch plan with what the ONNX pass did on the exported file, so that the number left
equals the BatchNormalization nodes in that file.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

IDENTITY_BRANCH = "identity-branch"  # a BN-only branch (BN(x) summed with a conv on x) joined that conv's centre tap
MERGED_BRANCH = "merged-branch"  # a conv branch's BN whose conv merged into a parallel conv on the same input


@dataclass
class Folded:
    bn: str
    into: list[str]
    rule: str  # backward | forward | concat | reshape | pool-head | identity-branch | merged-branch | ...
    into_type: list[str]
    fold_pass: str = "pytorch"  # "pytorch" or "onnx"

    def to_dict(self) -> dict[str, Any]:
        return {"bn": self.bn, "into": list(self.into), "rule": self.rule, "into_type": list(self.into_type),
                "pass": self.fold_pass}


@dataclass
class Unfolded:
    bn: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"bn": self.bn, "reason": self.reason}


@dataclass(frozen=True)
class Edit:
    """One piece of a fold: apply the BN's (s, t) — channels ``sl`` of it, each repeated ``repeat``
    times — to ``target``'s output channels ("backward") or input channels ("forward")."""

    target: str
    op: str  # "backward" | "forward" | "identity" (a parallel BN branch added at the centre tap)
    bn: str
    sl: tuple[int, int] | None = None
    repeat: int = 1
    sign: int = 1  # −1: the BN branch is subtracted from the conv branch it joins
    affine: str = "st"  # which map: "st" (s, t); "s" (s, 0): a further branch of a sum; "s-1" (s − 1, 0): a kept skip


@dataclass(frozen=True)
class Merge:
    """Parallel branches that sum into one tensor, re-parameterised as one conv: ``target`` (the
    conv that stays) takes the kernels and biases of ``parts`` ((conv path, sign relative to the
    target's), each after its own edits), all written with ``groups`` groups and the target's kernel
    size; the part convs then contribute zeros."""

    target: str
    parts: tuple[tuple[str, int], ...]
    groups: int


@dataclass(frozen=True)
class Unmerged:
    """Parallel branches summed into one tensor that stay separate: ``branches`` and why."""

    branches: tuple[str, ...]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"branches": list(self.branches), "reason": self.reason}


@dataclass
class FoldPlan:
    """Every BN layer's fate. ``folded`` and ``unfolded`` together name each BN exactly once."""

    folded: list[Folded] = field(default_factory=list)
    unfolded: list[Unfolded] = field(default_factory=list)
    tracer: str | None = None
    trace_error: str | None = None
    edits: list[Edit] = field(default_factory=list, repr=False, compare=False)
    merges: list[Merge] = field(default_factory=list, repr=False, compare=False)
    unmerged: list[Unmerged] = field(default_factory=list, repr=False, compare=False)
    graph_edits: int = field(default=0, repr=False, compare=False)  # ONNX nodes the structural pass rewrote
    repairs: list[str] = field(default_factory=list, repr=False, compare=False)  # what the ONNX pass repaired, one line each

    def to_dict(self) -> dict[str, Any]:
        return {
            "tracer": self.tracer,
            "trace_error": self.trace_error,
            "folded": [f.to_dict() for f in self.folded],
            "unfolded": [u.to_dict() for u in self.unfolded],
        }

    @property
    def bn_count(self) -> int:
        return len(self.folded) + len(self.unfolded)


def folded_entry(bn: str, into: list[str], rule: str, into_type: list[str], fold_pass: str = "onnx") -> Folded:
    """A ``Folded`` plan entry made by the ONNX pass (or the exporter's optimiser)."""
    return Folded(bn, list(into), rule, list(into_type), fold_pass=fold_pass)


def merge_plans(base: FoldPlan | None, nodes: list, entries: dict, module_of: dict, optimised_away: set) -> FoldPlan:
    """The plan of an exported file: ``base`` (the PyTorch pass) joined with the ONNX pass.

    ``nodes``: the exported BatchNormalization nodes, in order; ``entries[id(node)]``: the ONNX pass's
    plan entry for it; ``module_of[node name]``: the PyTorch module it came from; ``optimised_away``:
    ids of nodes the ONNX pass left that the exporter's optimiser removed. Every BN of the result is
    folded in ``pytorch`` (as ``base`` said), folded in ``onnx``, or left with both passes' reasons.
    """

    def mod(name: str) -> str:
        return module_of.get(name) or name

    base = base if base is not None else FoldPlan(tracer="onnx")
    pytorch_left = {u.bn: u.reason for u in base.unfolded}
    folded, unfolded, seen = list(base.folded), [], set()
    for n in nodes:
        name = mod(n.name)
        seen.add(name)
        entry = entries.get(id(n))
        if isinstance(entry, Unfolded) and id(n) in optimised_away:
            folded.append(folded_entry(name, [], "exporter-optimizer", []))
        elif entry is not None and not isinstance(entry, Unfolded):
            folded.append(folded_entry(name, [mod(i) for i in entry.into], entry.rule, list(entry.into_type)))
        else:
            why_torch = pytorch_left.get(name)
            prefix = f"PyTorch pass: {why_torch}; " if why_torch else ""
            unfolded.append(Unfolded(name, f"{prefix}ONNX pass: {entry.reason if entry is not None else 'not visited'}"))
    # BN layers the plan left that have no node in the export (never called by forward())
    for u in base.unfolded:
        if u.bn not in seen:
            unfolded.append(Unfolded(u.bn, f"{u.reason}; not in the exported graph"))
    return replace(base, folded=folded, unfolded=unfolded)
