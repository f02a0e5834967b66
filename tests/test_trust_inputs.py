"""Trust round 3 (issue 23 §2, §5, §6, §7), one class per section, one mechanism per class
(docs/trust.md): "the data goes where the user meant", "inputs are inputs, wherever they come from",
"change detection that sees every input", "one validation, before any work". Each hostile case checks
the exit code, the one line on stderr and the files before/after (hashed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from bnfold_cli.app import app
from test_bad_inputs import snapshot
from typer.testing import CliRunner

import bnfold
from bnfold import batch
from bnfold.edges import files as _io
from bnfold.edges.load import parse_shape
from bnfold.errors import DataError

runner = CliRunner()

MODEL = textwrap.dedent("""
    from torch import nn
    import helper

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, helper.C, 3), nn.BatchNorm2d(helper.C)
        def forward(self, x, scale=None):
            y = self.bn(self.conv(x))
            return y if scale is None else y * scale

    def scaled():
        return Scaled()

    def plain():
        return nn.Sequential(nn.Conv2d(1, helper.C, 3), nn.BatchNorm2d(helper.C), nn.ReLU())
""")

DATA = textwrap.dedent("""
    import os
    import numpy as np
    import torch

    def pairs():
        g = torch.Generator().manual_seed(0)
        return [(torch.randn(8, 1, 8, 8, generator=g), torch.randn(8, 4, 1, 1, generator=g)) for _ in range(2)]

    def from_npz():
        x = np.load(os.path.join(os.path.dirname(__file__), "d.npz"))["x"]
        return [torch.from_numpy(x[:8]), torch.from_numpy(x[8:])]
""")


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A folder with a model file importing a local helper, a data module and data; on sys.path (so
    ``m:scaled`` and ``data:pairs`` are module specs of these very files) and the working folder."""
    (tmp_path / "m.py").write_text(MODEL)
    (tmp_path / "helper.py").write_text("C = 4\n")
    (tmp_path / "data.py").write_text(DATA)
    np.savez(tmp_path / "d.npz", x=np.random.RandomState(0).randn(16, 1, 8, 8).astype("float32"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for name in ("m", "helper", "data"):  # this folder's modules, not another test's
        monkeypatch.delitem(sys.modules, name, raising=False)
    return tmp_path


def refused(args, ws, needle: str, code: int = 2, env=None) -> str:
    """Run the CLI; the exit code, exactly one error line containing ``needle``, nothing changed."""
    before = snapshot(ws)
    res = runner.invoke(app, args, env=env)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("bnfold: error:")]
    assert res.exit_code == code, res.stderr
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert snapshot(ws) == before
    return lines[0]


# ------------------------------------------------------------- §2 the data goes where the user meant
@pytest.mark.parametrize("calib", ["data.py:pairs", "data:pairs", "xy.npz"])
def test_a_label_that_could_bind_an_optional_input_is_refused(calib, ws):
    np.savez(ws / "xy.npz", x=np.zeros((8, 1, 8, 8), "float32"), y=np.ones((8, 4, 1, 1), "float32"))
    msg = refused(["calibrate", "m.py:scaled", "--calib", calib, "-o", "cal.pt"], ws, "could be a label or the optional input 'scale'")
    assert "dicts of named inputs" in msg


def test_labels_are_dropped_and_named_inputs_are_fed(ws):
    g = torch.Generator().manual_seed(0)
    x, label = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,))
    plain = bnfold.calibrate(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)), [(x, label)])
    model = __import__("m").scaled()
    with pytest.raises(DataError, match="could be a label"):
        bnfold.calibrate(model, [(x, torch.ones(16, 4, 1, 1))])
    scale = torch.full((16, 4, 1, 1), 3.0)
    named = bnfold.calibrate(model, [{"x": x, "scale": scale}])
    alone = bnfold.calibrate(model, [x])
    assert torch.equal(named.bn.running_mean, alone.bn.running_mean)  # scale is fed after the BN: same stats
    assert plain[1].running_mean.abs().sum() > 0


# ------------------------------------------------------------- §5 inputs are inputs, wherever they come from
@pytest.mark.parametrize("args, needle", [
    (["convert", "m:scaled", "-s", "1,1,8,8", "-o", "m.py"], "is the same file as model"),
    (["convert", "m:plain", "-s", "1,1,8,8", "--calib", "data:from_npz", "-o", "x.onnx", "--report", "data.py"], "same file as --calib"),
    (["calibrate", "m:plain", "--calib", "data:from_npz", "-o", "data.py"], "same file as --calib"),
    (["calibrate", "m.py:plain", "--calib", "data.py:from_npz", "-o", "m.py"], "same file as model"),
], ids=["module-model-source", "module-data-source-report", "calibrate-o-data-module", "calibrate-o-model-file"])
def test_the_source_of_a_spec_is_an_input(args, needle, ws):
    refused(args, ws, needle)


def test_an_output_that_is_a_link_is_never_replaced(ws):
    # what `-o /dev/stdout` is, in a folder of the test's own: a link to this process's stdout
    os.symlink("/proc/self/fd/1", ws / "stdout")
    os.symlink(ws / "d.npz", ws / "to_data.onnx")
    refused(["convert", "m.py:plain", "-s", "1,1,8,8", "-o", "stdout"], ws, "is a symbolic link")
    refused(["convert", "m.py:plain", "-s", "1,1,8,8", "-o", "x.onnx", "--report", "stdout"], ws, "is a symbolic link")
    refused(["convert", "m.py:plain", "-s", "1,1,8,8", "-o", "to_data.onnx"], ws, "is a symbolic link")
    assert os.readlink(ws / "stdout") == "/proc/self/fd/1"


def test_verify_report_onto_the_artifacts_external_data_is_refused(ws):
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [4096], np.ones(4096, "float32").tobytes(), raw=True)
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4096])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4096])], [w])
    onnx.save(helper.make_model(graph), str(ws / "a.onnx"), save_as_external_data=True, location="a.weights", size_threshold=0)
    assert (ws / "a.weights").is_file()
    refused(["verify", "a.onnx", "a.onnx", "--report", "a.weights"], ws, "external data")


def test_no_overwrite_protects_the_report_too(ws):
    (ws / "r.json").write_text("{}")
    refused(["convert", "m.py:plain", "-s", "1,1,8,8", "-o", "new.onnx", "--report", "r.json", "--no-overwrite"], ws, "--report 'r.json' already exists")
    refused(["calibrate", "m.py:plain", "--calib", "d.npz", "-o", "new.pt", "--report", "r.json", "--no-overwrite"], ws, "already exists")
    cfg = ws / "cfg.toml"
    cfg.write_text('[[conversion]]\nmodel = "m.py:plain"\ninput_shape = "1,1,8,8"\noutput = "a.onnx"\nreport = "r.json"\noverwrite = false\n')
    msg = refused(["convert", "--config", str(cfg)], ws, "key 'report'")
    assert "already exists and overwrite = false is set" in msg and "--no-overwrite" not in msg


def test_step_summary_is_never_appended_to_an_input(ws):
    cfg = ws / "cfg.toml"
    cfg.write_text('[[conversion]]\nmodel = "m.py:missing"\ninput_shape = "1,1,8,8"\noutput = "a.onnx"\n')
    before = snapshot(ws)
    res = runner.invoke(app, ["convert", "--config", str(cfg)], env={"GITHUB_STEP_SUMMARY": str(cfg)})
    assert res.exit_code == 2, res.stderr  # the conversion's own failure (no factory 'missing')
    assert "is the same file as the config file" in res.stderr and "nothing was appended" in res.stderr
    assert snapshot(ws) == before


_OWNER = textwrap.dedent("""
    import os, sys, time
    from bnfold.edges import files
    with files.OutputSet():
        files.write_text_atomic(os.path.join(sys.argv[1], "m.onnx"), "staged")
        print(next(n for n in os.listdir(sys.argv[1]) if n.startswith(".bnfold-")), flush=True)
        time.sleep(60)
""")


def test_staging_is_removed_only_when_its_owner_is_provably_gone(tmp_path):
    def owner():
        p = subprocess.Popen([sys.executable, "-c", _OWNER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        return p, tmp_path / p.stdout.readline().strip()

    alive, alive_dir = owner()
    dead, dead_dir = owner()
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        # the live owner's folder, named as if its pid were gone here (another pid namespace)
        disguised = alive_dir.with_name(_io._staging_prefix(dead.pid) + "live")
        os.rename(alive_dir, disguised)
        with _io.OutputSet():
            _io.write_text_atomic(tmp_path / "r.json", "{}")
        assert not dead_dir.exists() and disguised.is_dir() and (disguised / "m.onnx").is_file()
    finally:
        alive.kill()
        alive.wait()
    assert _io.sweep_stale_staging(tmp_path) == [disguised]


# ------------------------------------------------------------- §6 change detection that sees every input
def test_skip_unchanged_sees_imported_modules_read_files_and_outputs(ws):
    cfg = ws / "cfg.toml"
    cfg.write_text('[[conversion]]\nmodel = "m.py:plain"\ninput_shape = "1,1,8,8"\nverify = false\n'  # cheap: no onnxruntime
                   'calib = "data.py:from_npz"\noutput = "a.onnx"\n')
    assert batch.run_config(cfg)["exit_code"] == 0
    (entry,) = batch.load_config(cfg)
    assert batch.unchanged_manifest(entry) is not None
    for path, new in (("helper.py", "C = 4  # edited\n"), ("d.npz", None)):
        old = (ws / path).read_bytes()
        if new is None:
            np.savez(ws / "d.npz", x=np.random.RandomState(1).randn(16, 1, 8, 8).astype("float32"))
        else:
            (ws / path).write_text(new)
        assert batch.unchanged_manifest(entry) is None, path
        (ws / path).write_bytes(old)
        assert batch.unchanged_manifest(entry) is not None
    cfg.write_text(cfg.read_text() + 'report = "r.json"\n')  # a new requested output: run
    (entry,) = batch.load_config(cfg)
    assert batch.unchanged_manifest(entry) is None


# ------------------------------------------------------------- §7 one validation, before any work
@pytest.mark.parametrize("key, value, needle", [("seed", "9223372036854775808", "key 'seed' 9223372036854775808 is outside 0..2**63-1"),
                                                ("opset", "99", "key 'opset' 99 is outside"),
                                                ("model", '"no_such_module_h17:build"', "key 'model': module 'no_such_module_h17' not found"),
                                                ("input_shape", '"[1, 1, 0, 8]"', "key 'input_shape' '[1, 1, 0, 8]' has a zero dimension")])
def test_a_config_is_validated_whole_before_the_first_conversion(key, value, needle, ws):
    cfg = ws / "cfg.toml"
    second = {"model": '"m.py:plain"', "input_shape": '"1,1,8,8"', key: value}
    cfg.write_text('[defaults]\nproviders = "cpu"\n'
                   '[[conversion]]\nmodel = "m.py:plain"\ninput_shape = "[1, 1, 8, 8]"\noutput = "a.onnx"\n'
                   '[[conversion]]\noutput = "b.onnx"\n' + "".join(f"{k} = {v}\n" for k, v in second.items()))
    msg = refused(["convert", "--config", str(cfg)], ws, needle)
    assert f"{cfg}: conversion #2" in msg


@pytest.mark.parametrize("extra, needle", [
    (["--allow-tf32", "--calib", "d.npz"], "--allow-tf32 has no meaning for an ONNX model"),
    (["--batch-size", "4", "--calib", "d.npz"], "--batch-size has no meaning for an ONNX model"),
    (["--atol", "y=1e-3", "--atol", "y=1e-2"], "--atol gives output 'y' two values"),
    (["--providers", "cpu", "--providers", "cuda"], "--providers is given 2 times"),
    (["--verify", "--no-verify"], "--verify is given 2 times with different values (--verify, --no-verify)"),
])
def test_an_option_without_effect_or_a_conflicting_repeat_is_refused(extra, needle, ws):
    (ws / "x.onnx").write_bytes(b"not read: the options are refused first")
    refused(["convert", "x.onnx", "-o", "y.onnx", *extra], ws, needle)


def test_trust_pickle_without_a_checkpoint_in_every_interface(ws):
    refused(["convert", "m.py:plain", "-s", "1,1,8,8", "-o", "y.onnx", "--trust-pickle"], ws, "--trust-pickle is given without --weights")
    with pytest.raises(bnfold.BadInputError, match="trust_pickle= is given without weights="):
        bnfold.convert("m.py:plain", None, "y.onnx", input_shape="1,1,8,8", trust_pickle=True)
    with pytest.raises(bnfold.BadInputError, match="batch_size= has no meaning for an ONNX model"):
        bnfold.convert("x.onnx", None, "y.onnx", calib="d.npz", batch_size=4)
    cfg = ws / "cfg.toml"
    cfg.write_text('[[conversion]]\nmodel = "m.py:plain"\ninput_shape = "1,1,8,8"\noutput = "a.onnx"\ntrust_pickle = true\n')
    msg = refused(["convert", "--config", str(cfg)], ws, "key 'trust_pickle' is given without key 'weights'")
    assert "--" not in msg.replace("--config", "")


def test_identical_repeats_are_one_value_and_the_bracket_shape_works_on_the_cli(ws):
    assert parse_shape("[1, 3, 8, 8]") == parse_shape("1,3,8,8") == (1, 3, 8, 8)
    res = runner.invoke(app, ["inspect", "m.py:plain", "-s", "[1, 1, 8, 8]", "--json"])
    assert res.exit_code == 0, res.stderr
    # the same value twice is not a conflict: the run goes on to the next check (a missing folder)
    refused(["convert", "m.py:plain", "-s", "1,1,8,8", "-o", "no/y.onnx", "--providers", "cpu", "--providers", "cpu"], ws,
            "folder 'no' for the output does not exist")
