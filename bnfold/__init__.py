"""bnfold: make trained PyTorch models ready for inference.

Recompute BatchNorm population statistics (``calibrate``), fold BatchNorm into neighbouring
Conv/ConvTranspose/Linear weights (``fold``, ``inspect``), export to ONNX (``export``), fold the
BatchNormalization nodes of existing ONNX files (``fold_onnx``) and prove with onnxruntime that the
outputs still match (``verify``). ``convert`` runs the whole pipeline.

Heavy libraries (torch, onnx, onnxruntime) are imported on first use, so importing bnfold and
``bnfold --help`` stay instant.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.2.0"

# public name -> module that defines it
_EXPORTS = {
    "calibrate": "calibration",
    "run_calibration": "calibration",
    "CalibrationSummary": "calibration",
    "fold": "folding",
    "fold_with_plan": "folding",
    "inspect": "folding",
    "register_batchnorm": "folding",
    "FoldPlan": "folding",
    "Folded": "folding",
    "Unfolded": "folding",
    "export": "exporting",
    "verify": "verification",
    "VerifyReport": "verification",
    "OutputComparison": "verification",
    "reference_outputs": "verification",
    "compare_runners": "verification",
    "register_provider": "providers",
    "ProviderSpec": "providers",
    "fold_onnx": "onnx_fold",
    "convert": "pipeline",
    "check_artifact": "pipeline",
    "ConvertReport": "report",
    "CheckReport": "report",
    "ConvertOptions": "options",
    "Estimator": "options",
    "Provider": "options",
    "OPTIONS": "options",
    "load_model": "load",
    "load_batches": "data",
    "DataSource": "data",
}

from .errors import (  # noqa: E402  (light: no heavy imports)
    BadInputError,
    BnfoldError,
    CalibrationError,
    DataError,
    ExportError,
    ModelError,
)

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
    from .calibration import CalibrationSummary, calibrate, run_calibration
    from .data import DataSource, load_batches
    from .options import OPTIONS, ConvertOptions, Estimator, Provider
    from .pipeline import check_artifact, convert
    from .report import CheckReport, ConvertReport
    from .exporting import export
    from .folding import Folded, FoldPlan, Unfolded, fold, fold_with_plan, inspect
    from .load import load_model
    from .onnx_fold import fold_onnx
    from .verification import OutputComparison, VerifyReport, verify
