"""Accuracy study on the digits sample: training-time running statistics vs population statistics,
and running statistics vs recalibration on shifted, unlabelled inputs (AdaBN).

The sample's CNN (model.py: 4 BatchNorm layers, dropout) is trained here from scratch with small
batches (8) and a high BN momentum (0.5: PyTorch's momentum is the weight of the NEWEST batch, so the
running statistics are an average over the last few batches only), on several seeds. For each seed:

* clean test set (450 images): accuracy and NLL with the running statistics as trained, with
  population statistics from the training images (``bnfold.calibrate``, estimator ``paper`` and
  ``pooled``, calibration batches of the training batch size); each model also folded
  (``bnfold.fold``) and exported to ONNX (``bnfold.convert``, scored on onnxruntime CPU), with the
  number of test predictions that folding or the export changed; and the fraction of test
  predictions that differ between running and population statistics;
* shifted inputs (contrast/brightness ``c·x + b``; additive Gaussian noise ``x + σ·N(0, 1)``, not
  clipped), 3 strengths each: the test set is split (stratified, fixed seed) into a calibration
  half and an evaluation half; the evaluation half is scored with the running statistics, with the
  clean population statistics and with statistics recalibrated on the shifted calibration half
  WITHOUT its labels (AdaBN, both estimators). No test image is both used for calibration and scored.

Deterministic: fixed data split, ``torch.manual_seed(seed)`` per seed, a fixed thread count and
``torch.use_deterministic_algorithms``. Needs scikit-learn (the data) and onnxruntime.

Run:  python samples/digits/study.py [--seeds N] [--out docs/study.md] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

import bnfold

HERE = Path(__file__).resolve().parent
SPEC = f"{HERE / 'model.py'}:build"
TEST_SIZE, SPLIT_SEED = 450, 0  # the split of train.py: 1,347 training and 450 test images
NOTES_MARK = "<!-- study.py writes everything above this line; it keeps the notes below when it rewrites the page -->"
STATS = ("running", "paper", "pooled")
STATS_LABEL = {
    "running": "running statistics (as trained)",
    "paper": "population, paper estimator (bnfold default)",
    "pooled": "population, pooled",
}
# (kind, strength label, parameters): contrast/brightness x' = c·x + b; noise x' = x + σ·N(0, 1)
SHIFTS = (
    ("none", "–", None),
    ("contrast/brightness", "c=0.75, b=0.15", (0.75, 0.15)),
    ("contrast/brightness", "c=0.5, b=0.3", (0.5, 0.3)),
    ("contrast/brightness", "c=0.3, b=0.5", (0.3, 0.5)),
    ("Gaussian noise", "σ=0.1", 0.1),
    ("Gaussian noise", "σ=0.2", 0.2),
    ("Gaussian noise", "σ=0.3", 0.3),
)
SHIFT_COLUMNS = ("running", "clean_paper", "adabn_paper", "adabn_pooled")


@dataclass(frozen=True)
class Config:
    seeds: int = 5
    epochs: int = 12
    batch: int = 8  # training batch, and the calibration batch (the BN paper's m)
    momentum: float = 0.5  # PyTorch convention: weight of the newest batch in the running statistics
    lr: float = 1e-3
    weight_decay: float = 1e-4
    threads: int = 1  # the model is tiny: one thread is fastest, and two oversubscribe a loaded 2-core machine
    noise_seed: int = 1234


def load_data():
    """The digits images scaled to [0, 1], split as train.py splits them."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=y)
    return x_tr, y_tr, x_te, y_te


def adabn_split(y: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (calibration, evaluation) of the test set: disjoint, stratified, the calibration half a
    whole number of batches."""
    from sklearn.model_selection import train_test_split

    n_cal = (len(y) // 2) // batch * batch
    idx = np.arange(len(y))
    cal, ev = train_test_split(idx, train_size=n_cal, random_state=SPLIT_SEED, stratify=y)
    return np.sort(cal), np.sort(ev)


def shift(x: np.ndarray, params, seed: int) -> np.ndarray:
    """The shifted inputs: None = unchanged, (c, b) = c·x + b, σ = x + σ·N(0, 1) (fixed noise seed)."""
    if params is None:
        return x
    if isinstance(params, tuple):
        c, b = params
        return (c * x + b).astype(np.float32)
    noise = np.random.default_rng(seed).standard_normal(x.shape)
    return (x + params * noise).astype(np.float32)


def batches(x: np.ndarray, size: int) -> list[torch.Tensor]:
    """Whole batches of ``size`` samples, in order (a trailing partial batch is dropped)."""
    return [torch.from_numpy(x[i:i + size]) for i in range(0, len(x) - size + 1, size)]


def train(seed: int, cfg: Config, x: np.ndarray, y: np.ndarray) -> nn.Module:
    """The sample's CNN, every BN with momentum ``cfg.momentum``, trained with batches of ``cfg.batch``."""
    torch.manual_seed(seed)
    model = bnfold.load_model(SPEC)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = cfg.momentum
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), cfg.batch):
            idx = perm[i:i + cfg.batch]
            if len(idx) < 2:  # BN cannot normalise a batch of one
                continue
            opt.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def logits(model: nn.Module, x: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.from_numpy(x)).double()


def score(out: torch.Tensor, y: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(accuracy, NLL, predictions) of float64 logits."""
    nll = torch.nn.functional.cross_entropy(out, torch.from_numpy(y)).item()
    pred = out.argmax(1).numpy()
    return float((pred == y).mean()), nll, pred


def onnx_predictions(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1)


def onnx_bn_nodes(path: Path) -> int:
    import onnx

    return sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)


def fold_and_export(model: nn.Module, x: np.ndarray, pred: np.ndarray, path: Path) -> dict:
    """Fold and export ``model``; the accuracies need the labels, so this returns the predictions and
    how many differ from ``pred`` (the unfolded PyTorch model's)."""
    example = (torch.from_numpy(x[:1]),)
    folded = bnfold.fold(model, example)
    fpred = logits(folded, x).argmax(1).numpy()
    rep = bnfold.convert(model, example, path, dynamic_batch=True, providers=["cpu"])
    opred = onnx_predictions(path, x)
    return {
        "folded_pred": fpred,
        "onnx_pred": opred,
        "folded_changed": int((fpred != pred).sum()),
        "onnx_changed": int((opred != pred).sum()),
        "bn_modules_left": sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules()),
        "onnx_bn_nodes": onnx_bn_nodes(path),
        "convert_passed": bool(rep.passed),
    }


def clean_rows(models: dict, x: np.ndarray, y: np.ndarray, workdir: Path) -> dict:
    """Per statistics: accuracy, NLL, folded and ONNX accuracy, predictions changed."""
    rows = {}
    for name, model in models.items():
        acc, nll, pred = score(logits(model, x), y)
        fx = fold_and_export(model, x, pred, workdir / f"{name}.onnx")
        rows[name] = {
            "accuracy": acc, "nll": nll, "pred": pred,
            "folded_accuracy": float((fx["folded_pred"] == y).mean()),
            "onnx_accuracy": float((fx["onnx_pred"] == y).mean()),
            **{k: v for k, v in fx.items() if not k.endswith("_pred")},
        }
    for name in ("paper", "pooled"):
        rows[name]["changed_vs_running"] = float((rows[name]["pred"] != rows["running"]["pred"]).mean())
    for r in rows.values():
        del r["pred"]
    return rows


def shift_rows(models: dict, data: dict, cfg: Config) -> list[dict]:
    """Per shift: evaluation-half accuracy with running, clean population and AdaBN statistics."""
    cal, ev = data["split"]
    out = []
    for kind, label, params in SHIFTS:
        xs = shift(data["x_te"], params, cfg.noise_seed)
        adapt = batches(xs[cal], cfg.batch)  # unlabelled: only the images
        scored = {
            "running": models["running"],
            "clean_paper": models["paper"],
            "adabn_paper": bnfold.calibrate(models["running"], adapt, estimator="paper"),
            "adabn_pooled": bnfold.calibrate(models["running"], adapt, estimator="pooled"),
        }
        accs = {k: score(logits(m, xs[ev]), data["y_te"][ev])[0] for k, m in scored.items()}
        out.append({"kind": kind, "strength": label, **accs})
    return out


def run_seed(seed: int, cfg: Config, data: dict, workdir: Path) -> dict:
    base = train(seed, cfg, data["x_tr"], data["y_tr"])
    calib = batches(data["x_tr"], cfg.batch)
    models = {"running": base}
    for est in ("paper", "pooled"):
        models[est] = bnfold.calibrate(base, calib, estimator=est)
    return {"seed": seed, "clean": clean_rows(models, data["x_te"], data["y_te"], workdir), "shifts": shift_rows(models, data, cfg)}


def run(cfg: Config) -> dict:
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    x_tr, y_tr, x_te, y_te = load_data()
    data = {"x_tr": x_tr, "y_tr": y_tr, "x_te": x_te, "y_te": y_te, "split": adabn_split(y_te, cfg.batch)}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # the machine may be shared
    t0, c0 = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as d:
        seeds = [run_seed(s, cfg, data, Path(d)) for s in range(cfg.seeds)]
    return {
        "config": cfg,
        "sizes": {"train": len(y_tr), "test": len(y_te), "calibration_half": len(data["split"][0]),
                  "evaluation_half": len(data["split"][1])},
        "seeds": seeds,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "load_average": load,
    }


# ---------------------------------------------------------------- the page


def pm(values, pct: bool = True, digits: int = 2) -> str:
    """mean ± std (population std over seeds; a single seed shows no ±)."""
    a = np.asarray(values, dtype=np.float64) * (100 if pct else 1)
    unit = " %" if pct else ""
    if len(a) == 1:
        return f"{a[0]:.{digits}f}{unit}"
    return f"{a.mean():.{digits}f} ± {a.std():.{digits}f}{unit}"


def table_head(*columns: str) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def clean_table(res: dict) -> list[str]:
    seeds = res["seeds"]
    lines = table_head("BN statistics", "test accuracy", "test NLL", "folded (PyTorch)", "exported ONNX (ORT CPU)",
                       "predictions changed by fold / export", "predictions changed vs running")
    for name in STATS:
        rows = [s["clean"][name] for s in seeds]
        changed = "–" if name == "running" else pm([r["changed_vs_running"] for r in rows])
        n = len(rows) * res["sizes"]["test"]
        lines.append(
            f"| {STATS_LABEL[name]} | {pm([r['accuracy'] for r in rows])} | {pm([r['nll'] for r in rows], pct=False, digits=3)} "
            f"| {pm([r['folded_accuracy'] for r in rows])} | {pm([r['onnx_accuracy'] for r in rows])} "
            f"| {sum(r['folded_changed'] for r in rows)} / {sum(r['onnx_changed'] for r in rows)} of {n} | {changed} |"
        )
    return lines


def shift_table(res: dict) -> list[str]:
    lines = table_head("input shift", "strength", "running statistics", "population (clean training data)",
                       "AdaBN, paper estimator", "AdaBN, pooled")
    for i, (kind, label, _) in enumerate(SHIFTS):
        rows = [s["shifts"][i] for s in res["seeds"]]
        cells = " | ".join(pm([r[c] for r in rows]) for c in SHIFT_COLUMNS)
        lines.append(f"| {kind} | {label} | {cells} |")
    return lines


def seed_table(res: dict) -> list[str]:
    lines = table_head("seed", "running", "paper", "pooled")
    for s in res["seeds"]:
        accs = " | ".join(f"{100 * s['clean'][n]['accuracy']:.2f} %" for n in STATS)
        lines.append(f"| {s['seed']} | {accs} |")
    return lines


def machine(load: float | None) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    return (f"{cpu}, {os.cpu_count()} CPU cores visible, torch threads: {torch.get_num_threads()}; {platform.system()} "
            f"{platform.release()}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"onnxruntime {onnxruntime.__version__}, bnfold {bnfold.__version__}"
            + ("" if load is None else f"; 1-minute load average {load:.1f} at the start"))


def page(res: dict, command: str) -> str:
    cfg, sizes = res["config"], res["sizes"]
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = [
        "# Digits accuracy study: running vs population BatchNorm statistics, and AdaBN under input shift",
        "",
        (f"Generated by `samples/digits/study.py` on {when}, in {res['seconds']:.0f} s "
         f"({res['cpu_seconds']:.0f} s of CPU time).  "),
        f"Machine: {machine(res['load_average'])}.  ",
        f"Command: `{command}`",
        "",
        "## Setup",
        "",
        (f"* Data: scikit-learn's digits (8×8, scaled to [0, 1]), the split of `train.py`: {sizes['train']} training "
         f"and {sizes['test']} test images."),
        (f"* Model: the sample's CNN (`model.py`, 4 BatchNorm layers, dropout 0.3), every BN momentum set to "
         f"{cfg.momentum} (PyTorch's momentum weights the newest batch), trained from scratch for {cfg.epochs} epochs "
         f"with batches of {cfg.batch} (Adam, lr {cfg.lr:g}, weight decay {cfg.weight_decay:g}); seeds 0–{cfg.seeds - 1} "
         f"(initialisation, batch order and dropout). Mean ± std over the {cfg.seeds} seed(s)."),
        (f"* Population statistics: `bnfold.calibrate` on the {sizes['train']} training images in batches of "
         f"{cfg.batch} (the training batch; a trailing partial batch dropped), estimator `paper` (default) or `pooled`."),
        ("* Fold and export: `bnfold.fold` (PyTorch) and `bnfold.convert` (ONNX, dynamic batch, scored on onnxruntime "
         "CPU); the column counts test predictions that differ from the unfolded PyTorch model's, over all seeds."),
        (f"* Input shifts: contrast/brightness `c·x + b`; additive Gaussian noise `x + σ·N(0, 1)` (not clipped, noise "
         f"seed {cfg.noise_seed}). The test set is split, stratified, into a calibration half ({sizes['calibration_half']} "
         f"images) and an evaluation half ({sizes['evaluation_half']}); all shift accuracies are on the evaluation half. "
         "AdaBN = `bnfold.calibrate` of the as-trained model on the SHIFTED calibration half, its labels unused; "
         "'population (clean training data)' is the paper-estimator model of the clean table, not adapted."),
        "",
        "## Reproduce",
        "",
        ("From the repository root, with bnfold and scikit-learn installed (`pip install -e . scikit-learn`), run the "
         "command above; `--seeds N` sets the number of seeds, `--quick` is the 1-seed, 3-epoch smoke run that "
         "`tests/test_study.py` checks. A run is deterministic: the same CPU, thread count (`--threads`, default 1) and "
         "library versions give the same tables; another thread count, CPU or torch version can move a few images."),
        "",
        "## Clean test set",
        "",
        *clean_table(res),
        "",
        "## Shifted inputs (evaluation half)",
        "",
        *shift_table(res),
        "",
        "## Per seed (clean test accuracy)",
        "",
        *seed_table(res),
        "",
    ]
    return "\n".join(head)


def write_page(text: str, out: Path) -> None:
    """Write the page; hand-written notes below NOTES_MARK in an existing page are kept."""
    notes = f"{NOTES_MARK}\n\n## Notes\n\n(none yet)\n"
    if out.exists():
        old = out.read_text()
        if NOTES_MARK in old:
            notes = old[old.index(NOTES_MARK):]
    out.write_text(text + "\n" + notes)


def parse_args(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=Config.seeds, help="number of training seeds (default %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {Config.epochs}; --quick: 3)")
    p.add_argument("--threads", type=int, default=Config.threads, help="torch threads (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="1 seed, 3 epochs: a smoke run (what the test runs)")
    p.add_argument("--out", type=Path, default=None, help="write the Markdown page here (default: print it)")
    args = p.parse_args(argv)
    cfg = Config(seeds=args.seeds, threads=args.threads)
    if args.quick:
        cfg = replace(cfg, seeds=1, epochs=3)
    if args.epochs is not None:
        cfg = replace(cfg, epochs=args.epochs)
    if cfg.seeds < 1 or cfg.epochs < 1 or cfg.threads < 1:
        p.error("--seeds, --epochs and --threads must be at least 1")
    return cfg, args


def main(argv: list[str] | None = None) -> dict:
    cfg, args = parse_args(argv)
    res = run(cfg)
    script = os.path.relpath(Path(__file__).resolve()) if Path.cwd() in Path(__file__).resolve().parents else str(Path(__file__).resolve())
    command = shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])
    text = page(res, command)
    if args.out is None:
        print(text)
    else:
        write_page(text, args.out)
        print(f"wrote {args.out} ({res['seconds']:.0f} s, {res['cpu_seconds']:.0f} s CPU)")
    return res


if __name__ == "__main__":
    main()
