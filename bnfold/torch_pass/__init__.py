"""The PyTorch fold pass: graph discovery (graph), BatchNorm kinds and producers (bn_kinds), one rule
per pattern (rules) and applying their edits in float64 (fold).

Public names are re-exported by ``bnfold`` itself (lazily, so that ``bnfold --help`` stays instant).
"""
