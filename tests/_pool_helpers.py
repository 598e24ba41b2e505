"""Picklable producers for tests/test_pool.py (importable by spawn/forkserver children)."""

from __future__ import annotations

import os
import time

import numpy as np

ROWS = 4
SLOTS = {"x": ((ROWS, 3, 5), np.float32), "y": ((ROWS, 2), np.int32)}


def expected(i: int, n: int = ROWS) -> dict[str, np.ndarray]:
    """What ``Producer.produce(Task(i, n))`` writes, computed in-process."""
    x = (np.arange(n * 15, dtype=np.float32).reshape(n, 3, 5) + 1000 * i) / 7
    y = np.stack([np.full(n, i, np.int32), np.arange(n, dtype=np.int32)], axis=1)
    return {"x": x, "y": y}


class Producer:
    """Deterministic producer; tasks are ``(i, n, sleep_s, fail)`` tuples."""

    def __init__(self) -> None:
        self.setups = 0

    def setup(self) -> None:
        self.setups += 1

    def produce(self, task: tuple, out: dict[str, np.ndarray]) -> int:
        i, n, sleep, fail = task
        if sleep:
            time.sleep(sleep)
        if fail:
            raise ValueError(f"bad sample {i} (pid {os.getpid()})")
        for name, arr in expected(i, n).items():
            out[name][:n] = arr
        if n < ROWS:  # garbage after the valid rows must never leak into results
            out["x"][n:] = -1
        return n


def task(i: int, n: int = ROWS, sleep: float = 0.0, fail: bool = False) -> tuple:
    return (i, n, sleep, fail)


class ThreadsReporter:
    """Runs ``inner.setup_process`` as a worker process would, then reports OpenCV's thread
    count and whether the hook ran in this process; slots: ``THREADS_SLOTS``."""

    def __init__(self, inner: object | None = None) -> None:
        self.inner = inner
        self.ran_in = 0  # pid of the process setup_process ran in

    def setup_process(self) -> None:
        self.ran_in = os.getpid()
        if self.inner is not None:
            self.inner.setup_process()

    def produce(self, task: object, out: dict[str, np.ndarray]) -> int:
        import cv2

        out["v"][0] = (cv2.getNumThreads(), self.ran_in, os.getpid())
        return 1


THREADS_SLOTS = {"v": ((1, 3), np.int64)}
