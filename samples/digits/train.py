"""Train the digits sample and write its artifacts (needs scikit-learn only to re-train).

Data: scikit-learn's bundled copy of the UCI "Optical Recognition of Handwritten Digits" test set
(1,797 images, 8×8 pixels, values 0–16; sklearn.datasets.load_digits), scaled to [0, 1].
A stratified split with seed 0 keeps 450 images for testing.

Writes, beside this file:
  weights.pt   the trained state_dict (torch.save; loads with weights_only=True)
  test.npz     held-out split: x (450, 1, 8, 8) float32, y (450,) int64
  calib.npz    calibration data: x = the 1,347 training images (the model's only input)

Run: python samples/digits/train.py
"""

from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent


def main() -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    import sys

    sys.path.insert(0, str(HERE))
    from model import build

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=450, random_state=0, stratify=y)

    torch.manual_seed(0)
    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(25):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 32):
            idx = perm[i:i + 32]
            if len(idx) < 2:
                continue
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean()
    print(f"test accuracy {acc:.4f}")
    torch.save(model.state_dict(), HERE / "weights.pt")
    np.savez(HERE / "test.npz", x=x_te, y=y_te)
    np.savez(HERE / "calib.npz", x=x_tr)


if __name__ == "__main__":
    main()
