"""How much BatchNorm bnfold folds in PyTorch across timm and torchvision families.

Per model (random weights, randomised BN statistics/γ/β, float64): BN layers, folded in PyTorch (by
rule), left (reasons grouped), and the max relative error of the folded module against the original
(max |Δ| / max |ref|). With ``--onnx`` also the BatchNormalization nodes left in bnfold's ONNX file
(``bnfold.convert``) and in a plain ``torch.onnx.export`` (its default optimiser) of the same model.

Run (CPU heavy; one thread is enough):
    OMP_NUM_THREADS=1 python benchmarks/timm_sweep.py [--onnx] [--out benchmarks/timm_sweep.txt] [names…]

benchmarks/timm_sweep.txt is the whole list without --onnx (about 3 minutes on a loaded 2-core box);
benchmarks/timm_sweep_onnx.txt is a 14-model sample with --onnx (about 10 minutes).
"""

from __future__ import annotations

import argparse
import collections
import copy
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

# the smallest member of each family the fold-engine issue names, plus a few more; (name, input size)
TIMM = [
    "efficientnet_b0", "tf_efficientnet_b0", "efficientnet_cc_b0_4e", "tinynet_e", "mobilenetv1_100",
    "mobilenetv2_050", "mobilenetv3_small_050", "mobilenetv4_conv_small", "regnetx_002", "regnety_002",
    "cspresnet50", "cs3darknet_s", "darknet17", "mixnet_s", "tf_mixnet_s", "lcnet_050", "rexnet_100",
    "tresnet_m", "ese_vovnet19b_slim_dw", "fbnetc_100", "mnasnet_small", "semnasnet_050", "spnasnet_100",
    "hardcorenas_a", "inception_v3", "densenet121", "levit_128s", "efficientvit_m0", "coatnet_nano_rw_224",
    "visformer_tiny", "fastvit_t8", "repvgg_a0", "mobileone_s0", "repvit_m1", "ghostnet_050",
    "ghostnetv3_050", "repghostnet_050", "convmixer_768_32", "resnet18", "resnet50d", "dpn48b",
    "hrnet_w18_small", "res2net50_26w_4s", "dla34", "selecsls42b", "gernet_s", "xception41",
    "efficientformer_l1",
]
TORCHVISION = [
    "resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf", "shufflenet_v2_x0_5",
    "mnasnet0_5", "googlenet", "inception_v3", "densenet121", "vgg11_bn",
]


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
            if isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor):
                rm.copy_(torch.randn(rm.shape, generator=g) * 0.5)
                rv.copy_(torch.rand(rv.shape, generator=g) * 1.5 + 0.25)
                for name, mean, std in (("weight", 1.0, 0.5), ("bias", 0.0, 0.5)):
                    p = getattr(m, name, None)
                    if isinstance(p, torch.Tensor) and p.shape == rm.shape:
                        p.copy_(torch.randn(p.shape, generator=g) * std + mean)
    return model


def build(source: str, name: str) -> tuple[nn.Module, int]:
    if source == "timm":
        import timm

        m = timm.create_model(name, pretrained=False)
        cfg = getattr(m, "pretrained_cfg", None) or {}
        size = cfg["input_size"][-1] if cfg.get("fixed_input_size") else (75 if "inception" in name else 64)
        return m, size
    import torchvision as tv

    kw = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    return tv.models.get_model(name, weights=None, **kw), 80 if name == "inception_v3" else 64


def reason_group(reason: str) -> str:
    """A reason with names and numbers taken out, so equal causes group together."""
    r = re.sub(r"`[^`]*`", "`…`", reason)
    r = re.sub(r"\b\d+\b", "N", r)
    return r[:230]


def bn_nodes(path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    count = sum(n.op_type == "BatchNormalization" for n in m.graph.node)
    for f in m.functions:
        count += sum(n.op_type == "BatchNormalization" for n in f.node)
    return count


def onnx_counts(model: nn.Module, x: torch.Tensor) -> tuple[str, str]:
    import bnfold

    with tempfile.TemporaryDirectory() as d:
        try:
            rep = bnfold.convert(copy.deepcopy(model), (x,), Path(d) / "b.onnx", providers="cpu", verify=False)
            ours = str(bn_nodes(rep.output))
        except Exception as e:  # noqa: BLE001  (a sweep reports, it does not stop)
            ours = f"error {type(e).__name__}"
        try:
            torch.onnx.export(copy.deepcopy(model).eval(), (x,), str(Path(d) / "p.onnx"), verbose=False)
            plain = str(bn_nodes(Path(d) / "p.onnx"))
        except Exception as e:  # noqa: BLE001
            plain = f"error {type(e).__name__}"
    return ours, plain


def run_one(source: str, name: str, with_onnx: bool) -> dict:
    from bnfold.torch_pass.fold import fold_with_plan

    t0 = time.time()
    torch.manual_seed(0)
    model, size = build(source, name)
    model = randomize_bn(model).eval()
    x = torch.randn(1, 3, size, size)
    m64, x64 = copy.deepcopy(model).double(), x.double()
    folded, plan = fold_with_plan(m64, (x64,))
    with torch.no_grad():
        ref, out = m64(x64), folded(x64)
    ref = ref if isinstance(ref, torch.Tensor) else ref[0]
    out = out if isinstance(out, torch.Tensor) else out[0]
    err = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()
    row = {
        "model": f"{source}:{name}", "bn": plan.bn_count, "folded": len(plan.folded), "left": len(plan.unfolded),
        "err": err, "rules": dict(collections.Counter(f.rule for f in plan.folded)),
        "reasons": collections.Counter(reason_group(u.reason) for u in plan.unfolded), "tracer": plan.tracer,
    }
    if with_onnx:
        row["onnx_bnfold"], row["onnx_plain"] = onnx_counts(model, x)
    row["seconds"] = time.time() - t0
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="timm:NAME or torchvision:NAME (default: the built-in list)")
    ap.add_argument("--onnx", action="store_true", help="also count BN nodes in bnfold's and plain torch.onnx.export files")
    ap.add_argument("--out", default=None, help="write the table here too")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    jobs = [tuple(n.split(":", 1)) for n in args.names] or [("timm", n) for n in TIMM] + [("torchvision", n) for n in TORCHVISION]
    lines: list[str] = []

    def emit(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    head = f"{'model':38s} {'BN':>5s} {'folded':>6s} {'left':>5s} {'max rel err':>11s}"
    head += f" {'onnx bnfold':>11s} {'onnx plain':>10s}" if args.onnx else ""
    emit(head + "  rules")
    rows, reasons = [], collections.Counter()
    for source, name in jobs:
        try:
            r = run_one(source, name, args.onnx)
        except Exception as e:  # noqa: BLE001
            emit(f"{source + ':' + name:38s} ERROR {type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}")
            continue
        rows.append(r)
        reasons.update({f"{k}": v for k, v in r["reasons"].items()})
        line = f"{r['model']:38s} {r['bn']:5d} {r['folded']:6d} {r['left']:5d} {r['err']:11.1e}"
        line += f" {r['onnx_bnfold']:>11s} {r['onnx_plain']:>10s}" if args.onnx else ""
        emit(line + "  " + " ".join(f"{k}={v}" for k, v in sorted(r["rules"].items())))
    total = sum(r["bn"] for r in rows)
    left = sum(r["left"] for r in rows)
    worst = max((r["err"] for r in rows), default=0.0)
    emit()
    emit(f"models: {len(rows)} ({sum(r['model'].startswith('timm:') for r in rows)} timm, "
         f"{sum(r['model'].startswith('torchvision:') for r in rows)} torchvision); BN layers: {total}; "
         f"folded in PyTorch: {total - left}; left: {left} ({100 * left / max(total, 1):.1f} %); "
         f"worst float64 max rel error: {worst:.1e}")
    rule_tot = collections.Counter()
    for r in rows:
        rule_tot.update(r["rules"])
    emit("folds by rule: " + ", ".join(f"{k} {v}" for k, v in rule_tot.most_common()))
    if args.onnx:
        def num(v):
            return int(v) if str(v).isdigit() else 0
        ob, op = sum(num(r["onnx_bnfold"]) for r in rows), sum(num(r["onnx_plain"]) for r in rows)
        emit(f"BN nodes left in ONNX: bnfold {ob}, plain torch.onnx.export {op}")
    emit()
    emit("left, by reason (names and numbers elided):")
    for reason, n in reasons.most_common():
        emit(f"{n:5d}  {reason}")
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
