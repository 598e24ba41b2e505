"""Conversion workers end when the converting process dies.

Pool workers block reading their task queue; if the parent is killed (``SIGKILL``, OOM
killer) nothing ever wakes them, and they would live on holding the caller's pipes (a
caller reading the converter's output hangs) and the destination's lock.  On Linux each
worker asks the kernel for ``SIGKILL`` when its parent dies (``prctl(PR_SET_PDEATHSIG)``),
then checks that the parent is still the expected process (it may have died before the
request was made).  Elsewhere, or if ``prctl`` is unavailable, a daemon thread polls the
parent; the converter also checks between chunks.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

__all__ = ["die_with_parent"]

_PR_SET_PDEATHSIG = 1
_POLL_S = 0.5


def _set_pdeathsig() -> bool:
    """Ask the kernel to SIGKILL this process when its parent thread exits (Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        ul = ctypes.c_ulong
        return libc.prctl(_PR_SET_PDEATHSIG, ul(signal.SIGKILL), ul(0), ul(0), ul(0)) == 0
    except (OSError, AttributeError):
        return False


def _watch(alive: Callable[[], bool]) -> None:
    while alive():
        time.sleep(_POLL_S)
    os._exit(1)


def die_with_parent(owner: int) -> Callable[[], bool]:
    """Make this worker end when the process ``owner`` (its parent) dies.

    Parameters
    ----------
    owner : int
        PID of the converting process that started the pool.

    Returns
    -------
    callable
        ``alive()``: whether the parent is still running (cheap; for checks between chunks).
    """
    parent = mp.parent_process()
    ppid = os.getppid()
    armed = ppid == owner and _set_pdeathsig()
    if armed and os.getppid() != owner:
        os._exit(1)  # the parent died just before the death signal was armed

    def alive() -> bool:
        if ppid == owner:  # fork or spawn: the owner is our parent, and re-parenting means it died
            return os.getppid() == owner
        # a fork server is our parent (or the owner died before we looked): the owner's sentinel
        return parent is not None and parent.is_alive()

    if not alive():
        os._exit(1)
    if not armed:  # no death signal (not Linux, or not the owner's child): poll instead
        threading.Thread(target=_watch, args=(alive,), name="streamseg-parent-watch", daemon=True).start()
    return alive
