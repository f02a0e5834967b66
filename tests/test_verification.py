"""Verification: the comparator, nested outputs, per-output tolerances, honest provider reporting."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import bnfold
from bnfold.errors import ProviderError
from bnfold.verification.compare import compare
from bnfold.verification.runners import OrtRunner, RunnerUnavailable, flatten_outputs, tf32
from conftest import randomize_bn


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        pooled = y.mean((2, 3))
        return {"logits": self.head(pooled), "aux": (pooled, y.amax((2, 3)))}


def test_compare_statistics_and_tolerances():
    ref = np.array([1.0, 0.5, 0.0, -0.25], np.float32)
    got = ref + np.array([0, 1e-5, 3e-4, -2e-5], np.float32)
    c = compare("y", ref, got)  # float32 defaults: atol 1e-4, rtol 1e-4 → the element at 0 fails
    assert not c and c.max_abs_error == pytest.approx(3e-4, rel=1e-3)
    assert c.atol == 1e-4 and c.required_atol == pytest.approx(3e-4, rel=1e-3)
    assert compare("y", ref, got, atol=c.required_atol * 1.01)  # the reported tolerance passes
    assert compare("y", ref, got, atol={"y": 1e-3})
    assert not compare("y", ref, got, atol={"other": 1e-3})
    assert compare("y", ref, got, atol={"*": 1e-3})
    assert 0.999 < c.cosine_similarity <= 1.0


def test_default_atol_scales_with_output_magnitude():
    ref = np.array([1e5, 1.0, 0.0], np.float32)
    c = compare("y", ref, ref + np.array([0, 0, 5.0], np.float32))
    assert c.atol == pytest.approx(10.0) and c  # 5 is rounding noise next to 1e5
    assert not compare("y", ref, ref + np.array([0, 0, 50.0], np.float32))
    assert not compare("y", ref, ref + np.array([0, 0, 5.0], np.float32), atol=1e-4)  # given: as is


def test_compare_shape_dtype_and_nonfinite():
    a = np.ones((2, 3), np.float32)
    assert "shape" in compare("y", a, np.ones((3, 2), np.float32)).problem
    assert "dtype" in compare("y", a, np.ones((2, 3), np.float64)).problem
    b = a.copy()
    b[0, 0] = np.nan
    assert "candidate has 1 NaN/Inf" in compare("y", a, b).problem
    same = compare("y", b, b.copy())  # the same NaN in both proves nothing: never a pass
    assert not same and "reference itself is non-finite" in same.problem and same.nonfinite_reference == 1
    assert compare("x", np.arange(3), np.arange(3)) and not compare("x", np.arange(3), np.arange(3) + 1)


def test_flatten_outputs_names():
    out = {"logits": torch.zeros(1), "aux": (torch.ones(1), [torch.ones(2)])}
    assert [n for n, _ in flatten_outputs(out)] == ["output.logits", "output.aux.0", "output.aux.1.0"]


def test_nested_outputs_end_to_end(tmp_path):
    model = randomize_bn(TwoHeads()).eval()
    x = torch.randn(2, 3, 6, 6)
    rep = bnfold.convert(model, (x,), tmp_path / "m.onnx", providers="cpu",
                         atol={"output.aux.1": 1e-3}, report=tmp_path / "r.json")
    assert rep.passed, rep.verification
    names = [o["name"] for o in rep.verification["runs"][-1]["outputs"]]
    assert names == ["output.logits", "output.aux.0", "output.aux.1"]
    atols = {o["name"]: o["atol"] for o in rep.verification["runs"][-1]["outputs"]}
    assert atols == {"output.logits": 1e-4, "output.aux.0": 1e-4, "output.aux.1": 1e-3}


def test_corrupted_file_fails_with_precise_report(tmp_path):
    import onnx

    model = randomize_bn(TwoHeads()).eval()
    x = torch.randn(2, 3, 6, 6)
    path = bnfold.export(bnfold.fold(model), (x,), tmp_path / "m.onnx")
    m = onnx.load(str(path))
    head = next(i for i in m.graph.initializer if onnx.numpy_helper.to_array(i).shape == (2, 4))
    arr = onnx.numpy_helper.to_array(head).copy()
    arr[1, 2] += 0.25
    head.CopyFrom(onnx.numpy_helper.from_array(arr, head.name))
    onnx.save(m, str(path))
    vr = bnfold.verify(model, path, (x,), providers=["cpu"])
    assert not vr and vr.providers_run == ["cpu"]
    failing = {(r.graph_optimization, o.name) for r, o in vr.failures()}
    # only the logits read the perturbed weight; the aux outputs still match
    assert failing == {("disable_all", "output.logits"), ("default", "output.logits")}


def test_cuda_absent_is_unavailable_not_passed(tmp_path):
    model = randomize_bn(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))).eval()
    x = torch.randn(1, 1, 5, 5)
    path = bnfold.export(model, (x,), tmp_path / "m.onnx")
    vr = bnfold.verify(model, path, (x,), providers="cpu,cuda")  # asked for; the default is what this onnxruntime has
    if "cuda" in vr.providers_run:
        pytest.skip("CUDA really runs here")
    assert [u["provider"] for u in vr.providers_unavailable] == ["cuda"]
    assert vr.providers_unavailable[0]["reason"]
    assert all(r.provider != "cuda" for r in vr.runs)
    with pytest.raises(ProviderError, match="required provider 'cuda'"):
        bnfold.verify(model, path, (x,), require_providers=["cuda"])


def test_listed_cuda_that_falls_back_is_unavailable(tmp_path, monkeypatch):
    """onnxruntime may list CUDA and then quietly run on CPU: only get_providers() tells."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3)).eval()
    path = bnfold.export(model, (torch.randn(1, 1, 5, 5),), tmp_path / "m.onnx")
    real_session = ort.InferenceSession

    class FallbackSession:
        def __init__(self, *a, providers=None, **k):
            self._s = real_session(*a, providers=["CPUExecutionProvider"], **k)

        def get_providers(self):
            return ["CPUExecutionProvider"]

        def __getattr__(self, name):
            return getattr(self._s, name)

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", FallbackSession)
    with pytest.raises(RunnerUnavailable, match="fell back to CPUExecutionProvider"):
        OrtRunner(path, "cuda", "default")


def test_tf32_flags_restored():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.allow_tf32 = True
    with tf32(False):
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.allow_tf32 is True
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def gpu_test(fn):
    """CUDA-only: selected by `pytest -m gpu`, skipped without a CUDA device."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(fn))


def cuda_ep():
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDAExecutionProvider (bring onnxruntime-gpu, README section GPU)")


@gpu_test
def test_cuda_reference_on_gpu(tmp_path):
    model = randomize_bn(TwoHeads()).eval()
    x = torch.randn(2, 3, 6, 6)
    rep = bnfold.convert(model, (x,), tmp_path / "m.onnx", providers="cpu,cuda")
    assert rep.passed
    if "cuda" in rep.verification["providers_run"]:
        assert any(r["provider"] == "cuda" and r["device"] == "cuda" for r in rep.verification["runs"])


@gpu_test
def test_convert_a_model_that_lives_on_the_gpu(tmp_path):
    model = randomize_bn(TwoHeads()).eval().cuda()
    rep = bnfold.convert(model, (torch.randn(2, 3, 6, 6, device="cuda"),), tmp_path / "m.onnx")
    assert rep.passed, rep.verification
    assert next(model.parameters()).is_cuda  # untouched, still on the GPU
    runs = rep.verification["runs"]
    assert any(r["target"] == "folded-module" and r["device"].startswith("cuda") for r in runs)
    cuda_runs = [r for r in runs if r["provider"] == "cuda"]
    assert bool(cuda_runs) == ("cuda" in rep.verification["providers_run"])


def test_verify_leaves_the_reference_as_it_was(tmp_path):
    from conftest import state_hash

    model = randomize_bn(TwoHeads())
    model.train()
    model.head.eval()
    x = torch.randn(2, 3, 6, 6)
    path = bnfold.export(bnfold.fold(model), (x,), tmp_path / "m.onnx")
    before, flags = state_hash(model), {n: m.training for n, m in model.named_modules()}
    assert bnfold.verify(model, path, (x,), providers="cpu")  # compared in eval mode ...
    assert state_hash(model) == before  # ... without touching statistics or flags
    assert {n: m.training for n, m in model.named_modules()} == flags


@gpu_test
def test_cuda_provider_really_runs_and_is_quiet(tmp_path, capfd):
    """onnxruntime-gpu: the CUDA session runs on CUDA (get_providers), prints nothing (no "No registered
    plugin EP device" warning: bnfold passes no device_id), and the comparison uses a GPU reference."""
    cuda_ep()
    from bnfold.verification.runners import OrtRunner

    model = randomize_bn(TwoHeads()).eval()
    x = torch.randn(2, 3, 6, 6)
    path = bnfold.export(bnfold.fold(model), (x,), tmp_path / "m.onnx")
    capfd.readouterr()
    for level in ("disable_all", "default"):
        r = OrtRunner(path, "cuda", level)
        assert r.session.get_providers()[0] == "CUDAExecutionProvider"
        r.infer((x,))
    err = capfd.readouterr().err
    assert "No registered plugin EP device" not in err and "onnxruntime" not in err, err
    vr = bnfold.verify(model, path, (x,), providers="cpu,cuda", require_providers="cuda")
    assert vr and vr.providers_run == ["cpu", "cuda"]
    assert {r.reference_device for r in vr.runs if r.provider == "cuda"} == {"cuda"}
    assert vr.float64_reference == "ran"


@gpu_test
def test_cuda_only_providers_compare_or_refuse(tmp_path):
    """--providers cuda alone: compared on CUDA where it runs, else exit 2 (never PASSED untested)."""
    from bnfold.errors import ProviderError

    model = randomize_bn(TwoHeads()).eval().cuda()
    x = torch.randn(2, 3, 6, 6, device="cuda")
    path = bnfold.export(bnfold.fold(model), (x,), tmp_path / "m.onnx")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        vr = bnfold.verify(model, path, (x,), providers="cuda")
        assert vr and vr.providers_run == ["cuda"]
    else:
        with pytest.raises(ProviderError, match="none of the requested providers"):
            bnfold.verify(model, path, (x,), providers="cuda")


def test_convert_works_on_one_copy_released_before_the_sessions(tmp_path, monkeypatch):
    """A caller's module is copied once; the copy is calibrated and folded in place and is gone before
    the onnxruntime sessions exist; the caller's module never changes; verification still compares the
    folded module and the file against references taken before the fold."""
    import gc
    import weakref

    import bnfold.pipeline as pipeline
    from conftest import state_hash

    model = randomize_bn(TwoHeads()).train()
    before = state_hash(model)
    seen = {}
    real_fold, real_cal, real_verify = pipeline.fold_with_plan, pipeline.run_calibration, pipeline.verify

    def fold(m, *a, inplace=False, **k):
        seen.update(fold_inplace=inplace, fold_on_user=m is model, module=weakref.ref(m))
        return real_fold(m, *a, inplace=inplace, **k)

    def calibrate(m, *a, inplace=False, **k):
        seen.update(cal_inplace=inplace, cal_on_user=m is model)
        return real_cal(m, *a, inplace=inplace, **k)

    def check(*a, **k):
        gc.collect()
        seen["alive_at_verify"] = seen["module"]() is not None
        return real_verify(*a, **k)

    monkeypatch.setattr(pipeline, "fold_with_plan", fold)
    monkeypatch.setattr(pipeline, "run_calibration", calibrate)
    monkeypatch.setattr(pipeline, "verify", check)
    x = torch.randn(2, 3, 6, 6)
    rep = bnfold.convert(model, (x,), tmp_path / "m.onnx", providers="cpu", calib=torch.randn(16, 3, 6, 6), batch_size=8)
    assert rep.passed, rep.verification
    assert seen == {"fold_inplace": True, "fold_on_user": False, "cal_inplace": True, "cal_on_user": False,
                    "module": seen["module"], "alive_at_verify": False}
    assert state_hash(model) == before  # statistics and train flags as they were
    assert list(rep.timings) == ["check_inputs", "calibrate", "reference", "fold", "export", "verify"]
    runs = rep.verification["runs"]
    assert [r["target"] for r in runs] == ["folded-module"] * 2 + ["onnx"] * 4 and all(r["passed"] for r in runs)
    assert rep.verification["float64_reference"] == "ran"
