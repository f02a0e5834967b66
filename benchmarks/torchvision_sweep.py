"""Every torchvision classification model with BatchNorm (random weights, randomised statistics)
through bnfold.convert; prints one line per model. Run: python benchmarks/torchvision_sweep.py
(about 10 minutes on 2 cores; models over 150 M parameters are skipped)."""
import torch, torchvision as tv, time, sys, tempfile
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parent.parent / 'tests'))
from conftest import randomize_bn
import bnfold
from torch import nn
names = tv.models.list_models(module=tv.models)
for n in names:
    kw = {"aux_logits": False, "init_weights": False} if n in ("googlenet", "inception_v3") else {}
    t = time.time()
    try:
        m = tv.models.get_model(n, weights=None, **kw)
    except Exception as e:
        print(n, "build failed", e); continue
    has_bn = any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())
    params = sum(p.numel() for p in m.parameters()) / 1e6
    if not has_bn:
        print(f"{n:28s} noBN {params:.0f}M", flush=True); continue
    if params > 150:
        print(f"{n:28s} BN {params:.0f}M SKIP", flush=True); continue
    size = 80 if n == "inception_v3" else (224 if n.startswith(("maxvit", "swin", "vit")) else 64)
    randomize_bn(m).eval()
    try:
        with tempfile.TemporaryDirectory() as d:
            rep = bnfold.convert(m, (torch.randn(1, 3, size, size),), d + "/m.onnx", providers="cpu")
    except Exception as e:
        print(f"{n:28s} ERROR {type(e).__name__}: {str(e)[:200]}", flush=True); continue
    print(f"{n:28s} BN {params:.0f}M passed={rep.passed} folded={len(rep.folded)} left={len(rep.unfolded)} {time.time()-t:.1f}s", flush=True)
