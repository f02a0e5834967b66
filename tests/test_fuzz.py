"""Property-based fuzzing of the parsers: they either parse or raise bnfold's typed errors."""

from __future__ import annotations

import string

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnfold.edges.data import load_batches
from bnfold.errors import BnfoldError
from bnfold.edges.load import parse_model_spec, parse_shape
from bnfold.onnx_pass.io import load_onnx

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(st.text(max_size=60))
def test_model_spec_parses_or_says_why(text):
    try:
        spec = parse_model_spec(text)
    except BnfoldError as err:
        assert str(err)
        return
    assert spec.kind in ("file", "module", "onnx")
    if spec.kind != "onnx":
        assert spec.attr and spec.attr.replace(".", "_").isidentifier()


@FAST
@given(st.lists(st.integers(min_value=1, max_value=4096), min_size=1, max_size=8), st.sampled_from([",", "x", ", "]))
def test_shape_roundtrip(dims, sep):
    assert parse_shape(sep.join(map(str, dims))) == tuple(dims)


@FAST
@given(st.text(alphabet=string.digits + ",x-+. abc", max_size=30))
def test_shape_parses_or_says_why(text):
    try:
        shape = parse_shape(text)
    except BnfoldError as err:
        assert "input shape" in str(err) or "empty" in str(err)
        return
    assert all(d > 0 for d in shape)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=4096), st.sampled_from([".npz", ".npy", ".pt"]))
def test_data_files_from_random_bytes(tmp_path, data, suffix):
    path = tmp_path / f"d{suffix}"
    path.write_bytes(data)
    try:
        batches = load_batches(str(path), 4)
    except BnfoldError:
        return
    assert batches  # a random file that parses must still give batches


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(min_value=0, max_value=6), min_size=1, max_size=4), st.integers(min_value=1, max_value=7),
       st.sampled_from(["float32", "float64", "int64", "float16"]))
def test_npz_arrays_batched(tmp_path, shape, batch, dtype):
    arr = np.ones(shape, dtype=dtype)
    path = tmp_path / "a.npz"
    np.savez(path, x=arr)
    try:
        batches = load_batches(str(path), batch)
    except BnfoldError as err:
        assert shape[0] == 0 or len(shape) == 0, err
        return
    assert sum(b.size for b in batches) == shape[0]
    assert all(b.size <= batch for b in batches)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=2048))
def test_onnx_loading_from_random_bytes(tmp_path, data):
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    with pytest.raises(BnfoldError):
        load_onnx(path)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(min_value=1, max_value=10_000))
def test_truncated_onnx_is_refused(tmp_path, cut):
    from onnx import helper, TensorProto

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    full = helper.make_model(g).SerializeToString()
    path = tmp_path / "t.onnx"
    path.write_bytes(full[: cut % len(full)])
    with pytest.raises(BnfoldError):
        load_onnx(path)
