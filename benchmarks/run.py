"""bnfold benchmarks: one entry point, one table of ratios, each measured side by side in one run
(A and B alternate; medians over repeats). Run from the repository root:

    python benchmarks/run.py            # every row (about 15 minutes on 2 cores)
    python benchmarks/run.py --quick    # fewer repeats
    python benchmarks/run.py --only calibrate,latency

Rows: convert vs torch.onnx.export (time, stages, peak RSS); calibrate vs update_bn and a plain
train-mode forward; folded vs original latency (PyTorch eager, onnxruntime at ORT_DISABLE_ALL and
default); fold error vs torch's fuse_conv_bn_eval (fp32, fp16); ONNX-in folding vs onnxoptimizer and
onnxruntime's saved optimised model; a > 2 GB model through external data.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

ROWS: list[dict] = []


def row(section, metric, a, b, ratio, target="", note=""):
    met = ""
    if target and ratio is not None:  # targets read "≤ 1.3×"
        val = float(target.split()[-1].rstrip("×x"))
        met = "yes" if ratio <= val else f"NO (by {(ratio / val - 1) * 100:.0f}%)"
    ROWS.append(dict(section=section, metric=metric, a=a, b=b, ratio=ratio, target=target, met=met, note=note))
    r = "-" if ratio is None else f"{ratio:.3f}"
    print(f"  {section:12s} {metric:58s} A={a:<14} B={b:<14} ratio={r:<7} {target} {met} {note}", flush=True)


def fmt_s(x):
    return f"{x:.3f} s" if x >= 0.1 else f"{x * 1e3:.2f} ms"


def alternate(fa, fb, reps):
    ta, tb = [], []
    for _ in range(reps):
        t = time.perf_counter(); fa(); ta.append(time.perf_counter() - t)
        t = time.perf_counter(); fb(); tb.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


# ------------------------------------------------------------------------------ convert vs export
WRAP = """
import resource, runpy, sys, time, json
t = time.perf_counter()
{body}
print("BENCH", json.dumps({{"seconds": time.perf_counter() - t, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

CONVERT_BODY = """
sys.argv = ["bnfold", "convert", "benchmarks/models.py:{model}", "--input-shape", "{shape}", "-o", "{out}", "--providers", "cpu", "--report", "{report}", "-q"]
try:
    runpy.run_module("bnfold", run_name="__main__")
except SystemExit as e:
    assert e.code in (0, None), e.code
"""

EXPORT_BODY = """
import torch
sys.path.insert(0, "benchmarks")
import models
m = models.{model}()
torch.onnx.export(m, (torch.randn(1, 3, 224, 224),), "{out}", dynamo=True, external_data=False)
"""


def _child(body):
    r = subprocess.run([sys.executable, "-c", WRAP.format(body=body)], cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("BENCH "))
    return json.loads(line[6:])


def bench_convert(reps):
    with tempfile.TemporaryDirectory() as d:
        out_a, out_b, rep = Path(d) / "a.onnx", Path(d) / "b.onnx", Path(d) / "r.json"
        wall_a, wall_b, rss_a, rss_b, stages = [], [], [], [], []
        for _ in range(reps):
            a = _child(CONVERT_BODY.format(model="resnet50", shape="1,3,224,224", out=out_a, report=rep))
            b = _child(EXPORT_BODY.format(model="resnet50", out=out_b))
            wall_a.append(a["seconds"]); rss_a.append(a["maxrss_mb"])
            wall_b.append(b["seconds"]); rss_b.append(b["maxrss_mb"])
            stages.append(json.loads(rep.read_text())["timings"])
    ma, mb = statistics.median(wall_a), statistics.median(wall_b)
    row("convert", "ResNet-50 bnfold convert (process) vs torch.onnx.export alone", fmt_s(ma), fmt_s(mb), ma / mb, "≤ 1.3×")
    st = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
    row("convert", "  stages: " + ", ".join(f"{k} {v:.2f}s" for k, v in st.items()), "", "", None)
    ra, rb = statistics.median(rss_a), statistics.median(rss_b)
    row("memory", "ResNet-50 peak RSS: bnfold convert vs export alone", f"{ra:.0f} MB", f"{rb:.0f} MB", ra / rb, "≤ 1.2×")


# -------------------------------------------------------------------------------------- calibrate
def bench_calibrate(reps):
    import torch
    from torch.optim.swa_utils import update_bn

    import bnfold
    import models

    model = models.resnet18()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 3, 112, 112, generator=g) for _ in range(8)]

    def ours():
        bnfold.calibrate(model, batches, inplace=True)

    def swa():
        update_bn(batches, model)

    def plain():
        model.train()
        with torch.no_grad():
            for b in batches:
                model(b)
        model.eval()

    ours(); swa(); plain()  # warm up
    t_ours, t_swa, t_plain = [], [], []
    for _ in range(reps):
        for f, acc in ((ours, t_ours), (swa, t_swa), (plain, t_plain)):
            t = time.perf_counter(); f(); acc.append(time.perf_counter() - t)
    a, b, c = (statistics.median(x) for x in (t_ours, t_swa, t_plain))
    row("calibrate", "ResNet-18, 8 batches of 16×3×112²: bnfold.calibrate vs update_bn", fmt_s(a), fmt_s(b), a / b, "≤ 1.05×")
    row("calibrate", "  bnfold.calibrate vs a plain train-mode forward", fmt_s(a), fmt_s(c), a / c, "")


# --------------------------------------------------------------------------------------- latency
def bench_latency(reps):
    import onnxruntime as ort
    import torch

    import bnfold
    import models
    from bnfold.exporting import export_proto

    for name in ("resnet50", "mobilenet_v2"):
        model = getattr(models, name)()
        folded = bnfold.fold(model, (torch.randn(1, 3, 224, 224),))
        with tempfile.TemporaryDirectory() as d:
            paths = {}
            for tag, m in (("orig", model), ("fold", folded)):
                # optimize=False on both: the exporter's own Conv+BN fusion would hide the difference
                proto = export_proto(m, (torch.randn(2, 3, 224, 224),), dynamic_batch=True, optimize=False)
                paths[tag] = Path(d) / f"{tag}.onnx"
                paths[tag].write_bytes(proto.SerializeToString())
            for batch in (1, 8):
                x = torch.randn(batch, 3, 224, 224)
                with torch.no_grad():
                    a, b = alternate(lambda: folded(x), lambda: model(x), reps)
                row("latency", f"{name} b{batch} PyTorch eager: folded vs original", fmt_s(a), fmt_s(b), a / b, "")
                for level, lname in ((ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "ORT_DISABLE_ALL"), (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "ORT default")):
                    so = ort.SessionOptions()
                    so.graph_optimization_level = level
                    sa = ort.InferenceSession(str(paths["fold"]), so, providers=["CPUExecutionProvider"])
                    sb = ort.InferenceSession(str(paths["orig"]), so, providers=["CPUExecutionProvider"])
                    feed = {sa.get_inputs()[0].name: x.numpy()}
                    feedb = {sb.get_inputs()[0].name: x.numpy()}
                    sa.run(None, feed); sb.run(None, feedb)
                    a, b = alternate(lambda: sa.run(None, feed), lambda: sb.run(None, feedb), reps)
                    row("latency", f"{name} b{batch} {lname}: folded vs original", fmt_s(a), fmt_s(b), a / b, "")


# ----------------------------------------------------------------------------------------- error
def bench_error():
    import torch
    from torch.fx.experimental.optimization import fuse

    import bnfold
    import models

    for name in ("resnet50", "mobilenet_v2"):
        model = getattr(models, name)()
        x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
        with torch.no_grad():
            ref = copy.deepcopy(model).double()(x)
            for dtype in (torch.float32, torch.float16):
                m = copy.deepcopy(model).to(dtype)
                ours = bnfold.fold(m, (x[:1].to(dtype),))
                theirs = fuse(m)
                # run both in float64 so only the folded weights' rounding differs
                ea = (ours.double()(x) - ref).abs().max().item()
                eb = (theirs.double()(x) - ref).abs().max().item()
                row("error", f"{name} {str(dtype)[6:]} max abs error vs float64 reference: bnfold vs fuse_conv_bn_eval", f"{ea:.3g}", f"{eb:.3g}", ea / eb if eb else None, "≤ 1.0×")


# -------------------------------------------------------------------------------------- ONNX in
def bench_onnx_in(reps):
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    import models
    from bnfold.onnx_fold import fold_onnx_proto

    try:
        import onnxoptimizer
    except ImportError:
        onnxoptimizer = None
    for name in ("resnet50", "mobilenet_v2"):
        model = getattr(models, name)()
        f = io.BytesIO()
        torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), f, dynamo=False, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.EVAL)
        src = onnx.load_from_string(f.getvalue())
        x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)

        def run(m):
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
            return s.run(None, {s.get_inputs()[0].name: x})[0]

        ref = run(src)
        results = {}

        def ours():
            m = copy.deepcopy(src)
            fold_onnx_proto(m)
            return m

        def onnxopt():
            return onnxoptimizer.optimize(src, ["fuse_bn_into_conv"])

        def ort_saved():
            with tempfile.TemporaryDirectory() as d:
                so = ort.SessionOptions()
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
                so.optimized_model_filepath = str(Path(d) / "opt.onnx")
                ort.InferenceSession(src.SerializeToString(), so, providers=["CPUExecutionProvider"])
                return onnx.load(str(Path(d) / "opt.onnx"))

        tools = [("bnfold", ours), ("ORT saved (BASIC)", ort_saved)]
        if onnxoptimizer:
            tools.insert(1, ("onnxoptimizer", onnxopt))
        for tool, fn in tools:
            times = []
            for _ in range(reps):
                t = time.perf_counter(); out = fn(); times.append(time.perf_counter() - t)
            bn = sum(n.op_type == "BatchNormalization" for n in out.graph.node)
            err = float(np.abs(run(out) - ref).max())
            results[tool] = (statistics.median(times), bn, len(out.graph.node), err)
        base = results["bnfold"]
        for tool, (t, bn, nodes, err) in results.items():
            row("onnx-in", f"{name}: {tool}: BN left {bn}, nodes {nodes}, max err {err:.2g}", fmt_s(t), fmt_s(base[0]),
                t / base[0], "", "B = bnfold's time")


# ----------------------------------------------------------------------------------------- scale
def bench_scale():
    with tempfile.TemporaryDirectory(dir=ROOT) as d:
        out, rep = Path(d) / "big.onnx", Path(d) / "r.json"
        try:
            res = _child(CONVERT_BODY.format(model="bignet", shape="1,3,4,4", out=out, report=rep))
        except RuntimeError as err:
            row("scale", f"2.4 GB conv net: FAILED {str(err).splitlines()[-1][:80]}", "", "", None)
            return
        r = json.loads(rep.read_text())
        data = Path(d) / r["export"]["external_data"]
        row("scale", f"2.4 GB conv net → {out.stat().st_size / 1e3:.0f} kB .onnx + {data.stat().st_size / 1e9:.2f} GB external data, passed={r['passed']}",
            fmt_s(res["seconds"]), f"{res['maxrss_mb'] / 1024:.1f} GB", None, "", "A = time, B = peak RSS")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--only", default="convert,calibrate,latency,error,onnx-in,scale")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = ap.parse_args()
    only = set(args.only.split(","))
    reps = 3 if args.quick else 5
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    print(f"bnfold benchmarks · {datetime.date.today()} · {platform.machine()} · {os.cpu_count()} CPUs · "
          f"Python {platform.python_version()} · torch {torch.__version__}", flush=True)
    if "convert" in only:
        bench_convert(3 if args.quick else 5)
    if "calibrate" in only:
        bench_calibrate(reps)
    if "latency" in only:
        bench_latency(reps)
    if "error" in only:
        bench_error()
    if "onnx-in" in only:
        bench_onnx_in(3)
    if "scale" in only:
        bench_scale()
    print()
    print("| section | metric | A | B | A/B | target | met |")
    print("|---|---|---|---|---|---|---|")
    for r in ROWS:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.3f}"
        print(f"| {r['section']} | {r['metric']} | {r['a']} | {r['b']} | {ratio} | {r['target']} | {r['met']} |")
    if args.json:
        args.json.write_text(json.dumps(ROWS, indent=2))


if __name__ == "__main__":
    main()
