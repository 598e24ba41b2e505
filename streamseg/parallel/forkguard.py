"""Keep streamseg's own threads out of native code while a worker process is forked.

``fork`` copies only the calling thread; a lock that another thread held at that moment stays
held for good in the child.  OpenCV's thread pool and its per-thread state are guarded by such
locks, so a worker forked while a thread of the parent was inside ``cv2.warpAffine`` can hang
in its own first OpenCV call (seen once, in a CI run of the test suite: a forked worker asleep
in ``cv2.remap`` for good; thread workers of other datasets in that process may have been
augmenting at the time, the one explanation found, not reproduced on demand).

Producer calls that run in the main process (thread workers, inline production) hold
:meth:`ForkGuard.producing`; starting worker processes with ``fork`` holds
:meth:`ForkGuard.forking`, which waits for running producer calls to finish and holds new ones
back until the workers exist.  Threads that are not streamseg's are not covered: a program
that runs OpenCV in threads of its own should use ``start_method="forkserver"`` or ``"spawn"``.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

__all__ = ["FORK_GUARD", "ForkGuard"]


class ForkGuard:
    """A readers-writer lock: many producer calls at once, or one fork, never both.

    Forks take precedence (new producer calls wait while one is pending), and a fork waits at
    most ``timeout`` seconds for running calls, then goes ahead with a warning on stderr, so
    a producer call that blocks for long can delay worker start-up but never deadlock it.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        """Fresh state; also what a forked child starts from (it has only the forking thread)."""
        self._cond = threading.Condition()
        self._producing = 0
        self._forking = 0

    @property
    def producing_now(self) -> int:
        """Number of producer calls in progress."""
        return self._producing

    @contextmanager
    def producing(self) -> Iterator[None]:
        """Hold around a producer call made in this process."""
        with self._cond:
            self._cond.wait_for(lambda: self._forking == 0)
            self._producing += 1
        try:
            yield
        finally:
            with self._cond:
                self._producing -= 1
                self._cond.notify_all()

    @contextmanager
    def forking(self, timeout: float = 10.0) -> Iterator[None]:
        """Hold while forking worker processes."""
        with self._cond:
            self._forking += 1
            late = 0 if self._cond.wait_for(lambda: self._producing == 0, timeout) else self._producing
        if late:
            print(f"streamseg: {late} batch(es) still being produced in this process after "
                  f"{timeout:g} s; forking the workers anyway", file=sys.stderr)
        try:
            yield
        finally:
            with self._cond:
                self._forking -= 1
                self._cond.notify_all()


FORK_GUARD = ForkGuard()
"""The one guard of this process: forks and producer calls of every dataset must meet here."""

if hasattr(os, "register_at_fork"):  # a child forked mid-fork must not inherit a pending fork
    os.register_at_fork(after_in_child=FORK_GUARD._reset)
