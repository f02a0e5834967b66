"""The stage meter: time, RSS at the end, peak RSS per stage (bnfold.edges.resources)."""

from __future__ import annotations

import sys
import time

import pytest

from bnfold.edges import resources as _resources
from bnfold.edges.resources import StageMeter, stage

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
MB = 1024 * 1024


def _fresh(body: str) -> None:
    """Run ``body`` in a new interpreter: RSS figures mean nothing in a process whose heap already
    holds freed, still-resident memory from earlier tests (a new buffer may reuse it)."""
    import os
    import subprocess

    code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import pytest, test_resources as t\n"
            f"try:\n    t.{body}()\nexcept pytest.skip.Exception as e:\n    print(e); sys.exit(77)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if res.returncode == 77:
        pytest.skip(res.stdout.strip())
    assert res.returncode == 0, res.stdout + res.stderr


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS as a caller may (Linux >= 4.0, where permitted): True when it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _touch(n_mb: int) -> bytearray:
    buf = bytearray(n_mb * MB)
    for i in range(0, len(buf), 4096):  # make every page resident
        buf[i] = 1
    return buf


def _body_new_process_peak_is_exact_hwm():
    _reset_hwm()  # where permitted: the high-water mark drops to the RSS now
    rss, hwm = _resources._status()
    if hwm - rss > 200 * MB:
        pytest.skip("an earlier peak is far above the RSS and clear_refs is not writable")
    with StageMeter() as m:
        buf = _touch((hwm - rss) // MB + 64)  # more than the high-water mark: a new process peak
        del buf
    d = m.to_dict()
    assert d["peak_method"] == "hwm"
    assert d["peak_rss_mb"] >= hwm / MB + 60
    # the memory was freed inside the stage: the end RSS is well below the peak
    assert d["rss_mb"] < d["peak_rss_mb"] - 40
    assert d["seconds"] > 0


def _body_peak_below_an_earlier_peak_is_sampled():
    big = _touch(160)
    del big  # the process high-water mark is now at least 160 MB above what follows
    with StageMeter(interval=0.005) as m:
        buf = _touch(48)
        time.sleep(0.05)  # hold it: the sampler must see it
        del buf
    d = m.to_dict()
    assert d["peak_method"] == "sampled"
    assert d["peak_rss_mb"] >= d["rss_mb"] + 40


def _body_process_peak_survives_a_reset_by_the_caller():
    big = _touch(200)
    del big
    high = _resources.process_peak_rss_mb()
    if not _reset_hwm():
        pytest.skip("/proc/self/clear_refs not writable here")
    assert _resources._status()[1] < high * MB - 100 * MB  # the kernel's high-water mark went down
    with StageMeter() as m:
        buf = _touch(32)
        del buf
    d = m.to_dict()
    assert d["rss_mb"] + 25 <= d["peak_rss_mb"] < high - 100  # the 32 MB touched inside, not the earlier peak
    assert _resources.process_peak_rss_mb() >= high  # the meter's process peak is kept


@linux
def test_new_process_peak_is_exact_hwm():
    _fresh("_body_new_process_peak_is_exact_hwm")


@linux
def test_peak_below_an_earlier_peak_is_sampled():
    _fresh("_body_peak_below_an_earlier_peak_is_sampled")


@linux
def test_process_peak_survives_a_reset_by_the_caller():
    _fresh("_body_process_peak_survives_a_reset_by_the_caller")


def test_stage_records_on_error_and_keeps_timings_shape():
    timings, res = {}, {}
    with pytest.raises(ValueError):
        with stage("boom", timings, res):
            time.sleep(0.01)
            raise ValueError("x")
    assert set(timings) == {"boom"} and isinstance(timings["boom"], float) and timings["boom"] >= 0.009
    assert set(res["boom"]) == {"seconds", "rss_mb", "peak_rss_mb", "peak_method"}
    assert res["boom"]["seconds"] == timings["boom"]


def test_without_proc_falls_back_to_ru_maxrss(monkeypatch):
    monkeypatch.setattr(_resources, "_STATUS", "/nonexistent/status")
    monkeypatch.setattr(_resources, "_STATM", "/nonexistent/statm")
    with StageMeter() as m:
        pass
    d = m.to_dict()
    assert d["rss_mb"] is None
    assert d["peak_method"] in (None, "ru_maxrss")  # ru_maxrss did not rise: unknown, not invented
    assert d["seconds"] >= 0
    assert _resources.process_peak_rss_mb() > 0  # from getrusage


def test_sampler_thread_is_stopped():
    with StageMeter(interval=0.001):
        time.sleep(0.01)
    import threading

    assert not any(t.name == "bnfold-rss-sampler" for t in threading.enumerate())


# ------------------------------------------------------------------ memory-lean convert (issue 17)
def test_streamed_write_is_byte_identical(tmp_path):
    """save_onnx writes one initializer at a time; the bytes equal SerializeToString(deterministic=True)
    for an exported model with metadata, value_info, functions and several initializers."""
    import io

    import onnx
    import torch
    from torch import nn

    from bnfold.onnx_pass.export import export_proto
    from bnfold.onnx_pass.io import write_streamed

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    proto = export_proto(m, (torch.randn(1, 3, 8, 8),), optimize=False)
    proto.metadata_props.add(key="bnfold.test", value="x")
    proto.graph.value_info.add().name = "extra"
    proto.functions.add().name = "f"
    assert len(proto.graph.initializer) >= 4
    buf = io.BytesIO()
    write_streamed(proto, buf)
    assert buf.getvalue() == proto.SerializeToString(deterministic=True)
    again = onnx.ModelProto()
    again.ParseFromString(buf.getvalue())
    assert again == proto


def test_convert_of_a_spec_folds_in_place_and_reports_stage_memory(tmp_path):
    """A model bnfold built from a spec is folded in place (its reference outputs are taken first, in a
    'reference' stage), and so is one copy of a model passed in (which never changes); every stage
    reports time and RSS; the result is the same for both."""
    import torch

    import bnfold
    from bnfold.edges.load import load_model, parse_model_spec

    spec, w = "samples/digits/model.py:build", "samples/digits/weights.pt"
    a = bnfold.convert(spec, None, tmp_path / "a.onnx", weights=w, input_shape="1,1,8,8", providers="cpu")
    user = load_model(parse_model_spec(spec), w)
    before = {k: v.clone() for k, v in user.state_dict().items()}
    b = bnfold.convert(user, torch.randn(1, 1, 8, 8), tmp_path / "b.onnx", providers="cpu")
    assert a.passed and b.passed
    assert "reference" in a.timings and "reference" in b.timings  # the user's model: copied once, the copy folded
    assert user.state_dict().keys() == before.keys() and all(torch.equal(user.state_dict()[k], v) for k, v in before.items())
    assert any(r["target"] == "folded-module" for r in a.verification["runs"])
    for stage_name in ("check_inputs", "fold", "export", "verify"):
        st = a.resources["stages"][stage_name]
        assert st["seconds"] >= 0 and st["rss_mb"] > 0 and st["peak_rss_mb"] >= st["rss_mb"] - 1
    assert a.resources["peak_rss_mb"] >= max(s["peak_rss_mb"] for s in a.resources["stages"].values()) - 1
    assert a.export["sha256"] == b.export["sha256"] or a.export["batchnorm_nodes"] == b.export["batchnorm_nodes"] == 0


def test_collect_new_only_sees_new_garbage_and_gives_the_old_objects_back():
    """Inside ``collect_new_only`` a collection walks only what the block made (issue 26): a cycle
    made inside is collected there; objects from before are frozen for the block and unfrozen after;
    a caller's own freeze is left alone."""
    import gc
    import weakref

    from bnfold.edges.resources import collect_new_only

    class Node:
        pass

    def cycle():
        a, b = Node(), Node()
        a.other, b.other = b, a
        return weakref.ref(a)

    old = cycle()  # garbage from before the block: frozen inside, collected after
    assert gc.get_freeze_count() == 0
    with collect_new_only():
        assert gc.get_freeze_count() > 0
        new = cycle()
        gc.collect()
        assert new() is None and old() is not None
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert old() is None
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with collect_new_only():
            assert gc.get_freeze_count() == frozen
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
