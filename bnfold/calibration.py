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
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from .data import as_batch, as_source, call_model, model_dtype_device, prepare
from .errors import CalibrationError, DataError
from .verification import tf32_off

ESTIMATORS = ("paper", "pooled")


@dataclass
class CalibrationSummary:
    estimator: str
    batches: int = 0
    samples: int = 0
    world_size: int = 1
    layers: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "estimator": self.estimator,
            "batches": self.batches,
            "samples": self.samples,
            "world_size": self.world_size,
            "layers": self.layers,
        }


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

    def finite(self) -> torch.Tensor:
        return torch.isfinite(self.a).all() & torch.isfinite(self.b).all()

    def all_reduce(self) -> None:
        import torch.distributed as dist

        c = self.a.numel()
        counts = torch.tensor([self.calls, self.values], dtype=torch.float64, device=self.a.device)
        flat = torch.cat([counts, self.a, self.b])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        self.calls, self.values = int(round(flat[0].item())), int(round(flat[1].item()))
        self.a, self.b = flat[2:2 + c].clone(), flat[2 + c:].clone()
        for op, attr in ((dist.ReduceOp.MIN, "m_min"), (dist.ReduceOp.MAX, "m_max")):
            v = torch.tensor([getattr(self, attr) if getattr(self, attr) is not None else (2**62 if attr == "m_min" else 0)], dtype=torch.int64, device=self.a.device)
            dist.all_reduce(v, op=op)
            setattr(self, attr, int(v.item()))

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.estimator == "paper":
            return self.a / self.calls, self.b / self.calls
        mean = self.a / self.values
        var_b = (self.b / self.values - mean * mean).clamp_min(0)
        return mean, var_b * (self.values / (self.values - 1))


def _bns(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if n and isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _rel_change(new: torch.Tensor, old: torch.Tensor | None) -> float | None:
    if old is None:
        return None
    new, old = new.double().cpu(), old.double().cpu()
    denom = old.norm().item()
    diff = (new - old).norm().item()
    return diff / denom if denom > 0 else (0.0 if diff == 0 else math.inf)


def _dist_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def run_calibration(
    model: nn.Module,
    data: Any,
    *,
    estimator: str = "paper",
    inplace: bool = False,
    batch_size: int | None = None,
    progress: bool = False,
    allow_tf32: bool = False,
) -> tuple[nn.Module, CalibrationSummary]:
    """Calibrate and return (model with population statistics, summary)."""
    if estimator not in ESTIMATORS:
        raise DataError(f"unknown estimator '{estimator}'", f"use one of {', '.join(ESTIMATORS)}")
    if not isinstance(model, nn.Module):
        raise DataError(f"expected a torch.nn.Module, got {type(model).__name__}", "pass the model object")
    work = model if inplace else copy.deepcopy(model)
    summary = CalibrationSummary(estimator, world_size=_dist_world())
    bns = _bns(work)
    if data is None:
        raise DataError("no calibration data", "pass a data file, a tensor of samples or an iterable of batches")
    batches: Iterable = as_source(data, batch_size, what="the calibration data")  # every data form, normalised once
    dtype, device = model_dtype_device(work)

    # save everything we touch, so that it can be restored (on success and on failure)
    flags = {m: m.training for m in work.modules()}
    saved = {
        name: dict(
            momentum=bn.momentum,
            track=bn.track_running_stats,
            mean=None if bn.running_mean is None else bn.running_mean.detach().clone(),
            var=None if bn.running_var is None else bn.running_var.detach().clone(),
            nbt=None if getattr(bn, "num_batches_tracked", None) is None else bn.num_batches_tracked.detach().clone(),
        )
        for name, bn in bns
    }
    accs = {name: _Acc(bn.num_features, bn.weight.device if bn.weight is not None else device, estimator) for name, bn in bns}
    order: list[str] = []  # BN layers in the order the forward pass reaches them
    hooks = []

    def pre_hook(name):
        def hook(mod, args):
            x = args[0]
            m = x.numel() // max(x.shape[1] if x.dim() > 1 else 1, 1)
            if m <= 1:
                raise CalibrationError(
                    f"BN layer '{name}' sees {m} value per channel in a batch (input shape {tuple(x.shape)}); "
                    "the variance of one value is undefined",
                    "use batches of at least 2 samples (--batch-size) and no batch of a single sample",
                )
        return hook

    def post_hook(name):
        def hook(mod, args, out):
            x = args[0]
            acc = accs[name]
            if acc.calls == 0 and name not in order:
                order.append(name)
            acc.add(x.numel() // x.shape[1], mod.running_mean, mod.running_var)
        return hook

    try:
        work.eval()
        for name, bn in bns:
            if bn.running_mean is None:  # track_running_stats=False: give it buffers to fill
                bn.register_buffer("running_mean", torch.zeros(bn.num_features, dtype=dtype, device=device))
                bn.register_buffer("running_var", torch.ones(bn.num_features, dtype=dtype, device=device))
                bn.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
            bn.track_running_stats = True
            bn.momentum = 1.0
            bn.train()
            hooks.append(bn.register_forward_pre_hook(pre_hook(name)))
            hooks.append(bn.register_forward_hook(post_hook(name)))

        total = len(batches) if hasattr(batches, "__len__") else None
        from rich.progress import Progress

        # TF32 off on CUDA (unless allow_tf32): cuDNN's default TF32 convolutions shift GPU
        # statistics by ~1e-4 relative against the fp32 model that the ONNX file runs.
        precision = contextlib.nullcontext() if allow_tf32 else tf32_off()
        with Progress(disable=not progress, transient=True) as bar, torch.no_grad(), precision:
            task = bar.add_task("calibrating", total=total)
            for i, raw in enumerate(batches):
                batch = prepare(as_batch(raw), dtype, device)
                try:
                    call_model(work, batch)
                except CalibrationError:
                    raise
                except Exception as err:
                    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                    raise DataError(
                        f"the model rejected calibration batch {i}: {type(err).__name__}: {first}",
                        "check that the data matches the model's inputs (shape, dtype, number of inputs)",
                    ) from err
                summary.batches += 1
                summary.samples += batch.size
                bar.advance(task)
        # one finiteness check at the end (no host sync per batch); name the first layer reached
        if order:
            finite = torch.stack([accs[n].finite().to(device) for n in order]).tolist()
            if not all(finite):
                bad = order[finite.index(False)]
                raise CalibrationError(
                    f"non-finite activations reach BN layer '{bad}' during calibration",
                    "check the data for extreme values and the layers before it",
                )
        if summary.batches == 0:
            raise DataError("the calibration data is empty", "provide at least one batch")
        if summary.world_size > 1:
            for acc in accs.values():
                acc.all_reduce()
            counts = torch.tensor([summary.batches, summary.samples], dtype=torch.int64, device=device)
            import torch.distributed as dist

            dist.all_reduce(counts)
            summary.batches, summary.samples = (int(v) for v in counts.tolist())

        for name, bn in bns:
            acc, old = accs[name], saved[name]
            if acc.calls == 0:
                _restore(bn, old)
                summary.layers.append({"name": name, "reached": False, "mean_change": None, "var_change": None})
                continue
            mean, var = acc.result()
            with torch.no_grad():
                bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
                bn.running_var.copy_(var.to(bn.running_var.dtype))
                base = old["nbt"] if old["nbt"] is not None else torch.zeros((), dtype=torch.long)
                bn.num_batches_tracked.copy_(base.to(bn.num_batches_tracked.device) + acc.calls)
            bn.momentum = old["momentum"]
            summary.layers.append({
                "name": name,
                "reached": True,
                "batch_statistics": acc.calls,
                "values_per_channel": [acc.m_min, acc.m_max],
                "mean_change": _rel_change(mean, old["mean"]),
                "var_change": _rel_change(var, old["var"]),
            })
    except BaseException:
        for name, bn in bns:
            _restore(bn, saved[name])
        raise
    finally:
        for h in hooks:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    return work, summary


def _restore(bn, old) -> None:
    bn.momentum = old["momentum"]
    bn.track_running_stats = old["track"]
    if old["mean"] is None:
        for b in ("running_mean", "running_var", "num_batches_tracked"):
            bn.register_buffer(b, None)
        return
    with torch.no_grad():
        bn.running_mean.copy_(old["mean"])
        bn.running_var.copy_(old["var"])
        if old["nbt"] is not None:
            bn.num_batches_tracked.copy_(old["nbt"])


def calibrate(model: nn.Module, data: Any, *, estimator: str = "paper", inplace: bool = False, batch_size: int | None = None, progress: bool = False, allow_tf32: bool = False) -> nn.Module:
    """Return a copy of ``model`` whose BN layers carry population statistics from ``data``.

    ``data``: any iterable of batches (tensors, tuples, dicts; a DataLoader works) or a data file.
    ``estimator``: ``"paper"`` (BN paper: average of batch means and of unbiased batch variances)
    or ``"pooled"`` (exact moments over all values). Training flags and momentum are restored.
    ``allow_tf32``: on CUDA, let convolutions use TF32 (faster, statistics ~1e-4 off fp32).
    """
    return run_calibration(model, data, estimator=estimator, inplace=inplace, batch_size=batch_size, progress=progress, allow_tf32=allow_tf32)[0]
