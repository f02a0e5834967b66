"""Calibrate stage: population statistics of every BatchNorm layer (Ioffe & Szegedy, §3.1).

Only the BN layers run in batch-statistics mode; every other module (dropout included) stays in eval.
Upstream BN layers normalise with their batch statistics, as in training.

For each BN call in each batch b with m_b values per channel (N, N·L, N·H·W, N·D·H·W):

* ``paper`` (default):  E[x] = mean_b(μ_b),  Var[x] = mean_b( m_b/(m_b−1) · σ²_b )   (σ²_b biased)
* ``pooled``:           the exact mean and (unbiased) variance over all calibration values.

The fast path costs one forward pass per batch: with momentum 1, PyTorch's own train-mode BN kernel
leaves exactly μ_b and the unbiased m_b/(m_b−1)·σ²_b of the batch in ``running_mean``/``running_var``;
a forward hook adds those (C values per layer) into float64 accumulators. With torch.distributed
initialised the accumulated sums and counts are all-reduced, so N ranks over disjoint shards give
the statistics of one process over all batches.

How stale the stored statistics were (per layer, in the summary; ``eps`` is the layer's own):

* ``mean_shift_std``: max over channels of |μ_running − μ_pop| / sqrt(σ²_pop + eps) (``mean_shift_std_mean``: the mean)
* ``var_ratio``: max over channels of max(r, 1/r), r = (σ²_running + eps) / (σ²_pop + eps): 1 when they agree
  (``var_ratio_gmean``: the geometric mean of max(r, 1/r))
* ``drift``: max over channels of the RMS change of the normalised activation x̂ = (x − μ)/sqrt(σ² + eps)
  when the running statistics replace the population ones, for x with the population's mean and variance:
  sqrt( ((μ_pop − μ_running)/s_running)² + σ²_pop·(1/s_running − 1/s_pop)² ), s = sqrt(σ² + eps).
  In units of x̂'s std (1 for σ² ≫ eps): 0.1 means BN's output moves by a tenth of its spread.
  ``drift_order`` names the layers, largest drift first.
* ``stored_problem``: what made the stored statistics unusable (NaN/Inf, a negative variance), else None.
  Such a layer is infinitely stale: it comes first in ``drift_order``; its drift fields that cannot be
  computed are None (JSON null). Calibration itself never reads the stored statistics (it resets the
  buffers before the first batch): a NaN ``running_mean`` is replaced like any other.

``output_effect`` (``run_calibration(effect=True)``): on the first calibration batches (kept from the one
pass, at most EFFECT_BATCHES batches and about EFFECT_SAMPLES samples), how far the model's outputs move in
eval mode between the running statistics it came with and the population statistics.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from bnfold import progress as progress_lines
from bnfold.edges.data import (DataSource, as_batch, as_source, call_model, eval_mode, model_dtype_device,
                               prepare)
from bnfold.errors import CalibrationError, DataError, first_line
from bnfold.report import by_drift
from bnfold.verification.compare import topk_agreement
from bnfold.verification.runners import flatten_outputs, hooks_removed, tf32

ESTIMATORS = ("paper", "pooled")
EFFECT_BATCHES, EFFECT_SAMPLES = 4, 256  # calibration batches kept for output_effect
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_DRIFT = ("mean_shift_std", "mean_shift_std_mean", "var_ratio", "var_ratio_gmean", "drift")
_NO_DRIFT = {**dict.fromkeys(_DRIFT), "stored_problem": None}  # a layer without stored statistics, or not reached


@dataclass
class CalibrationSummary:
    estimator: str
    batches: int = 0
    samples: int = 0
    world_size: int = 1
    layers: list[dict[str, Any]] = field(default_factory=list)
    drift_order: list[str] = field(default_factory=list)  # layers with a drift, largest first
    output_effect: dict[str, Any] | None = None  # {batches, samples, max_abs, scale, top1_agreement}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Acc:
    """float64 sums for one BN layer, over all its calls in all batches.

    Only the sums the estimator needs are kept, with in-place adds (two small kernels per BN call
    for ``paper``, four for ``pooled``): this runs once per BN per batch, so it is the hot path.
    """

    def __init__(self, c: int, device, estimator: str):
        z = lambda: torch.zeros(c, dtype=torch.float64, device=device)  # noqa: E731
        self.estimator = estimator
        # paper: Σ μ_b and Σ unbiased σ²_b; pooled: Σ m_b·μ_b and Σ m_b·(σ²_b + μ_b²) (σ²_b biased)
        self.a, self.b = z(), z()
        self.calls = 0  # batch statistics added (paper: the number of batches)
        self.values = 0  # Σ m_b (pooled: total values per channel)
        self.m_min: int | None = None
        self.m_max: int | None = None

    def add(self, m: int, mean: torch.Tensor, var_unbiased: torch.Tensor) -> None:
        if self.estimator == "paper":
            self.a.add_(mean)
            self.b.add_(var_unbiased)
        else:
            mean64 = mean.to(torch.float64)
            self.a.add_(mean64, alpha=m)
            # m·(σ²_biased + μ²) = (m − 1)·σ²_unbiased + m·μ²
            self.b.add_(var_unbiased, alpha=m - 1).addcmul_(mean64, mean64, value=m)
        self.calls += 1
        self.values += m
        self.m_min = m if self.m_min is None else min(self.m_min, m)
        self.m_max = m if self.m_max is None else max(self.m_max, m)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.estimator == "paper":
            return self.a / self.calls, self.b / self.calls
        mean = self.a / self.values
        var_b = (self.b / self.values - mean * mean).clamp_min(0)
        return mean, var_b * (self.values / (self.values - 1))


def _all_reduce(accs: list[_Acc], summary: CalibrationSummary) -> None:
    """Sum every layer's sums and counts, and ``summary``'s batches and samples, over the processes in ONE
    all-reduce (plus one MIN and one MAX for the values-per-channel range), instead of three collectives
    and host reads per layer."""
    import torch.distributed as dist

    groups: dict = {}
    for acc in accs:  # one flat buffer per device (model-parallel layers may live on several)
        groups.setdefault(acc.a.device, []).append(acc)
    local = [summary.batches, summary.samples]  # this process's own: every device's buffer sums these
    for dev, group in groups.items():
        sizes = local + [v for a in group for v in (a.calls, a.values)]
        head = torch.tensor(sizes, dtype=torch.float64, device=dev)
        flat = torch.cat([head] + [t for a in group for t in (a.a, a.b)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        lo = torch.tensor([a.m_min if a.m_min is not None else 2**62 for a in group], dtype=torch.int64, device=dev)
        hi = torch.tensor([a.m_max if a.m_max is not None else 0 for a in group], dtype=torch.int64, device=dev)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        counts, lo_l, hi_l = flat[:2 + 2 * len(group)].tolist(), lo.tolist(), hi.tolist()
        summary.batches, summary.samples = int(round(counts[0])), int(round(counts[1]))
        pos = 2 + 2 * len(group)
        for i, a in enumerate(group):
            a.calls, a.values = int(round(counts[2 + 2 * i])), int(round(counts[3 + 2 * i]))
            c = a.a.numel()
            a.a, a.b = flat[pos:pos + c].clone(), flat[pos + c:pos + 2 * c].clone()
            pos += 2 * c
            a.m_min = lo_l[i] if a.calls else None
            a.m_max = hi_l[i] if a.calls else None


def _bns(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if n and isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _drift(mean: torch.Tensor, var: torch.Tensor, old_m: torch.Tensor, old_v: torch.Tensor, eps: float) -> list[torch.Tensor]:
    """[mean_shift_std, its mean, var_ratio, its geometric mean, drift] of one layer (module docstring), float64 on the device."""
    m, v = mean.to(torch.float64), var.to(torch.float64).clamp_min(0)
    om, ov = old_m.to(device=m.device, dtype=torch.float64), old_v.to(device=m.device, dtype=torch.float64).clamp_min(0)
    s_pop, s_run = (v + eps).sqrt(), (ov + eps).sqrt()
    shift = (om - m).abs() / s_pop
    log_ratio = ((ov + eps).log() - (v + eps).log()).abs()  # |log r|: max(r, 1/r) = exp(|log r|)
    drift = (((m - om) / s_run).square() + v * (1 / s_run - 1 / s_pop).square()).sqrt()
    # what was wrong with the stored statistics, as bits (_drift_fields): reported, never a crash
    bad = ((~torch.isfinite(om).all()).double() + 2 * (~torch.isfinite(ov).all()).double()
           + 4 * (old_v.to(device=m.device, dtype=torch.float64) < 0).any().double())
    return [shift.max(), shift.mean(), log_ratio.max().exp(), log_ratio.mean().exp(), drift.max(), bad]


def _drift_fields(values: list[float | None]) -> dict[str, Any]:
    """The summary's drift fields from ``_drift``'s host values: None where a value is not finite, and the
    variance-based ones None too when the stored variances were unusable (a negative one is clamped above);
    ``stored_problem``: what made the stored statistics unusable (``_drift``'s bits), None when usable."""
    *fields, bits = values
    bits = int(bits or 0)
    out = dict(zip(_DRIFT, (x if x is not None and math.isfinite(x) else None for x in fields)))
    if bits & 6:
        out.update(var_ratio=None, var_ratio_gmean=None, drift=None)
    words = [w for b, w in ((1, "NaN/Inf in running_mean"), (2, "NaN/Inf in running_var"),
                            (4, "negative running_var")) if bits & b]
    return {**out, "stored_problem": ", ".join(words) or None}


def _host_table(names: list[str], results: dict, saved: dict, eps: dict) -> list[list]:
    """[finite, ‖Δmean‖, ‖old mean‖, ‖Δvar‖, ‖old var‖, *_drift] per layer, with a single device→host copy
    (the drift entries are NaN for a layer that had no running statistics)."""
    rows = []
    target = results[names[0]][0].device
    for n in names:
        mean, var = results[n]
        old_m, old_v = saved[n]["mean"], saved[n]["var"]
        finite = (torch.isfinite(mean).all() & torch.isfinite(var).all()).to(torch.float64)
        row = [finite]
        for new, old in ((mean, old_m), (var, old_v)):
            if old is None:
                row += [new.new_zeros((), dtype=torch.float64)] * 2
            else:
                o = old.to(device=new.device, dtype=torch.float64)
                row += [torch.linalg.vector_norm(new.to(torch.float64) - o), torch.linalg.vector_norm(o)]
        nan = mean.new_full((), float("nan"), dtype=torch.float64)
        row += [nan] * len(_DRIFT) + [nan.new_zeros(())] if old_m is None else _drift(mean, var, old_m, old_v, eps[n])
        rows.append(torch.stack(row).to(target))
    table = torch.stack(rows).tolist()
    return [[bool(r[0]), *r[1:5], _drift_fields(r[5:])] for r in table]


def _ratio(diff: float, denom: float) -> float | None:
    """‖new − old‖ / ‖old‖; None where that is undefined (old statistics all zero, new ones not):
    never Infinity, so that the JSON report stays strict."""
    if denom > 0:
        return diff / denom
    return 0.0 if diff == 0 else None


def _dist_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _check_m(name: str, x: torch.Tensor) -> int:
    """Values per channel a BN layer sees in a batch; at least 2, else CalibrationError."""
    m = x.numel() // max(x.shape[1] if x.dim() > 1 else 1, 1)
    if m <= 1:
        raise CalibrationError(
            f"BN layer '{name}' sees {m} value per channel in a batch (input shape {tuple(x.shape)}); "
            "the variance of one value is undefined",
            "use batches of at least 2 samples (--batch-size) and no batch of a single sample",
        )
    return m


class _Run:
    """One calibration of ``work``'s BN layers: what it saved (to restore on success and on failure),
    the float64 accumulators and the forward hooks that fill them."""

    def __init__(self, work: nn.Module, estimator: str):
        self.work, self.bns = work, _bns(work)
        self.dtype, self.device = model_dtype_device(work)
        self.saved = {
            name: dict(
                momentum=bn.momentum,
                track=bn.track_running_stats,
                mean=None if bn.running_mean is None else bn.running_mean.detach().clone(),
                var=None if bn.running_var is None else bn.running_var.detach().clone(),
                nbt=None if getattr(bn, "num_batches_tracked", None) is None else bn.num_batches_tracked.detach().clone(),
            )
            for name, bn in self.bns
        }
        self.accs = {name: _Acc(bn.num_features, bn.weight.device if bn.weight is not None else self.device, estimator)
                     for name, bn in self.bns}
        self.order: list[str] = []  # BN layers in the order the forward pass reaches them
        self.hooks: list = []

    def attach(self) -> None:
        """Only the BN layers in batch-statistics mode (momentum 1), each with its forward hook (the caller
        puts every module in eval mode first)."""
        for name, bn in self.bns:
            if bn.running_mean is None:  # track_running_stats=False: give it buffers to fill
                bn.register_buffer("running_mean", torch.zeros(bn.num_features, dtype=self.dtype, device=self.device))
                bn.register_buffer("running_var", torch.ones(bn.num_features, dtype=self.dtype, device=self.device))
                bn.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=self.device))
            else:  # calibration replaces statistics, it never reads the old ones: with momentum 1, torch still
                # computes 0·old, and a NaN/Inf stored statistic would survive it (saved above for the drift report)
                with torch.no_grad():
                    bn.running_mean.zero_()
                    bn.running_var.fill_(1)
            bn.track_running_stats = True
            bn.momentum = 1.0
            bn.train()
            self.hooks.append(bn.register_forward_hook(self._post_hook(name)))

    def _post_hook(self, name: str):
        # The hot path: ONE forward hook per BN call, host-side arithmetic on shapes and two in-place
        # device adds; no host synchronisation anywhere in the loop.
        acc, order = self.accs[name], self.order

        def hook(mod, args, out):
            if acc.calls == 0 and name not in order:
                order.append(name)
            acc.add(_check_m(name, args[0]), mod.running_mean, mod.running_var)
        return hook

    def diagnose(self, batch) -> None:
        """Rerun a batch the model rejected with pre-hooks that name a BN seeing ≤ 1 value per channel
        (torch refuses m = 1 itself)."""
        def pre_hook(name):
            def hook(mod, args):  # returns None: the inputs stay as they are
                _check_m(name, args[0])
            return hook

        diag = [bn.register_forward_pre_hook(pre_hook(name)) for name, bn in self.bns]
        with hooks_removed(diag):
            try:
                call_model(self.work, batch)
            except CalibrationError:
                raise
            except Exception:  # noqa: BLE001 — not a BN size problem: the caller reports the first error
                pass

    def restore(self) -> None:
        for name, bn in self.bns:
            _restore(bn, self.saved[name])

    def statistics(self) -> tuple[dict, dict]:
        """Every reached layer's (mean, var) and its (mean change, var change, drift fields), checked finite.

        One host transfer for the whole run (no sync per batch or per layer): finiteness of every
        layer's statistics and the norms of their changes, computed on the device, then .tolist()."""
        reached = self.order + [n for n, _ in self.bns if self.accs[n].calls and n not in self.order]  # forward order first
        results = {n: self.accs[n].result() for n in reached}
        eps = {name: float(bn.eps) for name, bn in self.bns}
        table = _host_table(reached, results, self.saved, eps) if reached else []
        for n, (ok, *_) in zip(reached, table):
            if not ok:
                raise CalibrationError(
                    f"non-finite activations reach BN layer '{n}' during calibration",
                    "check the data for extreme values and the layers before it",
                )
        return results, {n: (_ratio(dm, m0), _ratio(dv, v0), drift) for n, (ok, dm, m0, dv, v0, drift) in zip(reached, table)}

    def install(self, summary: CalibrationSummary) -> None:
        """Write the population statistics into the BN layers (an unreached one keeps its own)."""
        results, changes = self.statistics()
        for name, bn in self.bns:
            acc, old = self.accs[name], self.saved[name]
            if acc.calls == 0:
                _restore(bn, old)
                summary.layers.append({"name": name, "reached": False, "mean_change": None, "var_change": None, **_NO_DRIFT})
                continue
            mean, var = results[name]
            with torch.no_grad():
                bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
                bn.running_var.copy_(var.to(bn.running_var.dtype))
                if old["nbt"] is not None:  # all on the device: no host round trip
                    bn.num_batches_tracked.copy_(old["nbt"]).add_(acc.calls)
                else:
                    bn.num_batches_tracked.fill_(acc.calls)
            bn.momentum = old["momentum"]
            mean_change, var_change, drift = changes[name] if old["mean"] is not None else (None, None, _NO_DRIFT)
            summary.layers.append({"name": name, "reached": True, "batch_statistics": acc.calls,
                                   "values_per_channel": [acc.m_min, acc.m_max], "mean_change": mean_change, "var_change": var_change, **drift})
        summary.drift_order = [layer["name"] for layer in by_drift(summary.layers) if layer["drift"] is not None or layer["stored_problem"]]


def _feed(run: _Run, batches: DataSource, summary: CalibrationSummary, progress: bool,
          allow_tf32: bool | None, kept: list | None = None) -> None:
    """One forward pass per batch, counted in ``summary`` (and as n/N on the progress lines); the first
    batches into ``kept`` (output_effect)."""
    # TF32 policy (CUDA only; see calibrate's docstring): False (default) = true fp32,
    # True = TF32 convolutions and matmuls, None = torch's own flags as the caller set them.
    with progress_lines.reporting(progress) as lines, torch.no_grad(), tf32(allow_tf32):
        count = lines.count("calibrate", batches.length(), "batches")
        for i, raw in enumerate(batches):
            batch = prepare(as_batch(raw), run.dtype, run.device)
            try:
                call_model(run.work, batch)
            except DataError:  # a CalibrationError, or data that cannot be bound to forward()
                raise
            except Exception as err:
                run.diagnose(batch)  # raises CalibrationError when a BN sees a single value per channel
                raise DataError(
                    f"the model rejected calibration batch {i}: {type(err).__name__}: {first_line(err)}",
                    "check that the data matches the model's inputs (shape, dtype, number of inputs)",
                ) from err
            if kept is not None and len(kept) < EFFECT_BATCHES and sum(b.size for b in kept) < EFFECT_SAMPLES:
                kept.append(batch)
            summary.batches += 1
            summary.samples += batch.size
            count.advance()
        count.done()


def run_calibration(
    model: nn.Module,
    data: Any,
    *,
    estimator: str = "paper",
    inplace: bool = False,
    batch_size: int | None = None,
    progress: bool = False,
    allow_tf32: bool | None = False,
    effect: bool = False,
) -> tuple[nn.Module, CalibrationSummary]:
    """Calibrate and return (model with population statistics, summary). ``effect``: also measure how far
    the outputs move on the first calibration batches (``summary.output_effect``, module docstring)."""
    if estimator not in ESTIMATORS:
        raise DataError(f"unknown estimator '{estimator}'", f"use one of {', '.join(ESTIMATORS)}")
    if not isinstance(model, nn.Module):
        raise DataError(f"expected a torch.nn.Module, got {type(model).__name__}", "pass the model object")
    work = model if inplace else copy.deepcopy(model)
    summary = CalibrationSummary(estimator, world_size=_dist_world())
    if data is None:
        raise DataError("no calibration data", "pass a data file, a tensor of samples or an iterable of batches")
    batches = as_source(data, batch_size, what="the calibration data")  # every data form, normalised once
    run = _Run(work, estimator)  # saves everything it touches, so that it can be restored (on success and on failure)
    kept: list | None = [] if effect else None
    with eval_mode(work), hooks_removed(run.hooks):  # every module's training flag restored afterwards
        try:
            run.attach()
            _feed(run, batches, summary, progress, allow_tf32, kept)
            if summary.world_size > 1:
                _all_reduce(list(run.accs.values()), summary)
            if summary.batches == 0:
                raise DataError("the calibration data is empty", "provide at least one batch")
            run.install(summary)
        except BaseException:
            run.restore()
            raise
    if kept:
        with tf32(allow_tf32):
            summary.output_effect = _output_effect(run, kept)
    return work, summary


def _set_state(bns: list, states: dict) -> None:
    """Swap whole buffers in (no copy): the running statistics of ``states`` become the layers' own."""
    for name, bn in bns:
        bn.track_running_stats, *buffers = states[name]
        for b, t in zip(_BUFFERS, buffers):
            if t is not None or b in bn._buffers:
                bn.register_buffer(b, t)


def _output_effect(run: _Run, kept: list) -> dict[str, Any]:
    """Outputs in eval mode with the running statistics the model came with against the population ones, batch
    by batch on ``kept``: the largest absolute change (``scale``: the largest |output|, for reference) and, for
    outputs shaped like logits, the share of rows whose argmax stays (the worst output's; None without one)."""
    population = {n: (bn.track_running_stats, *(getattr(bn, b, None) for b in _BUFFERS)) for n, bn in run.bns}
    running = {name: (s["track"], s["mean"], s["var"], s["nbt"]) for name, s in run.saved.items()}
    diffs, agree = [], {}  # device scalars, one host copy at the end; name -> [agreeing rows, rows]
    measured = {"batches": len(kept), "samples": sum(b.size for b in kept)}
    try:
        with torch.no_grad(), eval_mode(run.work):
            for batch in kept:
                _set_state(run.bns, running)
                before = flatten_outputs(call_model(run.work, batch))
                _set_state(run.bns, population)
                after = flatten_outputs(call_model(run.work, batch))
                for (name, a), (_, b) in zip(before, after):
                    if not (a.is_floating_point() and b.is_floating_point() and a.shape == b.shape and a.numel()):
                        continue
                    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
                    diffs.append(torch.stack([(a64 - b64).abs().max(), b64.abs().max(), (~torch.isfinite(a64).all()).double()]).cpu())
                    top1, _ = topk_agreement(a64.cpu().numpy(), b64.cpu().numpy()) if a.dim() == 2 else (None, None)
                    if top1 is not None:
                        hits = agree.setdefault(name, [0.0, 0])
                        hits[0], hits[1] = hits[0] + top1 * a.shape[0], hits[1] + a.shape[0]
    except Exception as err:  # noqa: BLE001 — a measurement: it never fails the calibration
        return {**measured, "max_abs": None, "scale": None, "top1_agreement": None,
                "problem": f"not measured: {type(err).__name__}: {first_line(err)}"}
    finally:
        _set_state(run.bns, population)
    worst = torch.stack(diffs).amax(0).tolist() if diffs else [None, None, 0.0]
    finite = lambda x: x if x is None or math.isfinite(x) else None
    effect = {**measured, "max_abs": finite(worst[0]), "scale": finite(worst[1]),
              "top1_agreement": min((h / n for h, n in agree.values()), default=None)}
    if worst[2]:  # unusable stored statistics (stored_problem): the model's own outputs were not finite
        effect.update(max_abs=None, top1_agreement=None, problem="the outputs with the stored running statistics are not finite (NaN/Inf)")
    return effect


def _restore(bn, old) -> None:
    bn.momentum = old["momentum"]
    bn.track_running_stats = old["track"]
    if old["mean"] is None:
        for b in _BUFFERS:
            bn.register_buffer(b, None)
        return
    with torch.no_grad():
        bn.running_mean.copy_(old["mean"])
        bn.running_var.copy_(old["var"])
        if old["nbt"] is not None:
            bn.num_batches_tracked.copy_(old["nbt"])


def calibrate(model: nn.Module, data: Any, *, estimator: str = "paper", inplace: bool = False, batch_size: int | None = None, progress: bool = False, allow_tf32: bool | None = False) -> nn.Module:
    """Return a copy of ``model`` whose BN layers carry population statistics from ``data``.

    ``data``: any iterable of batches (tensors, tuples, dicts; a DataLoader works) or a data file.
    ``estimator``: ``"paper"`` (BN paper: average of batch means and of unbiased batch variances)
    or ``"pooled"`` (exact moments over all values). Training flags and momentum are restored.
    ``allow_tf32``: on CUDA, False (default) computes in true fp32 (the statistics match a CPU
    calibration to ~1e-7); True lets convolutions and matmuls use TF32 (≈1.6× faster on an H200 for
    ResNet-50; statistics move by ~1e-4 relative, far below their sampling noise); None leaves
    torch's own flags (``torch.backends.cudnn.allow_tf32``, ``torch.backends.cuda.matmul.allow_tf32``).
    No effect on CPU.
    """
    return run_calibration(model, data, estimator=estimator, inplace=inplace, batch_size=batch_size, progress=progress, allow_tf32=allow_tf32)[0]
