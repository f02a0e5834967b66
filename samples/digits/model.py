"""A small CNN for the 8×8 handwritten digits of scikit-learn, with BatchNorm in every usual place.

* conv1 → bn1, conv2 → bn2: BN after a conv (folded backward into the conv);
* conv2 → ReLU → bn3 → conv3 (1×1, no padding): BN after an activation (folded forward into conv3);
* fc1 → bn4 (BatchNorm1d on (N, C)): BN after a Linear (folded backward);
* dropout before the classifier (calibration must keep it in eval mode).

`build()` is the factory that `bnfold` loads: `samples/digits/model.py:build`.
"""

from torch import nn


class DigitsNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.bn3 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.bn4 = nn.BatchNorm1d(64)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(64, num_classes)
        self.act = nn.ReLU()

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(x)))
        x = self.act(self.bn2(self.conv2(x)))  # BN after conv, then the activation ...
        x = self.conv3(self.bn3(x))  # ... and a BN after the activation, before an unpadded conv
        x = self.pool(self.act(x)).flatten(1)
        x = self.drop(self.act(self.bn4(self.fc1(x))))
        return self.fc2(x)


def build() -> nn.Module:
    return DigitsNet()
