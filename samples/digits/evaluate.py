"""Held-out accuracy of the digits sample with training-time moving-average BN statistics and with
population statistics recomputed by bnfold (BN paper estimator and pooled), before and after
folding (PyTorch and the exported ONNX on onnxruntime). Prints the README's table.

Run: python samples/digits/evaluate.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

import bnfold

HERE = Path(__file__).resolve().parent


def accuracy_and_nll(model, x, y):
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).double()
    nll = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)).item()
    return (logits.argmax(1).numpy() == y).mean(), nll


def onnx_accuracy(path, x, y):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    preds = np.concatenate([sess.run(None, {name: x[i:i + 1]})[0].argmax(1) for i in range(len(x))])
    return (preds == y).mean()


def main() -> None:
    test = np.load(HERE / "test.npz")
    x, y = test["x"], test["y"]
    base = bnfold.load_model(f"{HERE / 'model.py'}:build", HERE / "weights.pt")
    rows = [("moving average (training)", base)]
    for est in ("paper", "pooled"):
        for bs in (64, 256):
            rows.append((f"population, {est}, batch {bs}", bnfold.calibrate(base, str(HERE / "calib.npz"), estimator=est, batch_size=bs)))
    print("| BN statistics | test accuracy | test NLL | folded (PyTorch) | folded ONNX (ORT CPU) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for name, m in rows:
            acc, nll = accuracy_and_nll(m, x, y)
            folded = bnfold.fold(m, (torch.from_numpy(x[:1]),))
            facc, _ = accuracy_and_nll(folded, x, y)
            path = bnfold.export(folded, (torch.from_numpy(x[:1]),), Path(d) / "m.onnx")
            print(f"| {name} | {acc:.4f} | {nll:.4f} | {facc:.4f} | {onnx_accuracy(path, x, y):.4f} |")


if __name__ == "__main__":
    main()
