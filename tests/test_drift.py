"""How stale the stored statistics were (issue 25 §2): per-layer drift of the running statistics against
the population ones, sorted by drift in the table, the JSON and the plot; the outputs' move between them."""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import shutil
import sys

import pytest
import torch
from bnfold_cli.app import app
from conftest import SAMPLE, SAMPLE_SPEC, file_hash, state_hash
from rich.console import Console
from torch import nn
from typer.testing import CliRunner

import bnfold
from bnfold.calibration.population import run_calibration
from bnfold.edges import jsonio as bnfold_json
from bnfold.errors import BadInputError, OutputPathError
from bnfold.options import ConvertOptions
from bnfold.report import calibration_table, render_convert, write_drift_plot

runner = CliRunner()
HAS_MPL = importlib.util.find_spec("matplotlib") is not None  # the plot asserts need it: pip install 'bnfold[plot]'
DRIFT = ("mean_shift_std", "mean_shift_std_mean", "var_ratio", "var_ratio_gmean", "drift")


class Net(nn.Module):
    """Four BN layers over (N, C, H, W) and (N, C); logits out."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)
        self.c2, self.b2 = nn.Conv2d(6, 6, 3), nn.BatchNorm2d(6)
        self.c3, self.b3 = nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4)
        self.fc, self.b4 = nn.Linear(4 * 4 * 4, 10), nn.BatchNorm1d(10)
        self.head = nn.Linear(10, 7)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(y)))
        y = torch.relu(self.b3(self.c3(y)))
        return self.head(torch.relu(self.b4(self.fc(y.flatten(1)))))


def _rows(text: str) -> list[str]:
    """The layer names of a printed calibration table, in its order."""
    return [line.split()[0] for line in text.splitlines() if line.split() and line.split()[0] in {"b1", "b2", "b3", "b4"}]


def _data(n=192, seed=0):
    return torch.randn(n, 3, 10, 10, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def _stale(shift=3.0, scale=4.0) -> nn.Module:
    """A model whose running statistics are the population's (pooled, on ``_data``) except in b2 and b4:
    b2's means moved by ``shift`` population stds, b4's variances scaled by ``scale``."""
    m = Net().eval()
    run_calibration(m, _data(), estimator="pooled", inplace=True, batch_size=64)
    with torch.no_grad():
        m.b2.running_mean += shift * (m.b2.running_var + m.b2.eps).sqrt()
        m.b4.running_var *= scale
    return m


def test_wrong_layers_sort_first_with_known_values():
    m = _stale()
    _, summary = run_calibration(m, _data(), estimator="pooled", batch_size=64)
    d = summary.to_dict()
    layers = {layer["name"]: layer for layer in d["layers"]}
    assert d["drift_order"][:2] == ["b2", "b4"] and sorted(d["drift_order"]) == ["b1", "b2", "b3", "b4"]
    assert [layer["name"] for layer in d["layers"]] == ["b1", "b2", "b3", "b4"]  # the layer list keeps the model's order
    assert layers["b2"]["mean_shift_std"] == pytest.approx(3.0, rel=1e-4)
    assert layers["b2"]["mean_shift_std_mean"] == pytest.approx(3.0, rel=1e-4)
    assert layers["b2"]["var_ratio"] == pytest.approx(1.0, abs=1e-4)
    assert layers["b4"]["var_ratio"] == pytest.approx(4.0, rel=1e-3)  # (4σ² + eps)/(σ² + eps), σ² ≫ eps
    assert layers["b4"]["mean_shift_std"] == pytest.approx(0.0, abs=1e-4)
    # mean moved by 3 population stds: the normalised activation moves by 3 (its std stays)
    assert layers["b2"]["drift"] == pytest.approx(3.0, rel=1e-3)
    assert layers["b4"]["drift"] == pytest.approx(0.5, rel=1e-3)  # x̂ shrinks by 1/sqrt(4): RMS change 1/2
    for name in ("b1", "b3"):  # recalibrated on the same data: nothing moved
        assert layers[name]["drift"] < 1e-4 and layers[name]["var_ratio"] == pytest.approx(1.0, abs=1e-4)


def test_drift_is_the_rms_change_of_the_normalised_activation():
    """``drift`` against an empirical measurement: BN's normalised input with either statistics."""
    m = Net().eval()
    with torch.no_grad():  # arbitrary stored statistics, different per channel
        m.b3.running_mean.copy_(torch.tensor([0.3, -1.0, 2.0, 0.0]))
        m.b3.running_var.copy_(torch.tensor([0.2, 3.0, 1.0, 9.0]))
    data = _data(2048, seed=1)
    work, summary = run_calibration(m, data, estimator="pooled", batch_size=2048)
    seen = []  # b3's input with population statistics upstream (the calibrated copy's)
    h = work.b3.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().double()))
    with torch.no_grad():
        work(data)
    h.remove()
    x = seen[0].transpose(0, 1).reshape(4, -1)
    mu, var = x.mean(1), x.var(1)  # the population statistics (pooled: unbiased variance)
    old_m, old_v = torch.tensor([0.3, -1.0, 2.0, 0.0]).double(), torch.tensor([0.2, 3.0, 1.0, 9.0]).double()
    eps = m.b3.eps
    xr = (x - old_m[:, None]) / (old_v[:, None] + eps).sqrt()
    xp = (x - mu[:, None]) / (var[:, None] + eps).sqrt()
    rms = (xr - xp).square().mean(1).sqrt()
    b3 = next(layer for layer in summary.layers if layer["name"] == "b3")
    assert b3["drift"] == pytest.approx(rms.max().item(), rel=1e-3)
    # rel 1e-4: during calibration b1 and b2 normalise with the batch's biased variance, here with the
    # unbiased population one (a factor 1 + 1/131071), in float32
    shift = (old_m - mu).abs() / (var + eps).sqrt()
    assert b3["mean_shift_std"] == pytest.approx(shift.max().item(), rel=1e-4)
    assert b3["mean_shift_std_mean"] == pytest.approx(shift.mean().item(), rel=1e-4)
    r = (old_v + eps) / (var + eps)
    assert b3["var_ratio"] == pytest.approx(torch.maximum(r, 1 / r).max().item(), rel=1e-4)
    assert b3["var_ratio_gmean"] == pytest.approx(r.log().abs().mean().exp().item(), rel=1e-4)
    assert b3["stored_problem"] is None


def test_output_effect_on_the_batches_already_read():
    m = _stale()
    reads = []

    def batches():  # read once: every batch counted
        for b in _data().split(64):
            reads.append(b.shape[0])
            yield b

    work, summary = run_calibration(m, batches(), estimator="pooled", effect=True)
    assert reads == [64, 64, 64]
    eff = summary.output_effect
    assert eff["batches"] == 3 and eff["samples"] == 192
    # the same batches by hand: eval mode, stale against calibrated statistics
    with torch.no_grad():
        before, after = m(_data()), work(_data())
    assert eff["max_abs"] == pytest.approx((before - after).abs().max().item(), rel=1e-5)
    assert eff["scale"] == pytest.approx(after.abs().max().item(), rel=1e-5)
    assert eff["top1_agreement"] == pytest.approx((before.argmax(1) == after.argmax(1)).double().mean().item())
    assert eff["top1_agreement"] < 1
    # measuring changes nothing: the same statistics, flags and buffers as without it
    plain, _ = run_calibration(m, _data(), estimator="pooled", batch_size=64)
    assert state_hash(work) == state_hash(plain) and not work.training
    assert all(type(b) is torch.Tensor for b in work.buffers())
    # statistics that were already right: the outputs do not move
    _, again = run_calibration(work, _data(), estimator="pooled", batch_size=64, effect=True)
    assert again.output_effect["max_abs"] < 1e-4 and again.output_effect["top1_agreement"] == 1.0


def test_output_effect_caps_the_kept_batches_and_skips_non_logits():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)).eval()
    _, summary = run_calibration(m, _data(600), batch_size=50, effect=True)
    d = summary.to_dict()
    eff = d["output_effect"]
    assert eff["batches"] == 4 and eff["samples"] == 200 and eff["top1_agreement"] is None and eff["max_abs"] > 0
    no_stats = d["layers"][0]
    assert no_stats["reached"] and all(no_stats[k] is None for k in DRIFT) and d["drift_order"] == ["3"]
    _, plain = run_calibration(m, _data(600), batch_size=50)
    assert plain.output_effect is None  # only when asked (convert and calibrate ask)


def test_output_effect_never_fails_the_calibration():
    class Flaky(nn.Module):  # accepts the calibration pass (2 batches), then fails
        def __init__(self):
            super().__init__()
            self.c, self.b, self.calls = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), 0

        def forward(self, x):
            self.calls += 1
            if self.calls > 2:
                raise RuntimeError("gone [bold]now")
            return self.b(self.c(x))

    work, summary = run_calibration(Flaky().eval(), _data(128), batch_size=64, effect=True)
    assert summary.output_effect["problem"] == "not measured: RuntimeError: gone [bold]now" and summary.output_effect["max_abs"] is None
    buf = io.StringIO()
    Console(file=buf, width=200, no_color=True).print(calibration_table(summary.to_dict()))
    assert "output effect: not measured: RuntimeError: gone [bold]now" in buf.getvalue()  # as text, not rich markup
    assert summary.batches == 2 and torch.isfinite(work.b.running_var).all() and work.b.num_batches_tracked == 2


def test_table_and_verbose_convert_list_layers_by_drift(tmp_path):
    m = _stale()
    out = tmp_path / "m.onnx"
    plot = tmp_path / "drift.svg"
    kw = {"plot": str(plot)} if HAS_MPL else {}
    rep = bnfold.convert(m, torch.randn(1, 3, 10, 10), out, calib=_data(), batch_size=64, providers="cpu", **kw)
    cal = rep.to_dict()["calibration"]
    assert rep.passed and cal["drift_order"][:2] == ["b2", "b4"]
    assert set(cal["output_effect"]) >= {"max_abs", "top1_agreement", "samples"} and cal["output_effect"]["top1_agreement"] < 1
    assert all(set(DRIFT) <= set(layer) for layer in cal["layers"])
    if HAS_MPL:
        assert plot.read_text().lstrip().startswith("<?xml") and "b2" in plot.read_text()
    buf = io.StringIO()
    console = Console(file=buf, width=200, no_color=True)
    render_convert(rep.to_dict(), console, verbose=True)
    text = buf.getvalue()
    assert "shift/σ" in text
    text = text[text.index("Calibration:"):]  # the calibration table (the plan table lists the layers too)
    assert text.index("\nb2 ") < text.index("\nb4 ") < text.index("\nb1 ")
    assert "top-1 agreement" in text
    buf = io.StringIO()
    render_convert(rep.to_dict(), Console(file=buf, width=200, no_color=True))
    assert "shift/σ" not in buf.getvalue() and "max abs change" in buf.getvalue()
    buf = io.StringIO()
    Console(file=buf, width=200, no_color=True).print(calibration_table(cal))
    assert _rows(buf.getvalue())[:2] == ["b2", "b4"]


def test_calibrate_command_plot_and_report(tmp_path):
    out, report, plot = tmp_path / "c.pt", tmp_path / "c.json", tmp_path / "drift.png"
    args = ["calibrate", SAMPLE_SPEC, "--weights", str(SAMPLE / "weights.pt"), "--calib", str(SAMPLE / "calib.npz"),
            "--batch-size", "64", "-o", str(out), "--report", str(report)]
    res = runner.invoke(app, args + (["--plot", str(plot)] if HAS_MPL else []))
    assert res.exit_code == 0, res.stderr
    assert "drift" in res.stdout and "max abs change" in res.stdout
    cal = json.loads(report.read_text())["calibration"]
    assert cal["drift_order"] and cal["drift_order"][0] == max(cal["layers"], key=lambda layer: layer["drift"] or -1)["name"]
    assert set(cal["output_effect"]) >= {"max_abs", "top1_agreement"} and cal["output_effect"]["samples"] == 256
    if HAS_MPL:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_matplotlib_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    msg = "the plot needs matplotlib: pip install 'bnfold[plot]'"
    with pytest.raises(BadInputError, match=r"the plot needs matplotlib: pip install 'bnfold\[plot\]'"):
        ConvertOptions.build({"plot": "drift.png", "calib": "x.npz"})
    out = tmp_path / "c.pt"
    # the model spec does not even exist: the refusal comes first
    res = runner.invoke(app, ["calibrate", str(tmp_path / "nope.py") + ":build", "--calib", "x.npz", "-o", str(out),
                              "--plot", str(tmp_path / "d.png")])
    assert res.exit_code == 2 and msg in res.stderr and not out.exists()
    with pytest.raises(BadInputError, match="needs matplotlib"):
        bnfold.convert(Net(), torch.randn(1, 3, 10, 10), tmp_path / "m.onnx", calib=_data(), plot=tmp_path / "d.svg")
    assert not list(tmp_path.iterdir())


def test_plot_path_rules(tmp_path):
    if not HAS_MPL:
        pytest.skip("matplotlib is not installed: pip install 'bnfold[plot]'")
    with pytest.raises(BadInputError, match="not a .png or .svg"):
        ConvertOptions.build({"plot": "drift.jpg", "calib": "x.npz"})
    with pytest.raises(BadInputError, match="without calibration data"):
        ConvertOptions.build({"plot": "drift.png"})
    weights = tmp_path / "weights.png"  # an input with a plot's name: never written over
    shutil.copy(SAMPLE / "weights.pt", weights)
    before = file_hash(weights)
    res = runner.invoke(app, ["calibrate", SAMPLE_SPEC, "--weights", str(weights), "--calib", str(SAMPLE / "calib.npz"),
                              "-o", str(tmp_path / "c.pt"), "--plot", str(weights)])
    assert res.exit_code == 2 and "overwrite its input" in res.stderr and file_hash(weights) == before
    with pytest.raises(OutputPathError, match="same file"):
        bnfold.convert(Net(), torch.randn(1, 3, 10, 10), tmp_path / "m.onnx", calib=_data(), plot=tmp_path / "r.png",
                       report=tmp_path / "r.png")
    assert not (tmp_path / "c.pt").exists() and not (tmp_path / "m.onnx").exists()


def test_plot_has_no_meaning_for_an_onnx_model(tmp_path):
    if not HAS_MPL:
        pytest.skip("matplotlib is not installed: pip install 'bnfold[plot]'")
    src = tmp_path / "src.onnx"
    src.write_bytes(b"not read: the option is refused first")
    with pytest.raises(BadInputError, match="plot= has no meaning for an ONNX model"):
        bnfold.convert(str(src), None, tmp_path / "out.onnx", calib=_data(), plot=tmp_path / "d.png")


# ------------------------------------------------- calibration never reads the stored statistics (issue 23 §7)
def _population(x: torch.Tensor, estimator: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BN's population statistics by hand, in float64, over (N, C, ...) batches of ``batch`` samples."""
    x = x.double().transpose(0, 1).reshape(x.shape[1], x.shape[0], -1)  # (C, N, values per sample)
    if estimator == "pooled":
        flat = x.reshape(x.shape[0], -1)
        return flat.mean(1), flat.var(1)
    parts = [p.reshape(x.shape[0], -1) for p in x.split(batch, dim=1)]
    return torch.stack([p.mean(1) for p in parts]).mean(0), torch.stack([p.var(1) for p in parts]).mean(0)


def _poison(m: nn.Module) -> nn.Module:
    with torch.no_grad():
        m.b1.running_mean[0] = float("nan")
        m.b2.running_var.fill_(-1.0)
        m.b3.running_var[1] = float("nan")
        m.b4.running_mean += 100.0  # finite, far off: ranked after the unusable ones
    return m


@pytest.mark.parametrize("estimator", ["paper", "pooled"])
def test_nan_and_negative_stored_statistics_are_replaced(estimator, tmp_path):
    clean = Net().eval()
    broken = _poison(copy.deepcopy(clean))
    data = _data(128)
    work, summary = run_calibration(broken, data, estimator=estimator, batch_size=64, effect=True)
    ref, _ = run_calibration(clean, data, estimator=estimator, batch_size=64)
    for name in ("b1", "b2", "b3", "b4"):  # the same statistics as from finite stored ones, bit for bit
        got, want = getattr(work, name), getattr(ref, name)
        assert torch.isfinite(got.running_mean).all() and (got.running_var > 0).all()
        assert torch.equal(got.running_mean, want.running_mean) and torch.equal(got.running_var, want.running_var)
    with torch.no_grad():
        mean, var = _population(clean.c1(data), estimator, 64)
    assert torch.allclose(work.b1.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(work.b1.running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert torch.isnan(broken.b1.running_mean[0])  # the caller's model is untouched
    d = summary.to_dict()
    layers = {layer["name"]: layer for layer in d["layers"]}
    assert layers["b1"]["stored_problem"] == "NaN/Inf in running_mean" and layers["b1"]["mean_shift_std"] is None
    assert layers["b2"]["stored_problem"] == "negative running_var" and layers["b2"]["mean_shift_std"] is not None
    assert layers["b3"]["stored_problem"] == "NaN/Inf in running_var" and layers["b3"]["drift"] is None
    assert layers["b4"]["stored_problem"] is None and layers["b4"]["mean_shift_std"] > 10
    assert d["drift_order"] == ["b1", "b2", "b3", "b4"]  # unusable first (model order), then by drift
    assert d["output_effect"]["max_abs"] is None and "not finite" in d["output_effect"]["problem"]
    assert bnfold_json.loads_strict(bnfold_json.dumps(d)) == bnfold_json.sanitize(d)  # strict JSON: no NaN literal
    buf = io.StringIO()
    Console(file=buf, width=220, no_color=True).print(calibration_table(d))
    assert _rows(buf.getvalue()) == ["b1", "b2", "b3", "b4"] and "∞ (stored: NaN/Inf in running_mean)" in buf.getvalue()
    if HAS_MPL:  # unusable stored statistics: a full-length bar, labelled
        write_drift_plot(d, tmp_path / "d.svg")
        assert "stored NaN/Inf in running_mean" in (tmp_path / "d.svg").read_text()


BROKEN_MODEL = '''
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5))
    with torch.no_grad():
        m[1].running_mean[0] = float("nan")
        m[1].running_var.fill_(-2.0)
        m[5].running_var[2] = float("inf")
    return m.eval()
'''


def test_nan_stored_statistics_through_the_cli(tmp_path):
    import numpy as np

    (tmp_path / "broken.py").write_text(BROKEN_MODEL)
    spec = f"{tmp_path / 'broken.py'}:build"
    x = torch.randn(96, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    np.savez(tmp_path / "calib.npz", x=x.numpy())
    out, rep = tmp_path / "c.pt", tmp_path / "c.json"
    res = runner.invoke(app, ["calibrate", spec, "--calib", str(tmp_path / "calib.npz"), "--batch-size", "32", "-o", str(out),
                              "--report", str(rep)])
    assert res.exit_code == 0, res.stderr
    assert "∞ (stored: NaN/Inf in running_mean, negative running_var)" in res.stdout
    state = torch.load(out)
    conv = nn.Conv2d(1, 4, 3)
    conv.load_state_dict({"weight": state["0.weight"], "bias": state["0.bias"]})
    with torch.no_grad():
        mean, var = _population(conv(x), "paper", 32)
    assert torch.allclose(state["1.running_mean"].double(), mean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(state["1.running_var"].double(), var, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(state["5.running_var"]).all()
    cal = bnfold_json.loads_strict(rep.read_text())["calibration"]
    assert cal["drift_order"][:2] == ["1", "5"] and cal["layers"][1]["stored_problem"] == "NaN/Inf in running_var"
    onnx_out, onnx_rep = tmp_path / "m.onnx", tmp_path / "m.json"
    res = runner.invoke(app, ["convert", spec, "--input-shape", "1,1,8,8", "--calib", str(tmp_path / "calib.npz"), "--batch-size", "32",
                              "--providers", "cpu", "-o", str(onnx_out), "--report", str(onnx_rep)])
    assert res.exit_code == 0, res.stderr  # folded from the population statistics: finite, and PASSED
    report = bnfold_json.loads_strict(onnx_rep.read_text())
    assert report["passed"] and report["calibration"]["drift_order"][:2] == ["1", "5"]
    assert "not finite" in report["calibration"]["output_effect"]["problem"]


def test_config_plot_never_lands_on_another_conversions_input(tmp_path):
    if not HAS_MPL:
        pytest.skip("matplotlib is not installed: pip install 'bnfold[plot]'")
    from bnfold.batch import run_config
    from bnfold.errors import ConfigError

    shutil.copy(SAMPLE / "weights.pt", tmp_path / "w.png")  # an input with a plot's name
    before = file_hash(tmp_path / "w.png")
    entry = ('[[conversion]]\nmodel = "{m}"\nweights = "{w}"\ninput_shape = "1,1,8,8"\ncalib = "{c}"\noutput = "{o}"\n{extra}')
    cfg = tmp_path / "c.toml"
    cfg.write_text(entry.format(m=SAMPLE_SPEC, w=tmp_path / "w.png", c=SAMPLE / "calib.npz", o=tmp_path / "a.onnx", extra="")
                   + entry.format(m=SAMPLE_SPEC, w=SAMPLE / "weights.pt", c=SAMPLE / "calib.npz", o=tmp_path / "b.onnx",
                                  extra=f'plot = "{tmp_path / "w.png"}"\n'))
    with pytest.raises(ConfigError, match="plot.*same file as.*weights|weights.*same file as.*plot"):
        run_config(cfg)
    assert file_hash(tmp_path / "w.png") == before and not (tmp_path / "a.onnx").exists()
