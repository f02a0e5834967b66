"""The CUDA path end to end, for a machine with a GPU (run by benchmarks/gpu_check.sh).

Checks: calibration on the GPU equals calibration on the CPU; folding a CUDA model keeps its device
and matches the original with TF32 off; fp16 folding on the GPU; convert with --providers cpu,cuda
reports CUDA honestly (run or unavailable, never passed when it did not run); --require-providers
cuda fails cleanly where onnxruntime has no CUDA; calibrate vs update_bn on the GPU.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bnfold  # noqa: E402
from bnfold.load import load_model  # noqa: E402
from bnfold.verification import tf32_off  # noqa: E402

OUT = Path(os.environ.get("OUT", tempfile.mkdtemp()))
results: dict = {}


def check(name, ok, detail=""):
    results[name] = {"ok": bool(ok), "detail": detail}
    print(f"{'OK  ' if ok else 'FAIL'} {name} {detail}", flush=True)


def main():
    import onnxruntime as ort

    print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
    print("onnxruntime", ort.__version__, ort.get_available_providers())
    sample = ROOT / "samples" / "digits"
    model = load_model(f"{sample / 'model.py'}:build", sample / "weights.pt")
    calib = np.load(sample / "calib.npz")["x"]
    batches = [torch.from_numpy(calib[i:i + 64]) for i in range(0, len(calib), 64)]

    cpu = bnfold.calibrate(model, batches)
    gpu = bnfold.calibrate(copy.deepcopy(model).cuda(), [b.cuda() for b in batches])
    worst = max((gpu.get_submodule(n).running_var.cpu().double() - cpu.get_submodule(n).running_var.double()).abs().max().item()
                / cpu.get_submodule(n).running_var.double().abs().max().item() for n in ("bn1", "bn2", "bn3", "bn4"))
    check("calibrate on cuda == on cpu (rel 1e-5, TF32 off)", worst < 1e-5, f"worst rel diff {worst:.2e}")
    check("calibrated model stays on cuda", next(gpu.parameters()).is_cuda)

    x = torch.from_numpy(np.load(sample / "test.npz")["x"]).cuda()
    folded, plan = bnfold.fold_with_plan(gpu, (x[:1],))
    with tf32_off(), torch.no_grad():
        err = (folded(x) - gpu(x)).abs().max().item()
    check("fold on cuda: 4/4 folded, params on cuda, max err < 1e-4", len(plan.folded) == 4 and next(folded.parameters()).is_cuda and err < 1e-4, f"max err {err:.2e}")

    half = copy.deepcopy(gpu).half()
    fh = bnfold.fold(half, (x[:1].half(),))
    with torch.no_grad():
        e16 = (fh(x.half()).float() - gpu(x)).abs().max().item()
    check("fp16 fold on cuda keeps fp16 and stays close", next(fh.parameters()).dtype == torch.float16 and e16 < 0.05, f"max err vs fp32 {e16:.2e}")

    with tempfile.TemporaryDirectory() as d:
        rep = bnfold.convert(gpu, (x[:1],), Path(d) / "gpu.onnx", providers="cpu,cuda", report=OUT / "gpu_convert_report.json")
        ran = rep.verification["providers_run"]
        unavailable = rep.verification["providers_unavailable"]
        cuda_runs = [r for r in rep.verification["runs"] if r["provider"] == "cuda"]
        honest = ("cuda" in ran and cuda_runs and all(r["device"] == "cuda" for r in cuda_runs)) or (
            "cuda" not in ran and not cuda_runs and unavailable and unavailable[0]["provider"] == "cuda")
        check("convert of a CUDA model passes; CUDA provider reported honestly", rep.passed and honest,
              f"providers_run={ran} unavailable={unavailable}")
        if "cuda" not in ran:
            try:
                bnfold.convert(gpu, (x[:1],), Path(d) / "req.onnx", providers="cpu", require_providers="cuda")
                check("--require-providers cuda fails where ORT has no CUDA", False)
            except bnfold.BnfoldError as err:
                check("--require-providers cuda fails where ORT has no CUDA", err.exit_code == 2 and not (Path(d) / "req.onnx").exists(), str(err)[:160])

    # calibrate vs update_bn on the GPU (ResNet-50, 8 batches of 32×3×224²)
    import models
    from torch.optim.swa_utils import update_bn

    net = models.resnet50().cuda()
    gb = [torch.randn(32, 3, 224, 224, device="cuda") for _ in range(8)]

    def timed(f):
        torch.cuda.synchronize(); t = time.perf_counter(); f(); torch.cuda.synchronize(); return time.perf_counter() - t

    f_exact = lambda: bnfold.calibrate(net, gb, inplace=True)  # noqa: E731  (TF32 off: exact fp32)
    f_tf32 = lambda: bnfold.calibrate(net, gb, inplace=True, allow_tf32=True)  # noqa: E731
    f_swa = lambda: update_bn(gb, net)  # noqa: E731  (cuDNN's default: TF32 convolutions)
    for f in (f_exact, f_tf32, f_swa):
        timed(f)
    te, tt, ts = [], [], []
    for _ in range(7):
        te.append(timed(f_exact)); tt.append(timed(f_tf32)); ts.append(timed(f_swa))
    me, mt, ms = (statistics.median(v) for v in (te, tt, ts))
    check("GPU calibrate (allow_tf32, same precision as update_bn) ≤ 1.05× update_bn", mt / ms <= 1.05,
          f"bnfold {mt * 1e3:.1f} ms, update_bn {ms * 1e3:.1f} ms, ratio {mt / ms:.3f}")
    print(f"INFO exact-fp32 calibrate (default, TF32 off) {me * 1e3:.1f} ms = {me / ms:.2f}× update_bn with TF32", flush=True)
    results["gpu_calibrate_ms"] = {"exact": me * 1e3, "allow_tf32": mt * 1e3, "update_bn": ms * 1e3}
    (OUT / "gpu_check.json").write_text(json.dumps(results, indent=2))
    sys.exit(0 if all(r.get("ok", True) for r in results.values()) else 1)


if __name__ == "__main__":
    main()
