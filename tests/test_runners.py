"""Runners, the provider registry, the comparator apart from them, honest verdicts and the noise floor."""

from __future__ import annotations

import copy
import os

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import bnfold
from bnfold.verification.compare import NOISE_K, OutputComparison, check_tolerance_keys, compare, compare_outputs
from bnfold.edges.data import Batch
from bnfold.errors import BadInputError, ProviderError, WeightsError
from bnfold.verification.providers import PROVIDERS, ProviderSpec, parse_providers, register_provider
from bnfold.verification.runners import OrtRunner, Runner, RunnerUnavailable, TorchRunner
from bnfold.verification.verify import Run, VerifyReport, compare_runners, verify
from conftest import randomize_bn, state_hash


def small():
    return randomize_bn(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = small()
    x = torch.randn(2, 2, 6, 6)
    path = bnfold.export(bnfold.fold(model), (x,), tmp_path_factory.mktemp("exported") / "m.onnx")
    return model, x, path


def ill_conditioned(depth=8, width=16, seed=0, offset=1e4):
    """Deep Linear→BN with huge biases cancelled by the BN means and small variances: torch's eval BN
    computes x·α + (β − μ·α) in float32, so the float32 model is far from its own float64 run."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(depth):
        lin, bn = nn.Linear(width, width), nn.BatchNorm1d(width)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(width, width, generator=g) * 0.3 / width ** 0.5)
            lin.bias.copy_(torch.randn(width, generator=g) * offset)
            bn.running_mean.copy_(lin.bias + torch.randn(width, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(width, generator=g) * 0.05 + 0.05)
            bn.weight.copy_(torch.randn(width, generator=g) * 0.5 + 1)
            bn.bias.copy_(torch.randn(width, generator=g) * 0.5)
        layers += [lin, bn]
    return nn.Sequential(*layers).eval()


# ------------------------------------------------------------------------------------ runners
def test_torch_runner_names_outputs_and_leaves_the_model_alone():
    model = small().train()
    before = state_hash(model)
    r = TorchRunner(model)
    assert isinstance(r, Runner) and r.device == "cpu" and not r.copied
    x = torch.randn(2, 2, 6, 6)
    (name, y), = r.infer((x,))
    with torch.no_grad():
        expected = copy.deepcopy(model).eval()(x).numpy()
    assert name == "output" and y.dtype == np.float32 and np.array_equal(y, expected)
    assert state_hash(model) == before  # eval for the run only, flags restored
    r64 = TorchRunner(model, dtype=torch.float64)
    (_, y64), = r64.infer(Batch((x,), {}))
    assert r64.copied and y64.dtype == np.float64 and next(model.parameters()).dtype == torch.float32
    assert np.abs(y64 - expected).max() < 1e-4


@pytest.mark.parametrize("level", ["disable_all", "default"])
def test_ort_runner_cpu_both_levels(exported, level):
    model, x, path = exported
    r = OrtRunner(path, "cpu", level)
    assert isinstance(r, Runner) and (r.provider, r.level, r.device) == ("cpu", level, "cpu")
    assert r.session.get_providers()[0] == "CPUExecutionProvider"
    (name, y), = r.infer((x,))
    with torch.no_grad():
        ref = model(x).numpy()
    assert name == "output" and compare(name, ref, y)
    with pytest.raises(BadInputError, match="needs input"):
        r.infer(())


def test_ort_runner_unavailable_provider(exported):
    _, _, path = exported
    if "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(RunnerUnavailable, match="no CUDAExecutionProvider"):
        OrtRunner(path, "cuda", "default")


def test_ort_runner_bad_file_is_bad_input(tmp_path):
    p = tmp_path / "bad.onnx"
    p.write_bytes(b"not onnx")
    with pytest.raises(BadInputError, match="cannot load"):
        OrtRunner(p, "cpu", "default")


class FakeRunner:
    """The protocol is all a runtime needs: attributes + infer(feeds) -> [(name, ndarray)]."""

    target, provider, level, device = "onnx", "fake-runtime", None, "cpu"

    def __init__(self, model, shift=0.0):
        self.model, self.shift = model, shift

    def infer(self, feeds):
        with torch.no_grad():
            return [("output", self.model(*feeds.args).numpy() + np.float32(self.shift))]


def test_a_fake_runner_is_compared_like_any_other():
    model = small()
    x = torch.randn(2, 2, 6, 6)
    assert isinstance(FakeRunner(model), Runner)
    rep = compare_runners(TorchRunner(model), [FakeRunner(model), FakeRunner(model, 1e-2)], {"a": (x,), "b": (x * 2,)})
    assert [(r.provider, r.inputs, r.passed) for r in rep.runs] == [
        ("fake-runtime", "a", True), ("fake-runtime", "b", True), ("fake-runtime", "a", False), ("fake-runtime", "b", False)]
    assert not rep and rep.providers_run == ["fake-runtime"]


# ----------------------------------------------------------------------------------- registry
def test_registry_entries_and_parsing():
    assert {"cpu", "cuda", "tensorrt"} <= set(PROVIDERS)
    assert PROVIDERS["cuda"].ort_name == "CUDAExecutionProvider"
    # device_id triggers onnxruntime-gpu's per-session "No registered plugin EP device" warning
    assert all("device_id" not in s.options for s in PROVIDERS.values())
    assert PROVIDERS["cuda"].options["use_tf32"] == "0"
    assert PROVIDERS["cpu"].provider_list() == ["CPUExecutionProvider"]
    assert PROVIDERS["cuda"].provider_list() == [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    assert parse_providers("CPU, CUDAExecutionProvider,cpu") == ["cpu", "cuda"]
    assert parse_providers(["TensorrtExecutionProvider"]) == ["tensorrt"]
    with pytest.raises(ProviderError, match="unknown provider 'gpu0'"):
        parse_providers("gpu0")


def test_adding_a_provider_is_one_entry(exported, monkeypatch):
    """A registered provider is verified like the built-in ones (here: the CPU EP under a new key)."""
    model, x, path = exported
    monkeypatch.setitem(PROVIDERS, "cpu2", PROVIDERS["cpu"])
    register_provider(ProviderSpec("cpu2", "CPUExecutionProvider"))
    vr = verify(model, path, (x,), providers="cpu2")
    assert vr and vr.providers_run == ["cpu2"] and {r.provider for r in vr.runs} == {"cpu2"}


def test_fallback_session_is_not_a_run(exported):
    class Session:
        def get_providers(self):
            return ["CPUExecutionProvider"]

    ok, why = PROVIDERS["cuda"].really_runs(Session())
    assert not ok and "fell back to CPUExecutionProvider" in why


# --------------------------------------------------------------------------------- comparator
def test_comparison_statistics_and_round_trip():
    ref = np.array([1.0, -2.0, 0.5, 0.0], np.float32)
    got = ref + np.array([1e-5, -3e-5, 0, 2e-5], np.float32)
    c = compare("y", ref, got)
    assert c and c.verdict == "tolerance"
    assert c.max_abs_error == pytest.approx(3e-5, rel=1e-2) and c.median_abs_error == pytest.approx(1.5e-5, rel=1e-2)
    assert c.mean_abs_error == pytest.approx(1.5e-5, rel=1e-2)
    assert OutputComparison.from_dict(c.to_dict()) == c
    bad = compare_outputs([("a", ref)], [("a", ref), ("b", ref)])
    assert len(bad) == 1 and not bad[0] and "2 outputs" in bad[0].problem


def test_verify_report_round_trip(exported):
    import json

    model, x, path = exported
    vr = verify(model, path, {"one": (x,), "two": (x * 2,)}, providers="cpu", folded=bnfold.fold(model))
    d = json.loads(json.dumps(vr.to_dict()))
    back = VerifyReport.from_dict(d)
    assert back.to_dict() == vr.to_dict() and bool(back) == bool(vr) is True
    assert isinstance(back.runs[0], Run) and isinstance(back.runs[0].outputs[0], OutputComparison)
    assert vr.float64_reference == "ran" and all(o.noise_floor is not None for r in vr.runs for o in r.outputs)


def test_unknown_tolerance_key_is_refused(exported):
    model, x, path = exported
    with pytest.raises(BadInputError, match="names output 'logits'.*Use one of output"):
        verify(model, path, (x,), providers="cpu", atol={"logits": 1e-3})
    with pytest.raises(BadInputError, match="--rtol names output 'nope'"):
        check_tolerance_keys({"nope": 1.0, "*": 1.0}, "rtol", ["output"])
    assert verify(model, path, (x,), providers="cpu", atol={"output": 1e-3, "*": 1e-4})


# ------------------------------------------------------------------------------ honest verdicts
def test_no_requested_provider_ran_is_an_error(exported):
    model, x, path = exported
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(ProviderError, match=r"none of the requested providers \(cuda\) can run here") as e:
        verify(model, path, (x,), providers="cuda")
    assert e.value.exit_code == 2
    with pytest.raises(ProviderError, match="never compared"):
        verify(str(path), path, (x,), providers="cuda")  # an ONNX reference: same rule


def test_no_provider_ran_cli_exit_2(tmp_path):
    from typer.testing import CliRunner

    import onnxruntime as ort
    from bnfold_cli.app import app
    from conftest import SAMPLE, SAMPLE_SPEC

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    res = CliRunner().invoke(app, ["convert", SAMPLE_SPEC, "-o", str(tmp_path / "d.onnx"), "--weights", str(SAMPLE / "weights.pt"),
                                   "--input-shape", "1,1,8,8", "--providers", "cuda"])
    assert res.exit_code == 2 and "none of the requested providers (cuda)" in res.stderr
    assert "PASSED" not in res.stdout and not (tmp_path / "d.onnx").exists()


class ReturnsNaN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.act = nn.Hardtanh()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)) * torch.tensor(float("nan")))


def test_nonfinite_reference_fails_and_says_where(tmp_path):
    model = randomize_bn(ReturnsNaN()).eval()
    x = torch.randn(1, 1, 5, 5)
    path = bnfold.export(model, (x,), tmp_path / "m.onnx")
    vr = verify(model, path, (x,), providers="cpu")
    assert not vr and vr.runs and all(not r for r in vr.runs)
    assert all("reference itself is non-finite" in o.problem for r in vr.runs for o in r.outputs)
    assert any("non-finite" in n and "'act'" in n for n in vr.notes), vr.notes
    rep = bnfold.convert(model, (x,), tmp_path / "c.onnx", providers="cpu")
    assert rep.exit_code == 1 and not rep.passed


def test_invalid_statistics_are_bad_input(tmp_path):
    model = randomize_bn(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))).eval()
    x = torch.randn(1, 1, 5, 5)
    path = bnfold.export(model, (x,), tmp_path / "m.onnx")
    bad = copy.deepcopy(model)
    bad[1].running_var[1] = -0.5
    with pytest.raises(WeightsError, match="BatchNorm layer '1' has invalid statistics: running_var has 1 negative value") as e:
        verify(bad, path, (x,), providers="cpu")
    assert e.value.exit_code == 2
    # an ONNX BatchNormalization with a negative epsilon
    m = onnx.load(str(path))
    if not any(n.op_type == "BatchNormalization" for n in m.graph.node):
        m = onnx.helper.make_model(onnx.parser.parse_graph("""
            g (float[1,2,3,3] x) => (float[1,2,3,3] y) <float[2] s = {1.0, 1.0}, float[2] b = {0.0, 0.0},
            float[2] mu = {0.0, 0.0}, float[2] v = {1.0, 1.0}> { y = BatchNormalization <epsilon = -1.0> (x, s, b, mu, v) }"""),
            opset_imports=[onnx.helper.make_opsetid("", 17)])
        x = torch.randn(1, 2, 3, 3)
    else:
        for n in m.graph.node:
            if n.op_type == "BatchNormalization":
                n.attribute.append(onnx.helper.make_attribute("epsilon", -1.0))
    src = tmp_path / "neg_eps.onnx"
    onnx.save(m, str(src))
    with pytest.raises(BadInputError, match="negative"):
        verify(str(src), src, (x,), providers="cpu")


# -------------------------------------------------------------------------------- noise floor
def test_ill_conditioned_net_correct_fold_passes_corrupted_fails(tmp_path):
    model = ill_conditioned()
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    rep = bnfold.convert(model, (x,), tmp_path / "m.onnx", providers="cpu")
    assert rep.passed, rep.verification
    outs = [o for r in rep.verification["runs"] for o in r["outputs"]]
    assert all(o["ill_conditioned"] and o["verdict"] == "noise-floor" for o in outs)
    assert all(o["max_abs_error"] > o["atol"] and o["max_abs_error_float64"] < NOISE_K * o["noise_floor"] for o in outs)
    assert any("ill-conditioned in float32" in n for n in rep.verification["notes"])
    # without the float64 run, the same correct file is judged against float32 noise: FAILED
    classic = verify(model, tmp_path / "m.onnx", (x,), providers="cpu", float64_reference=False)
    assert not classic and classic.float64_reference == "switched off"

    m = onnx.load(str(tmp_path / "m.onnx"))
    w = next(i for i in m.graph.initializer if onnx.numpy_helper.to_array(i).shape == (16, 16))
    arr = onnx.numpy_helper.to_array(w).copy()
    arr[3] *= 1.25  # a wrong fold: one channel's scale off by 25 %
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    onnx.save(m, str(tmp_path / "bad.onnx"))
    vr = verify(model, tmp_path / "bad.onnx", (x,), providers="cpu")
    assert not vr
    o = vr.runs[0].outputs[0]
    assert o.ill_conditioned and "ill-conditioned in float32" in o.problem and o.max_abs_error_float64 > NOISE_K * o.noise_floor


def test_noise_k_boundary():
    """A candidate c·floor away from the float64 truth passes for c < K and fails for c > K (plus atol)."""
    rng = np.random.default_rng(0)
    t64 = rng.standard_normal(200) * 3
    floor = 0.05
    ref = (t64 + floor * np.sign(rng.standard_normal(200))).astype(np.float32)
    sign = np.sign(rng.standard_normal(200))
    for c, ok in ((0.5, True), (3.9, True), (4.1, False), (10, False)):
        got = (t64 + c * floor * sign).astype(np.float32)
        r = compare("y", ref, got, reference64=t64)  # default tolerance: atol ≈ 1e-3 here
        assert r.noise_floor == pytest.approx(floor, rel=1e-4) and r.ill_conditioned and not r.tolerance_given
        assert bool(r) is ok, (c, r)
        assert r.verdict == ("noise-floor" if ok else None)
    # a tolerance the user gives is a contract: judged as given, the figures explain the failure
    got = (t64 + 0.5 * floor * sign).astype(np.float32)
    r = compare("y", ref, got, atol={"*": 1e-3}, reference64=t64)
    assert not r and r.tolerance_given and "ill-conditioned in float32" in r.problem and "used as it is" in r.problem
    # a well-conditioned model (floor below the tolerance) is judged by the tolerance alone
    r = compare("y", t64.astype(np.float32), (t64 + 1e-2).astype(np.float32), atol=1e-4, rtol=0, reference64=t64)
    assert not r and not r.ill_conditioned and "exceeds atol" in r.problem


def test_float64_run_skipped_when_too_big(exported):
    model, x, path = exported
    vr = verify(model, path, (x,), providers="cpu", float64_max_bytes=100)
    assert vr and "would take" in vr.float64_reference and any("no float64 run" in n for n in vr.notes)
    assert all(o.noise_floor is None for r in vr.runs for o in r.outputs)


# ------------------------------------------------------------------------------ quiet sessions
def test_sessions_are_quiet_unless_verbose(tmp_path, capfd):
    """An unused initializer makes onnxruntime warn at ORT_ENABLE_ALL: silent by default, shown with verbose."""
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
                          initializer=[numpy_helper.from_array(np.ones(3, np.float32), "unused")])
    path = tmp_path / "unused.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    capfd.readouterr()
    r = OrtRunner(path, "cpu", "default")
    r.infer((torch.ones(1, 2),))
    assert "onnxruntime" not in capfd.readouterr().err
    OrtRunner(path, "cpu", "default", verbose=True)
    assert "Removing initializer 'unused'" in capfd.readouterr().err
    OrtRunner(path, "cpu", "default")  # verbose does not stick
    assert "onnxruntime" not in capfd.readouterr().err


def test_native_stderr_is_routed_into_messages():
    from bnfold.verification.runners import _captured_stderr

    lines: list[str] = []
    with _captured_stderr(lines):
        os.write(2, b"[E:onnxruntime:Default] something native\n")
    assert lines == ["[E:onnxruntime:Default] something native"]


def test_borrowed_float64_reference_restores_the_module_exactly():
    """reference_outputs(borrow=True) runs the float64 reference on the module itself (no copy) and
    puts back every parameter and buffer bit for bit, dtypes (mixed fp32/fp16) and sharing included;
    the outputs equal those of the copying path."""
    import torch
    from torch import nn

    from bnfold.verification.verify import reference_outputs

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5)).eval()
    m[1].running_var.uniform_(0.5, 2.0)
    m.register_buffer("aux", torch.randn(3).half())  # mixed dtypes come back as they were
    m.register_buffer("shared", m[1].running_mean)  # a buffer held by two modules stays one tensor
    before = {k: (v.clone(), v.dtype) for k, v in m.state_dict().items()}
    params = [id(p) for p in m.parameters()]
    x = torch.randn(2, 3, 8, 8)
    a = reference_outputs(m, {"x": (x,)}, providers="cpu", borrow=True)
    assert a.float64_reference == "ran"
    after = m.state_dict()
    for k, (v, dt) in before.items():
        assert after[k].dtype == dt and torch.equal(after[k], v), k
    assert [id(p) for p in m.parameters()] == params and m.shared is m[1].running_mean
    b = reference_outputs(m, {"x": (x,)}, providers="cpu")
    np.testing.assert_allclose(a.refs64["x"][0][1], b.refs64["x"][0][1], rtol=1e-6)


# ---------------------------------------------------------------- runners as context managers
def test_runners_are_released_by_their_with_block(exported):
    model, x, path = exported
    with OrtRunner(path, "cpu", "default") as r:
        assert r.session is not None and r.infer((x,))
    assert r.session is None
    with TorchRunner(model, dtype=torch.float64) as r64:  # a float64 copy, dropped at the end
        assert r64.copied and r64.model is not model
    assert r64.model is None
    before = state_hash(model)
    with pytest.raises(RuntimeError, match="inside"):
        with TorchRunner(model, dtype=torch.float64, borrow=True) as rb:  # the module itself, cast
            assert rb.model is model and next(model.parameters()).dtype == torch.float64
            raise RuntimeError("inside")
    assert next(model.parameters()).dtype == torch.float32 and state_hash(model) == before  # cast back anyway


def _counting_ort_runner(monkeypatch, fail_on: int | None = None):
    """OrtRunner as verify sees it, counting live sessions (``fail_on``: that session's infer raises)."""
    import bnfold.verification.verify as vmod

    live = {"now": 0, "max": 0, "made": 0}

    class Counting(OrtRunner):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            live["made"] += 1
            live["now"] += 1
            live["max"] = max(live["max"], live["now"])
            self.number = live["made"]

        def infer(self, feeds):
            if self.number == fail_on:
                raise BadInputError("infer failed on purpose")
            return super().infer(feeds)

        def close(self):
            if self.session is not None:
                live["now"] -= 1
            super().close()

    monkeypatch.setattr(vmod, "OrtRunner", Counting)
    return live


def test_verify_holds_one_session_at_a_time_and_releases_each(exported, monkeypatch):
    model, x, path = exported
    live = _counting_ort_runner(monkeypatch)
    vr = verify(model, path, {"a": (x,), "b": (x * 2,)}, providers="cpu")
    assert vr and [(r.graph_optimization, r.inputs) for r in vr.runs] == [
        ("disable_all", "a"), ("disable_all", "b"), ("default", "a"), ("default", "b")]
    assert live == {"now": 0, "max": 1, "made": 2}  # one session per level, never two at once
    live = _counting_ort_runner(monkeypatch, fail_on=2)
    with pytest.raises(BadInputError, match="on purpose"):
        verify(model, path, (x,), providers="cpu")
    assert live["made"] == 2 and live["now"] == 0  # released on the way out too


# ---------------------------------------------------------------- one tolerance, one settings
def test_tolerance_and_settings_objects_equal_their_keywords(exported):
    from bnfold.verification.compare import Tolerance
    from bnfold.verification.verify import VerifySettings

    model, x, path = exported
    kw = verify(model, path, (x,), atol={"*": 1e-3}, rtol=1e-5, noise_k=2.0, providers="cpu", levels=["default"],
                float64_reference=False)
    obj = verify(model, path, (x,), tolerance=Tolerance({"*": 1e-3}, 1e-5, 2.0),
                 settings=VerifySettings(providers="cpu", levels=["default"], float64_reference=False))
    assert kw.to_dict() == obj.to_dict() and kw and kw.noise_k == 2.0 and kw.float64_reference == "switched off"
    assert [(r.provider, r.graph_optimization) for r in kw.runs] == [("cpu", "default")]
    assert {o.atol for r in kw.runs for o in r.outputs} == {1e-3}
    with pytest.raises(BadInputError, match="tolerance= and atol were both given"):
        verify(model, path, (x,), tolerance=Tolerance(), atol=1e-3, providers="cpu")
    with pytest.raises(BadInputError, match="settings= and providers were both given"):
        verify(model, path, (x,), settings=VerifySettings(), providers="cpu")
    with pytest.raises(TypeError, match="unexpected keyword argument 'atoll'"):
        verify(model, path, (x,), atoll=1e-3)
    with pytest.raises(BadInputError, match="atol -1 is negative"):
        Tolerance(atol=-1)  # checked when made
    with pytest.raises(BadInputError, match="unknown optimisation level 'fast'"):
        VerifySettings(levels=["fast"])
    s = VerifySettings(providers="cpu", require_providers="CUDAExecutionProvider")
    assert s.providers == ("cpu", "cuda") and s.require_providers == ("cuda",)  # a required provider is tried
    rep = compare_runners(TorchRunner(model), [FakeRunner(model, 1e-2)], (x,), tolerance=Tolerance(atol=0.1))
    assert rep and rep.runs[0].outputs[0].atol == 0.1


def test_references_pick_the_gpu_run_for_a_gpu_candidate():
    from bnfold.verification.verify import References

    cpu, gpu = {"a": [("output", np.zeros(1))]}, {"a": [("output", np.ones(1))]}
    refs = References(cpu, "cpu", by_device={"cuda": gpu})
    assert refs.against("cuda") == (gpu, "cuda") and refs.against("cpu") == (cpu, "cpu")
    on_gpu = References(gpu, "cuda:0")
    assert on_gpu.against("cuda") == (gpu, "cuda:0") and on_gpu.against("cpu") == (gpu, "cuda:0")


def test_verification_functions_take_at_most_8_parameters():
    import ast
    from pathlib import Path

    import bnfold.verification as pkg

    wide = []
    for path in Path(pkg.__file__).parent.glob("*.py"):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = fn.args
                names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if p is not None]
                if len([n for n in names if n not in ("self", "cls")]) > 8:
                    wide.append(f"{path.name}:{fn.name}")
    assert wide == []
