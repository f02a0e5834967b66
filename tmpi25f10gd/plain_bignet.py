
import sys
sys.path.insert(0, '/work/main/benchmarks')
import torch
import models
model = models.bignet()
x = torch.randn(1, 3, 4, 4)
torch.onnx.export(model.eval(), (x,), '/work/main/tmpi25f10gd/plain.onnx')
