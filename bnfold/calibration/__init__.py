"""Calibration: population BatchNorm statistics (the BN paper's estimator, or pooled), in float64,
all-reduced under torch.distributed.

Public names are re-exported by ``bnfold`` itself (lazily, so that ``bnfold --help`` stays instant).
"""
