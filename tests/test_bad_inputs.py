"""The bad-input catalogue: each case exits 2 (3 when the model cannot be exported), prints one
clear line on stderr naming the problem and the fix, no traceback, leaves no output file and no file
changed (every file of the folder is hashed before and after; inputs are copies inside it)."""

from __future__ import annotations

import hashlib
import os
import socket
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import bnfold
from bnfold.errors import BadInputError, DataError, ModelError, OutputPathError, ProviderError
from bnfold_cli.app import app
from conftest import SAMPLE, SAMPLE_SPEC

runner = CliRunner()
W = str(SAMPLE / "weights.pt")
CALIB = str(SAMPLE / "calib.npz")


@pytest.fixture
def work(tmp_path):
    """A folder with helper model files and broken data files."""
    (tmp_path / "factories.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        NOT_CALLABLE = 3
        def raises():
            raise RuntimeError("cannot build: missing config")
        def not_a_module():
            return {"a": 1}
        def no_bn():
            return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
        class Unexportable(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(1, 2, 3)
                self.bn = nn.BatchNorm2d(2)
            def forward(self, x):
                y = self.bn(self.conv(x))
                if y.sum() > 0:  # data-dependent Python branch: torch.export cannot trace it
                    return y * 2
                return y - 1
        def unexportable():
            return Unexportable()
        import sys
        def exit0():
            sys.exit(0)
        def exit3():
            sys.exit(3)
        def exit_msg():
            raise SystemExit("msg")
        def generator_exit():
            raise GeneratorExit()
        def bn_model():
            return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        def data_exit():
            sys.exit(0)
        def data_gen_exit():
            yield torch.randn(8, 1, 8, 8)
            sys.exit(4)
        def data_gen_raises():
            yield torch.randn(8, 1, 8, 8)
            raise SystemExit("stop here")
        class Meta(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(1, 4, 3)
                self.bn = nn.BatchNorm2d(4)
                self.register_buffer("scale", torch.ones(1), persistent=False)
            def forward(self, x):
                return self.bn(self.conv(x)) * self.scale
        def meta_partial():
            with torch.device("meta"):
                return Meta()
    """))
    (tmp_path / "import_exits.py").write_text("import sys\nsys.exit(0)\ndef build():\n    pass\n")
    import shutil
    shutil.copy(W, tmp_path / "w.pt")
    os.symlink(tmp_path / "w.pt", tmp_path / "wlink.pt")
    os.link(tmp_path / "w.pt", tmp_path / "whard.pt")
    shutil.copy(CALIB, tmp_path / "c.npz")
    np.savez(tmp_path / "c3.npz", x=np.random.rand(8, 3, 8, 8).astype(np.float32))
    import pickle
    with open(tmp_path / "plain.pkl", "wb") as fh:
        pickle.dump(dict(torch.load(W, weights_only=True)), fh)
    os.mkfifo(tmp_path / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    sock.close()
    _onnx_files(tmp_path)
    (tmp_path / "syntax.py").write_text("def build(:\n")
    sd = torch.load(W, weights_only=True)
    torch.save({k: v for k, v in sd.items() if k != "conv1.weight"}, tmp_path / "missing_key.pt")
    torch.save({**sd, "extra.weight": torch.zeros(1)}, tmp_path / "unexpected_key.pt")
    torch.save({**sd, "conv1.weight": torch.zeros(3, 3)}, tmp_path / "wrong_shape.pt")
    torch.save([1, 2, 3], tmp_path / "not_state_dict.pt")
    (tmp_path / "corrupt.pt").write_bytes(os.urandom(2048))
    data = Path(W).read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    from bnfold.edges.load import load_model
    torch.save(load_model(SAMPLE_SPEC, W), tmp_path / "whole_model.pt")
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 1, 8, 8), np.float32))
    np.savez(tmp_path / "wrong_shape.npz", x=np.zeros((10, 3, 5), np.float32))
    np.savez(tmp_path / "strings.npz", x=np.array(["a", "b"]))
    bad = np.random.rand(10, 1, 8, 8).astype(np.float32)
    bad[3, 0, 2, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x=bad)
    (tmp_path / "data.csv").write_text("1,2,3\n")
    (tmp_path / "not.onnx").write_text("this is not onnx")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "existing.onnx").write_bytes(b"old")
    (tmp_path / "out").mkdir()
    return tmp_path


def _onnx_files(w: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def model(inputs, nodes, inits=(), name="m.onnx", out_rank=4):
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * out_rank)
        g = helper.make_graph(nodes, "g", inputs, [out], list(inits))
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(w / name))

    conv_w = numpy_helper.from_array(np.random.rand(4, 1, 3, 3).astype(np.float32), "W")
    conv = helper.make_node("Conv", ["x", "W"], ["y"])
    t = helper.make_tensor_value_info
    model([t("x", TensorProto.FLOAT, [1, 1, 8, 8])], [conv], [conv_w], "conv1.onnx")
    model([t("x", TensorProto.FLOAT, [1, 3, 8, 8])], [helper.make_node("Conv", ["x", "W3"], ["y"])],
          [numpy_helper.from_array(np.random.rand(4, 3, 3, 3).astype(np.float32), "W3")], "conv3.onnx")
    model([t("x", TensorProto.FLOAT, [100000, 1, 320, 320])], [conv], [conv_w], "huge.onnx")
    model([t("x", TensorProto.FLOAT, [0, 1, 8, 8])], [conv], [conv_w], "zero.onnx")
    model([t("x", TensorProto.STRING, [1])], [helper.make_node("Constant", [], ["y"], value=numpy_helper.from_array(np.zeros(1, np.float32)))], (), "string.onnx", 1)
    seq = helper.make_tensor_sequence_value_info("x", TensorProto.FLOAT, None)
    model([seq], [helper.make_node("SequenceAt", ["x", "i"], ["y"])], [numpy_helper.from_array(np.array(0, np.int64), "i")], "sequence.onnx")
    model([t("x", TensorProto.FLOAT, [1, 1, 8, 8]), t("x2", TensorProto.FLOAT, [1, 1, 8, 8])],
          [helper.make_node("Add", ["x", "x2"], ["s"]), helper.make_node("Conv", ["s", "W"], ["y"])], [conv_w], "two_inputs.onnx")
    os.symlink(w / "conv1.onnx", w / "conv1_link.onnx")
    big = numpy_helper.from_array(np.random.rand(64, 1, 3, 3).astype(np.float32), "W")
    g = helper.make_graph([conv], "g", [t("x", TensorProto.FLOAT, [1, 1, 8, 8])], [t("y", TensorProto.FLOAT, [1, 64, 6, 6])], [big])
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(w / "ext_in.onnx"),
                    save_as_external_data=True, location="ext_in.weights", size_threshold=0)


def _cases(w: Path):
    ok = ["--weights", W, "--input-shape", "1,1,8,8"]
    o = ["-o", str(w / "out" / "m.onnx")]
    s = SAMPLE_SPEC
    return {
        "malformed spec": (["convert", "no_colon_here", *ok, *o], 2, "names no factory"),
        "bad factory name": (["convert", f"{s.rpartition(':')[0]}:1bad", *ok, *o], 2, "malformed"),
        "missing model file": (["convert", str(w / "missing.py") + ":build", *ok, *o], 2, "does not exist"),
        "missing attribute": (["convert", s.rpartition(":")[0] + ":nope", *ok, *o], 2, "has no attribute 'nope'"),
        "module not found": (["convert", "no_such_pkg.models:build", *ok, *o], 2, "not found"),
        "syntax error in model file": (["convert", f"{w / 'syntax.py'}:build", *ok, *o], 2, "SyntaxError"),
        "factory raises": (["convert", f"{w / 'factories.py'}:raises", "--input-shape", "1,1,8,8", *o], 2, "cannot build: missing config"),
        "factory returns non-module": (["convert", f"{w / 'factories.py'}:not_a_module", "--input-shape", "1,1,8,8", *o], 2, "not a torch.nn.Module"),
        "attribute not callable": (["convert", f"{w / 'factories.py'}:NOT_CALLABLE", "--input-shape", "1,1,8,8", *o], 2, "not a callable"),
        "weights missing": (["convert", s, "--weights", str(w / "nope.pt"), "--input-shape", "1,1,8,8", *o], 2, "does not exist"),
        "corrupt checkpoint": (["convert", s, "--weights", str(w / "corrupt.pt"), "--input-shape", "1,1,8,8", *o], 2, "cannot read checkpoint"),
        "truncated checkpoint": (["convert", s, "--weights", str(w / "truncated.pt"), "--input-shape", "1,1,8,8", *o], 2, "truncated"),
        "missing keys": (["convert", s, "--weights", str(w / "missing_key.pt"), "--input-shape", "1,1,8,8", *o], 2, "missing keys conv1.weight"),
        "unexpected keys": (["convert", s, "--weights", str(w / "unexpected_key.pt"), "--input-shape", "1,1,8,8", *o], 2, "unexpected keys extra.weight"),
        "wrong shapes": (["convert", s, "--weights", str(w / "wrong_shape.pt"), "--input-shape", "1,1,8,8", *o], 2, "conv1.weight: checkpoint (3, 3)"),
        "not a state_dict": (["convert", s, "--weights", str(w / "not_state_dict.pt"), "--input-shape", "1,1,8,8", *o], 2, "not a state_dict"),
        "pickled model without --trust-pickle": (["convert", s, "--weights", str(w / "whole_model.pt"), "--input-shape", "1,1,8,8", *o], 2, "--trust-pickle"),
        "input shape wrong rank": (["convert", s, "--weights", W, "--input-shape", "1,8,8", *o], 2, "rejected example inputs of shape [1, 8, 8]"),
        "input shape zero": (["convert", s, "--weights", W, "--input-shape", "0,1,8,8", *o], 2, "zero dimension"),
        "input shape negative": (["convert", s, "--weights", W, "--input-shape", "1,-1,8,8", *o], 2, "negative dimension"),
        "input shape non-numeric": (["convert", s, "--weights", W, "--input-shape", "1,one,8,8", *o], 2, "non-integer dimension 'one'"),
        "input shape wrong channels": (["convert", s, "--weights", W, "--input-shape", "1,3,8,8", *o], 2, "rejected example inputs"),
        "no input shape": (["convert", s, "--weights", W, *o], 2, "no --input-shape"),
        "calib empty": (["convert", s, *ok, "--calib", str(w / "empty.npz"), *o], 2, "empty (0 samples)"),
        "calib wrong shape": (["convert", s, *ok, "--calib", str(w / "wrong_shape.npz"), *o], 2, "rejected calibration batch 0"),
        "calib wrong dtype": (["convert", s, *ok, "--calib", str(w / "strings.npz"), *o], 2, "not numeric"),
        "calib NaN": (["convert", s, *ok, "--calib", str(w / "nan.npz"), *o], 2, "NaN or Inf"),
        "calib m = 1": (["convert", s, *ok, "--calib", CALIB, "--batch-size", "1", *o], 2, "sees 1 value per channel"),
        "calib missing": (["convert", s, *ok, "--calib", str(w / "nope.npz"), *o], 2, "does not exist"),
        "calib unknown type": (["convert", s, *ok, "--calib", str(w / "data.csv"), *o], 2, "not a known form"),
        "batch size zero": (["convert", s, *ok, "--calib", CALIB, "--batch-size", "0", *o], 2, "not positive"),
        "unknown estimator": (["convert", s, *ok, "--calib", CALIB, "--estimator", "ema", *o], 2, "unknown estimator"),
        "output folder missing": (["convert", s, *ok, "-o", str(w / "nope" / "m.onnx")], 2, "does not exist"),
        "output is a folder": (["convert", s, *ok, "-o", str(w / "out")], 2, "is a folder"),
        "output folder unwritable": (["convert", s, *ok, "-o", "/sys/bnfold-test.onnx"], 2, "is not writable"),
        "output parent is a file": (["convert", s, *ok, "-o", str(w / "a_file" / "m.onnx")], 2, "is not a folder"),
        "existing output with --no-overwrite": (["convert", s, *ok, "-o", str(w / "existing.onnx"), "--no-overwrite"], 2, "already exists"),
        "onnx input not onnx": (["convert", str(w / "not.onnx"), *o], 2, "not a readable ONNX model"),
        "onnx input missing": (["convert", str(w / "missing.onnx"), *o], 2, "does not exist"),
        "unknown provider": (["convert", s, *ok, "--providers", "cpu,tpu", *o], 2, "unknown provider 'tpu'"),
        "negative tolerance": (["convert", s, *ok, "--atol", "-1e-3", *o], 2, "negative"),
        "non-numeric tolerance": (["convert", s, *ok, "--rtol", "tight", *o], 2, "not a number"),
        "model cannot be exported": (["convert", f"{w / 'factories.py'}:unexportable", "--input-shape", "1,1,8,8", *o], 3, "torch.onnx.export failed"),
        "verify: artifact missing": (["verify", s, str(w / "none.onnx"), *ok], 2, "does not exist"),
        "verify: artifact not onnx": (["verify", s, str(w / "not.onnx"), *ok], 2, "not a readable ONNX model"),
        "calibrate: onnx model": (["calibrate", str(w / "not.onnx"), "--calib", CALIB, "-o", str(w / "out" / "c.pt")], 2, "needs the PyTorch model"),
        # --- trust rule "exit codes are bnfold's": user code cannot take bnfold's exit code; exiting is exit 3
        "factory sys.exit(0)": (["convert", f"{w / 'factories.py'}:exit0", "-s", "1,1,8,8", *o], 3, "called sys.exit(0)"),
        "factory sys.exit(3)": (["convert", f"{w / 'factories.py'}:exit3", "-s", "1,1,8,8", *o], 3, "called sys.exit(3)"),
        "factory SystemExit('msg')": (["convert", f"{w / 'factories.py'}:exit_msg", "-s", "1,1,8,8", *o], 3, "SystemExit: msg"),
        "factory GeneratorExit": (["convert", f"{w / 'factories.py'}:generator_exit", "-s", "1,1,8,8", *o], 2, "raised GeneratorExit"),
        "model file exits on import": (["convert", f"{w / 'import_exits.py'}:build", "-s", "1,1,8,8", *o], 3, "called sys.exit(0)"),
        "calibrate: factory sys.exit(0)": (["calibrate", f"{w / 'factories.py'}:exit0", "--calib", CALIB, "-o", str(w / "out" / "c.pt")], 3, "called sys.exit(0)"),
        "verify: factory sys.exit(0)": (["verify", f"{w / 'factories.py'}:exit0", str(w / "conv1.onnx"), "-s", "1,1,8,8"], 3, "called sys.exit(0)"),
        "data function sys.exit(0)": (["convert", f"{w / 'factories.py'}:bn_model", "-s", "1,1,8,8", "--calib", f"{w / 'factories.py'}:data_exit", *o], 3, "called sys.exit(0)"),
        "data generator sys.exit(4) mid-way": (["convert", f"{w / 'factories.py'}:bn_model", "-s", "1,1,8,8", "--calib", f"{w / 'factories.py'}:data_gen_exit", *o], 3, "called sys.exit(4)"),
        "data generator SystemExit('stop')": (["calibrate", f"{w / 'factories.py'}:bn_model", "--calib", f"{w / 'factories.py'}:data_gen_raises", "-o", str(w / "out" / "c.pt")], 3, "stop here"),
        # --- trust rule "no output on an input": no output on an input, another output or a special file
        "-o is --weights": (["convert", s, "--weights", str(w / "w.pt"), "-s", "1,1,8,8", "-o", str(w / "w.pt")], 2, "same file as --weights"),
        "-o is a symlink to --weights": (["convert", s, "--weights", str(w / "w.pt"), "-s", "1,1,8,8", "-o", str(w / "wlink.pt")], 2, "same file as --weights"),
        "-o is a hard link to --weights": (["convert", s, "--weights", str(w / "w.pt"), "-s", "1,1,8,8", "-o", str(w / "whard.pt")], 2, "same file as --weights"),
        "-o reaches --weights through ..": (["convert", s, "--weights", str(w / "w.pt"), "-s", "1,1,8,8", "-o", str(w / "out" / ".." / "w.pt")], 2, "same file as --weights"),
        "-o is the model .py": (["convert", f"{w / 'factories.py'}:no_bn", "-s", "1,1,8,8", "-o", str(w / "factories.py")], 2, "same file as model"),
        "-o is the input .onnx": (["convert", str(w / "conv1.onnx"), "-o", str(w / "conv1.onnx")], 2, "same file as model"),
        "-o is a symlink to the input .onnx": (["convert", str(w / "conv1.onnx"), "-o", str(w / "conv1_link.onnx")], 2, "same file as model"),
        "-o is the input .onnx's external data": (["convert", str(w / "ext_in.onnx"), "-o", str(w / "ext_in.weights")], 2, "same file as model"),
        "-o is --calib": (["convert", s, *ok, "--calib", str(w / "c.npz"), "-o", str(w / "c.npz")], 2, "same file as --calib"),
        "--report is --calib": (["convert", s, *ok, "--calib", str(w / "c.npz"), *o, "--report", str(w / "c.npz")], 2, "--report"),
        "--report is -o": (["convert", s, *ok, *o, "--report", str(w / "out" / "m.onnx")], 2, "are the same file"),
        "--report is -o's external data": (["convert", s, *ok, *o, "--report", str(w / "out" / "m.onnx.data")], 2, "are the same file"),
        "--report is --weights (hard link)": (["convert", s, "--weights", str(w / "w.pt"), "-s", "1,1,8,8", *o, "--report", str(w / "whard.pt")], 2, "same file as --weights"),
        "-o is a FIFO": (["convert", s, *ok, "-o", str(w / "fifo")], 2, "is a FIFO"),
        "--report is a FIFO": (["convert", s, *ok, *o, "--report", str(w / "fifo")], 2, "is a FIFO"),
        "-o is a socket": (["convert", s, *ok, "-o", str(w / "sock")], 2, "is a socket"),
        "-o is /dev/null": (["convert", s, *ok, "-o", "/dev/null"], 2, "is a character device"),
        "-o with a trailing slash (existing folder)": (["convert", s, *ok, "-o", str(w / "out") + "/"], 2, "names a folder"),
        "-o with a trailing slash (new name)": (["convert", s, *ok, "-o", str(w / "newdir") + "/"], 2, "names a folder"),
        "--report with a trailing slash": (["convert", s, *ok, *o, "--report", str(w / "newdir") + "/"], 2, "names a folder"),
        "-o name longer than NAME_MAX": (["convert", s, *ok, "-o", str(w / ("a" * 260 + ".onnx"))], 2, "255"),
        "calibrate: -o is --weights": (["calibrate", s, "--weights", str(w / "w.pt"), "--calib", CALIB, "-o", str(w / "whard.pt")], 2, "same file as --weights"),
        "calibrate: --report is --calib": (["calibrate", s, "--calib", str(w / "c.npz"), "-o", str(w / "out" / "c.pt"), "--report", str(w / "c.npz")], 2, "same file as --calib"),
        "calibrate: -o is /dev/null": (["calibrate", s, "--calib", CALIB, "-o", "/dev/null"], 2, "character device"),
        "verify: --report is the artifact": (["verify", s, str(w / "conv1.onnx"), *ok, "--report", str(w / "conv1_link.onnx")], 2, "same file as the ONNX file"),
        "verify: --report is --weights": (["verify", s, str(w / "conv1.onnx"), "--weights", str(w / "w.pt"), "-s", "1,1,8,8", "--report", str(w / "wlink.pt")], 2, "same file as --weights"),
        "--no-overwrite names no --force": (["convert", s, *ok, "-o", str(w / "existing.onnx"), "--no-overwrite"], 2, "drop --no-overwrite"),
        # --- trust rule "environment errors are bad input": the environment's limits are bad input, checked before work
        "--seed beyond 2**63": (["convert", s, *ok, *o, "--seed", str(2**63)], 2, "--seed 9223372036854775808 is outside"),
        "--seed negative": (["convert", s, *ok, *o, "--seed", "-1"], 2, "--seed is -1, negative"),
        "verify: --seed beyond 2**63": (["verify", s, str(w / "conv1.onnx"), *ok, "--seed", str(2**64)], 2, "is outside"),
        "input shape beyond int64": (["convert", s, "--weights", W, "-s", f"1,{2**63}", *o], 2, "beyond 2**63-1"),
        "input shape needs too much memory": (["convert", s, "--weights", W, "-s", "1,1,100000,100000", *o], 2, "of memory is available"),
        "ONNX input fixed at 100000x1x320x320": (["convert", str(w / "huge.onnx"), *o], 2, "of memory is available"),
        "ONNX input of sequence type": (["convert", str(w / "sequence.onnx"), *o], 2, "not a tensor"),
        "ONNX input of string type": (["convert", str(w / "string.onnx"), *o], 2, "holds STRING elements"),
        "ONNX input of zero size": (["convert", str(w / "zero.onnx"), *o], 2, "zero-size dimension"),
        "ONNX input with calib of wrong channels": (["convert", str(w / "conv1.onnx"), "--calib", str(w / "c3.npz"), *o], 2, "expects [1, 1, 8, 8]"),
        "verify: artifact with other channels": (["verify", s, str(w / "conv3.onnx"), *ok], 2, "expects [1, 3, 8, 8]"),
        "verify: artifact with two inputs": (["verify", s, str(w / "two_inputs.onnx"), *ok], 2, "takes 2"),
        "verify: onnx source vs artifact with other inputs": (["verify", str(w / "conv1.onnx"), str(w / "conv3.onnx")], 2, "expects [1, 3, 8, 8]"),
        # --- trust rule "stdout carries only what was asked for": messages that say what is wrong
        "plain pickle without --trust-pickle": (["convert", s, "--weights", str(w / "plain.pkl"), "-s", "1,1,8,8", *o], 2, "is a Python pickle"),
        "meta model without --weights": (["convert", f"{w / 'factories.py'}:meta_partial", "-s", "1,1,8,8", *o], 2, "meta device"),
        "meta model, buffer not in checkpoint": (["convert", f"{w / 'factories.py'}:meta_partial", "--weights", str(w / "meta_weights.pt"), "-s", "1,1,8,8", *o], 2, "meta device"),
    }


CASES = list(_cases(Path("/placeholder")).keys())


def snapshot(folder: Path) -> dict:
    """Every entry below ``folder``: regular files by content hash, links by target, others by kind."""
    out = {}
    for p in folder.rglob("*"):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir" if p.is_dir() else "special"
    return out


@pytest.fixture
def meta_weights(work):
    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module("conv", nn.Conv2d(1, 4, 3))
    m.add_module("bn", nn.BatchNorm2d(4))
    torch.save(m.state_dict(), work / "meta_weights.pt")


@pytest.mark.parametrize("case", CASES)
def test_catalogue(case, work, meta_weights):
    args, code, message = _cases(work)[case]
    before = snapshot(work)
    res = runner.invoke(app, args)
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("bnfold: error:")]
    assert len(errors) == 1, res.stderr
    assert message in errors[0], errors[0]
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    assert "staging" not in errors[0] and ".bnfold-" not in errors[0], errors[0]
    after = snapshot(work)
    assert set(after) - set(before) == set(), f"left behind: {set(after) - set(before)}"
    assert after == before, "a file changed: " + str([k for k in before if after.get(k) != before[k]])


def test_debug_shows_traceback(work):
    res = runner.invoke(app, ["--debug", "convert", "no_colon", "-o", str(work / "m.onnx")])
    assert res.exit_code == 2 and "Traceback" in res.stderr


def test_trust_pickle_loads_whole_model(work):
    out = work / "out" / "m.onnx"
    res = runner.invoke(app, ["convert", SAMPLE_SPEC, "--weights", str(work / "whole_model.pt"), "--trust-pickle",
                              "--input-shape", "1,1,8,8", "-o", str(out), "-q"])
    assert res.exit_code == 0, res.stderr
    assert out.is_file()


def test_model_without_batchnorm_converts_and_says_so(work):
    out = work / "out" / "m.onnx"
    res = runner.invoke(app, ["convert", f"{work / 'factories.py'}:no_bn", "--input-shape", "1,1,8,8", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.stderr
    assert "no BatchNorm" in res.stdout and out.is_file()


def test_existing_output_is_replaced_by_default(work):
    out = work / "existing.onnx"
    res = runner.invoke(app, ["convert", SAMPLE_SPEC, "--weights", W, "--input-shape", "1,1,8,8", "-o", str(out), "-q"])
    assert res.exit_code == 0 and out.read_bytes() != b"old"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only folders")
def test_unwritable_folder(work):
    ro = work / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    res = runner.invoke(app, ["convert", SAMPLE_SPEC, "--weights", W, "--input-shape", "1,1,8,8", "-o", str(ro / "m.onnx")])
    assert res.exit_code == 2 and "not writable" in res.stderr


def test_required_provider_missing_is_an_error(work):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        pytest.skip("CUDA can run here")
    out = work / "out" / "m.onnx"
    res = runner.invoke(app, ["convert", SAMPLE_SPEC, "--weights", W, "--input-shape", "1,1,8,8", "-o", str(out),
                              "--require-providers", "cuda"])
    assert res.exit_code == 2 and "required provider 'cuda' cannot run here" in res.stderr
    assert not out.exists()


# ------------------------------------------------------------------------------------ the API
def test_api_errors(tmp_path):
    with pytest.raises(ModelError, match="expected a torch.nn.Module"):
        bnfold.fold("model.pt")
    with pytest.raises(ModelError):
        bnfold.inspect(None)
    with pytest.raises(DataError, match="unknown estimator"):
        bnfold.calibrate(nn.BatchNorm1d(2), [torch.randn(4, 2)], estimator="ema")
    with pytest.raises(DataError, match="not an iterable of batches"):
        bnfold.calibrate(nn.BatchNorm1d(2), 3)
    with pytest.raises(OutputPathError, match="does not exist"):
        bnfold.export(nn.Conv2d(1, 1, 1), (torch.randn(1, 1, 2, 2),), tmp_path / "no" / "x.onnx")
    with pytest.raises(BadInputError, match="not a readable ONNX"):
        (tmp_path / "x.onnx").write_text("nope")
        bnfold.fold_onnx(tmp_path / "x.onnx", tmp_path / "y.onnx")
    assert not (tmp_path / "y.onnx").exists()
    with pytest.raises(ProviderError, match="unknown provider"):
        bnfold.verify(nn.Conv2d(1, 1, 1), tmp_path / "x.onnx", torch.randn(1, 1, 2, 2), providers=["gpu0"])
    with pytest.raises(BadInputError, match="negative"):
        bnfold.verify(nn.Conv2d(1, 1, 1), tmp_path / "x.onnx", torch.randn(1, 1, 2, 2), atol={"output": -1})
