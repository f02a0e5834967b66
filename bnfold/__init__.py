"""bnfold: make trained PyTorch models ready for inference.

Recompute BatchNorm population statistics (``calibrate``), fold BatchNorm into neighbouring
Conv/ConvTranspose/Linear weights (``fold``, ``inspect``), export to ONNX (``export``), fold the
BatchNormalization nodes of existing ONNX files (``fold_onnx``) and prove with onnxruntime that the
outputs still match (``verify``). ``convert`` runs the whole pipeline. The CLI's commands are these
functions too: ``convert``, ``run_config`` (``--config``), ``calibrate_checkpoint``,
``check_artifact`` (``verify``) and ``inspect_spec``.

Heavy libraries (torch, onnx, onnxruntime) are imported on first use, so importing bnfold and
``bnfold --help`` stay instant.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from bnfold._version import __version__
from bnfold.errors import BadInputError, BnfoldError, CalibrationError, DataError, ExportError, ModelError

# public name -> module that defines it (imported on first use)
_EXPORTS = {
    "calibrate": "calibration.population",
    "run_calibration": "calibration.population",
    "CalibrationSummary": "calibration.population",
    "calibrate_checkpoint": "calibration.checkpoint",
    "fold": "torch_pass.fold",
    "fold_with_plan": "torch_pass.fold",
    "inspect": "torch_pass.fold",
    "inspect_spec": "inspection",
    "register_batchnorm": "torch_pass.bn_kinds",
    "FoldPlan": "plan",
    "Folded": "plan",
    "Unfolded": "plan",
    "export": "onnx_pass.export",
    "fold_onnx": "onnx_pass.fold",
    "verify": "verification.verify",
    "VerifyReport": "verification.verify",
    "OutputComparison": "verification.compare",
    "reference_outputs": "verification.verify",
    "compare_runners": "verification.verify",
    "register_provider": "verification.providers",
    "ProviderSpec": "verification.providers",
    "convert": "pipeline",
    "check_artifact": "pipeline",
    "run_config": "batch",
    "ConvertReport": "report",
    "CheckReport": "report",
    "ConvertOptions": "options",
    "Estimator": "options",
    "Provider": "options",
    "OPTIONS": "options",
    "load_model": "edges.load",
    "load_batches": "edges.data",
    "DataSource": "edges.data",
}

__all__ = sorted(
    list(_EXPORTS)
    + ["BnfoldError", "BadInputError", "CalibrationError", "DataError", "ExportError", "ModelError", "__version__"]
)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bnfold' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from bnfold.batch import run_config
    from bnfold.calibration.checkpoint import calibrate_checkpoint
    from bnfold.calibration.population import CalibrationSummary, calibrate, run_calibration
    from bnfold.edges.data import DataSource, load_batches
    from bnfold.edges.load import load_model
    from bnfold.inspection import inspect_spec
    from bnfold.onnx_pass.export import export
    from bnfold.onnx_pass.fold import fold_onnx
    from bnfold.options import OPTIONS, ConvertOptions, Estimator, Provider
    from bnfold.pipeline import check_artifact, convert
    from bnfold.plan import Folded, FoldPlan, Unfolded
    from bnfold.report import CheckReport, ConvertReport
    from bnfold.torch_pass.bn_kinds import register_batchnorm
    from bnfold.torch_pass.fold import fold, fold_with_plan, inspect
    from bnfold.verification.compare import OutputComparison
    from bnfold.verification.providers import ProviderSpec, register_provider
    from bnfold.verification.verify import VerifyReport, compare_runners, reference_outputs, verify
