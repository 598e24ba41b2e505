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

__all__ = ["memory_snapshot", "MemorySampler"]


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


def memory_snapshot(proc: psutil.Process | None = None) -> dict[str, int]:
    """Bytes of ``rss``, ``uss``, ``rss_anon``, ``rss_file`` for a process and ``children_pss``."""
    proc = proc or psutil.Process()
    snap = {"rss": 0, "uss": 0, "rss_anon": 0, "rss_file": 0, "children_pss": 0, "children": 0}
    try:
        full = proc.memory_full_info()
        snap["rss"], snap["uss"] = int(full.rss), int(full.uss)
    except (psutil.Error, AttributeError):
        snap["rss"] = int(proc.memory_info().rss)
    status = _status_kib(proc.pid, ("RssAnon", "RssFile", "RssShmem"))
    snap["rss_anon"], snap["rss_file"] = status["RssAnon"], status["RssFile"] + status["RssShmem"]
    for child in proc.children(recursive=True):
        try:
            snap["children_pss"] += int(getattr(child.memory_full_info(), "pss", 0))
            snap["children"] += 1
        except psutil.Error:
            continue
    return snap


class MemorySampler:
    """Sample :func:`memory_snapshot` in a background thread and keep the peaks.

    Parameters
    ----------
    interval : float
        Seconds between samples.
    """

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.peaks: dict[str, int] = {}
        self.samples = 0
        self.cpu_percent: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc = psutil.Process()

    def _take(self) -> None:
        snap = memory_snapshot(self._proc)
        for k, v in snap.items():
            self.peaks[k] = max(self.peaks.get(k, 0), v)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._take()

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
        return {"peak": dict(self.peaks), "samples": self.samples, "cpu_percent": self.cpu_percent}

    def __enter__(self) -> "MemorySampler":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
