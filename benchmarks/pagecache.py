"""The page cache under a benchmark: warm a store before it is measured, or evict it.

This VM runs DAMON proactive reclaim (``/sys/kernel/mm/damon/admin/kdamonds/0``: action
``pageout`` for regions not accessed in 12 aggregation intervals of 5 s, i.e. about a minute,
up to 128 MiB a second): a store that no run touched for a minute is read from disk again
(about 490 MB/s here) in the next run's first epoch.  In a ``compare.py`` round the memmap
store is read by every memmap peer, one after the other, so it stays cached; the zarr store,
read by the streamseg zarr rows only, went cold between rounds.  :func:`warm` reads every file
of the stores a run reads, just before the run, so every pipeline starts on a warm page cache
(the conditions RESULTS.md states); :func:`evict` drops them (``POSIX_FADV_DONTNEED``) to
measure the cold start instead.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["evict", "files_under", "warm"]
_BLOCK = 1 << 22


def files_under(paths: list[str]) -> list[Path]:
    """Every regular file under ``paths`` (files or folders), sorted."""
    out: list[Path] = []
    for path in paths:
        p = Path(path)
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file()))
    return out


def warm(paths: list[str]) -> dict[str, float]:
    """Read every file under ``paths`` once (into the page cache); return bytes and seconds."""
    t0, total = time.perf_counter(), 0
    buf = bytearray(_BLOCK)
    for path in files_under(paths):
        with open(path, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    return {"bytes": float(total), "seconds": time.perf_counter() - t0}


def evict(paths: list[str]) -> dict[str, float]:
    """Drop every file under ``paths`` from the page cache (clean pages only; Linux/POSIX)."""
    t0, total = time.perf_counter(), 0
    for path in files_under(paths):
        fd = os.open(path, os.O_RDONLY)
        try:
            total += os.fstat(fd).st_size
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return {"bytes": float(total), "seconds": time.perf_counter() - t0}
