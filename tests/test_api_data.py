"""One data path: every data form through calibrate, convert and check_artifact (API), the CLI where
the form has a file or spec spelling, and a config file. One-shot generators are read exactly once."""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset
from typer.testing import CliRunner

import bnfold
from bnfold.edges.data import DataSource
from bnfold_cli.app import app

N, SHAPE = 24, (1, 2, 5, 5)
MODEL_PY = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(27, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def build():
    return Net()
"""
DATA_PY = """
import numpy as np
import torch


def batches():
    x = np.load(__file__.replace("{stem}.py", "x.npy"))
    return [torch.from_numpy(x[i:i + 8]) for i in range(0, len(x), 8)]
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("forms")
    (d / "netmod_i14.py").write_text(MODEL_PY)
    (d / "datamod_i14.py").write_text(DATA_PY.format(stem="datamod_i14"))
    (d / "data.py").write_text(DATA_PY.format(stem="data"))
    x = np.random.default_rng(0).standard_normal((N,) + SHAPE[1:]).astype(np.float32) * 2 + 0.5
    np.save(d / "x.npy", x)
    np.savez(d / "x.npz", x=x)
    torch.save(torch.from_numpy(x), d / "x.pt")
    sys.path.insert(0, str(d))
    yield d, torch.from_numpy(x)
    sys.path.remove(str(d))


class Stream(IterableDataset):
    def __init__(self, x):
        self.x = x

    def __iter__(self):
        for i in range(0, len(self.x), 8):
            yield self.x[i:i + 8]


class OneShot:
    """A generator that counts how often it was started and how many batches it gave."""

    def __init__(self, x):
        self.x, self.starts, self.given = x, 0, 0

    def __call__(self):
        self.starts += 1
        for i in range(0, len(self.x), 8):
            self.given += 1
            yield self.x[i:i + 8]


def forms(d, x):
    y = torch.arange(N) % 4
    return {
        "npz": str(d / "x.npz"),
        "npy": str(d / "x.npy"),
        "pt": str(d / "x.pt"),
        "file.py:fn": f"{d / 'data.py'}:batches",
        "module:fn": "datamod_i14:batches",
        "tensor": x,
        "list": [x[i:i + 8] for i in range(0, N, 8)],
        "pairs": [(x[i:i + 8], y[i:i + 8]) for i in range(0, N, 8)],
        "dicts": [{"x": x[i:i + 8]} for i in range(0, N, 8)],
        "DataLoader": DataLoader(TensorDataset(x, y), batch_size=8),
        "IterableDataset": Stream(x),
    }


FORMS = ["npz", "npy", "pt", "file.py:fn", "module:fn", "tensor", "list", "pairs", "dicts", "DataLoader", "IterableDataset", "generator"]
FILE_FORMS = ["npz", "npy", "pt", "file.py:fn", "module:fn"]


def _data(env, form):
    d, x = env
    if form == "generator":
        g = OneShot(x)
        return g(), g
    data = forms(d, x)[form]
    return data, None


def _model(env):
    return bnfold.load_model(f"{env[0] / 'netmod_i14.py'}:build")


def _bs(form):  # arrays are cut by batch_size; iterables bring their own batches
    return 8 if form in ("npz", "npy", "pt", "tensor") else None


def _expected(env):
    """Statistics of the three batches of 8, by the paper estimator (batch means averaged)."""
    model = _model(env)
    return bnfold.calibrate(model, [env[1][i:i + 8] for i in range(0, N, 8)]).bn.running_mean


@pytest.mark.parametrize("form", FORMS)
def test_calibrate(env, form):
    data, gen = _data(env, form)
    kw = {"batch_size": _bs(form)} if _bs(form) else {}
    out = bnfold.calibrate(_model(env), data, **kw)
    torch.testing.assert_close(out.bn.running_mean, _expected(env), rtol=1e-6, atol=1e-6)
    if gen:
        assert gen.starts == 1 and gen.given == 3


@pytest.mark.parametrize("named", [False, True])
def test_calibrate_bfloat16_arrays(env, named):
    """A bfloat16 tensor (alone or in a dict of arrays) is cut like a .pt file's: upcast, not a raw TypeError."""
    xb = env[1].bfloat16()
    out = bnfold.calibrate(_model(env), {"x": xb} if named else xb, batch_size=8)
    want = bnfold.calibrate(_model(env), [xb.float()[i:i + 8] for i in range(0, N, 8)]).bn.running_mean
    torch.testing.assert_close(out.bn.running_mean, want, rtol=0, atol=0)


@pytest.mark.parametrize("form", FORMS)
def test_convert(env, form, tmp_path):
    data, gen = _data(env, form)
    kw = {"batch_size": _bs(form)} if _bs(form) else {}
    model = _model(env)
    rep = bnfold.convert(model, (torch.randn(SHAPE),), tmp_path / "m.onnx", calib=data, providers="cpu",
                         report=tmp_path / "r.json", **kw)
    assert rep.passed, rep.verification
    assert rep.calibration["batches"] == 3 and rep.calibration["samples"] == N
    sets = {r["inputs"] for r in rep.verification["runs"]}
    if form != "dicts":  # keyword batches are not positional ONNX inputs
        assert "calibration[:1]" in sets  # samples for verification, taken during the one pass
    if gen:
        assert gen.starts == 1 and gen.given == 3
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is True


@pytest.mark.parametrize("form", FORMS)
def test_calibrate_checkpoint(env, form, tmp_path):
    """calibrate_checkpoint (`bnfold calibrate` as an API) takes every form calibrate and convert take."""
    data, gen = _data(env, form)
    kw = {"batch_size": _bs(form)} if _bs(form) else {}
    summary = bnfold.calibrate_checkpoint(f"{env[0] / 'netmod_i14.py'}:build", tmp_path / "c.pt", calib=data, **kw)
    assert summary.batches == 3 and summary.samples == N
    state = torch.load(tmp_path / "c.pt")
    torch.testing.assert_close(state["bn.running_mean"], _expected(env), rtol=1e-6, atol=1e-6)
    if gen:
        assert gen.starts == 1 and gen.given == 3


@pytest.fixture(scope="module")
def artifact(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "a.onnx"
    rep = bnfold.convert(f"{env[0] / 'netmod_i14.py'}:build", None, out, input_shape=list(SHAPE),
                         calib=[env[1][i:i + 8] for i in range(0, N, 8)], providers="cpu")
    assert rep.passed
    return out


@pytest.mark.parametrize("form", FORMS)
def test_check_artifact(env, artifact, form):
    data, gen = _data(env, form)
    kw = {"batch_size": _bs(form)} if _bs(form) else {}
    check = bnfold.check_artifact(_model(env), artifact, (torch.randn(SHAPE),), calib=data, providers="cpu", **kw)
    assert check.passed, check.differences
    assert check.differences == []
    if gen:
        assert gen.starts == 1 and gen.given == 3


@pytest.mark.parametrize("form", FILE_FORMS)
def test_cli_verify(env, artifact, form):
    d, x = env
    data = forms(d, x)[form]
    args = ["verify", f"{d / 'netmod_i14.py'}:build", str(artifact), "--input-shape", "1,2,5,5", "--calib", data,
            "--providers", "cpu", "--json"]
    if _bs(form):
        args += ["--batch-size", "8"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["passed"] is True


def test_config_every_file_form(env, tmp_path):
    d, x = env
    tables = []
    for i, form in enumerate(FILE_FORMS):
        spec = forms(d, x)[form]
        if form == "file.py:fn":  # relative to the config file, as a user writes it
            (tmp_path / "data.py").write_text(DATA_PY.format(stem="data"))
            np.save(tmp_path / "x.npy", x.numpy())
            spec = "data.py:batches"
        tables.append(textwrap.dedent(f"""
            [[conversion]]
            model = "{d / 'netmod_i14.py'}:build"
            input_shape = [1, 2, 5, 5]
            calib = "{spec}"
            {"batch_size = 8" if _bs(form) else ""}
            output = "out/{i}.onnx"
        """))
    cfg = tmp_path / "c.toml"
    cfg.write_text('[defaults]\nproviders = "cpu"\n' + "".join(tables))
    from bnfold.batch import run_config

    s = run_config(cfg)
    assert s["exit_code"] == 0, [c["error"] or c["detail"] for c in s["conversions"]]
    assert [c["report"]["calibration"]["batches"] for c in s["conversions"]] == [3] * len(FILE_FORMS)
    fps = {c["report"]["calibration"]["data_sha256"] for c in s["conversions"]}
    assert len(fps) == 1  # the same samples, whatever the form and batching


def test_fingerprint_does_not_depend_on_batching(env):
    d, x = env
    fps = set()
    for bs in (4, 8, None):
        src = DataSource(str(d / "x.npz"), bs, fingerprint=True)
        list(src)
        fps.add(src.fingerprint)
    assert len(fps) == 1
    assert None not in fps


def test_one_shot_generator_is_read_once_even_without_calibration(env, artifact):
    """ONNX-in verification takes its samples from a generator in one pass, then never again."""
    d, x = env
    g = OneShot(x)
    src = DataSource(g())
    first = src.head(2)
    assert first.size == 2 and g.starts == 1
    assert src.head(1).size == 1 and g.starts == 1  # the kept head, not a second pass
    with pytest.raises(bnfold.DataError, match="already read"):
        list(src)


def test_batch_size_with_a_dataloader_is_an_error(env):
    d, x = env
    with pytest.raises(bnfold.DataError, match="batch_size"):
        bnfold.calibrate(_model(env), DataLoader(TensorDataset(x), batch_size=8), batch_size=4)
