"""Persistent worker pool that hands batches over through shared-memory slots.

Unlike Keras' ``PyDataset`` multiprocessing (a new ``Pool`` every epoch, batches
pickled through a pipe, a hang when a worker dies), :class:`BatchPool` keeps its
workers, lets them write batches into preallocated slots and only sends
``(ticket, n)`` messages back: a batch is then lent in place from its slot, or copied
out once.  The workers themselves live in :mod:`streamseg.parallel.workers`.
"""

from __future__ import annotations

import atexit
import os
import pickle
import threading
import time
import weakref
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Hashable, Iterator, Mapping, Protocol

import numpy as np

from .buffers import aligned_empty, lend
from ..errors import OptionError, StreamsegError, WorkerDiedError, WorkerError
from .workers import ProcessBackend, ThreadBackend, check_priority, layout_slots

__all__ = ["BatchPool", "EXIT_GATE", "ExitGate", "Producer"]


class ExitGate:
    """Refuses new pools once the interpreter has begun to exit.

    Every pool is shut down by its ``weakref.finalize`` at exit; a pool created after those
    finalizers have run (a daemon thread, such as a dataset's hand-over thread fed by tf.data,
    asking for a batch while the main thread exits) would never be shut down: its workers
    orphaned and its shared memory left to the resource tracker's "leaked shared_memory
    objects" warning.  :meth:`close` runs from an ``atexit`` hook that runs before
    weakref's (registered after it), and waits for a pool being created meanwhile, whose
    finalizer is then registered in time.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        """Fresh state; also what a forked child starts from (another thread may hold the lock)."""
        self._lock = threading.Lock()
        self.closed = False

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Hold while creating a pool and registering its finalizer.

        Raises
        ------
        RuntimeError
            If the interpreter is exiting.
        """
        with self._lock:
            if self.closed:
                raise RuntimeError("the interpreter is exiting: no new BatchPool is started "
                                   f"(pid {os.getpid()})")
            yield

    def close(self) -> None:
        """Refuse new pools from now on (called at interpreter exit)."""
        with self._lock:
            self.closed = True


EXIT_GATE = ExitGate()
"""The one gate of this process (see :class:`ExitGate`)."""

# weakref.finalize registers its own exit hook with the first finalizer; make sure that has
# happened, so the hook below, registered after it, runs before it (atexit runs hooks last in,
# first out).  The finalizer on the gate itself does nothing.
weakref.finalize(EXIT_GATE, int)
atexit.register(EXIT_GATE.close)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=EXIT_GATE._reset)


class Producer(Protocol):
    """What the workers of a :class:`BatchPool` run (picklable for processes).

    ``setup``, ``setup_process`` and ``setup_inline`` are optional, and so is ``describe(task) -> str``: called
    in the main process only when a task fails or its worker dies, it says what the task was
    about (e.g. which samples of which file), for the error message.
    """

    def setup(self) -> None:
        """Prepare once in each worker, e.g. open files lazily."""

    def setup_process(self) -> None:
        """Process-wide settings, once in each worker *process* before ``setup`` (never for
        thread workers: they share the caller's process), e.g. a library's thread count."""

    def setup_inline(self) -> None:
        """Once in each process that produces batches inline, in the calling thread (no
        workers; a :class:`~streamseg.parallel.feeder.Feeder` calls it, not the pool): what
        ``setup`` would do that also suits that process, e.g. a cache, not a thread count."""

    def produce(self, task: Any, out: dict[str, np.ndarray]) -> int:
        """Fill ``out[name][:n]`` for ``task`` and return ``n`` (at most the slot rows)."""


class _SlotHold:
    """Alive while an array lent from a slot is; keeps the slot's segment mapped meanwhile."""

    __slots__ = ("shm", "__weakref__")

    def __init__(self, shm: Any) -> None:
        self.shm = shm


class _Entry:
    """Book-keeping of one submitted task."""

    __slots__ = ("key", "ticket", "task", "slot", "state", "n", "data", "error", "worker",
                 "discarded", "about", "group")

    def __init__(self, key: Hashable, ticket: int, task: Any, about: Any = None) -> None:
        self.key, self.ticket, self.task, self.slot, self.about = key, ticket, task, None, about
        self.state = "waiting"  # waiting (for a slot) -> queued -> done | failed
        self.n, self.data, self.error, self.worker, self.discarded = 0, None, None, None, False
        self.group: Hashable | None = None


class BatchPool:
    """Persistent pool of workers producing batches into reusable slots.

    Parameters
    ----------
    producer : Producer
        Pickled to each worker process (a top-level class under 'spawn' and
        'forkserver'), ``setup()`` once per worker; threads share it (``setup()``
        once, ``produce`` must be thread-safe).
    slots : Mapping[str, tuple[tuple[int, ...], numpy.dtype]]
        One slot's arrays, same batch dimension first, e.g.
        ``{"images": ((32, 256, 256, 3), np.float32), "masks": ((32, 256, 256, 1), np.int32)}``.
    workers : int
        Worker processes or threads; 0 runs ``produce`` synchronously in :meth:`result`.
    use_processes : bool
        Processes with shared-memory slots (True) or threads with numpy slots.
    num_slots : int
        Batches in production or finished-but-unclaimed at once; keep it >= ``workers``.
    start_method : str or None
        'fork', 'forkserver' or 'spawn'; None is the platform default.
    poll_interval : float
        Seconds between liveness checks (of the workers, and of the parent in them).
    name : str
        Prefix of the worker names and of the shared-memory segment.
    lend : int
        At most this many results are handed out as arrays on their slot's memory, with
        no copy; the slot returns to the pool once no array or view on it is left.  Other
        results are copied out.  Make ``num_slots`` larger by as much.
    allocate : callable, optional
        ``allocate(shape, dtype)`` gives the array a result is copied into (default: a
        fresh 64-byte aligned array, e.g. ``BufferRecycler.empty`` to reuse memory).
    priority : {"normal", "low", "idle"}
        Scheduling priority of worker processes (see :data:`streamseg.parallel.workers.PRIORITIES`);
        anything but "normal" needs ``use_processes=True`` and ``workers >= 1``.
    affinity : callable, optional
        ``affinity(key)`` names the group of a task (e.g. the window of chunks a batch reads):
        worker processes take the tasks of a group on one worker while it is not two tasks
        behind, else the least loaded one takes them (threads share one queue).

    Notes
    -----
    :meth:`submit` never blocks: with every slot busy the task waits in an
    internal backlog and goes to a worker when a slot frees. Use the pool from
    one thread. A failing ``produce`` raises :class:`~streamseg.errors.WorkerError`
    for that key only; a dead worker raises :class:`~streamseg.errors.WorkerDiedError`
    and closes the pool. Workers and shared memory never outlive :meth:`close`,
    the ``with`` block, garbage collection or interpreter exit; once the interpreter has
    begun to exit, a new pool raises ``RuntimeError`` (see :class:`ExitGate`).
    """

    def __init__(self, producer: Producer, slots: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                 *, workers: int = 1, use_processes: bool = True, num_slots: int = 4,
                 start_method: str | None = None, poll_interval: float = 0.1,
                 name: str = "streamseg", lend: int = 0,
                 allocate: Callable[..., np.ndarray] | None = None, priority: str = "normal",
                 affinity: Callable[[Hashable], Hashable | None] | None = None) -> None:
        if not callable(getattr(producer, "produce", None)):
            raise OptionError(f"producer needs a produce(task, out) method; got {producer!r}")
        if int(workers) < 0 or int(num_slots) < 1 or not poll_interval > 0:
            raise OptionError(f"need workers >= 0, num_slots >= 1 and poll_interval > 0; "
                              f"got {workers}, {num_slots}, {poll_interval}")
        check_priority(priority, bool(use_processes) and int(workers) > 0)  # 0 workers: synchronous
        fields, stride, self._rows = layout_slots(slots)
        self._poll, self._next_ticket, self._broken = float(poll_interval), 0, None
        self._allocate = allocate or aligned_empty
        self._lend_max, self._lent = max(0, int(lend)), set()
        self._returned: deque[int] = deque()  # lent slots given back, from any thread
        self._pending: dict[Hashable, _Entry] = {}  # by key, in submission order
        self._tickets: dict[int, _Entry] = {}  # sent to a worker and not reported yet
        self._backlog: deque[_Entry] = deque()
        self._free = list(range(int(num_slots)))[::-1]
        self._describe = getattr(producer, "describe", None)
        self._affinity = affinity  # key -> group: tasks of a group prefer one worker process
        with EXIT_GATE.admit():  # at exit: refused; else the finalizer is in place before exit
            if use_processes and workers > 0:
                self._backend: Any = ProcessBackend(producer, fields, stride, int(num_slots),
                                                     self._rows, int(workers), start_method,
                                                     self._poll, name, priority)
            else:
                self._backend = ThreadBackend(producer, fields, int(num_slots), self._rows,
                                               int(workers), name)
            self._finalizer = weakref.finalize(self, self._backend.shutdown)

    @property
    def workers(self) -> int:
        """Number of worker processes or threads (0: synchronous)."""
        return len(getattr(self._backend, "procs", None) or getattr(self._backend, "threads", []))

    @property
    def pids(self) -> list[int]:
        """Process ids of the worker processes (empty for threads)."""
        return [p.pid for p in getattr(self._backend, "procs", []) if p.pid is not None]

    @property
    def shm_names(self) -> list[str]:
        """Names of the shared-memory segments, one per slot (empty for threads)."""
        return [shm.name for shm in self._backend.shms]

    @property
    def closed(self) -> bool:
        """Whether the pool was closed (by :meth:`close` or after a worker died)."""
        return not self._finalizer.alive

    def submit(self, key: Hashable, task: Any) -> None:
        """Queue ``task`` under ``key``; it waits in a backlog while every slot is busy.

        Raises
        ------
        ValueError
            If ``key`` is already pending.
        """
        self._check_open()
        if key in self._pending:
            raise ValueError(f"key {key!r} is already pending; call result() or discard() first")
        about = task if self._describe is not None else None  # described only if it fails
        if self._backend.shms:  # pickle now: fail here, not in the feeder thread
            task = pickle.dumps(task, protocol=pickle.HIGHEST_PROTOCOL)
        entry = _Entry(key, self._next_ticket, task, about)
        entry.group = self._affinity(key) if self._affinity is not None else None
        self._next_ticket += 1
        self._pending[key] = entry
        self._backlog.append(entry)
        self._dispatch()

    def result(self, key: Hashable, timeout: float | None = None, lend: bool = True) -> dict[str, np.ndarray]:
        """Wait for ``key``; return its arrays cut to the rows produced.

        They are lent in place from the slot while fewer than ``lend`` (the pool's option)
        results are lent and ``lend`` (the argument) is true; otherwise copies.

        Results finishing meanwhile are kept until asked for; on ``TimeoutError``
        the key stays pending.

        Raises
        ------
        KeyError
            If ``key`` is not pending.
        TimeoutError
            If ``timeout`` seconds pass first.
        WorkerError
            If ``produce`` raised; the message holds the worker traceback.
        WorkerDiedError
            If a worker died; the pool is closed.
        """
        self._check_open()
        entry = self._pending.get(key)
        if entry is None:
            raise KeyError(f"no pending task with key {key!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        self._pump(0.0, entry.ticket)  # a dead worker is reported even when results are ready
        while entry.state not in ("done", "failed"):
            if entry.slot is None and not self._free:
                self._reclaim()
            if entry.slot is None and not self._free:
                self._evict()  # unclaimed results hold every slot: move one to the heap
            left = self._poll if deadline is None else deadline - time.monotonic()
            self._pump(max(0.0, min(self._poll, left)), entry.ticket)
            if entry.state not in ("done", "failed") and left <= 0:
                raise TimeoutError(f"result for key {key!r} not ready after {timeout} s")
        del self._pending[key]
        if entry.state == "failed":
            kind, message, trace, blob = entry.error
            original = pickle.loads(blob) if blob is not None else None
            if isinstance(original, StreamsegError):  # our own errors keep their type
                original.add_note(f"Raised in a worker while producing key {key!r}. "
                                  f"Worker traceback:\n{trace.rstrip()}")
                raise original
            raise WorkerError(f"producing key {key!r}{self._about(entry)} failed in a worker: "
                              f"{kind}: {message}\n\nWorker traceback:\n{trace.rstrip()}") from original
        if entry.data is not None:
            return entry.data
        self._reclaim()
        return self._lend(entry) if lend and len(self._lent) < self._lend_max else self._copy(entry)

    def pending(self) -> set:
        """Keys submitted and not yet returned by :meth:`result` nor discarded."""
        return set(self._pending)

    def discard(self, key: Hashable) -> None:
        """Forget ``key`` (unknown keys are ignored); its slot frees once it finishes."""
        entry = self._pending.pop(key, None)
        if entry is None:
            return
        if entry.state == "waiting":
            self._backlog.remove(entry)
        elif entry.state == "queued":
            entry.discarded = True  # a worker still runs it; the slot frees on its message
        else:
            self._release(entry)

    def discard_all(self) -> None:
        """Forget every pending key (e.g. at the end of an epoch)."""
        for key in list(self._pending):
            self.discard(key)

    def close(self) -> None:
        """Stop and join the workers (terminating stragglers) and unlink shared memory."""
        self._finalizer()
        self._pending.clear()
        self._tickets.clear()
        self._backlog.clear()

    def __enter__(self) -> BatchPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._broken is not None:
            raise WorkerDiedError(self._broken)
        if self.closed:
            raise RuntimeError("this BatchPool is closed; create a new one")

    def _about(self, entry: _Entry) -> str:
        """`` (what the producer says about the task)`` or nothing; never raises."""
        if self._describe is None or entry.about is None:
            return ""
        try:
            return f" ({self._describe(entry.about)})"
        except Exception:  # noqa: BLE001 - a description must not hide the real error
            return ""

    def _dispatch(self) -> None:
        """Give free slots to backlogged tasks, oldest first, and send them to the workers."""
        self._reclaim()
        while self._backlog and self._free:
            entry = self._backlog.popleft()
            entry.slot, entry.state = self._free.pop(), "queued"
            self._tickets[entry.ticket] = entry
            entry.worker = self._backend.send(entry.ticket, entry.slot, entry.task, entry.group)
            entry.task = None

    def _release(self, entry: _Entry) -> None:
        """Return ``entry``'s slot to the free list and hand it to the backlog."""
        if entry.slot is not None:
            self._free.append(entry.slot)
            entry.slot = None
            self._dispatch()

    def _copy(self, entry: _Entry) -> dict[str, np.ndarray]:
        """Copy ``entry``'s rows out of its slot (the one memcpy per batch) and free the slot."""
        data = {}
        for name, view in self._backend.views[entry.slot].items():
            data[name] = self._allocate(view[:entry.n].shape, view.dtype)  # aligned: TF adopts it
            np.copyto(data[name], view[:entry.n])
        self._release(entry)
        return data

    def _lend(self, entry: _Entry) -> dict[str, np.ndarray]:
        """Hand out ``entry``'s rows in place; the slot comes back when they are all gone."""
        slot = entry.slot
        hold = _SlotHold(self._backend.shms[slot] if self._backend.shms else None)
        self._backend.holds.add(hold)
        data = {name: lend(view[:entry.n], hold) for name, view in self._backend.views[slot].items()}
        weakref.finalize(hold, self._returned.append, slot).atexit = False
        self._lent.add(slot)
        entry.slot = None
        return data

    def _reclaim(self) -> None:
        """Put lent slots whose arrays are gone back on the free list."""
        while self._returned:
            slot = self._returned.popleft()
            self._lent.discard(slot)
            if not self.closed:
                self._free.append(slot)

    def _evict(self) -> None:
        """Move the oldest finished, unclaimed result out of its slot to free the slot."""
        for entry in self._pending.values():
            if entry.state == "done" and entry.slot is not None:
                entry.data = self._copy(entry)
                return

    def _pump(self, timeout: float, want: int | None) -> None:
        """Handle worker messages arriving within ``timeout``; close the pool if one died."""
        msgs, dead = self._backend.collect(timeout, want)
        for worker, (kind, ticket, value) in msgs:
            entry = self._tickets.pop(ticket, None)
            if entry is None:
                continue
            entry.state, entry.n, entry.error = ("done", value, None) if kind == "done" else \
                ("failed", 0, value)
            if entry.discarded or kind != "done":
                self._release(entry)  # failed results need no slot
        if dead is not None:
            # a worker runs its tasks in the order sent: the oldest one not reported was in hand
            mine = sorted((e for e in self._tickets.values() if e.worker == dead[0]), key=lambda e: e.ticket)
            doing = f"while producing key {mine[0].key!r}{self._about(mine[0])}" if mine else "while idle"
            self._broken = (f"{dead[1]} {doing}; pending keys: {list(self._pending)!r}. "
                            f"The pool has been closed; create a new one.")
            self._backend.shutdown(grace=0.0)  # the pool is unusable: do not wait for busy ones
            self.close()
            raise WorkerDiedError(self._broken)
