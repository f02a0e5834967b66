"""Loading: checkpoint wrappers and prefixes, every calibration data form, spec parsing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bnfold
from bnfold.edges.data import load_batches
from bnfold.errors import DataError, WeightsError
from bnfold.edges.load import load_model, parse_model_spec, read_checkpoint
from conftest import SAMPLE, SAMPLE_SPEC

SD = torch.load(SAMPLE / "weights.pt", weights_only=True)


@pytest.mark.parametrize("wrap", [
    lambda sd: {"state_dict": sd, "epoch": 3},
    lambda sd: {"model": sd, "optimizer": {"lr": 0.1}},
    lambda sd: {"model_state_dict": sd},
    lambda sd: {"module." + k: v for k, v in sd.items()},  # DDP
    lambda sd: {"state_dict": {"_orig_mod." + k: v for k, v in sd.items()}},  # torch.compile
])
def test_checkpoint_wrappers(tmp_path, wrap):
    path = tmp_path / "w.pt"
    torch.save(wrap(SD), path)
    sd = read_checkpoint(path)
    assert sd.keys() == SD.keys()
    m = load_model(SAMPLE_SPEC, path)
    assert torch.equal(m.conv1.weight, SD["conv1.weight"])


def test_safetensors_needs_its_package_or_loads(tmp_path):
    path = tmp_path / "w.safetensors"
    try:
        from safetensors.torch import save_file
    except ImportError:
        path.write_bytes(b"x")
        with pytest.raises(WeightsError, match="safetensors"):
            read_checkpoint(path)
        return
    save_file({k: v.contiguous() for k, v in SD.items()}, str(path))
    assert read_checkpoint(path).keys() == SD.keys()


def test_spec_forms(tmp_path):
    assert parse_model_spec("samples/digits/model.py:build").kind == "file"
    assert parse_model_spec("pkg.models:resnet").kind == "module"
    assert parse_model_spec("pkg.models:Factory.create").attr == "Factory.create"
    assert parse_model_spec("x/model.onnx").kind == "onnx"


def test_module_factory_spec():
    m = load_model("torchvision.models:resnet18")
    assert type(m).__name__ == "ResNet" and not m.training


X = np.random.default_rng(0).standard_normal((10, 1, 8, 8)).astype(np.float32)


def test_npy_and_npz(tmp_path):
    np.save(tmp_path / "x.npy", X)
    np.savez(tmp_path / "x.npz", x=X)
    for f in ("x.npy", "x.npz"):
        batches = load_batches(str(tmp_path / f), 4)
        assert [b.size for b in batches] == [4, 4, 2]
        assert torch.equal(batches[2].args[0], torch.from_numpy(X[8:]))


def test_pt_tensor_tuple_and_dict(tmp_path):
    t = torch.from_numpy(X)
    torch.save(t, tmp_path / "t.pt")
    torch.save((t, t[:, 0]), tmp_path / "tup.pt")
    torch.save({"x": t}, tmp_path / "d.pt")
    assert len(load_batches(str(tmp_path / "t.pt"), 5)) == 2
    assert len(load_batches(str(tmp_path / "tup.pt"), 5)[0].args) == 2
    d = load_batches(str(tmp_path / "d.pt"), 5)
    assert list(d[0].kwargs) == ["x"] and d[0].size == 5


def test_pt_with_pickled_objects_is_refused(tmp_path):
    torch.save({"x": torch.zeros(2), "meta": object()}, tmp_path / "p.pt")
    with pytest.raises(DataError, match="cannot read data file"):
        load_batches(str(tmp_path / "p.pt"), 2)


def test_module_fn_data_spec(tmp_path):
    (tmp_path / "calibdata.py").write_text(
        "import torch\n"
        "def batches():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    return [torch.randn(8, 1, 8, 8, generator=g) for _ in range(3)]\n"
    )
    batches = load_batches(f"{tmp_path / 'calibdata.py'}:batches")
    assert len(batches) == 3
    m = load_model(SAMPLE_SPEC, SAMPLE / "weights.pt")
    out = bnfold.calibrate(m, f"{tmp_path / 'calibdata.py'}:batches")
    assert int(out.bn1.num_batches_tracked) == int(m.bn1.num_batches_tracked) + 3
