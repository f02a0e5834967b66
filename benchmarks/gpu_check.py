"""The CUDA path end to end, for a machine with a GPU (run by benchmarks/gpu_check.sh).

Checks: onnxruntime's CUDA provider really runs (get_providers) and is quiet; calibration on the GPU
equals calibration on the CPU; folding a CUDA model keeps its device and matches the original with
TF32 off; fp16 folding on the GPU; models living on the GPU convert with --providers cpu,cuda
--require-providers cuda (or, where onnxruntime has no CUDA, CUDA is reported unavailable and
required-CUDA fails with exit 2); calibration makes one host synchronisation per run; calibration
speed against torch.optim.swa_utils.update_bn at equal precision both ways (TF32 on vs on, off vs
off, target ≤ 1.05×); the TF32 policy's evidence: how far TF32 moves the statistics next to their
sampling noise (two halves of the data).

``--device cpu --small`` runs the same code on the CPU with small sizes (a dry run of this script
on a machine without a GPU; the CUDA-only checks are skipped and say so).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bnfold  # noqa: E402
from bnfold.edges.load import load_model  # noqa: E402
from bnfold.verification.runners import tf32  # noqa: E402

OUT = Path(os.environ.get("OUT", tempfile.mkdtemp()))
results: dict = {}


def check(name, ok, detail=""):
    results[name] = {"ok": bool(ok), "detail": detail}
    print(f"{'OK  ' if ok else 'FAIL'} {name} {detail}", flush=True)


def info(name, detail, **data):
    results[name] = {"info": detail, **data}
    print(f"INFO {name} {detail}", flush=True)


def versions(dev):
    import onnxruntime as ort

    from bnfold.pipeline import versions as v

    print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if dev == "cuda" else "no GPU")
    print("onnxruntime", ort.__version__, ort.__file__, ort.get_available_providers())
    info("versions", json.dumps(v()), device=torch.cuda.get_device_name(0) if dev == "cuda" else "cpu")


def sample_checks(dev):
    sample = ROOT / "samples" / "digits"
    model = load_model(f"{sample / 'model.py'}:build", sample / "weights.pt")
    calib = np.load(sample / "calib.npz")["x"]
    batches = [torch.from_numpy(calib[i:i + 64]) for i in range(0, len(calib), 64)]
    cpu = bnfold.calibrate(model, batches)
    gpu = bnfold.calibrate(copy.deepcopy(model).to(dev), [b.to(dev) for b in batches])
    worst = max((gpu.get_submodule(n).running_var.cpu().double() - cpu.get_submodule(n).running_var.double()).abs().max().item()
                / cpu.get_submodule(n).running_var.double().abs().max().item() for n in ("bn1", "bn2", "bn3", "bn4"))
    check(f"calibrate on {dev} == on cpu (rel 1e-5, TF32 off)", worst < 1e-5, f"worst rel diff {worst:.2e}")
    x = torch.from_numpy(np.load(sample / "test.npz")["x"]).to(dev)
    folded, plan = bnfold.fold_with_plan(gpu, (x[:1],))
    with tf32(False), torch.no_grad():
        err = (folded(x) - gpu(x)).abs().max().item()
    check(f"fold on {dev}: 4/4 folded, params stay, max err < 1e-4",
          len(plan.folded) == 4 and next(folded.parameters()).device.type == dev and err < 1e-4, f"max err {err:.2e}")
    if dev == "cuda":
        half = copy.deepcopy(gpu).half()
        fh = bnfold.fold(half, (x[:1].half(),))
        with torch.no_grad():
            e16 = (fh(x.half()).float() - gpu(x)).abs().max().item()
        check("fp16 fold on cuda keeps fp16 and stays close", next(fh.parameters()).dtype == torch.float16 and e16 < 0.05, f"max err vs fp32 {e16:.2e}")


def cuda_conversions(dev, small):
    """Models living on the device, converted with the CUDA provider required where it exists."""
    import onnxruntime as ort

    import models

    has_cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
    names = ["resnet18"] if small else ["resnet18", "mobilenet_v2"]  # the CLI converts resnet50 & co in gpu_check.sh
    size = 64 if small else 224
    for name in names:
        net = getattr(models, name)().to(dev)
        x = torch.randn(1, 3, size, size, device=dev)
        with tempfile.TemporaryDirectory() as d:
            stderr = io.StringIO()
            t = time.perf_counter()
            try:
                with _fd2_to(stderr):
                    rep = bnfold.convert(net, (x,), Path(d) / f"{name}.onnx", providers="cpu,cuda",
                                         require_providers="cuda" if has_cuda_ep else (),
                                         report=OUT / f"convert_{name}.json")
            except bnfold.BnfoldError as err:
                check(f"convert {name} on {dev} --providers cpu,cuda", False, str(err)[:300])
                continue
            wall = time.perf_counter() - t
        v = rep.verification
        ran = v["providers_run"]
        cuda_runs = [r for r in v["runs"] if r["provider"] == "cuda"]
        errs = {f"{r['provider']}/{r['graph_optimization']}": r["max_abs_error"] for r in v["runs"] if r["target"] == "onnx"}
        noisy = [ln for ln in stderr.getvalue().splitlines() if ":onnxruntime" in ln]  # "[W:onnxruntime:Default, ..."
        if has_cuda_ep:
            ok = rep.passed and "cuda" in ran and len(cuda_runs) == 2 and all(r["reference_device"].startswith("cuda") for r in cuda_runs)
        else:
            ok = rep.passed and "cuda" not in ran and v["providers_unavailable"][0]["provider"] == "cuda"
        check(f"convert {name} (on {dev}) providers cpu,cuda{' --require-providers cuda' if has_cuda_ep else ''}", ok,
              f"providers_run={ran} max abs {json.dumps({k: float(f'{e:.3g}') for k, e in errs.items()})} "
              f"float64 ref {v.get('float64_reference')} wall {wall:.1f}s")
        check(f"convert {name}: no onnxruntime line on stderr", not noisy, " | ".join(noisy[:2]))
    if not has_cuda_ep:
        try:
            bnfold.convert(models.resnet18(), (torch.randn(1, 3, 32, 32),), OUT / "req.onnx", providers="cpu", require_providers="cuda")
            check("--require-providers cuda fails where onnxruntime has no CUDA", False)
        except bnfold.BnfoldError as err:
            check("--require-providers cuda fails where onnxruntime has no CUDA", err.exit_code == 2 and not (OUT / "req.onnx").exists(), str(err)[:160])


@contextlib.contextmanager
def _fd2_to(buf: io.StringIO):
    """Capture native writes to fd 2 (onnxruntime's logger) during the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", "replace")
            buf.write(text)
            sys.stderr.write(text)  # still visible in the log


def calibration_syncs(dev, small):
    """torch's sync debug mode counts the synchronising calls inside bnfold.calibrate."""
    import models

    if dev != "cuda":
        info("calibrate host syncs", "skipped: needs CUDA (tests/test_calibration.py counts them on CPU)")
        return
    net = models.resnet18().to(dev)
    gb = [torch.randn(8, 3, 64, 64, device=dev) for _ in range(4)]
    bnfold.calibrate(net, gb, inplace=True)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            bnfold.calibrate(net, gb, inplace=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [str(x.message).splitlines()[0] for x in w if "synchroniz" in str(x.message).lower()]
    check("calibrate: ≤ 2 host synchronisations per run (4 batches, 20 BN layers)", len(syncs) <= 2, f"{len(syncs)}: {syncs[:3]}")


def calibration_speed(dev, small):
    """bnfold.calibrate vs update_bn, ResNet-50, 8 batches of 32×3×224², both at the same precision."""
    import models
    from torch.optim.swa_utils import update_bn

    net = (models.resnet18() if small else models.resnet50()).to(dev)
    n, s = (4, 64) if small else (32, 224)
    gb = [torch.randn(n, 3, s, s, device=dev) for _ in range(8)]

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def timed(f):
        sync(); t = time.perf_counter(); f(); sync(); return time.perf_counter() - t

    def swa(allow):
        with tf32(allow):
            update_bn(gb, net)

    runs = {
        "bnfold tf32 off": lambda: bnfold.calibrate(net, gb, inplace=True, allow_tf32=False),
        "update_bn tf32 off": lambda: swa(False),
        "bnfold tf32 on": lambda: bnfold.calibrate(net, gb, inplace=True, allow_tf32=True),
        "update_bn tf32 on": lambda: swa(True),
        "update_bn torch defaults": lambda: update_bn(gb, net),
    }
    for f in runs.values():
        timed(f)
    times = {k: [] for k in runs}
    for _ in range(3 if small else 9):
        for k, f in runs.items():  # interleaved: drift hits every variant alike
            times[k].append(timed(f))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    for mode in ("off", "on"):
        ratio = med[f"bnfold tf32 {mode}"] / med[f"update_bn tf32 {mode}"]
        check(f"calibrate ≤ 1.05× update_bn, TF32 {mode} vs {mode} ({'resnet18 small' if small else 'ResNet-50, 8×32×3×224²'})",
              ratio <= 1.05 or dev != "cuda",
              f"bnfold {med[f'bnfold tf32 {mode}']:.1f} ms, update_bn {med[f'update_bn tf32 {mode}']:.1f} ms, ratio {ratio:.3f}"
              + ("" if dev == "cuda" else " (CPU dry run: not judged)"))
    info("calibrate timings (median ms)", json.dumps({k: round(v, 2) for k, v in med.items()}), ms=med)

    # TF32 policy evidence: how far TF32 moves the statistics, next to the statistics' sampling noise
    def stats(model):
        return {k: v.double().cpu() for k, v in model.state_dict().items() if k.endswith("running_var")}

    exact = stats(bnfold.calibrate(net, gb, allow_tf32=False))
    fast = stats(bnfold.calibrate(net, gb, allow_tf32=True))
    half_a = stats(bnfold.calibrate(net, gb[:4], allow_tf32=False))
    half_b = stats(bnfold.calibrate(net, gb[4:], allow_tf32=False))

    def rel(a, b):
        return [((a[k] - b[k]).norm() / b[k].norm()).item() for k in b]

    t32, noise = rel(fast, exact), rel(half_a, half_b)
    info(f"TF32 vs sampling noise on {dev} (running_var, per layer ‖Δ‖/‖var‖)", _evidence(t32, noise),
         tf32=t32, halves=noise)


def _evidence(t32, noise):
    mt, mn = statistics.median(t32), statistics.median(noise)
    ratio = f"{mn / mt:.0f}×" if mt > 0 else "n/a (TF32 changed nothing: no TF32 on this device)"
    return (f"TF32 effect median {mt:.2e} max {max(t32):.2e}; two halves of the data median {mn:.2e} "
            f"max {max(noise):.2e}; sampling noise / TF32 effect (medians) {ratio}")


def _round_tf32(t: torch.Tensor) -> torch.Tensor:
    """float32 → nearest TF32 value (10 mantissa bits), as tensor cores round their inputs."""
    i = t.contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


def tf32_emulation(small):
    """CPU evidence for the TF32 policy: conv/linear inputs and weights rounded to TF32 (fp32
    accumulation, as cuDNN's TF32 kernels do) vs exact fp32, next to the sampling noise."""
    import models
    from torch import nn

    net = models.resnet18() if small else models.resnet50()
    n, s = (4, 64) if small else (8, 112)
    g = torch.Generator().manual_seed(0)
    gb = [torch.randn(n, 3, s, s, generator=g) for _ in range(8)]

    def stats(model):
        return {k: v.double() for k, v in model.state_dict().items() if k.endswith("running_var")}

    exact = stats(bnfold.calibrate(net, gb))
    emu = copy.deepcopy(net)
    hooks = []
    with torch.no_grad():
        for m in emu.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(_round_tf32(m.weight))
                hooks.append(m.register_forward_pre_hook(lambda mod, args: (_round_tf32(args[0]),) + tuple(args[1:])))
    fast = stats(bnfold.calibrate(emu, gb))
    for h in hooks:
        h.remove()
    half_a, half_b = stats(bnfold.calibrate(net, gb[:4])), stats(bnfold.calibrate(net, gb[4:]))

    def rel(a, b):
        return [((a[k] - b[k]).norm() / b[k].norm()).item() for k in b]

    t32, noise = rel(fast, exact), rel(half_a, half_b)
    info(f"TF32 emulated on CPU ({'resnet18' if small else 'ResNet-50'}, 8 batches of {n}×3×{s}²; running_var per layer ‖Δ‖/‖var‖)",
         _evidence(t32, noise), tf32=t32, halves=noise)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="small sizes (a CPU dry run)")
    ap.add_argument("--tf32-emulation", action="store_true", help="only the CPU emulation of TF32's effect on the statistics")
    a = ap.parse_args()
    dev = a.device
    if a.tf32_emulation:
        tf32_emulation(a.small)
        return
    versions(dev)
    for step in (sample_checks, lambda d: cuda_conversions(d, a.small), lambda d: calibration_syncs(d, a.small),
                 lambda d: calibration_speed(d, a.small)):
        try:
            step(dev)
        except Exception as err:  # noqa: BLE001 — one failing step must not hide the others
            import traceback

            traceback.print_exc()
            check(f"step {getattr(step, '__name__', 'lambda')} ran", False, f"{type(err).__name__}: {err}"[:300])
    (OUT / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    sys.exit(0 if all(r.get("ok", True) for r in results.values()) else 1)


if __name__ == "__main__":
    main()
