"""The user-facing edges: loading models and checkpoints (load), calibration data (data), output paths
(paths), atomic writes (files), the guard around user code (usercode), strict JSON (jsonio) and the
resource meter (resources).

Public names are re-exported by ``bnfold`` itself (lazily, so that ``bnfold --help`` stays instant).
"""
