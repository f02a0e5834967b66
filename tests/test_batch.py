"""bnfold as a CI step: TOML configs, validation before work, parallel jobs, manifests, summaries."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bnfold.batch import load_config
from bnfold.errors import ConfigError
from bnfold_cli.app import app
from conftest import ROOT, SAMPLE

runner = CliRunner()


def _config(tmp_path: Path, second_extra: str = "", jobs_note: str = "") -> Path:
    shutil.copytree(SAMPLE, tmp_path / "digits")
    (tmp_path / "out").mkdir()
    cfg = tmp_path / "conversions.toml"
    cfg.write_text(f"""
[defaults]
providers = "cpu"

[[conversion]]
name = "plain"
model = "digits/model.py:build"
weights = "digits/weights.pt"
input_shape = "1,1,8,8"
output = "out/plain.onnx"

[[conversion]]
name = "calibrated"
model = "digits/model.py:build"
weights = "digits/weights.pt"
input_shapes = ["2,1,8,8"]
calib = "digits/calib.npz"
batch_size = 64
output = "out/calibrated.onnx"
{second_extra}
""")
    return cfg


def test_two_conversions_in_one_call_with_summary(tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    step = tmp_path / "step_summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    res = runner.invoke(app, ["convert", "--config", str(cfg), "--report", str(tmp_path / "summary.json")])
    assert res.exit_code == 0, res.stdout + res.stderr
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["exit_code"] == 0 and [c["name"] for c in s["conversions"]] == ["plain", "calibrated"]
    assert all(c["report"]["passed"] for c in s["conversions"])
    assert s["conversions"][1]["report"]["calibration"]["batches"] == 22
    for name in ("plain", "calibrated"):
        assert (tmp_path / "out" / f"{name}.onnx").is_file()
        manifest = json.loads((tmp_path / "out" / f"{name}.onnx.manifest.json").read_text())
        assert manifest["inputs"]["weights"] and manifest["inputs"]["model_source"] and manifest["versions"]["torch"]
        assert manifest["onnx_sha256"] == s["conversions"][["plain", "calibrated"].index(name)]["report"]["export"]["sha256"]
    assert "calibrated" in res.stdout and "PASSED" in res.stdout
    md = step.read_text()
    assert md.startswith("## bnfold conversions") and md.count("| passed |") == 2


def test_failing_verification_exits_1_while_other_converts(tmp_path):
    cfg = _config(tmp_path, second_extra="atol = 0.0\nrtol = 0.0")
    res = runner.invoke(app, ["convert", "--config", str(cfg), "--json", "--jobs", "2"])
    assert res.exit_code == 1, res.stdout + res.stderr
    s = json.loads(res.stdout)
    assert [c["exit_code"] for c in s["conversions"]] == [0, 1]
    assert (tmp_path / "out" / "plain.onnx").is_file()
    assert not (tmp_path / "out" / "calibrated.onnx").exists()


def test_skip_unchanged(tmp_path):
    cfg = _config(tmp_path)
    assert runner.invoke(app, ["convert", "--config", str(cfg)]).exit_code == 0
    res = runner.invoke(app, ["convert", "--config", str(cfg), "--skip-unchanged", "--json"])
    assert res.exit_code == 0
    assert [c["skipped"] for c in json.loads(res.stdout)["conversions"]] == [True, True]
    # changing a weight file re-runs the conversions that read it
    w = tmp_path / "digits" / "weights.pt"
    import torch

    sd = torch.load(w, weights_only=True)
    sd["fc2.bias"] += 0.01
    torch.save(sd, w)
    res = runner.invoke(app, ["convert", "--config", str(cfg), "--skip-unchanged", "--json"])
    assert [c["skipped"] for c in json.loads(res.stdout)["conversions"]] == [False, False]


@pytest.mark.parametrize("body,message", [
    ('[[conversion]]\nmodel = "digits/model.py:build"\ninput_shape = "1,1,8,8"\noutput = "o.onnx"\ninputshape = "1"\n', "key 'inputshape' is unknown. Did you mean 'input_shape'?"),
    ('[[conversion]]\nmodel = "digits/model.py:build"\ninput_shape = "1,1,8,8"\n', "has no 'output'"),
    ('[[conversion]]\nmodel = "digits/model.py:build"\ninput_shape = "1,1,8,8"\noutput = "o.onnx"\nbatch_size = "64"\n', "key 'batch_size' is str '64', not an integer"),
    ('[[conversion]]\nmodel = "digits/nope.py:build"\ninput_shape = "1,1,8,8"\noutput = "o.onnx"\n', "does not exist"),
    ('[[conversion]]\nmodel = "digits/model.py:build"\ninput_shape = "1,x,8,8"\noutput = "o.onnx"\n', "non-integer dimension"),
    ('[[conversion]]\nmodel = "digits/model.py:build"\ninput_shape = "1,1,8,8"\noutput = "o.onnx"\nproviders = "tpu"\n', "unknown provider"),
    ('[[conversion]]\nmodel = "digits/model.py:build"\ninput_shape = "1,1,8,8"\noutput = "o.onnx"\n[[conversion]]\nmodel = "digits/model.py:build"\ninput_shape = "1,1,8,8"\noutput = "o.onnx"\n', "is also written by conversion #1"),
    ('title = "x"\n', "unknown top-level key 'title'"),
    ("[[conversion]\n", "not valid TOML"),
])
def test_config_validated_before_any_work(tmp_path, body, message):
    shutil.copytree(SAMPLE, tmp_path / "digits")
    cfg = tmp_path / "c.toml"
    cfg.write_text(body)
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert message in str(err.value)
    res = runner.invoke(app, ["convert", "--config", str(cfg)])
    assert res.exit_code == 2 and message in res.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_bundled_config_and_workflow_are_consistent():
    entries = load_config(ROOT / "samples" / "ci" / "conversions.toml")
    assert [e["name"] for e in entries] == ["digits", "digits-calibrated"]
    wf = yaml.safe_load((ROOT / "samples" / "ci" / "convert-models.yml").read_text())
    steps = wf["jobs"]["convert"]["steps"]
    runs = "\n".join(s.get("run", "") for s in steps)
    assert "bnfold convert --config samples/ci/conversions.toml" in runs
    assert any(s.get("uses", "").startswith("actions/upload-artifact") for s in steps)
    readme = (ROOT / "README.md").read_text()
    assert "bnfold convert --config samples/ci/conversions.toml --report out/summary.json" in readme
