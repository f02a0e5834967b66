"""ONNX fold rules on onnx_ir: ``core`` (match results, constants, context, the BN's s and t) and
``rules`` (one class per pattern, listed in ``RULES``). ``bnfold.onnx_fold`` runs them."""

from .core import Ctx, Match, Reject, bn_params
from .rules import RULES

__all__ = ["Ctx", "Match", "Reject", "RULES", "bn_params"]
