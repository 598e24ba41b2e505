"""Main-process side of batch production: inline, threads, or a warm process pool.

The :class:`Feeder` owns at most one :class:`~streamseg.parallel.pool.BatchPool` and keeps it
across epochs.  Each request names the batch it wants plus the batches likely to follow,
which are submitted ahead (up to ``max_queue_size``).  Guesses that turn out wrong are
dropped.  The pool is shut down by :meth:`Feeder.close`, or ``keep_alive`` seconds after
the end of an epoch when no new batch is asked for (Keras gives a dataset no signal at
the end of ``fit``).
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import sys
import threading
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import numpy as np

from .buffers import BufferRecycler
from .forkguard import FORK_GUARD
from .pool import BatchPool

__all__ = ["Feeder", "in_daemonic_process"]


def in_daemonic_process() -> bool:
    """Whether this process is a daemonic ``multiprocessing`` child, which may not start
    processes of its own (a worker of a ``multiprocessing.Pool``, e.g. of Keras's own
    ``PyDatasetAdapter`` with ``use_multiprocessing=True``)."""
    return bool(mp.current_process().daemon)


@functools.lru_cache(maxsize=None)
def _say_inline(pid: int) -> None:
    """Tell once per process (cached by pid) that worker processes are replaced by inline work."""
    print(f"streamseg: process {pid} ({mp.current_process().name}) is a daemonic process, which may "
          "not start worker processes (e.g. a worker of Keras's own PyDatasetAdapter or of a "
          "multiprocessing.Pool): producing batches inline, in the calling thread", file=sys.stderr)


class Feeder:
    """Produce batches through a producer, possibly in worker processes or threads.

    Parameters
    ----------
    producer : BatchProducer-like
        Picklable object with ``setup()`` and ``produce(task, out) -> n``.
    slots : dict
        ``name -> (shape, dtype)`` of one batch (shape includes the batch dimension).
    workers : int
        Worker count: processes with ``use_multiprocessing``, else threads; 0 produces
        inline, in the calling thread.
    use_multiprocessing : bool
        Processes (shared-memory handover) instead of threads.
    max_queue_size : int
        Batches produced ahead of the one asked for, at most ``2 * workers`` (more only
        costs memory: each batch slot holds a whole float32 batch).
    start_method : str or None
        ``"fork"``, ``"forkserver"``, ``"spawn"`` or None for the platform default.
    keep_alive : float
        Seconds the pool stays up after an epoch ends without a new request.
    on_close : weakref.WeakMethod, optional
        Called (if still alive) whenever the pool is closed.
    priority : {"normal", "low", "idle"}
        Scheduling priority of worker processes.
    affinity : callable, optional
        ``affinity(key) -> group`` for :class:`~streamseg.parallel.pool.BatchPool`.
    """

    LEND = 6
    """Batches handed out in place (no copy out of their slot) at once.  Under ``fit`` up to 4
    are alive together: the one the model works on, the previous step's until TensorFlow lets
    it go, the one in tf.data's prefetch buffer and the one being handed over (counted at every
    lend, RESULTS.md 13h; 5 while a pass kept its carry batch referenced); two more are a
    margin.  More are copied (6-15 ms for a 32x256x256x3 float32 batch, once 120 ms, in the
    gap before a step: with 4, 16-22 of 192 batches of a timeline run were copied).  Each costs
    one more slot of shared memory."""

    def __init__(self, producer: Any, slots: dict[str, tuple[tuple[int, ...], np.dtype]], *,
                 workers: int, use_multiprocessing: bool, max_queue_size: int,
                 start_method: str | None, keep_alive: float, on_close: Any = None,
                 priority: str = "normal", affinity: Callable[[Hashable], Hashable | None] | None = None) -> None:
        self.producer = producer
        self.slots = slots
        self.workers = workers
        self.use_multiprocessing = use_multiprocessing
        self.ahead = max(1, min(max_queue_size, 2 * max(1, workers)))
        self.start_method = start_method
        self.keep_alive = keep_alive
        self.priority = priority
        self.affinity = affinity
        self._pid = os.getpid()
        self._pool: BatchPool | None = None
        self._lock = threading.RLock()
        self._defer_lock = threading.Lock()  # guards _waiting and _deferred (never held long)
        self._waiting = 0  # fetches holding _lock while they wait for a worker's result
        self._deferred: tuple[Callable[[Hashable], bool] | None] | None = None
        self._timer: threading.Timer | None = None
        self.buffers = BufferRecycler()
        self.on_close = on_close
        self._inline_pid: int | None = None  # the process that ran the producer's setup_inline

    @property
    def inline(self) -> bool:
        """True when batches are produced in the calling thread: with no workers, or worker
        processes asked for inside a daemonic process (said once per process on stderr)."""
        if self.workers <= 0 and not self.use_multiprocessing:
            return True
        if self.use_multiprocessing and in_daemonic_process():
            _say_inline(os.getpid())
            return True
        return False

    def _check_process(self) -> None:
        """In a child forked from the process that made this feeder (a worker of Keras's own
        pool, say), forget the parent's pool, timer and locks: they belong to the parent, and a
        lock one of its threads held at the fork would stay held here for good."""
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._lock = threading.RLock()
            self._defer_lock = threading.Lock()
            self._waiting, self._deferred = 0, None
            self._pool = None  # never closed from here: the parent's workers are its own
            self._timer = None
            self.buffers = BufferRecycler()

    @property
    def pool(self) -> BatchPool | None:
        """The live pool, if any."""
        return self._pool

    def _produce_inline(self, task: Any) -> dict[str, np.ndarray]:
        if self._inline_pid != os.getpid():
            self._inline_pid = os.getpid()
            setup = getattr(self.producer, "setup_inline", None)
            if setup is not None:
                setup()
        out = {name: self.buffers.empty(shape, dtype) for name, (shape, dtype) in self.slots.items()}
        with FORK_GUARD.producing():  # no fork of another dataset's workers meanwhile
            n = self.producer.produce(task, out)
        return {name: arr[:n] for name, arr in out.items()}

    def _ensure_pool(self) -> BatchPool:
        if self._pool is None or self._pool.closed:
            self._pool = BatchPool(self.producer, self.slots, workers=max(1, self.workers),
                                   use_processes=self.use_multiprocessing,
                                   num_slots=self.ahead + 1 + self.LEND, start_method=self.start_method,
                                   lend=self.LEND, allocate=self.buffers.empty, priority=self.priority,
                                   affinity=self.affinity)
        return self._pool

    def fetch(self, key: Hashable, task: Any, upcoming: Iterable[tuple[Hashable, Any]] = (), *,
              start: bool = True, lend: bool = True) -> dict[str, np.ndarray] | None:
        """Return the batch ``key`` (computing ``task``), scheduling ``upcoming`` ahead.

        Parameters
        ----------
        key : hashable
            Identity of the batch, e.g. ``(epoch, index)``.
        task : object
            What the producer needs to build it.
        upcoming : iterable of (key, task)
            Batches likely to be asked for next, in order.
        start : bool
            Start the pool if it is not running; if False, return None instead.
        lend : bool
            Allow the batch to be lent in place from its slot (else it is copied out).
        """
        self._check_process()
        if self.inline:
            return self._produce_inline(task)
        with self._lock:
            if not start and (self._pool is None or self._pool.closed):
                return None
            self._cancel_timer()
            pool = self._ensure_pool()
            wanted: list[tuple[Hashable, Any]] = [(key, task)]
            for item in upcoming:
                if len(wanted) >= self.ahead:
                    break
                wanted.append(item)
            wanted_keys = {k for k, _ in wanted}
            for stale in pool.pending() - wanted_keys:
                pool.discard(stale)
            pending = pool.pending()
            for k, t in wanted:
                if k not in pending:
                    pool.submit(k, t)
            with self._defer_lock:
                self._waiting += 1
            try:  # under the lock: a concurrent caller must not drop this key meanwhile
                return pool.result(key, lend=lend)
            except BaseException:
                self.close()
                raise
            finally:
                with self._defer_lock:
                    self._waiting -= 1
                    deferred, self._deferred = self._deferred, None
                if deferred is not None and self._pool is not None and not self._pool.closed:
                    self._finish_epoch(deferred[0])

    def epoch_finished(self, keep: Callable[[Hashable], bool] | None = None, *, defer: bool = False) -> None:
        """Drop work ahead and close the pool after ``keep_alive`` seconds of silence.

        Parameters
        ----------
        keep : callable, optional
            ``keep(key)`` is true for pending batches to keep (e.g. the first batches of
            the next epoch, produced ahead across the epoch boundary).
        defer : bool
            If another thread's :meth:`fetch` is waiting for a result (the hand-over thread
            collecting the next epoch's first batch), leave this to that fetch, which does it
            as soon as its result is in, instead of waiting for it (``on_epoch_end`` would
            otherwise block the training loop for a whole batch: 40-120 ms at full speed).
        """
        if sys.is_finalizing():  # no new threads at interpreter exit; the pool's finalizer cleans up
            return
        self._check_process()
        if defer:
            with self._defer_lock:
                if self._waiting:
                    self._deferred = (keep,)
                    return
        with self._lock:
            if self._pool is not None and not self._pool.closed:
                self._finish_epoch(keep)

    def _finish_epoch(self, keep: Callable[[Hashable], bool] | None) -> None:
        """:meth:`epoch_finished`'s work, with ``_lock`` held and the pool open."""
        assert self._pool is not None
        for key in self._pool.pending():
            if keep is None or not keep(key):
                self._pool.discard(key)
        self._cancel_timer()
        if self.keep_alive <= 0:
            self.close()
        else:
            self._timer = threading.Timer(self.keep_alive, self.close)
            self._timer.daemon = True
            self._timer.start()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        """Stop the workers and free shared memory now (idempotent)."""
        self._check_process()
        with self._lock:
            self._cancel_timer()
            if self._pool is not None:
                self._pool.close()
                self._pool = None
            self.buffers.clear()
            callback = self.on_close() if self.on_close is not None else None
            if callback is not None:
                callback()
