"""The rule protocol of both fold passes (PyTorch modules and ONNX nodes).

A rule is one pattern around a BatchNorm. ``rule.match(ctx, bn)`` either returns the rule's own
match, a dataclass with typed fields (what folds into what), or raises ``NoMatch`` with the reason it
does not fold here. Helpers deep inside a match raise ``NoMatch`` themselves (as onnxscript's rewriter
raises ``MatchFailureError``), so a failure travels up without being handed back by every caller.

``NoMatch.applies`` says whether the pattern was there at all: ``False`` when its anchor op is missing
(a ``concat`` rule on a BN whose input is no concatenation), and the reason is then generic ("its
input comes from Relu 'r'"); ``True`` when the pattern is there but not exact, and the reason is the
one a user needs. ``try_rules`` runs rules in order of preference and keeps every failure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

C = TypeVar("C")  # the pass's context (the graph being folded)
B = TypeVar("B")  # the pass's view of one BatchNorm
M = TypeVar("M")  # a rule's match


class NoMatch(Exception):
    """A rule does not fold this BatchNorm: ``reason`` says why. ``applies=False``: the pattern's
    anchor op is not there at all (the reason says what was found instead)."""

    def __init__(self, reason: str, *, applies: bool = True):
        super().__init__(reason)
        self.reason = reason
        self.applies = applies


class Rule(Generic[C, B, M]):
    """One fold pattern. ``name`` is the rule's name in the plan and the report (``folded[].rule``)."""

    name: str = ""

    def match(self, ctx: C, bn: B) -> M:
        """The match (a dataclass with typed fields), or raise ``NoMatch`` with the reason."""
        raise NotImplementedError


@dataclass
class Outcome(Generic[M]):
    """What ``try_rules`` found: the first rule that matched and its match (both None when none did),
    and the failure of every rule tried before it, in order."""

    rule: Rule | None = None
    match: M | None = None
    failures: list[tuple[Rule, NoMatch]] = field(default_factory=list)

    def reasons(self) -> list[str]:
        """``rule: reason`` of every failure whose pattern was there."""
        return [f"{r.name}: {f.reason}" for r, f in self.failures if f.applies]


def try_rules(rules: Iterable[Rule], ctx, bn, *, accept: Callable[[Rule, Any], None] | None = None,
              on_error: Callable[[Rule, Exception], str] | None = None) -> Outcome:
    """Run ``rules`` on ``bn`` in order; stop at the first match that ``accept`` (if given) does not
    refuse by raising ``NoMatch``. ``on_error``: turns any other exception of a rule into that rule's
    refusal reason (the pass prefers a refusal to a crash); without it, the exception propagates."""
    out = Outcome()
    for rule in rules:
        try:
            m = rule.match(ctx, bn)
            if accept is not None:
                accept(rule, m)
        except NoMatch as nm:
            out.failures.append((rule, nm))
        except Exception as err:
            if on_error is None:
                raise
            out.failures.append((rule, NoMatch(on_error(rule, err))))
        else:
            out.rule, out.match = rule, m
            return out
    return out
