"""Progress reporting: a tqdm bar on a terminal, plain lines otherwise, or nothing."""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["Progress"]


class Progress:
    """Progress over ``total`` units.

    Parameters
    ----------
    total : int
        Units of work.
    desc : str
        Label shown before the bar or line.
    mode : {"auto", "bar", "plain", "quiet"} or bool or None
        ``"auto"`` (or None/True) shows a bar with rate and ETA when stderr is a terminal and
        plain lines every ~10% otherwise; False or ``"quiet"`` prints nothing.
    unit : str
        Name of one unit, e.g. ``"pairs"``.
    """

    def __init__(self, total: int, desc: str, *, mode: Any = "auto", unit: str = "it") -> None:
        if mode is None or mode is True:
            mode = "auto"
        if mode is False:
            mode = "quiet"
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "plain"
        self.mode, self.total, self.desc, self.unit = mode, total, desc, unit
        self.done = 0
        self._start = time.perf_counter()
        self._next_report = 0.1
        self._bar: Any = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, smoothing=0.1)

    def update(self, n: int = 1) -> None:
        """Advance by ``n`` units."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "plain" and self.total and self.done / self.total >= self._next_report:
            while self._next_report <= self.done / self.total:
                self._next_report += 0.1
            elapsed = time.perf_counter() - self._start
            rate = self.done / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            print(f"{self.desc}: {self.done}/{self.total} {self.unit} "
                  f"({100 * self.done / self.total:.0f}%, {rate:.1f} {self.unit}/s, ETA {eta:.0f}s)",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        """Finish the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
