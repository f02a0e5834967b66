"""The artifact benchmark: is bnfold's ONNX file as fast and as small as the best other way to get one?

For a zoo of models (torchvision classification, timm's smallest model per BatchNorm family, every timm
family that ``timm.utils.reparameterize_model`` changes), random weights with randomised BN statistics,
γ and β (fixed seed, so no BN is the identity), eval mode, batch 1, the file of:

- bnfold     ``bnfold.convert(model, (x,), out, providers="cpu")`` (its verification result is kept);
- plain      ``torch.onnx.export(model, (x,), f, dynamo=True)``, the exporter's defaults (what users get);
- legacy     ``torch.onnx.export(..., dynamo=False)``, the TorchScript exporter (folds Conv+BN itself);
- reparam    ``timm.utils.reparameterize_model(model)`` then the plain export, where it changes the model;
- onnxslim   ``onnxslim.slim`` of the plain file.

Each file is checked against the PyTorch output on onnxruntime (max |Δ| / max |ref|, so a fast but wrong
file is flagged), then timed: onnxruntime CPU, ORT_ENABLE_ALL, intra_op_num_threads=2, warm-up, then the
files in turn, one run each per round, the first file rotating every round, for enough rounds that a model
takes about ``--budget`` seconds of timing (at least ``--min-rounds``), in two halves that create the
sessions in opposite orders (the session created first runs 1–4 % slower); medians per file. Nodes are those of
the file as loaded (main graph + functions), BN = BatchNormalization nodes; "ort" = nodes of the graph
onnxruntime runs after its own optimisations (written with ``optimized_model_filepath``).

Run (writes benchmarks/artifact.md): 30 minutes on 2 cores at load average ~3.5, an hour at ~12; most of
it is making the files (bnfold.convert alone 10-80 s a model), not timing. --quick takes ~3 minutes.
    python benchmarks/artifact.py [--quick] [--models repvgg_a0,tv:resnet18] [--json rows.json]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
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
import warnings
from importlib import metadata
from pathlib import Path

import torch
from timm_sweep import randomize_bn
from torch import nn

HERE = Path(__file__).resolve().parent
KINDS = ("bnfold", "plain", "legacy", "reparam", "onnxslim")
WRONG = 1e-3  # max |Δ| / max |ref| above this marks a file wrong (float32 files agree to ~1e-6)

# (group, source, name); torchvision: a representative handful; timm: the smallest model of each of ten
# BN families; every timm family whose modules have fuse()/reparameterize()/switch_to_deploy() (13 model
# files; byobnet holds two: repvgg and mobileone)
ZOO = [
    *(("torchvision", "tv", n) for n in (
        "resnet18", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "regnet_x_400mf",
        "shufflenet_v2_x1_0")),
    *(("timm BN", "timm", n) for n in (
        "resnet10t", "efficientnet_b0", "mobilenetv3_small_050", "mobilenetv4_conv_small", "ghostnet_050",
        "regnetx_002", "dla46_c", "cs3darknet_s", "ese_vovnet19b_slim_dw", "gernet_s")),
    *(("timm reparam", "timm", n) for n in (
        "repvgg_a0", "mobileone_s0", "repghostnet_050", "ghostnetv3_050", "fastvit_t8", "repvit_m1",
        "levit_128s", "efficientvit_m0", "tiny_vit_5m_224", "shvit_s1", "efficientvim_m1", "iformer_t",
        "lcnetv2_small", "nextvit_small")),
]
# more BN families, left out of the default run to keep it short: --models NAME or --all
EXTRA = [
    *(("torchvision", "tv", n) for n in ("densenet121", "googlenet", "mnasnet0_5")),
    *(("timm BN", "timm", n) for n in (
        "lcnet_050", "rexnet_100", "mixnet_s", "hrnet_w18_small", "dpn48b", "selecsls42b", "tinynet_e")),
]
QUICK = ["tv:resnet18", "repvgg_a0", "mobileone_s0"]


def build(source: str, name: str) -> tuple[nn.Module, torch.Tensor]:
    """The model (random weights, randomised BN, eval) and one input at its native resolution."""
    torch.manual_seed(0)
    if source == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
        size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    else:
        import torchvision as tv

        kw = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
        model = tv.models.get_model(name, weights=None, **kw)
        size = (3, 299, 299) if name == "inception_v3" else (3, 224, 224)
    randomize_bn(model)
    return model.eval(), torch.randn(1, *size, generator=torch.Generator().manual_seed(1))


def module_signature(model: nn.Module) -> collections.Counter:
    return collections.Counter(type(m).__name__ for m in model.modules())


def export_plain(model: nn.Module, x: torch.Tensor, path: Path, dynamo: bool = True) -> None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(copy.deepcopy(model), (x,), str(path), dynamo=dynamo, verbose=False)


def make_files(source: str, model: nn.Module, x: torch.Tensor, d: Path, legacy: bool) -> tuple[dict, dict]:
    """kind -> path of each file that could be made, and kind -> note (an error, bnfold's verdict)."""
    import onnx
    import onnxslim

    import bnfold

    paths, notes = {}, {}

    def attempt(kind, fn):
        t0 = time.perf_counter()
        try:
            fn(d / f"{kind}.onnx")
            paths[kind] = d / f"{kind}.onnx"
        except Exception as e:  # noqa: BLE001  (a benchmark reports, it does not stop)
            notes[kind] = f"error {type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
        notes[kind + "_s"] = round(time.perf_counter() - t0, 1)

    def run_bnfold(p):
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            rep = bnfold.convert(copy.deepcopy(model), (x,), p, providers="cpu", keep_failed=True)
        notes["bnfold_verified"] = bool(rep.passed)

    def run_slim(p):
        with contextlib.redirect_stdout(io.StringIO()):
            onnx.save(onnxslim.slim(onnx.load(str(paths["plain"]))), str(p))

    attempt("bnfold", run_bnfold)
    attempt("plain", lambda p: export_plain(model, x, p))
    if legacy:
        attempt("legacy", lambda p: export_plain(model, x, p, dynamo=False))
    if source == "timm":
        import timm

        rep = timm.utils.reparameterize_model(model)  # a deep copy
        if module_signature(rep) != module_signature(model):
            attempt("reparam", lambda p: export_plain(rep, x, p))
        else:
            notes["reparam"] = "unchanged by reparameterize_model"
    if "plain" in paths:
        attempt("onnxslim", run_slim)
    return paths, notes


def op_counts(path: Path) -> collections.Counter:
    """op type -> count over the main graph and the model's functions."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return collections.Counter(n.op_type for n in [*m.graph.node, *(n for f in m.functions for n in f.node)])


def session(path: Path, threads: int, spin: bool = True, ort_path: Path | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if ort_path is not None:
        so.optimized_model_filepath = str(ort_path)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def check_file(path: Path, x: torch.Tensor, ref: torch.Tensor) -> dict:
    """What the file is: nodes by op, BN nodes, nodes after ORT's optimisation, error against PyTorch."""
    import numpy as np

    ort_path = path.with_suffix(".ort.onnx")
    sess = session(path, 1, ort_path=ort_path)
    ops = op_counts(path)
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    r = ref.detach().numpy()
    err = float(np.abs(out.astype(np.float64) - r).max() / max(float(np.abs(r).max()), 1e-30)) if out.shape == r.shape else float("inf")
    return {"nodes": sum(ops.values()), "bn": ops["BatchNormalization"], "ops": dict(ops),
            "ort_nodes": sum(op_counts(ort_path).values()) if ort_path.exists() else None,
            "rel_err": err, "wrong": not err <= WRONG}


# the two measures: CPU time of a one-thread session (robust on a shared machine: time the process
# is not scheduled does not count), and wall-clock latency at --threads with onnxruntime's defaults
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def time_files(sessions: dict, x: torch.Tensor, clock, budget: float, min_rounds: int) -> tuple[dict, int]:
    """kind -> the run times (s, on ``clock``) of rounds that run every session once, the first one
    rotating each round. Warm-up first: three rounds, which also size the run on ``budget`` seconds."""
    feeds = {k: {s.get_inputs()[0].name: x.numpy()} for k, s in sessions.items()}
    kinds = list(sessions)
    t0 = time.perf_counter()
    for _ in range(3):
        for k in kinds:
            sessions[k].run(None, feeds[k])
    per_round = (time.perf_counter() - t0) / 3
    rounds = max(min_rounds, int(budget / max(per_round, 1e-6)))
    times = {k: [] for k in kinds}
    for i in range(rounds):
        for k in kinds[i % len(kinds):] + kinds[:i % len(kinds)]:
            t = clock()
            sessions[k].run(None, feeds[k])
            times[k].append(clock() - t)
    return times, rounds


def paired(a: list, b: list) -> float:
    """The median over rounds of a/b: two files timed in the same round see the same load."""
    return statistics.median(x / y for x, y in zip(a, b))


def measure(paths: dict, x: torch.Tensor, row: dict, measure_name: str, args) -> dict:
    """One measure over the right files and the control (a second session on the plain file):
    medians (ms), rounds, noise (control / plain), the fastest file and bnfold over it (paired)."""
    threads, spin = (1, False) if measure_name == "cpu" else (args.threads, True)
    kinds = [k for k in paths if k in row["files"]]
    names = kinds + (["plain'"] if "plain" in kinds else [])
    times, rounds = {k: [] for k in names}, 0
    # The session created first runs 1–4 % slower in this process, whatever its file (measured on two
    # identical graphs, 2026-12-01): two halves, each creating the sessions in the other order.
    for order in (names, names[::-1]):
        sessions = {k: session(paths[k.rstrip("'")], threads, spin) for k in order}
        half, r = time_files(sessions, x, CLOCKS[measure_name], args.budget / 2, max(1, (args.min_rounds + 1) // 2))
        for k, v in half.items():
            times[k] += v
        rounds += r
        del sessions
    ms = {k: 1e3 * statistics.median(times[k]) for k in kinds}
    out = {"ms": ms, "rounds": rounds}
    if "plain'" in times:
        out["noise"] = paired(times["plain'"], times["plain"])
    right = {k: v for k, v in ms.items() if not row["files"][k]["wrong"]}
    if "bnfold" in right:
        out["best"] = min(right, key=right.get)
        out["ratio"] = paired(times["bnfold"], times[out["best"]])
    return out


def reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return torch.utils._pytree.tree_leaves(out)[0]


def run_model(entry: tuple, args) -> dict:
    group, source, name = entry
    t0 = time.perf_counter()
    row = {"group": group, "model": f"{'tv:' if source == 'tv' else ''}{name}", "files": {}, "timing": {}}
    model, x = build(source, name)
    row["input"] = list(x.shape)
    row["bn_modules"] = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    ref = reference(model, x)
    with tempfile.TemporaryDirectory() as tmp:
        paths, notes = make_files(source, model, x, Path(tmp), args.legacy)
        row["notes"] = notes
        for kind, path in paths.items():
            try:
                row["files"][kind] = check_file(path, x, ref)
            except Exception as e:  # noqa: BLE001
                notes[kind] = f"onnxruntime {type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
        if row["files"]:
            for m in CLOCKS:
                row["timing"][m] = measure(paths, x, row, m, args)
    row.update(node_verdict(row["files"]))
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def node_verdict(f: dict) -> dict:
    """bnfold's nodes against the plain exporter's, and the ops it has beyond the file with the fewest."""
    out = {}
    if "bnfold" in f and "plain" in f:
        out["nodes_le_plain"] = f["bnfold"]["nodes"] <= f["plain"]["nodes"]
    if "bnfold" in f:
        fewest = min((k for k in f if not f[k]["wrong"]), key=lambda k: f[k]["nodes"])
        more = collections.Counter(f["bnfold"]["ops"])
        more.subtract(f[fewest]["ops"])
        out["fewest"] = fewest
        out["extra_ops"] = {k: v for k, v in more.most_common() if v}
    return out


def cell(row: dict, kind: str, measure_name: str, bn: bool = False) -> str:
    f, t = row["files"].get(kind), row["timing"].get(measure_name, {})
    if f is None or kind not in t.get("ms", {}):
        note = row["notes"].get(kind)
        return "error" if note and note.startswith(("error", "onnxruntime")) else "–"
    s = f"{t['ms'][kind]:.1f}"
    if measure_name == "cpu":
        s += f", {f['nodes']}" + (f" ({f['bn']})" if bn else "")
        if kind == "bnfold" and not row["notes"].get("bnfold_verified", False):
            s += " unverified"
    if kind == t.get("best"):
        s = f"**{s}**"
    return s + (" WRONG" if f["wrong"] else "")


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores, {cpu}, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def versions() -> str:
    def v(pkg):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(pkg)
        return "absent"

    rev = subprocess.run(["git", "-C", str(HERE), "describe", "--always", "--dirty"], capture_output=True, text=True, check=False).stdout.strip()
    pkgs = ("torch", "onnx", "onnxruntime", "onnxscript", "timm", "torchvision", "onnxslim", "bnfold")
    return ", ".join(f"{p} {v(p)}" for p in pkgs) + (f" (bnfold commit {rev})" if rev else "")


def ratio_cells(row: dict, measure_name: str) -> str:
    t = row["timing"].get(measure_name, {})
    return " | ".join(f"{t[k]:.2f}" if k in t else "–" for k in ("ratio", "noise"))


def table(rows: list) -> list:
    lines = [("| model | bnfold | plain (BN) | legacy (BN) | timm reparam | onnxslim | bnfold / best | noise "
              "| wall: bnfold / best | wall: noise | bnfold nodes ≤ plain |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    for group in dict.fromkeys(r["group"] for r in rows):
        lines.append(f"| *{group}* ||||||||||")
        for r in (r for r in rows if r["group"] == group):
            le = {True: "yes", False: "**no**", None: "–"}[r.get("nodes_le_plain")]
            lines.append(f"| {r['model']} | {cell(r, 'bnfold', 'cpu')} | {cell(r, 'plain', 'cpu', True)} "
                         f"| {cell(r, 'legacy', 'cpu', True)} | {cell(r, 'reparam', 'cpu')} | {cell(r, 'onnxslim', 'cpu')} "
                         f"| {ratio_cells(r, 'cpu')} | {ratio_cells(r, 'wall')} | {le} |")
    return lines


def wall_table(rows: list, threads: int) -> list:
    lines = ["| model | bnfold | plain | legacy | timm reparam | onnxslim | rounds (CPU, wall) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        rounds = ", ".join(str(r["timing"].get(m, {}).get("rounds", "–")) for m in CLOCKS)
        lines.append(f"| {r['model']} | " + " | ".join(cell(r, k, "wall") for k in KINDS) + f" | {rounds} |")
    return lines


def speed_goal(rows: list, measure_name: str, label: str) -> list:
    timed = [r for r in rows if "ratio" in r["timing"].get(measure_name, {})]
    slow = [r for r in timed if r["timing"][measure_name]["ratio"] > 1.05]
    noisy = [r["model"] for r in slow if abs(r["timing"][measure_name].get("noise", 1) - 1) > 0.05]
    missed = ", ".join(f"{r['model']} ({r['timing'][measure_name]['ratio']:.2f}× {r['timing'][measure_name]['best']})" for r in slow)
    out = [f"- **{label}, bnfold ≤ 1.05× the fastest file:** met on {len(timed) - len(slow)} of {len(timed)} models"
           + (f"; missed on {missed}." if slow else ".")]
    if noisy:
        out.append(f"  The control (two sessions on the same plain file) moved more than 5 % on {', '.join(noisy)}: "
                   "there the miss may be noise.")
    return out


def goals(rows: list) -> list:
    counted = [r for r in rows if r.get("nodes_le_plain") is not None]
    more = [r["model"] for r in counted if not r["nodes_le_plain"]]
    unverified = [r["model"] for r in rows if "bnfold" in r["files"] and not r["notes"].get("bnfold_verified")]
    wrong = [f"{r['model']} {k}" for r in rows for k, f in r["files"].items() if f["wrong"]]
    return [*speed_goal(rows, "cpu", "Speed (CPU time, one thread)"),
            *speed_goal(rows, "wall", "Latency (wall clock, two threads)"),
            f"- **Nodes, bnfold ≤ plain exporter:** met on {len(counted) - len(more)} of {len(counted)} models"
            + (f"; more nodes on {', '.join(more)}." if more else "."),
            "- bnfold's own verification " + (f"failed on {', '.join(unverified)}." if unverified else "passed on every model."),
            "- Files whose output disagrees with PyTorch (max |Δ| / max |ref| > 1e-3): " + (", ".join(wrong) if wrong else "none") + "."]


def details(rows: list) -> list:
    def per_kind(r, fn):
        return " / ".join(f"{k} {fn(r, k)}" for k in KINDS if k in r["files"] or f"{k}_s" in r["notes"])

    lines = [("| model | bnfold's ops beyond the file with the fewest nodes | nodes after ORT's optimisation | "
              "max rel err | seconds to make |"), "|---|---|---|---|---|"]
    for r in rows:
        extra = ", ".join(f"{v:+d} {k}" for k, v in r.get("extra_ops", {}).items()) or "none"
        lines.append(f"| {r['model']} | {extra} ({r.get('fewest', '–')}) "
                     f"| {per_kind(r, lambda r, k: r['files'].get(k, {}).get('ort_nodes', '–'))} "
                     f"| {per_kind(r, lambda r, k: format(r['files'][k]['rel_err'], '.0e') if k in r['files'] else '–')} "
                     f"| {per_kind(r, lambda r, k: r['notes'].get(k + '_s', '–'))} |")
    return lines


METHOD = (
    "Random weights; BN running statistics, γ and β randomised (fixed seed), eval mode, batch 1 at each "
    "model's native resolution. Files: **bnfold** `bnfold.convert(model, (x,), out, providers=\"cpu\")`; "
    "**plain** `torch.onnx.export(model, (x,), f, dynamo=True)` with its defaults; **legacy** the same with "
    "`dynamo=False`; **timm reparam** `timm.utils.reparameterize_model` then the plain export (only where it "
    "changes the model); **onnxslim** `onnxslim.slim` of the plain file. Each file is checked against PyTorch "
    "on onnxruntime, then timed on onnxruntime CPU with ORT_ENABLE_ALL, two ways: **CPU time** (ms of process "
    "CPU time per inference, a one-thread session) and **wall** (ms of wall clock per inference, a session of "
    "{threads} intra-op threads with onnxruntime's defaults). Either way the files run in turn, one run each per "
    "round, the first file rotating each round, in two halves that create the sessions in opposite orders (the "
    "session created first runs 1–4 % slower here, whatever its file); medians over rounds. **bnfold / best** is the median over rounds "
    "of bnfold's time over the fastest file's time in the same round (1.00 where bnfold is the fastest; below 1 "
    "where it won most rounds against the file with the lowest median). **noise** is the same ratio for a second "
    "session on the plain file against the first: how far two identical files drift apart here. Nodes: those of "
    "the file (main graph and functions); (BN): its BatchNormalization nodes. Bold: the fastest file.")

SHARED = (
    "The machine is shared (2 cores; other engineers' tests and exports run beside this), so wall-clock "
    "milliseconds are inflated and noisy: a thread pool whose threads wait for each other loses whole "
    "scheduler slices. CPU time of a one-thread session does not count the time the process waits for a core, "
    "so it measures the work each file asks for; its noise column is the one to trust here. Read ratios, not "
    "absolute milliseconds.")


def markdown(rows: list, meta: dict) -> str:
    errors = [f"- {r['model']} {k}: {v}" for r in rows for k, v in r["notes"].items()
              if isinstance(v, str) and v.startswith(("error", "onnxruntime"))]
    return "\n".join([
        "# Artifact benchmark: bnfold's ONNX file against the other ways to get one", "",
        (f"`python benchmarks/artifact.py{meta['argv']}` on {meta['date']}, {meta['minutes']:.0f} minutes. "
         f"Machine: {meta['machine']}; load average {meta['load'][0]} at the start, {meta['load'][1]} at the end. "
         f"Versions: {meta['versions']}."), "",
        METHOD.format(threads=meta["threads"]), "", SHARED, "",
        "## Goals", "", *goals(rows), "",
        "## Results", "",
        "CPU time in ms and nodes per file; the ratio columns for both measures.", "",
        *table(rows), "",
        f"## Wall-clock latency, {meta['threads']} threads (ms)", "", *wall_table(rows, meta["threads"]), "",
        "## Details", "",
        ("Ops beyond: bnfold's op counts minus those of the file with the fewest nodes (in brackets). ORT nodes: "
         "the graph onnxruntime runs after its own fusions (`optimized_model_filepath`, one-thread session)."), "",
        *details(rows), "",
        *(["## Errors", "", *errors, ""] if errors else []),
    ])


def pick(args) -> list:
    zoo = ZOO + EXTRA if args.all else ZOO
    names = QUICK if args.quick else [n for n in (args.models or "").split(",") if n]
    if not names:
        return zoo
    known = {("tv:" if s == "tv" else "") + n: (g, s, n) for g, s, n in ZOO + EXTRA}
    return [known.get(n) or (("torchvision", "tv", n[3:]) if n.startswith("tv:") else ("timm", "timm", n)) for n in names]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"a smoke run: {', '.join(QUICK)}")
    ap.add_argument("--models", help="comma-separated: timm names, tv:NAME for torchvision")
    ap.add_argument("--all", action="store_true", help="the default zoo and the extra BN families")
    ap.add_argument("--budget", type=float, default=4.0, help="seconds of timing per model and measure (default 4)")
    ap.add_argument("--min-rounds", type=int, default=15, help="rounds at least (default 15)")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    ap.add_argument("--no-legacy", dest="legacy", action="store_false", help="skip the dynamo=False exporter")
    ap.add_argument("--out", help="markdown file (default: benchmarks/artifact.md for a whole-zoo run, else stdout only)")
    ap.add_argument("--json", help="write the rows here as JSON")
    args = ap.parse_args(argv)
    jobs = pick(args)
    t0, load0 = time.time(), os.getloadavg()
    rows = []
    for i, entry in enumerate(jobs, 1):
        try:
            rows.append(run_model(entry, args))
        except Exception as e:  # noqa: BLE001  (a model that does not build is reported, not fatal)
            rows.append({"group": entry[0], "model": entry[2], "files": {}, "timing": {},
                         "notes": {"build": f"error {type(e).__name__}: {e}"[:200]}})
        r = rows[-1]
        cpu, wall = r.get("timing", {}).get("cpu", {}), r.get("timing", {}).get("wall", {})
        print(f"[{i}/{len(jobs)}] {r['model']}: " + ", ".join(f"{k} {cpu.get('ms', {}).get(k, float('nan')):.1f} ms/{v['nodes']}" for k, v in r["files"].items())
              + "".join(f"; {m} bnfold/best {t['ratio']:.2f} (noise {t.get('noise', float('nan')):.2f})" for m, t in (("cpu", cpu), ("wall", wall)) if "ratio" in t)
              + f" ({r.get('seconds', '?')} s)", file=sys.stderr, flush=True)
    meta = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "minutes": (time.time() - t0) / 60,
            "machine": machine(), "versions": versions(), "threads": args.threads,
            "load": (f"{load0[0]:.1f}", f"{os.getloadavg()[0]:.1f}"),
            "argv": "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))}
    md = markdown(rows, meta)
    out = args.out or (None if args.quick or args.models else str(HERE / "artifact.md"))
    if out:
        Path(out).write_text(md + "\n")
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
