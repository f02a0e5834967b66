"""Verification: runners (PyTorch, onnxruntime per provider and level), the provider registry,
the comparator, and verify (runners plus one comparator loop).

Public names are re-exported by ``bnfold`` itself (lazily, so that ``bnfold --help`` stays instant).
"""
