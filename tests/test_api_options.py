"""One options type: the API, the CLI and a config file accept the same options, validated once,
and the bugs of issue 14 stay fixed (one test each)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

import bnfold
from bnfold.batch import load_config, run_config
from bnfold.errors import BadInputError, ConfigError
from bnfold.options import OPTIONS, ConvertOptions, Estimator, Provider
from bnfold_cli.app import app
from conftest import SAMPLE, SAMPLE_SPEC

W = str(SAMPLE / "weights.pt")
CALIB = str(SAMPLE / "calib.npz")
runner = CliRunner()


def _digits():
    return bnfold.load_model(SAMPLE_SPEC, W)


def _cli(*args):
    res = runner.invoke(app, list(args))
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("bnfold: error:")]
    return res, errors


# ------------------------------------------------------------------ the options table
def test_every_flag_has_a_config_key_and_help():
    import typer.main

    cmd = typer.main.get_command(app)
    for command in ("convert", "verify", "calibrate", "inspect"):
        params = {o for p in cmd.commands[command].params for o in p.opts + p.secondary_opts}
        for opt in OPTIONS.values():
            if command in opt.commands and opt.flag:
                assert opt.flag.split("/")[0] in params, (command, opt.flag)
                assert opt.config and opt.help
        for p in cmd.commands[command].params:
            assert p.help or p.param_type_name == "argument" and p.help, (command, p.opts)
    # and every convert option is a keyword of bnfold.convert (by name, through ConvertOptions)
    keys = {k for k, o in OPTIONS.items() if "convert" in o.commands}
    assert keys <= {f for f in ConvertOptions.__dataclass_fields__}


def test_options_typed_and_validated_in_one_place():
    o = ConvertOptions.build({"input_shape": [1, 3, 8, 8], "atol": ["1e-4", "logits=1e-3"], "providers": "CPU",
                              "estimator": "Pooled", "calib": "x.npz"})
    assert o.input_shape == ((1, 3, 8, 8),) and o.atol == {"*": 1e-4, "logits": 1e-3}
    assert o.providers == (Provider.CPU,) and o.estimator is Estimator.POOLED
    assert ConvertOptions.build({"input_shape": ["1,3,8,8", [1, 10]]}).input_shape == ((1, 3, 8, 8), (1, 10))
    with pytest.raises(BadInputError, match="inputshape= is not an option. Did you mean 'input_shape'"):
        ConvertOptions.build({"inputshape": "1,3,8,8"})
    with pytest.raises(BadInputError, match="atol= has no effect when verification is off"):
        ConvertOptions.build({"verify": False, "atol": 1e-3})
    with pytest.raises(BadInputError, match="opset= has no meaning for verify"):
        ConvertOptions.build({"opset": 18}, command="verify")


def test_api_errors_do_not_name_cli_flags(tmp_path):
    model = _digits()
    cases = [
        dict(),  # no example inputs
        dict(input_shape="1,1,8,8", estimator="pooled"),
        dict(input_shape="1,1,8,8", calib=str(tmp_path / "nope.npz")),
        dict(input_shape="1,1,8,8", weights=str(tmp_path / "nope.pt")),
        dict(input_shape="1,1,8,8", batch_size=0, calib=CALIB),
        dict(input_shape="1,1,8,8", opset=6),
        dict(input_shape="1,1,8,8", providers="tpu"),
        dict(input_shape="1,1,8,8", calib=CALIB, batch_size=1),  # raised by calibration, reworded at the API
        dict(input_shape="1,1,8,8", overwrite=False),  # raised by _io, reworded
    ]
    (tmp_path / "m.onnx").write_bytes(b"")  # for overwrite=False
    for kw in cases:
        with pytest.raises(bnfold.BnfoldError) as err:
            bnfold.convert(model, None, tmp_path / "m.onnx", **kw)
        assert "--" not in str(err.value), (kw, str(err.value))
    assert (tmp_path / "m.onnx").read_bytes() == b""


# ------------------------------------------------------------------ API: specs, README example
def test_readme_api_example_with_a_dataloader(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = _digits()
    x = torch.randn(1, 1, 8, 8)
    loader = DataLoader(TensorDataset(torch.randn(64, 1, 8, 8), torch.zeros(64)), batch_size=16)
    rep = bnfold.convert(model, (x,), "model.onnx", calib=loader, report="report.json", providers="cpu")
    d = json.loads(Path("report.json").read_text())
    assert rep.passed and d["calibration"]["batches"] == 4
    # one schema: the JSON reads back into the same typed report
    assert bnfold.ConvertReport.from_dict(d).to_dict() == json.loads(json.dumps(rep.to_dict(), default=str))


def test_api_accepts_model_specs_with_weights(tmp_path):
    rep = bnfold.convert(SAMPLE_SPEC, None, tmp_path / "m.onnx", weights=W, input_shape=[1, 1, 8, 8], providers="cpu")
    assert rep.passed and rep.model == SAMPLE_SPEC
    again = bnfold.convert(str(tmp_path / "m.onnx"), None, tmp_path / "again.onnx", providers="cpu")
    assert again.passed
    with pytest.raises(bnfold.BnfoldError, match="weights= has no meaning for an ONNX model"):
        bnfold.convert(str(tmp_path / "m.onnx"), None, tmp_path / "x.onnx", weights=W)


def test_weights_load_into_a_copy_of_a_module(tmp_path):
    model = bnfold.load_model(SAMPLE_SPEC)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert bnfold.convert(model, torch.randn(1, 1, 8, 8), tmp_path / "m.onnx", weights=W, providers="cpu").passed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------ opset
def test_opset_is_honoured_or_refused(tmp_path):
    res, errors = _cli("convert", SAMPLE_SPEC, "--weights", W, "--input-shape", "1,1,8,8", "-o", str(tmp_path / "a.onnx"),
                       "--opset", "21", "--providers", "cpu", "--json")
    assert res.exit_code == 0, res.stderr
    assert onnx.load(str(tmp_path / "a.onnx")).opset_import[0].version == 21
    for bad in ("6", "99"):  # 7-17: tests/test_opsets.py
        res, errors = _cli("convert", SAMPLE_SPEC, "--weights", W, "--input-shape", "1,1,8,8", "-o", str(tmp_path / "b.onnx"), "--opset", bad)
        assert res.exit_code == 2 and len(errors) == 1 and "opset" in errors[0] and "from 7 to" in errors[0], res.stderr
        assert not (tmp_path / "b.onnx").exists()


def test_opset_for_an_onnx_input_converts_or_refuses(tmp_path):
    src = tmp_path / "src.onnx"
    assert bnfold.convert(_digits(), torch.randn(1, 1, 8, 8), src, providers="cpu", opset=20).passed
    rep = bnfold.convert(str(src), None, tmp_path / "o21.onnx", opset=21, providers="cpu")
    assert rep.passed and rep.export["opset"] == 21
    assert onnx.load(str(tmp_path / "o21.onnx")).opset_import[0].version == 21
    with pytest.raises(BadInputError, match="opset="):
        bnfold.convert(str(src), None, tmp_path / "o99.onnx", opset=99)


# ------------------------------------------------------------------ flags that were ignored
def test_estimator_without_calib_is_an_error(tmp_path):
    res, errors = _cli("convert", SAMPLE_SPEC, "--input-shape", "1,1,8,8", "-o", str(tmp_path / "a.onnx"), "--estimator", "foo")
    assert res.exit_code == 2 and "unknown estimator" in errors[0]
    res, errors = _cli("convert", SAMPLE_SPEC, "--input-shape", "1,1,8,8", "-o", str(tmp_path / "a.onnx"), "--estimator", "pooled")
    assert res.exit_code == 2 and "--estimator is given without calibration data" in errors[0]


def test_config_with_model_output_or_weights_is_an_error(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[conversion]]\nmodel = "m.onnx"\noutput = "o.onnx"\n')
    for extra in ([SAMPLE_SPEC], ["-o", "x.onnx"], ["--weights", W], ["--opset", "20"]):
        res, errors = _cli("convert", "--config", str(cfg), *extra)
        assert res.exit_code == 2 and "would be ignored" in errors[0], (extra, res.stderr)


def test_atol_per_output_reaches_verify(tmp_path, monkeypatch):
    import bnfold.pipeline as vmod  # convert calls the verify stage through the pipeline's import

    seen = {}
    real = vmod.verify

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setattr(vmod, "verify", spy)
    _cli("convert", SAMPLE_SPEC, "--weights", W, "--input-shape", "1,1,8,8", "-o", str(tmp_path / "a.onnx"),
         "--atol", "logitz=1e-3", "--providers", "cpu")
    assert seen["atol"] == {"logitz": 1e-3}  # i16's verify names an output that does not exist


# ------------------------------------------------------------------ config file bugs
def _cfg(tmp_path, body):
    shutil.copytree(SAMPLE, tmp_path / "digits", dirs_exist_ok=True)
    cfg = tmp_path / "c.toml"
    cfg.write_text(body)
    return cfg


def test_config_input_shape_list_and_data_spec(tmp_path):
    (tmp_path / "data.py").write_text("import numpy as np\nimport torch\n\ndef batches():\n"
                                      "    x = np.load(__file__.replace('data.py', 'digits/calib.npz'))['x']\n"
                                      "    return [torch.from_numpy(x[i:i + 64]) for i in range(0, 256, 64)]\n")
    cfg = _cfg(tmp_path, '[[conversion]]\nmodel = "digits/model.py:build"\nweights = "digits/weights.pt"\n'
                         'input_shape = [1, 1, 8, 8]\ncalib = "data.py:batches"\nproviders = ["cpu"]\noutput = "o.onnx"\n')
    (entry,) = load_config(cfg)
    assert entry["options"].input_shape == ((1, 1, 8, 8),)
    s = run_config(cfg)
    assert s["exit_code"] == 0 and s["conversions"][0]["report"]["calibration"]["batches"] == 4


@pytest.mark.parametrize("body,message", [
    ('defaults = 5\n[[conversion]]\nmodel = "m.onnx"\noutput = "o.onnx"\n', "defaults is not a table"),
    ("conversion = [1, 2]\n", "conversion #1 is not a table"),
    ("conversion = 3\n", "conversion is not a table"),
    ('[defaults]\nestimatr = "pooled"\n[[conversion]]\nmodel = "m.onnx"\noutput = "o.onnx"\n', "[defaults], key 'estimatr' is unknown"),
    ('[[conversion]]\nmodel = "digits/model.py:build"\ninput_shape = "1,1,8,8"\noutput = "o.onnx"\nestimator = "pooled"\n',
     "key 'estimator' is given without calibration data"),
    ('[[conversion]]\nmodel = "digits/model.py:build"\ninput_shape = "1,1,8,8"\ninput_shapes = ["1,1,8,8"]\noutput = "o.onnx"\n',
     "repeats 'input_shape'"),
    ('[[conversion]]\nmodel = "digits/model.py:build"\ninput_shape = "1,1,8,8"\noutput = "o.onnx"\ncalib = "nope.py:batches"\n', "does not exist"),
    ('[[conversion]]\nmodel = "digits/model.py:build"\ninput_shape = "1,1,8,8"\noutput = "o.onnx"\nprogress = true\n', "key 'progress' is unknown"),
])
def test_config_errors_name_file_table_and_key(tmp_path, body, message):
    with pytest.raises(ConfigError) as err:
        load_config(_cfg(tmp_path, body))
    assert message in str(err.value)
    res, errors = _cli("convert", "--config", str(tmp_path / "c.toml"))
    assert res.exit_code == 2 and len(errors) == 1 and message in errors[0]


def test_skip_unchanged_keeps_the_report_and_failed_rows_have_detail(tmp_path):
    cfg = _cfg(tmp_path, '[defaults]\nproviders = "cpu"\nmodel = "digits/model.py:build"\nweights = "digits/weights.pt"\n'
                         'input_shape = "1,1,8,8"\n[[conversion]]\noutput = "out/ok.onnx"\n'
                         '[[conversion]]\noutput = "out/bad.onnx"\natol = 0.0\nrtol = 0.0\n')
    res = runner.invoke(app, ["convert", "--config", str(cfg), "--report", str(tmp_path / "new" / "s.json")])
    assert res.exit_code == 1
    s = json.loads((tmp_path / "new" / "s.json").read_text())  # the summary's folder was created
    ok, bad = s["conversions"]
    assert bad["detail"] and "verification failed" in bad["detail"] and "FAILED" in res.stdout
    assert "verification failed" in res.stdout.split("FAILED", 1)[1]
    res = runner.invoke(app, ["convert", "--config", str(cfg), "--skip-unchanged", "--report", str(tmp_path / "new" / "s.json")])
    again = json.loads((tmp_path / "new" / "s.json").read_text())["conversions"][0]
    assert again["skipped"] and again["report"] == ok["report"]


# ------------------------------------------------------------------ provenance
def test_provenance_recorded_and_used_by_verify(tmp_path):
    out = tmp_path / "d.onnx"
    rep = bnfold.convert(SAMPLE_SPEC, None, out, weights=W, input_shape="1,1,8,8", calib=CALIB, batch_size=64,
                         providers="cpu", atol=1e-3)
    assert rep.passed
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["bnfold.estimator"] == "paper" and meta["bnfold.batch_size"] == "64" and meta["bnfold.opset"] == str(rep.export["opset"])
    assert meta["bnfold.calib_sha256"] == rep.calibration["data_sha256"] and json.loads(meta["bnfold.atol"]) == 1e-3
    assert meta["bnfold.version"] == bnfold.__version__
    # defaults from the artifact: no --batch-size needed
    res, _ = _cli("verify", SAMPLE_SPEC, str(out), "--weights", W, "--input-shape", "1,1,8,8", "--calib", CALIB, "--providers", "cpu", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["options"]["batch_size"] == 64
    # a different batch size: fails, and says why
    res, _ = _cli("verify", SAMPLE_SPEC, str(out), "--weights", W, "--input-shape", "1,1,8,8", "--calib", CALIB,
                  "--batch-size", "32", "--providers", "cpu", "--atol", "1e-6", "--json")
    d = json.loads(res.stdout)
    assert res.exit_code == 1 and any("batch size 32" in x for x in d["differences"]) and any("atol" in x for x in d["differences"])
    assert set(d["verification"]) >= {"passed", "runs", "providers_run"}  # the schema of convert's "verification"
    assert set(d["verification"]) == set(rep.verification)


# ------------------------------------------------------------------ allow_tf32
@pytest.mark.parametrize("via", ["api", "cli", "calibrate"])
def test_allow_tf32_reaches_calibration_and_needs_calib(via, tmp_path, monkeypatch):
    """--allow-tf32 / allow_tf32= is passed to the calibration (default False: exact fp32); without
    calibration data it would be ignored, so it is refused."""
    import bnfold.calibration.population as cal
    import bnfold.pipeline

    seen = []
    orig = cal.run_calibration
    spy = lambda *a, **k: (seen.append(k.get("allow_tf32")), orig(*a, **k))[1]  # noqa: E731
    for mod in (cal, bnfold.pipeline):  # the calibrate command and convert each call it by their own import
        monkeypatch.setattr(mod, "run_calibration", spy)
    out = str(tmp_path / ("a.pt" if via == "calibrate" else "a.onnx"))
    if via == "api":
        assert bnfold.convert(SAMPLE_SPEC, None, out, weights=W, input_shape="1,1,8,8", calib=CALIB, providers="cpu", allow_tf32=True).passed
        assert bnfold.convert(SAMPLE_SPEC, None, out, weights=W, input_shape="1,1,8,8", calib=CALIB, providers="cpu").passed
        with pytest.raises(BadInputError, match="allow_tf32"):
            bnfold.convert(SAMPLE_SPEC, None, out, weights=W, input_shape="1,1,8,8", providers="cpu", allow_tf32=True)
    else:
        base = (["convert", SAMPLE_SPEC, "--input-shape", "1,1,8,8", "--providers", "cpu"] if via == "cli" else ["calibrate", SAMPLE_SPEC])
        res, errors = _cli(*base, "--weights", W, "--calib", CALIB, "-o", out, "--allow-tf32")
        assert res.exit_code == 0, res.stderr
        res, errors = _cli(*base, "--weights", W, "--calib", CALIB, "-o", out)
        assert res.exit_code == 0, res.stderr
        if via == "cli":
            res, errors = _cli(*base, "--weights", W, "-o", out, "--allow-tf32")
            assert res.exit_code == 2 and "--allow-tf32" in errors[0], res.stderr
    assert seen == [True, False]


def test_providers_option_takes_every_registered_provider():
    """--providers is checked against bnfold.verification.providers' registry, not a fixed list: onnxruntime's own
    names work, and a provider added with register_provider is accepted at once."""
    from bnfold.verification.providers import PROVIDERS, ProviderSpec, register_provider

    o = ConvertOptions.build({"providers": "cpu,TensorrtExecutionProvider,openvino"})
    assert o.providers == ("cpu", "tensorrt", "openvino")
    with pytest.raises(BadInputError, match="unknown provider 'tpu'"):
        ConvertOptions.build({"providers": "cpu,tpu"})
    try:
        register_provider(ProviderSpec("qnn", "QNNExecutionProvider"))
        assert ConvertOptions.build({"require_providers": ["qnn"]}).require_providers == ("qnn",)
    finally:
        PROVIDERS.pop("qnn", None)
