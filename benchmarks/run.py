"""bnfold benchmarks: one entry point, one table of ratios, each measured side by side in one run
(A and B alternate; medians over repeats). Run from the repository root:

    python benchmarks/run.py            # every row (about 25 minutes on 2 cores, 10 GB of memory)
    python benchmarks/run.py --quick    # convert, scaling (ResNet-18/50), calibrate: a few minutes
    python benchmarks/run.py --only calibrate,latency --json rows.json

Rows: `bnfold convert` vs a plain torch.onnx.export script, both as whole processes (wall time, peak
RSS) and the per-stage time/RSS of convert's JSON report; `bnfold.convert` vs `torch.onnx.export` in
one warm process (ResNet-18, MobileNetV3-Large, ResNet-50); `--config` of ten torchvision models with
`--jobs 2` vs a script exporting them in a loop; calibrate vs update_bn and a plain
train-mode forward; folded vs original latency (PyTorch eager, onnxruntime at ORT_DISABLE_ALL and
default); fold error vs torch's fuse_conv_bn_eval (fp32, fp16); ONNX-in folding vs onnxoptimizer and
onnxruntime's saved optimised model; scaling (ResNet-18/50/101/152 convert time and RSS vs
parameters, calibration time vs batches, least-squares fits); the 2.4 GB net through external data
(peak RSS / weights, time vs the plain exporter).
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
        met = "yes" if ratio <= val else f"NO (by {(ratio / val - 1) * 100:.1f}%)"
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
# Both sides are whole processes, as a user runs them: the `bnfold convert` command, and a plain script
# that builds the same model and calls torch.onnx.export with its defaults. Wall time is measured by
# the parent from spawn to exit (interpreter start and imports included); peak RSS is the child's own
# ru_maxrss from os.wait4 (not RUSAGE_CHILDREN, which is the maximum over every child so far).

PLAIN_EXPORT = """
import sys
sys.path.insert(0, {bench!r})
import torch
import models
model = models.{model}()
x = torch.randn({shape})
torch.onnx.export(model.eval(), (x,), {out!r})
"""


def _bnfold_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "bnfold"  # the console script a user types
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "bnfold"]


# A fork of this (by then large) benchmark process starts with its RSS, and Linux keeps that in the
# child's ru_maxrss across exec: every child would report at least the parent's size. So each command
# is started by a small launcher process, which forks it from its own small image and reports the
# command's own ru_maxrss (and wall time) back.
LAUNCHER = """
import json, os, sys, time
t = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, ru = os.wait4(pid, 0)
sys.stderr.write("\\n@@launcher " + json.dumps({"seconds": time.perf_counter() - t, "maxrss_kb": ru.ru_maxrss,
                                               "rc": os.waitstatus_to_exitcode(status)}) + "\\n")
"""


def _proc(cmd: list[str], cwd: Path = ROOT) -> dict:
    """Run ``cmd`` to completion: {"seconds": wall time, "maxrss_mb": the command's own peak RSS}."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *cmd], cwd=cwd, stdout=out, stderr=err, text=True)
        err.seek(0)
        text = err.read()
        line = next((ln for ln in reversed(text.splitlines()) if ln.startswith("@@launcher ")), None)
        if p.returncode or line is None:
            raise RuntimeError(f"{' '.join(cmd[:4])} … launcher exited {p.returncode}: {text[-3000:]}")
        r = json.loads(line[len("@@launcher "):])
        if r["rc"]:
            raise RuntimeError(f"{' '.join(cmd[:4])} … exited {r['rc']}: {text[-3000:]}")
    return {"seconds": r["seconds"], "maxrss_mb": r["maxrss_kb"] / 1024}


def _convert_cmd(model: str, shape: str, out: Path, report: Path) -> list[str]:
    return _bnfold_cmd() + ["convert", f"benchmarks/models.py:{model}", "--input-shape", shape, "-o", str(out),
                            "--providers", "cpu", "--report", str(report), "-q"]


def _plain_cmd(model: str, shape: str, out: Path, d: Path) -> list[str]:
    script = d / f"plain_{model}.py"
    script.write_text(PLAIN_EXPORT.format(bench=str(HERE), model=model, shape=shape, out=str(out)))
    return [sys.executable, str(script)]


def _pair(model: str, shape: str, reps: int, d: Path) -> dict:
    """Alternate convert and the plain export script ``reps`` times; medians and the last report."""
    out_a, out_b, rep = d / f"{model}_a.onnx", d / f"{model}_b.onnx", d / f"{model}_r.json"
    runs: dict[str, list] = {"wall_a": [], "wall_b": [], "rss_a": [], "rss_b": [], "reports": []}
    for i in range(reps):
        order = [("a", _convert_cmd(model, shape, out_a, rep)), ("b", _plain_cmd(model, shape, out_b, d))]
        for tag, cmd in order if i % 2 == 0 else order[::-1]:  # A B, B A, …: drift hits both sides
            r = _proc(cmd)
            runs[f"wall_{tag}"].append(r["seconds"]); runs[f"rss_{tag}"].append(r["maxrss_mb"])
        runs["reports"].append(json.loads(rep.read_text()))
        for f in d.glob(f"{model}_*.onnx*"):  # keep the disk free between repeats
            f.unlink()
    med = {k: statistics.median(v) for k, v in runs.items() if k != "reports"}
    med["reports"] = runs["reports"]
    return med


def _stage_table(reports: list[dict]) -> dict[str, dict]:
    """Median per stage of seconds, end RSS and peak RSS (``resources`` when the report has it,
    else ``timings`` only)."""
    stages: dict[str, dict] = {}
    for name in reports[0].get("timings", {}):
        res = [r.get("resources", {}).get("stages", r.get("resources", {})).get(name) for r in reports]
        entry = {"seconds": statistics.median(r["timings"][name] for r in reports)}
        if all(isinstance(x, dict) and x.get("peak_rss_mb") is not None for x in res):
            entry["rss_mb"] = statistics.median(x["rss_mb"] for x in res)
            entry["peak_rss_mb"] = statistics.median(x["peak_rss_mb"] for x in res)
        stages[name] = entry
    return stages


def bench_convert(reps):
    with tempfile.TemporaryDirectory() as d:
        m = _pair("resnet50", "1,3,224,224", reps, Path(d))
    ma, mb = m["wall_a"], m["wall_b"]
    row("convert", "ResNet-50 1×3×224²: `bnfold convert` vs plain torch.onnx.export script (process wall)",
        fmt_s(ma), fmt_s(mb), ma / mb, "≤ 0.85×", f"{reps} alternating pairs")
    ra, rb = m["rss_a"], m["rss_b"]
    row("memory", "ResNet-50 peak RSS (process): `bnfold convert` vs plain export script",
        f"{ra:.0f} MB", f"{rb:.0f} MB", ra / rb, "≤ 1.10×")
    for name, st in _stage_table(m["reports"]).items():
        mem = f"RSS {st['rss_mb']:.0f} MB, peak {st['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in st else "(report has no resources)"
        row("stages", f"  {name}: {mem}", fmt_s(st["seconds"]), "", None, "", "from the JSON report")


# ------------------------------------------------------------------------- in one process, --config
def bench_inprocess(reps):
    """The API in one warm Python process (a notebook, a service): ``bnfold.convert`` against
    ``torch.onnx.export`` alone with its defaults, alternating, after one warm-up call of each."""
    import torch

    import bnfold
    import models

    with tempfile.TemporaryDirectory() as d:
        for name in ("resnet18", "mobilenet_v3_large", "resnet50"):
            model = getattr(models, name)()
            x = torch.randn(1, 3, 224, 224)

            def ours():
                bnfold.convert(model, x, Path(d) / "a.onnx", providers="cpu")

            def plain():
                torch.onnx.export(model.eval(), (x,), str(Path(d) / "b.onnx"))

            ours(); plain()  # warm: both pay their first-call costs here
            a, b = alternate(ours, plain, reps)
            row("in-process", f"{name} 1×3×224², warm: bnfold.convert vs torch.onnx.export alone", fmt_s(a), fmt_s(b), a / b,
                "≤ 1.2×", f"{reps} alternating pairs")


PLAIN_LOOP = """
import sys
sys.path.insert(0, {bench!r})
import torch
import models
for name in {names!r}:
    model = getattr(models, name)()
    torch.onnx.export(model.eval(), (torch.randn(1, 3, 224, 224),), {out!r} + "/" + name + ".onnx")
"""


def bench_config(reps):
    """``bnfold convert --config`` of ten torchvision models with ``--jobs 2`` against one script that
    builds and exports them in a loop; whole processes, alternating."""
    import models

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "a").mkdir(); (d / "b").mkdir()
        cfg = d / "ten.toml"
        cfg.write_text('[defaults]\nproviders = "cpu"\ninput_shape = "1,3,224,224"\n' + "".join(
            f'\n[[conversion]]\nname = "{n}"\nmodel = "{HERE / "models.py"}:{n}"\noutput = "a/{n}.onnx"\n' for n in models.TEN))
        script = d / "loop.py"
        script.write_text(PLAIN_LOOP.format(bench=str(HERE), names=list(models.TEN), out=str(d / "b")))
        wa, wb = [], []
        for i in range(reps):
            order = [(wa, _bnfold_cmd() + ["convert", "--config", str(cfg), "--jobs", "2", "-q"]), (wb, [sys.executable, str(script)])]
            for acc, cmd in order if i % 2 == 0 else order[::-1]:
                acc.append(_proc(cmd)["seconds"])
            for f in list(d.glob("*/*.onnx*")) + list(d.glob("*/.bnfold*")):
                if f.is_file():
                    f.unlink()
    a, b = statistics.median(wa), statistics.median(wb)
    row("config", f"--config of {len(models.TEN)} torchvision models, --jobs 2: convert vs a plain export loop (process wall)",
        fmt_s(a), fmt_s(b), a / b, "≤ 1.2×", f"{reps} alternating pairs")


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

    for name in ("resnet50", "mobilenet_v2"):
        model = getattr(models, name)()
        folded = bnfold.fold(model, (torch.randn(1, 3, 224, 224),))
        with tempfile.TemporaryDirectory() as d:
            paths = {}
            for tag, m in (("orig", model), ("fold", folded)):
                # optimize=False on both: the exporter's own Conv+BN fusion would hide the difference
                paths[tag] = Path(d) / f"{tag}.onnx"
                batch = torch.export.Dim("batch", min=1, max=1 << 20)
                torch.onnx.export(m.eval(), (torch.randn(2, 3, 224, 224),), str(paths[tag]), dynamo=True, optimize=False,
                                  dynamic_shapes=({0: batch},), external_data=False)
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
    from bnfold.onnx_pass.fold import fold_onnx_proto

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
def bench_bignet(reps: int = 1):
    """The 2.4 GB synthetic conv net: convert and the plain exporter, ``reps`` alternating pairs of
    processes (medians)."""
    import models

    _, wbytes = models.weight_bytes("bignet")
    wgb = wbytes / 1e9
    runs_a, runs_b, reports, note = [], [], [], "one run each" if reps == 1 else f"{reps} alternating pairs"
    with tempfile.TemporaryDirectory(dir=ROOT, prefix=".bench-") as d:  # the 2.4 GB files stay on this disk
        d = Path(d)
        out, rep = d / "big.onnx", d / "r.json"
        for i in range(reps):
            for side in ("a", "b") if i % 2 == 0 else ("b", "a"):
                try:
                    if side == "a":
                        runs_a.append(_proc(_convert_cmd("bignet", "1,3,4,4", out, rep)))
                        r = json.loads(rep.read_text())
                        reports.append(r)
                        data = d / (r["export"].get("external_data") or "")
                        size = f"{out.stat().st_size / 1e3:.0f} kB .onnx + {data.stat().st_size / 1e9:.2f} GB data" if data.is_file() else ""
                    else:
                        runs_b.append(_proc(_plain_cmd("bignet", "1, 3, 4, 4", d / "plain.onnx", d)))
                except RuntimeError as err:
                    if side == "a":
                        row("bignet", f"2.4 GB conv net: convert FAILED {str(err).splitlines()[-1][:80]}", "", "", None)
                        return
                    note = f"plain exporter failed: {str(err).splitlines()[-1][:80]}"
                for f in list(d.glob("big.onnx*")) + list(d.glob("plain.onnx*")):
                    f.unlink()
    a = {k: statistics.median(x[k] for x in runs_a) for k in ("seconds", "maxrss_mb")}
    b = {k: statistics.median(x[k] for x in runs_b) for k in ("seconds", "maxrss_mb")} if runs_b else None
    ga = a["maxrss_mb"] / 1024
    row("bignet", f"2.4 GB conv net ({wgb:.2f} GB weights) → {size}, passed={r['passed']}: peak RSS / weights",
        f"{ga:.2f} GB", f"{wgb:.2f} GB", a["maxrss_mb"] * 2**20 / wbytes, "≤ 2.5×")
    if b is None:
        row("bignet", "2.4 GB conv net: convert vs plain exporter (wall)", fmt_s(a["seconds"]), "", None, "", note)
        return
    row("bignet", "2.4 GB conv net: convert vs plain torch.onnx.export script (process wall)",
        fmt_s(a["seconds"]), fmt_s(b["seconds"]), a["seconds"] / b["seconds"], "≤ 1.2×", note)
    row("bignet", "2.4 GB conv net: peak RSS, convert vs plain export script",
        f"{ga:.2f} GB", f"{b['maxrss_mb'] / 1024:.2f} GB", a["maxrss_mb"] / b["maxrss_mb"], "")
    for name, st in _stage_table(reports).items():
        mem = f"RSS {st['rss_mb'] / 1024:.2f} GB, peak {st['peak_rss_mb'] / 1024:.2f} GB" if "peak_rss_mb" in st else ""
        row("bignet", f"  {name}: {mem}", fmt_s(st["seconds"]), "", None, "", "from the JSON report")


def linfit(xs, ys) -> tuple[float, float, float]:
    """Least squares y = a + b·x: (a, b, R²)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    return a, b, (1 - ss_res / ss_tot) if ss_tot else 1.0


def bench_scaling(names, reps, calib_counts):
    """Convert time and peak RSS vs parameter count (whole processes, alternating with the plain
    export script), and calibration time vs number of batches: both fitted by least squares."""
    import models

    pts = []
    with tempfile.TemporaryDirectory() as d:
        for name in names:
            params, wbytes = models.weight_bytes(name)
            m = _pair(name, "1,3,224,224", reps, Path(d))
            pts.append((params, m))
            row("scaling", f"{name} ({params / 1e6:.1f} M params, {wbytes / 1e6:.0f} MB): convert vs plain export, wall",
                fmt_s(m["wall_a"]), fmt_s(m["wall_b"]), m["wall_a"] / m["wall_b"], "")
            row("scaling", f"{name}: peak RSS, convert vs plain export",
                f"{m['rss_a']:.0f} MB", f"{m['rss_b']:.0f} MB", m["rss_a"] / m["rss_b"], "")
    if len(pts) >= 3:
        xs = [p / 1e6 for p, _ in pts]
        for key, unit, what in (("wall_a", "s", "convert wall"), ("rss_a", "MB", "convert peak RSS"),
                                ("wall_b", "s", "plain export wall"), ("rss_b", "MB", "plain export peak RSS")):
            a, b, r2 = linfit(xs, [m[key] for _, m in pts])
            row("scaling", f"  fit {what} = {a:.3g} {unit} + {b:.3g} {unit}/M params", f"R²={r2:.4f}", "", None)

    import torch

    import bnfold

    model = models.resnet18()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 3, 112, 112, generator=g) for _ in range(max(calib_counts))]
    bnfold.calibrate(model, batches[:1], inplace=True)  # warm up
    times = []
    for k in calib_counts:
        ts = []
        for _ in range(max(reps, 3)):  # cheap: three repeats even in --quick
            t = time.perf_counter()
            bnfold.calibrate(model, batches[:k], inplace=True)
            ts.append(time.perf_counter() - t)
        times.append(statistics.median(ts))
        row("scaling", f"calibrate ResNet-18, {k} batch{'es' if k > 1 else ''} of 8×3×112²", fmt_s(times[-1]), "", None)
    a, b, r2 = linfit(list(calib_counts), times)
    row("scaling", f"  fit calibrate = {a * 1e3:.1f} ms + {b * 1e3:.1f} ms/batch", f"R²={r2:.4f}", "", None)


SECTIONS = ("convert", "in-process", "config", "calibrate", "latency", "error", "onnx-in", "scaling", "bignet")
QUICK = ("convert", "scaling", "calibrate")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few minutes: convert, scaling (ResNet-18/50) and calibrate, fewer repeats")
    ap.add_argument("--only", default=None, help=f"comma-separated sections of: {','.join(SECTIONS)}")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else set(QUICK if args.quick else SECTIONS)
    if only - set(SECTIONS):
        ap.error(f"unknown sections {sorted(only - set(SECTIONS))}; choose from {','.join(SECTIONS)}")
    reps = 3 if args.quick else 5
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    print(f"bnfold benchmarks · {datetime.date.today()} · {platform.machine()} · {os.cpu_count()} CPUs · "
          f"Python {platform.python_version()} · torch {torch.__version__}", flush=True)
    if "convert" in only:
        bench_convert(2 if args.quick else 5)
    if "in-process" in only:
        bench_inprocess(reps)
    if "config" in only:
        bench_config(2 if args.quick else 3)
    if "calibrate" in only:
        bench_calibrate(reps)
    if "latency" in only:
        bench_latency(reps)
    if "error" in only:
        bench_error()
    if "onnx-in" in only:
        bench_onnx_in(3)
    if "scaling" in only:
        if args.quick:
            bench_scaling(("resnet18", "resnet50"), 1, (1, 2, 4, 8))
        else:
            bench_scaling(("resnet18", "resnet50", "resnet101", "resnet152"), 3, (1, 2, 4, 8, 16, 32))
    if "bignet" in only:
        bench_bignet(1 if args.quick else 2)
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
