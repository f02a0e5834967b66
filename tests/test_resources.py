"""The stage meter: time, RSS at the end, peak RSS per stage (bnfold._resources)."""

from __future__ import annotations

import resource
import sys
import time

import pytest

from bnfold import _resources
from bnfold._resources import StageMeter, stage

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
MB = 1024 * 1024


def _touch(n_mb: int) -> bytearray:
    buf = bytearray(n_mb * MB)
    for i in range(0, len(buf), 4096):  # make every page resident
        buf[i] = 1
    return buf


@linux
def test_new_process_peak_is_exact_hwm():
    _resources._reset_hwm()  # where permitted: the high-water mark drops to the RSS now
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


@linux
def test_peak_below_an_earlier_peak_is_sampled():
    big = _touch(160)
    del big  # the process high-water mark is now at least 160 MB above what follows
    with StageMeter(interval=0.005) as m:
        buf = _touch(48)
        time.sleep(0.05)  # hold it: the sampler must see it
        del buf
    d = m.to_dict()
    assert d["peak_method"] == "sampled"
    assert d["peak_rss_mb"] >= d["rss_mb"] + 40


@linux
def test_reset_mode_is_exact_and_process_peak_survives_it():
    if not _resources._reset_hwm():
        pytest.skip("/proc/self/clear_refs not writable here")
    big = _touch(200)
    del big
    high = _resources.process_peak_rss_mb()
    with StageMeter(reset_peak=True) as m:
        buf = _touch(32)
        del buf
    d = m.to_dict()
    assert d["peak_method"] == "hwm-reset"
    assert d["rss_mb"] + 25 <= d["peak_rss_mb"] < high - 100
    # ru_maxrss was reset with it (why reset is opt-in); the meter's process peak was not
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 < high - 100
    assert _resources.process_peak_rss_mb() >= high


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
    assert _resources.current_rss_mb() is None
    assert _resources.process_peak_rss_mb() > 0  # from getrusage


def test_sampler_thread_is_stopped():
    with StageMeter(interval=0.001):
        time.sleep(0.01)
    import threading

    assert not any(t.name == "bnfold-rss-sampler" for t in threading.enumerate())
