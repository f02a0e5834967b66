"""The ONNX side: file I/O (io), the ONNX fold rules on onnx_ir (core, rules), the second fold pass
(fold) and the export that runs it (export).

Public names are re-exported by ``bnfold`` itself (lazily, so that ``bnfold --help`` stays instant).
"""
