"""Hostile cases of three trust classes (issue 23 §1, §3, §8), each with exit code, the one line on
stderr and the files hashed before/after:

* "PASSED means compared" — the verdict comes only from the checker: the pass criterion never from the
  file checked, zero compared values is not a pass, an unverified output is its own state, and like is
  compared with like (the ONNX reference at the candidate's optimisation level);
* "Every walk includes subgraphs" — counting, validating and folding go through ``io.walk``;
* one line, one error — onnxruntime's log lines, ShapeProp's tracebacks off the terminal; a model
  refusing its inputs is bad input (exit 2) in ``inspect`` and the API's ``verify`` as in ``convert``.
"""

from __future__ import annotations

import json
import re
import textwrap

import numpy as np
import onnx
import pytest
import torch
from bnfold_cli.app import app
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh
from test_bad_inputs import snapshot
from typer.testing import CliRunner

import bnfold
from bnfold.errors import BadInputError
from bnfold.onnx_pass.io import bn_count, walk
from bnfold.report import ConvertReport, config_table, markdown_summary
from bnfold.verification.compare import compare_outputs

runner = CliRunner()

MODELS = textwrap.dedent("""
    import torch
    from torch import nn

    def _seeded(seed):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3))
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
        return m

    def good():
        return _seeded(0)

    def other():
        return _seeded(1)

    def nan_weights():
        m = _seeded(0)
        with torch.no_grad():
            m[0].weight[0, 0, 0, 0] = float("nan")
        return m

    class Optional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)
        def forward(self, x, scale=None):
            y = self.bn(self.conv(x))
            return y if scale is None else y * scale

    def optional():
        return Optional()
""")


@pytest.fixture
def ws(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models.py").write_text(MODELS)
    return tmp_path


def one_error(stderr: str) -> str:
    """The one error line of a failed run (and no traceback, no onnxruntime log line)."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith("bnfold: error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "[E:onnxruntime" not in stderr and "onnxruntime:" not in stderr.replace(lines[0], ""), stderr
    return lines[0]


# ------------------------------------------------------------------ §1 the verdict comes only from the checker
def test_verify_takes_no_tolerance_from_the_file(ws):
    """An artifact made with --atol 1000 does not pass against the wrong model: its recorded tolerance
    is not the pass criterion; the settings taken from the file are said (text and JSON)."""
    args = ["--input-shape", "1,1,8,8"]
    assert runner.invoke(app, ["convert", "models.py:good", *args, "-o", "m.onnx", "--atol", "1000", "-q"]).exit_code == 0
    assert json.loads({p.key: p.value for p in onnx.load("m.onnx").metadata_props}["bnfold.atol"]) == 1000
    before = snapshot(ws)
    res = runner.invoke(app, ["verify", "models.py:other", "m.onnx", *args, "--report", "r.json"])
    assert res.exit_code == 1, res.output
    out = " ".join(res.stdout.split())  # rich wraps long lines
    assert "FAILED" in out and "the file records atol 1000.0 from when it was made: not used" in out
    assert "from the file's provenance: " in out and "never the tolerance" in out
    d = json.loads((ws / "r.json").read_text())
    assert d["passed"] is False and "seed" in d["from_file"] and "atol" not in d["from_file"]
    assert d["verification"]["runs"][0]["outputs"][0]["atol"] < 1
    (ws / "r.json").unlink()
    assert snapshot(ws) == before
    # a tolerance the caller gives is used as given
    assert runner.invoke(app, ["verify", "models.py:other", "m.onnx", *args, "--atol", "1000"]).exit_code == 0


@pytest.mark.parametrize("outs", [[], [("output", np.zeros((1, 0), np.float32))],
                                  [("a", np.zeros((0,), np.float32)), ("b", np.zeros((2, 0), np.float32))]])
def test_zero_values_compared_is_not_a_pass(outs):
    got = compare_outputs(outs, [(n, a.copy()) for n, a in outs])
    assert got and not all(got) and "nothing" in got[0].problem


def test_an_empty_output_beside_compared_ones_passes():
    ref = [("a", np.zeros((1, 0), np.float32)), ("b", np.ones((2, 3), np.float32))]
    got = compare_outputs(ref, [(n, a.copy()) for n, a in ref])
    assert all(got) and [o.verdict for o in got] == ["empty", "tolerance"]


def test_an_empty_model_output_fails_and_writes_nothing(ws):
    """A model whose one output is empty (``x[:, :0]``) compares zero values: FAILED, nothing written."""
    nodes, inits = _bn("n", "X", "B")
    inits += [nh.from_array(np.array([0], np.int64), "zero"), nh.from_array(np.array([1], np.int64), "axis")]
    nodes.append(h.make_node("Slice", ["B", "zero", "zero", "axis"], ["Y"]))
    g = h.make_graph(nodes, "empty", [h.make_tensor_value_info("X", T.FLOAT, [1, 2, 4, 4])],
                     [h.make_tensor_value_info("Y", T.FLOAT, [1, 0, 4, 4])], inits)
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), str(ws / "e.onnx"))
    before = snapshot(ws)
    res = runner.invoke(app, ["convert", "e.onnx", "-o", "o.onnx", "--json"])
    d = json.loads(res.stdout)
    assert res.exit_code == 1 and d["passed"] is False and d["verification"]["runs"]
    assert all("zero values were compared" in o["problem"] for r in d["verification"]["runs"] for o in r["outputs"])
    assert snapshot(ws) == before


@pytest.mark.parametrize("factory", ["good", "nan_weights"])
def test_no_verify_is_written_not_verified(ws, factory):
    res = runner.invoke(app, ["convert", f"models.py:{factory}", "--input-shape", "1,1,8,8", "--no-verify", "-o", "a.onnx",
                              "--report", "r.json"])
    assert res.exit_code == 0 and "WRITTEN, NOT VERIFIED" in res.stdout and "PASSED" not in res.stdout, res.output
    d = json.loads((ws / "r.json").read_text())
    assert d["passed"] is None and d["verified"] is False and d["verification"] is None and d["exit_code"] == 0
    assert ConvertReport.from_dict(d) and (ws / "a.onnx").is_file()


def test_unverified_in_summaries():
    """Every reader of ``passed`` (batch table, GITHUB_STEP_SUMMARY, exit code) sees the third state."""
    rep = ConvertReport(model="m", output="m.onnx")
    rep.mark_unverified()
    assert rep and rep.exit_code == 0 and rep.to_dict()["passed"] is None
    entry = {"name": "m", "model": "m", "output": "m.onnx", "exit_code": 0, "report": rep.to_dict()}
    assert "written, not verified" in markdown_summary([entry]) and "passed" not in markdown_summary([entry]).split("\n")[-2]
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(config_table({"conversions": [entry]}, "c.toml"))
    assert "written, not verified" in console.export_text() and "PASSED" not in console.export_text()


def _qdq_model(path):
    """x → Q → DQ → Conv (int8 weights through DQ) → Q → DQ: onnxruntime fuses it into a QLinearConv at
    ORT_ENABLE_ALL, whose integer arithmetic rounds differently from the float graph."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array(np.array(0.02, np.float32), "xs"), nh.from_array(np.array(128, np.uint8), "xz"),
             nh.from_array(rng.integers(-100, 100, size=(16, 16, 3, 3)).astype(np.int8), "wq"),
             nh.from_array(np.array(0.01, np.float32), "ws"), nh.from_array(np.array(0, np.int8), "wz"),
             nh.from_array(np.array(0.0737, np.float32), "ys"), nh.from_array(np.array(128, np.uint8), "yz")]
    nodes = [h.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]), h.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             h.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"]), h.make_node("Conv", ["xd", "wd"], ["c"]),
             h.make_node("QuantizeLinear", ["c", "ys", "yz"], ["cq"]), h.make_node("DequantizeLinear", ["cq", "ys", "yz"], ["y"])]
    g = h.make_graph(nodes, "qdq", [h.make_tensor_value_info("x", T.FLOAT, [1, 16, 16, 16])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 16, 14, 14])], inits)
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), str(path))


def test_qdq_is_compared_like_with_like(ws):
    import onnxruntime as ort

    _qdq_model(ws / "qdq.onnx")
    x = np.random.default_rng(1).standard_normal((1, 16, 16, 16)).astype(np.float32)
    runs = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        runs.append(ort.InferenceSession(str(ws / "qdq.onnx"), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0])
    assert np.abs(runs[0] - runs[1]).max() > 0.01  # onnxruntime's own difference between its levels
    before = snapshot(ws)
    rep = bnfold.convert(str(ws / "qdq.onnx"), None, "out.onnx", providers=["cpu"])
    assert rep and rep.passed is True
    assert {r["graph_optimization"] for r in rep.verification["runs"]} == {"disable_all", "default"}
    assert set(snapshot(ws)) - set(before) == {"out.onnx"} and all(snapshot(ws)[k] == v for k, v in before.items())


# ------------------------------------------------------------------ §3 one traversal, subgraphs and functions
def _bn(prefix, x, y, var=None, const_nodes=False, mean=None):
    arrays = {"s": np.ones(2, np.float32) * 2, "b": np.ones(2, np.float32), "m": np.full(2, 0.5, np.float32) if mean is None else mean,
              "v": np.ones(2, np.float32) if var is None else var}
    if const_nodes:  # a function has no initializers: its constants are Constant nodes
        nodes = [h.make_node("Constant", [], [prefix + k], value=nh.from_array(a, prefix + k)) for k, a in arrays.items()]
        inits = []
    else:
        nodes, inits = [], [nh.from_array(a, prefix + k) for k, a in arrays.items()]
    nodes.append(h.make_node("BatchNormalization", [x] + [prefix + k for k in "sbmv"], [y], name=prefix + "bn"))
    return nodes, inits


def _hostile_onnx(path, *, then_var=None, fn_var=None, else_mean=None):
    """A main graph with an If whose two branches hold a BN each, and a call of a model-local function
    that holds a BN: 3 BatchNormalization nodes, none in the main graph."""
    vi = lambda n: h.make_tensor_value_info(n, T.FLOAT, [1, 2, 4, 4])
    nt, it = _bn("t", "X", "yt", then_var)
    ne, ie = _bn("e", "X", "ye", mean=else_mean)
    then_g, else_g = h.make_graph(nt, "then", [], [vi("yt")], it), h.make_graph(ne, "else", [], [vi("ye")], ie)
    fnodes, _ = _bn("f", "fx", "fy", fn_var, const_nodes=True)
    fn = h.make_function("local", "BnFn", ["fx"], ["fy"], fnodes, [h.make_opsetid("", 17)])
    nodes = [h.make_node("If", ["cond"], ["A"], then_branch=then_g, else_branch=else_g, name="if"),
             h.make_node("BnFn", ["A"], ["Y"], domain="local", name="call")]
    g = h.make_graph(nodes, "main", [vi("X")], [vi("Y")], [nh.from_array(np.array(True), "cond")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("local", 1)], functions=[fn])
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return m


def test_walk_sees_every_graph_like(tmp_path):
    m = _hostile_onnx(tmp_path / "h.onnx")
    import onnx_ir as ir

    for model in (m, ir.serde.deserialize_model(m)):  # one traversal, both representations
        assert sorted(w.prefix for w in walk(model)) == ["", "BnFn:", "if/else_branch/", "if/then_branch/"]
        assert bn_count(model) == 3


def test_report_counts_what_the_file_holds(ws):
    _hostile_onnx(ws / "h.onnx")
    res = runner.invoke(app, ["convert", "h.onnx", "-o", "o.onnx", "--json", "--keep-failed"])
    d = json.loads(res.stdout)
    assert len(d["folded"]) + len(d["unfolded"]) == 3 and d["fold"]["batchnorm_layers"] == 3
    assert d["export"]["batchnorm_nodes"] == bn_count(onnx.load(str(ws / "o.onnx")))
    assert d["export"]["batchnorm_nodes"] == 3 - len(d["folded"])


@pytest.mark.parametrize(("where", "bad", "node"), [("then_var", -1.0, "if/then_branch/tbn"), ("then_var", np.nan, "if/then_branch/tbn"),
                                                    ("fn_var", -1.0, "BnFn:fbn"), ("fn_var", np.inf, "BnFn:fbn"),
                                                    ("else_mean", np.nan, "if/else_branch/ebn")])
def test_statistics_checked_in_subgraphs_and_functions(ws, where, bad, node):
    _hostile_onnx(ws / "h.onnx", **{where: np.array([bad, 1], np.float32)})
    before = snapshot(ws)
    res = runner.invoke(app, ["convert", "h.onnx", "-o", "o.onnx"])
    assert res.exit_code == 2, res.output
    line = one_error(res.stderr)
    assert "invalid statistics" in line and f"'{node}'" in line
    assert snapshot(ws) == before


# ------------------------------------------------------------------ §8 one line, one error
def test_onnxruntime_log_lines_stay_off_stderr(ws, capfd):
    """A file onnxruntime cannot run: one line on stderr, not onnxruntime's coloured [E:onnxruntime:…]
    line before it (written by native code to fd 2, which capfd sees)."""
    g = h.make_graph([h.make_node("Reshape", ["x", "shape"], ["y"])], "bad", [h.make_tensor_value_info("x", T.FLOAT, [1, 2, 4, 4])],
                     [h.make_tensor_value_info("y", T.FLOAT, [5])], [nh.from_array(np.array([5], np.int64), "shape")])
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), str(ws / "bad.onnx"))
    before = snapshot(ws)
    res = runner.invoke(app, ["convert", "bad.onnx", "-o", "o.onnx"])
    assert res.exit_code == 2 and res.stdout == ""
    others = [ln for ln in res.stderr.splitlines() if not re.match(r"^ *(\d+h)?(\d+m)?\d+(\.\d)?s  \S", ln)]  # all but bnfold's progress lines
    assert "cannot run 'bad.onnx'" in one_error(res.stderr) and len(others) == 1, res.stderr
    native = capfd.readouterr().err
    assert "onnxruntime" not in native and "Reshape" not in native, native
    assert snapshot(ws) == before


def test_shape_propagation_prints_no_traceback(ws, capfd):
    """A model with an optional forward argument: torch.fx's ShapeProp fails and prints a traceback of
    its own; the plan is made with nothing of that on the terminal."""
    from models import optional

    plan = bnfold.inspect(optional(), torch.randn(1, 1, 8, 8))
    assert len(plan.folded) == 1
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ShapeProp" not in err, err


def test_inspect_refuses_a_shape_the_model_rejects(ws):
    before = snapshot(ws)
    res = runner.invoke(app, ["inspect", "models.py:good", "--input-shape", "1,3,8,8"])
    assert res.exit_code == 2 and res.stdout == ""
    assert "the model rejected example inputs of shape [1, 3, 8, 8]" in one_error(res.stderr)
    conv = runner.invoke(app, ["convert", "models.py:good", "--input-shape", "1,3,8,8", "-o", "o.onnx"])
    assert conv.exit_code == 2 and one_error(conv.stderr) == one_error(res.stderr)
    assert snapshot(ws) == before


def test_api_verify_raises_a_bnfold_error_for_rejected_inputs(ws):
    """The reference refuses the inputs before any session exists: BadInputError (exit 2), not RuntimeError."""
    from models import good

    g = h.make_graph([h.make_node("Identity", ["x"], ["y"])], "id", [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 3, 8, 8])])
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), str(ws / "m.onnx"))
    with pytest.raises(BadInputError) as e:
        bnfold.verify(good().eval(), "m.onnx", torch.randn(1, 3, 8, 8))
    assert e.value.exit_code == 2 and "the model rejected inputs of shape [1, 3, 8, 8]" in str(e.value)
