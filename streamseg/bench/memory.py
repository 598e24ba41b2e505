"""Memory sampling that tells private memory from file-backed (memory-mapped) pages.

RSS counts pages of memory-mapped store files, which the kernel can drop at any time.
What grows with a leak is anonymous/private memory: USS and ``RssAnon``.  The sampler
reports both, for the main process and the summed PSS of its children (workers).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psutil

__all__ = ["memory_snapshot", "smaps_rollup", "MemorySampler"]


def _status_kib(pid: int, fields: tuple[str, ...]) -> dict[str, int]:
    out = {f: 0 for f in fields}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key = line.split(":", 1)[0]
                if key in out:
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def smaps_rollup(pid: int) -> dict[str, int]:
    """``/proc/PID/smaps_rollup`` in bytes (empty where the kernel lacks it or the process is gone).

    The kernel sums the mappings itself, so a sample costs well under a millisecond where
    ``psutil.Process.memory_full_info`` parses every mapping of ``/proc/PID/smaps`` in Python
    (~35 ms per process once TensorFlow is loaded, GIL held), which would slow the very loop
    being measured.
    """
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            rows = [line.split() for line in fh]
    except OSError:
        return {}
    return {r[0].rstrip(":"): int(r[1]) * 1024 for r in rows if len(r) == 3 and r[2] == "kB"}


def _uss(rollup: dict[str, int]) -> int:
    return rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0) + rollup.get("Private_Hugetlb", 0)


def memory_snapshot(proc: psutil.Process | None = None, rollups: dict[int, dict[str, int]] | None = None,
                    full: bool = True) -> dict[str, int]:
    """Bytes of ``rss``, ``uss``, ``rss_anon``, ``rss_file`` for a process and ``children_pss``.

    Parameters
    ----------
    proc : psutil.Process, optional
        The process (default: this one); ``children_pss`` sums its descendants.
    rollups : dict, optional
        Filled with each process's :func:`smaps_rollup`, by pid, for callers that want more.
    full : bool
        False: only ``rss``, ``rss_anon`` and ``rss_file`` from ``/proc/PID/status`` (tens of
        microseconds; the full snapshot walks page tables: ~15 ms of kernel time per process
        with TensorFlow loaded, during which the process cannot map or unmap memory).
    """
    proc = proc or psutil.Process()
    rollups = {} if rollups is None else rollups
    if not full:
        status = _status_kib(proc.pid, ("VmRSS", "RssAnon", "RssFile", "RssShmem"))
        return {"rss": status["VmRSS"], "rss_anon": status["RssAnon"],
                "rss_file": status["RssFile"] + status["RssShmem"]}
    snap = {"rss": 0, "uss": 0, "rss_anon": 0, "rss_file": 0, "children_pss": 0, "children": 0}
    main = rollups[proc.pid] = smaps_rollup(proc.pid)
    if main:
        snap["rss"], snap["uss"] = main.get("Rss", 0), _uss(main)
    else:  # no smaps_rollup (old kernel, not Linux): psutil's slower full scan
        try:
            full = proc.memory_full_info()
            snap["rss"], snap["uss"] = int(full.rss), int(full.uss)
        except psutil.Error:
            snap["rss"] = int(proc.memory_info().rss)
    status = _status_kib(proc.pid, ("RssAnon", "RssFile", "RssShmem"))
    snap["rss_anon"], snap["rss_file"] = status["RssAnon"], status["RssFile"] + status["RssShmem"]
    for child in proc.children(recursive=True):
        rollup = rollups[child.pid] = smaps_rollup(child.pid)
        try:
            pss = rollup["Pss"] if rollup else int(getattr(child.memory_full_info(), "pss", 0))
        except (KeyError, psutil.Error):
            continue
        snap["children_pss"] += pss
        snap["children"] += 1
    return snap


class MemorySampler:
    """Sample :func:`memory_snapshot` in a background thread and keep the peaks.

    Parameters
    ----------
    interval : float
        Seconds between samples of ``rss``, ``rss_anon`` and ``rss_file`` (cheap).
    full_every : int
        Every this many samples (and at start and stop) a full one, with USS and the
        children's PSS, which costs the sampled processes some kernel time.  Between
        :meth:`hold_full` and :meth:`release_full` only cheap samples are taken.
    """

    def __init__(self, interval: float = 0.25, full_every: int = 8) -> None:
        self.interval = interval
        self.full_every = max(1, int(full_every))
        self.peaks: dict[str, int] = {}
        self.samples = 0
        self.full_samples = 0
        self.cpu_percent: float | None = None
        self._stop = threading.Event()
        self._full_ok = threading.Event()
        self._full_ok.set()
        self._lock = threading.Lock()  # the sampling thread and hold/release both take samples
        self._thread: threading.Thread | None = None
        self._proc = psutil.Process()

    def _take(self, full: bool = True) -> None:
        self._record(memory_snapshot(self._proc, full=full), full)

    def _record(self, snap: dict[str, int], full: bool) -> None:
        with self._lock:
            for k, v in snap.items():
                self.peaks[k] = max(self.peaks.get(k, 0), v)
            self.samples += 1
            self.full_samples += bool(full)

    def _run(self) -> None:
        tick = 0
        while not self._stop.wait(self.interval):
            tick += 1
            self._take(full=tick % self.full_every == 0 and self._full_ok.is_set())

    def hold_full(self) -> None:
        """Take only cheap samples from now until :meth:`release_full`.

        For a timed stretch: a full sample walks the page tables of every sampled process
        (~15 ms of kernel time each, more with large file mappings), CPU that a small machine
        takes from the work being timed, and more of it the more processes a pipeline has.
        (No full sample is taken here: a pause of the caller just before the timing would let a
        pipeline fill its buffers and start the timed stretch ahead.)
        """
        self._full_ok.clear()

    def release_full(self) -> None:
        """Take a full sample now and let the periodic full samples resume."""
        self._full_ok.set()
        self._take(full=True)

    def start(self) -> "MemorySampler":
        """Start sampling."""
        self._take()
        psutil.cpu_percent(None)
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True, name="streamseg-memory")
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        """Stop sampling; return the peaks (bytes) and machine CPU utilisation (percent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._take()
        self.cpu_percent = psutil.cpu_percent(None)
        return {"peak": dict(self.peaks), "samples": self.samples, "full_samples": self.full_samples,
                "cpu_percent": self.cpu_percent}

    def __enter__(self) -> "MemorySampler":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
