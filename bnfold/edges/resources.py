"""Stage meter: wall time, resident memory at the end and peak resident memory of each stage.

Standard library only (no psutil). On Linux the numbers come from ``/proc/self/status``:
``VmRSS`` (resident now) and ``VmHWM`` (the process's resident high-water mark).

How a stage's peak is found, without touching the process's own high-water mark:

* when ``VmHWM`` rose during the stage, the stage set a new process peak and that value is exact
  (``peak_method: "hwm"``);
* otherwise the stage stayed below an earlier peak; a daemon thread samples ``/proc/self/statm``
  every ``interval`` seconds during the stage and the largest sample (or the RSS at the start or the
  end, whichever is larger) is reported (``peak_method: "sampled"``: a lower bound that can miss a
  spike shorter than the interval).

The meter never resets ``VmHWM`` (``/proc/self/clear_refs``): the reset is process-wide and also
resets what ``getrusage(...).ru_maxrss``, ``/usr/bin/time -v`` and a parent's ``RUSAGE_CHILDREN``
report, and a library must not falsify its caller's own memory measurement. Should the caller reset
it, ``process_peak_rss_mb()`` keeps the highest ``VmHWM`` it has read.

Elsewhere (macOS, BSD) only ``resource.getrusage`` exists: the peak is reported when the stage
raised ``ru_maxrss`` (``"ru_maxrss"``), otherwise None; the RSS at the end is None. Without
``resource`` (Windows) memory fields are None and only the time is measured.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Iterator

_STATUS = "/proc/self/status"
_STATM = "/proc/self/statm"
_MB = 1024 * 1024

try:
    _PAGE = os.sysconf("SC_PAGE_SIZE")
except (AttributeError, ValueError, OSError):  # pragma: no cover - non-POSIX
    _PAGE = 4096

_seen_peak = 0  # bytes: the highest VmHWM read so far (process-wide, for process_peak_rss_mb)
_lock = threading.Lock()


def _status() -> tuple[int | None, int | None]:
    """(VmRSS, VmHWM) in bytes from /proc/self/status, or (None, None) where it does not exist."""
    try:
        with open(_STATUS, "rb") as f:
            text = f.read()
    except OSError:
        return None, None
    rss = hwm = None
    for line in text.splitlines():
        if line.startswith(b"VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith(b"VmHWM:"):
            hwm = int(line.split()[1]) * 1024
    return rss, hwm


def _statm_rss() -> int | None:
    try:
        with open(_STATM, "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def _ru_maxrss() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return v if sys.platform == "darwin" else v * 1024  # macOS: bytes; Linux, BSD: KiB


def _note_peak(hwm: int | None) -> None:
    global _seen_peak
    if hwm is not None:
        with _lock:
            _seen_peak = max(_seen_peak, hwm)


def process_peak_rss_mb() -> float | None:
    """The process's peak resident memory so far (MB), including peaks before any reset."""
    hwm = _status()[1]
    if hwm is None:
        hwm = _ru_maxrss()
        return None if hwm is None else hwm / _MB
    _note_peak(hwm)
    return _seen_peak / _MB


class _Sampler(threading.Thread):
    def __init__(self, interval: float):
        super().__init__(name="bnfold-rss-sampler", daemon=True)
        self.interval = interval
        self.peak = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            rss = _statm_rss()
            if rss is not None:
                self.peak = max(self.peak, rss)
            if self._stop_event.wait(self.interval):
                return

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


class StageMeter:
    """Context manager measuring one stage; read ``to_dict()`` afterwards.

    >>> with StageMeter() as m:
    ...     work()
    >>> m.to_dict()   # {"seconds": .., "rss_mb": .., "peak_rss_mb": .., "peak_method": ..}
    """

    def __init__(self, *, interval: float = 0.01):
        self.interval = interval
        self.seconds: float | None = None
        self.rss_mb: float | None = None
        self.peak_rss_mb: float | None = None
        self.peak_method: str | None = None
        self._sampler: _Sampler | None = None

    def __enter__(self) -> "StageMeter":
        rss, hwm = _status()
        self._linux = hwm is not None
        self._rss0, self._hwm0 = rss, hwm if self._linux else _ru_maxrss()
        if self._linux:
            self._sampler = _Sampler(self.interval)
            self._sampler.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t0
        sampled = self._sampler.stop() if self._sampler is not None else 0
        self._sampler = None
        if self._linux:
            rss, hwm = _status()
            _note_peak(hwm)
            self.rss_mb = rss / _MB
            if hwm > self._hwm0:
                self.peak_rss_mb, self.peak_method = hwm / _MB, "hwm"
            else:
                self.peak_rss_mb, self.peak_method = max(sampled, self._rss0, rss) / _MB, "sampled"
        else:
            hwm = _ru_maxrss()
            if hwm is not None and self._hwm0 is not None and hwm > self._hwm0:
                self.peak_rss_mb, self.peak_method = hwm / _MB, "ru_maxrss"

    def to_dict(self, digits: int = 4) -> dict:
        def r(v, d):
            return None if v is None else round(v, d)

        return {"seconds": r(self.seconds, digits), "rss_mb": r(self.rss_mb, 1),
                "peak_rss_mb": r(self.peak_rss_mb, 1), "peak_method": self.peak_method}


@contextlib.contextmanager
def stage(name: str, timings: dict, resources: dict, **meter_kw) -> Iterator[StageMeter]:
    """Measure the ``with`` body as stage ``name``: ``timings[name]`` = seconds (as before) and
    ``resources[name]`` = ``StageMeter.to_dict()``. Recorded when the body raises, too."""
    meter = StageMeter(**meter_kw)
    try:
        with meter:
            yield meter
    finally:
        if meter.seconds is not None:
            timings[name] = round(meter.seconds, 4)
            resources[name] = meter.to_dict()


@contextlib.contextmanager
def collect_new_only() -> Iterator[None]:
    """Inside the block, the garbage collector looks only at objects made inside it.

    After torch, the exporter and onnxscript are imported a process tracks about half a million
    objects, and every full collection walks them all (0.24 s on this machine): four in a convert and
    the automatic ones during the export were a second of a ResNet-18 conversion. Whatever existed
    before the block (modules, the caller's model) is moved to the permanent generation
    (``gc.freeze``) and handed back at the end (``gc.unfreeze``), where a later collection sees it as
    before. A caller that froze objects itself keeps its own freeze: the block then does nothing."""
    import gc

    if gc.get_freeze_count():  # the caller's own freeze: unfreezing would undo it
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def return_freed_memory() -> None:
    """Collect the exporter's cycles and hand freed heap back to the OS (glibc keeps it otherwise):
    the onnxruntime sessions that follow then start from a lower RSS. Cheap inside
    ``collect_new_only``."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def weight_bytes(model) -> int:
    """Bytes of a module's parameters and buffers (what its weights take before the fold)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
