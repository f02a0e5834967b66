"""bnfold.calibrate against an independent float64 implementation of the BN paper's formulas."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import bnfold
from bnfold.errors import CalibrationError, DataError
from conftest import SAMPLE, SAMPLE_SPEC, randomize_bn, state_hash


class Mixed(nn.Module):
    """BN layers over (N, C, L), (N, C, H, W), (N, C, D, H, W) and (N, C), with dropout in between."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 3)
        self.b1 = nn.BatchNorm1d(3)
        self.c2 = nn.Conv2d(3, 4, 3, padding=1)
        self.b2 = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.c3 = nn.Conv3d(4, 2, 1)
        self.b3 = nn.BatchNorm3d(2)
        self.fc = nn.Linear(2 * 2 * 6 * 6, 5)
        self.b4 = nn.BatchNorm1d(5, track_running_stats=False)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))  # (N, 3, 36)
        y = y.reshape(-1, 3, 6, 6)
        y = self.drop(torch.relu(self.b2(self.c2(y))))
        y = self.b3(self.c3(y.reshape(y.shape[0], 4, 1, 6, 6).expand(-1, -1, 2, -1, -1)))
        return self.b4(self.fc(y.flatten(1)))


def reference_stats(model: nn.Module, batches, estimator: str):
    """Independent: capture each BN's input (BN layers in batch-stat mode, the rest eval), float64 formulas."""
    m = copy.deepcopy(model).eval()
    seen: dict[str, list] = {}
    hooks = []
    for name, mod in m.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.train()
            mod.momentum = 0.0

            def hook(module, args, name=name):
                x = args[0].detach().to(torch.float64)
                c = x.shape[1]
                seen.setdefault(name, []).append(x.transpose(0, 1).reshape(c, -1))

            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            m(b)
    out = {}
    for name, xs in seen.items():
        if estimator == "paper":
            means = torch.stack([x.mean(1) for x in xs])
            vars_ = torch.stack([x.var(1, unbiased=False) * x.shape[1] / (x.shape[1] - 1) for x in xs])
            out[name] = (means.mean(0), vars_.mean(0))
        else:
            allx = torch.cat(xs, dim=1)
            out[name] = (allx.mean(1), allx.var(1, unbiased=True))
    return out


def _batches(sizes, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 2, 38, generator=g, dtype=torch.float64) * 2 + 0.7).to(dtype) for n in sizes]


@pytest.mark.parametrize("estimator", ["paper", "pooled"])
def test_matches_independent_float64_reference(estimator):
    torch.manual_seed(0)
    model = randomize_bn(Mixed()).double().eval()
    batches = _batches([5, 3, 7, 4])  # unequal batch sizes: each batch counts with its own m
    ref = reference_stats(model, batches, estimator)
    before = state_hash(model)
    out, summary = bnfold.run_calibration(model, batches, estimator=estimator)
    assert state_hash(model) == before  # not inplace: the user's model is untouched
    assert summary.batches == 4 and summary.samples == 19
    for name, (mu, var) in ref.items():
        bn = out.get_submodule(name)
        torch.testing.assert_close(bn.running_mean, mu, rtol=1e-6, atol=0)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-6, atol=0)
        assert int(bn.num_batches_tracked) >= 4


def test_float32_model_within_1e6_of_float64_formulas():
    torch.manual_seed(1)
    model = randomize_bn(Mixed()).eval()
    batches = _batches([6, 9, 5], dtype=torch.float32)
    ref = reference_stats(model, batches, "paper")  # float32 activations, float64 formulas
    out = bnfold.calibrate(model, batches)
    for name, (mu, var) in ref.items():
        bn = out.get_submodule(name)
        scale = var.sqrt()
        assert ((bn.running_mean.double() - mu).abs() <= 1e-6 * (mu.abs() + scale)).all(), name
        assert ((bn.running_var.double() - var).abs() <= 1e-6 * var).all(), name


def test_only_bn_layers_in_batch_mode_and_flags_restored():
    model = Mixed()
    model.train()
    model.drop.eval()  # an odd mix of flags must come back exactly
    flags = {n: m.training for n, m in model.named_modules()}
    momenta = {n: m.momentum for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    out = bnfold.calibrate(model.double(), _batches([4, 4]))
    assert {n: m.training for n, m in out.named_modules()} == flags
    assert {n: m.momentum for n, m in out.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)} == momenta


def test_dropout_stays_in_eval():
    # with dropout in train mode, b3's statistics would change from call to call
    model = randomize_bn(Mixed()).double().eval()
    a = bnfold.calibrate(model, _batches([4, 4]))
    b = bnfold.calibrate(model, _batches([4, 4]))
    torch.testing.assert_close(a.b3.running_var, b.b3.running_var, rtol=0, atol=0)


def test_track_running_stats_false_gets_statistics_and_folds():
    model = randomize_bn(Mixed()).double().eval()
    assert model.b4.running_mean is None
    out = bnfold.calibrate(model, _batches([5, 5]))
    assert out.b4.running_mean is not None and out.b4.track_running_stats
    assert model.b4.running_mean is None  # the original still has none
    plan = bnfold.inspect(out, (_batches([3])[0],))
    assert "b4" in {f.bn for f in plan.folded}


def test_inplace():
    model = Mixed().double()
    out = bnfold.calibrate(model, _batches([4]), inplace=True)
    assert out is model and int(model.b1.num_batches_tracked) == 1


def test_refuse_m_equal_one():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(CalibrationError, match=r"BN layer '1' sees 1 value per channel"):
        bnfold.calibrate(model, [torch.randn(4, 3), torch.randn(1, 3)])
    # the failed calibration left the model as it was
    assert int(model[1].num_batches_tracked) == 0


def test_refuse_empty_data():
    with pytest.raises(DataError, match="empty"):
        bnfold.calibrate(Mixed(), [])


def test_refuse_data_that_does_not_fit():
    with pytest.raises(DataError, match="rejected calibration batch 0"):
        bnfold.calibrate(Mixed(), [torch.randn(4, 5, 38)])


def test_refuse_nonfinite_activations_names_the_layer():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    with torch.no_grad():
        model[0].weight.fill_(1e30)
    with pytest.raises(CalibrationError, match="non-finite activations reach BN layer '1'"):
        bnfold.calibrate(model, [torch.full((2, 1, 3, 3), 1e20)])


def test_dataloader_with_labels():
    ds = torch.utils.data.TensorDataset(torch.randn(20, 2, 38, dtype=torch.float64), torch.arange(20))
    loader = torch.utils.data.DataLoader(ds, batch_size=8)
    model = Mixed().double()
    ref = reference_stats(model, [x for x, _ in loader], "paper")
    out = bnfold.calibrate(model, loader)
    torch.testing.assert_close(out.b2.running_var, ref["b2"][1], rtol=1e-6, atol=0)


def test_sample_population_statistics_keep_accuracy(sample_model):
    data = np.load(SAMPLE / "test.npz")
    x, y = torch.from_numpy(data["x"]), data["y"]
    calibrated = bnfold.calibrate(sample_model, str(SAMPLE / "calib.npz"), batch_size=64)
    with torch.no_grad():
        acc_ma = (sample_model(x).argmax(1).numpy() == y).mean()
        acc_pop = (calibrated(x).argmax(1).numpy() == y).mean()
    assert acc_ma > 0.95 and acc_pop > 0.95
    assert not torch.equal(calibrated.bn1.running_var, sample_model.bn1.running_var)


def test_two_processes_equal_one(tmp_path):
    """torchrun with 2 gloo processes over disjoint shards == one process over all batches."""
    common = [SAMPLE_SPEC, "--weights", str(SAMPLE / "weights.pt"), "--calib", str(SAMPLE / "calib.npz"),
              "--batch-size", "100", "--quiet"]
    one = tmp_path / "one.pt"
    two = tmp_path / "two.pt"
    r1 = subprocess.run([sys.executable, "-m", "bnfold", "calibrate", *common, "-o", str(one)], capture_output=True, text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                         "-m", "bnfold", "calibrate", *common, "-o", str(two)], capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-2000:]
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        if "running" in k or "num_batches" in k:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=0, msg=k)
    assert int(b["bn1.num_batches_tracked"]) == int(a["bn1.num_batches_tracked"])


def gpu_test(fn):
    """CUDA-only: selected by `pytest -m gpu`, skipped without a CUDA device."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(fn))


SYNCS = ("item", "cpu", "tolist", "__float__", "__int__", "__bool__", "numpy")


def test_one_host_transfer_per_run(monkeypatch):
    """No device→host synchronisation per batch or per layer: one .tolist() for the whole run."""

    model = randomize_bn(Mixed()).eval()
    batches = _batches([4, 5, 6, 4, 5], dtype=torch.float32)
    for estimator in ("paper", "pooled"):
        calls: list[str] = []
        with monkeypatch.context() as mp:
            for name in SYNCS:
                orig = getattr(torch.Tensor, name)
                mp.setattr(torch.Tensor, name, lambda self, *a, _o=orig, _n=name, **k: (calls.append(_n), _o(self, *a, **k))[1])
            bnfold.calibrate(model, batches, estimator=estimator)
        assert calls == ["tolist"], (estimator, calls)


def test_changes_are_finite_or_null_never_infinity():
    import json

    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)).eval()  # fresh BN: running_mean is 0
    _, summary = bnfold.run_calibration(model, [torch.randn(4, 2, 5, 5) + 1 for _ in range(2)])
    layer = summary.layers[0]
    assert layer["mean_change"] is None and layer["var_change"] > 0
    json.dumps(summary.to_dict(), allow_nan=False)  # strict JSON
    same = bnfold.run_calibration(model, [torch.zeros(4, 2, 5, 5)] * 2)[1].layers[0]  # unchanged zero mean: 0, not null
    assert same["reached"]


@pytest.mark.parametrize("allow", [True, False, None])
def test_tf32_policy_inside_the_loop_and_restored(allow):
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            return x

    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    model = nn.Sequential(nn.Conv2d(1, 2, 1), Probe(), nn.BatchNorm2d(2))
    bnfold.calibrate(model, [torch.randn(2, 1, 3, 3)], allow_tf32=allow)
    assert seen == [before if allow is None else (allow, allow)]
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before


@gpu_test
def test_calibrate_on_cuda_tf32_close_to_exact():
    torch.manual_seed(0)
    model = randomize_bn(Mixed()).eval().cuda()
    batches = [b.cuda() for b in _batches([16, 16, 16], dtype=torch.float32)]
    exact = bnfold.calibrate(model, batches)
    fast = bnfold.calibrate(model, batches, allow_tf32=True)
    for name in ("b1", "b2", "b3", "b4"):
        torch.testing.assert_close(fast.get_submodule(name).running_var, exact.get_submodule(name).running_var, rtol=5e-3, atol=1e-5)


@gpu_test
def test_calibrate_on_cuda_matches_cpu():
    torch.manual_seed(0)
    model = randomize_bn(Mixed()).eval()
    batches = _batches([6, 9, 5], dtype=torch.float32)
    cpu = bnfold.calibrate(model, batches)
    gpu = bnfold.calibrate(copy.deepcopy(model).cuda(), [b.cuda() for b in batches])
    assert next(gpu.parameters()).is_cuda
    for name in ("b1", "b2", "b3", "b4"):
        torch.testing.assert_close(gpu.get_submodule(name).running_var.cpu(), cpu.get_submodule(name).running_var, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(gpu.get_submodule(name).running_mean.cpu(), cpu.get_submodule(name).running_mean, rtol=1e-5, atol=1e-6)
