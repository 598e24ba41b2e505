"""Persistent worker pool that hands batches over through shared-memory slots.

Unlike Keras' ``PyDataset`` multiprocessing (a new ``Pool`` every epoch, batches
pickled through a pipe, a hang when a worker dies), :class:`BatchPool` keeps its
workers, lets them write batches into preallocated slots and only sends
``(ticket, n)`` messages back: handing a batch over costs one copy out of the slot.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import re
import secrets
import signal
import threading
import time
import traceback
import weakref
from collections import deque
from contextlib import suppress
from multiprocessing import shared_memory
from multiprocessing.connection import wait as _wait
from typing import Any, Callable, Hashable, Mapping, Protocol

import numpy as np

from .buffers import aligned_empty, lend
from .errors import OptionError, StreamsegError, WorkerDiedError, WorkerError

__all__ = ["BatchPool", "Producer"]

_ALIGN = 64  # byte alignment of every array inside a slot
_GRACE = 1.0  # seconds close() gives busy workers before terminating them
Fields = dict  # name -> (shape, dtype, byte offset inside a slot)


class Producer(Protocol):
    """What the workers of a :class:`BatchPool` run (picklable for processes)."""

    def setup(self) -> None:
        """Prepare once in each worker, e.g. open files lazily."""

    def produce(self, task: Any, out: dict[str, np.ndarray]) -> int:
        """Fill ``out[name][:n]`` for ``task`` and return ``n`` (at most the slot rows)."""


def _layout(slots: Mapping[str, tuple[tuple[int, ...], Any]]) -> tuple[Fields, int, int]:
    """Validate the slot spec; return (fields, bytes per slot, rows per slot)."""
    fields: Fields = {}
    offset, rows = 0, None
    for name, spec in slots.items():
        try:
            shape, dtype = tuple(int(d) for d in spec[0]), np.dtype(spec[1])
        except (TypeError, ValueError, IndexError) as exc:
            raise OptionError(f"slots[{name!r}] must be (shape, dtype); got {spec!r}") from exc
        if not shape or min(shape) < 0 or shape[0] < 1 or dtype.hasobject:
            raise OptionError(f"slots[{name!r}] needs a shape with a batch dimension >= 1 "
                              f"and a non-object dtype; got {spec!r}")
        if shape[0] != (rows or shape[0]):
            raise OptionError(f"all slot arrays need the same batch dimension; got {dict(slots)}")
        rows, offset = shape[0], -(-offset // _ALIGN) * _ALIGN
        fields[name] = (shape, dtype, offset)
        offset += int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if rows is None:
        raise OptionError("slots must name at least one array, e.g. {'x': ((32, 64), 'f4')}")
    return fields, -(-offset // _ALIGN) * _ALIGN, rows


def _views(bufs: list[Any], fields: Fields) -> list[dict[str, np.ndarray]]:
    """Numpy views of every slot, one buffer (shared-memory segment) per slot."""
    return [{name: np.ndarray(shape, dtype, buffer=buf, offset=off)
             for name, (shape, dtype, off) in fields.items()} for buf in bufs]


class _Once:
    """Call ``fn`` until it has succeeded once (thread-safe; None does nothing)."""

    def __init__(self, fn: Any) -> None:
        self._fn, self._done, self._lock = fn, fn is None, threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            if not self._done:
                self._fn()
                self._done = True


def _produce(producer: Any, setup: _Once, out: dict[str, np.ndarray], rows: int, ticket: int,
             load: Any) -> tuple:
    """Run one task; return a ``("done", ticket, n)`` or ``("error", ticket, info)`` message."""
    try:
        task = load()
        setup()
        n = producer.produce(task, out)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= rows:
            raise ValueError(f"produce() must return the number of rows written, an int in "
                             f"[0, {rows}]; got {n!r}")
        return ("done", ticket, int(n))
    except Exception as exc:  # noqa: BLE001 - reported to the caller of result()
        try:  # the exception itself travels when it can, so callers can catch its type
            blob = pickle.dumps(exc)
            pickle.loads(blob)
        except Exception:  # noqa: BLE001
            blob = None
        return ("error", ticket, (type(exc).__name__, str(exc), traceback.format_exc(), blob))


def _process_worker(producer: Any, shm_names: list[str], fields: Fields, rows: int, tasks: Any,
                    stop: Any, conn: Any, poll: float) -> None:
    """Main loop of a worker process: take a task, fill its slot, send ``(ticket, n)``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process' business
    parent, ppid = mp.parent_process(), os.getppid()
    shms = [shared_memory.SharedMemory(name=n) for n in shm_names]  # registers with the parent's tracker
    views = _views([shm.buf for shm in shms], fields)
    setup = _Once(getattr(producer, "setup", None))
    try:
        while not stop.value:
            try:
                item = tasks.get(timeout=poll)
            except queue.Empty:
                if os.getppid() != ppid or (parent is not None and not parent.is_alive()):
                    break  # orphaned: the main process is gone
                continue
            if item is None or stop.value:
                break
            ticket, slot, payload = item
            conn.send(("start", ticket, None))
            conn.send(_produce(producer, setup, views[slot], rows, ticket,
                               lambda: pickle.loads(payload)))
    except (OSError, EOFError):  # pipe or queue broken: the main process is gone
        pass
    finally:
        del views
        conn.close()
        for shm in shms:
            with suppress(BufferError):  # the producer kept a view of a slot; exit unmaps it anyway
                shm.close()


def _thread_worker(producer: Any, setup: _Once, views: list, rows: int,
                   tasks: queue.SimpleQueue, results: queue.SimpleQueue) -> None:
    """Main loop of a worker thread."""
    while (item := tasks.get()) is not None:
        ticket, slot, task = item
        results.put(("start", ticket, None))
        results.put(_produce(producer, setup, views[slot], rows, ticket, lambda: task))


def _describe_exit(code: int | None) -> str:
    """Describe a process exit code, with a hint for the usual signals."""
    if code is None or code >= 0:
        return "closed its pipe" if code is None else f"exited with code {code}"
    sig = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
    hint = {"SIGKILL": " — often the out-of-memory killer (use fewer workers, smaller "
                       "batches or fewer slots)", "SIGSEGV": " — a crash in native code",
            "SIGBUS": " — often a full /dev/shm (docker run --shm-size)"}.get(sig, "")
    return f"killed by {sig}{hint}"


class _ProcessBackend:
    """Persistent worker processes writing into shared memory, one segment per slot (so an
    array lent from a slot keeps only that slot's segment mapped)."""

    def __init__(self, producer: Any, fields: Fields, stride: int, num_slots: int, rows: int,
                 workers: int, start_method: str | None, poll: float, name: str) -> None:
        ctx = mp.get_context(start_method)
        self.owner, self.closed, self.procs, self.conns = os.getpid(), False, [], []
        self.holds: weakref.WeakSet = weakref.WeakSet()  # of _SlotHold: lent slots in use
        self.tasks, self.stop = ctx.Queue(), ctx.RawValue("b", 0)
        prefix = re.sub(r"[^A-Za-z0-9_-]", "", name)[:12] or "streamseg"
        token = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
        self.shms: list[Any] = []
        # children start with SIGINT ignored (fork copies it, exec keeps it); not under
        # forkserver, whose children take the server's handlers (and it serves others too)
        old = signal.getsignal(signal.SIGINT)
        mask = threading.current_thread() is threading.main_thread() and old is not None \
            and ctx.get_start_method() != "forkserver"
        try:
            for s in range(num_slots):
                shm = shared_memory.SharedMemory(name=f"{token}_{s}", create=True, size=max(1, stride))
                self.shms.append(shm)
                if hasattr(os, "posix_fallocate") and getattr(shm, "_fd", -1) >= 0:
                    try:  # reserve the pages now: a full /dev/shm would SIGBUS the workers later
                        os.posix_fallocate(shm._fd, 0, max(1, stride))
                    except OSError as exc:
                        raise OSError(exc.errno, f"no room for {num_slots} x {stride / 2**20:.0f} MiB in "
                                      "/dev/shm; lower num_slots or the batch size, enlarge /dev/shm "
                                      "(docker --shm-size) or use use_processes=False") from exc
            self.views: list | None = _views([shm.buf for shm in self.shms], fields)
            if mask:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
            for i in range(workers):
                reader, writer = ctx.Pipe(duplex=False)
                self.procs.append(ctx.Process(
                    target=_process_worker, name=f"{name}-worker-{i}", daemon=True,
                    args=(producer, [shm.name for shm in self.shms], fields, rows, self.tasks,
                          self.stop, writer, poll)))
                self.conns.append(reader)
                try:
                    self.procs[-1].start()
                finally:
                    writer.close()  # keep only the child's end, so its death reads as EOF
        except BaseException:
            self.shutdown()
            raise
        finally:
            if mask:
                signal.signal(signal.SIGINT, old)

    def send(self, ticket: int, slot: int, payload: bytes) -> None:
        self.tasks.put((ticket, slot, payload))

    def collect(self, timeout: float, want: int | None) -> tuple[list, tuple | None]:
        """Wait up to ``timeout``; return ([(worker, message)], (dead worker, text) or None)."""
        _wait(self.conns + [p.sentinel for p in self.procs], timeout)
        msgs, dead = [], []
        for i, conn in enumerate(self.conns):
            try:
                while conn.poll():
                    msgs.append((i, conn.recv()))
            except (EOFError, OSError):
                dead.append(i)
        dead += [i for i, proc in enumerate(self.procs) if proc.exitcode is not None]
        if not dead:
            return msgs, None
        proc = self.procs[dead[0]]
        proc.join(1.0)
        return msgs, (dead[0], f"worker process {proc.pid} ({proc.name}) "
                               f"{_describe_exit(proc.exitcode)}")

    def shutdown(self, grace: float = _GRACE) -> None:
        """Stop the workers (terminate after ``grace`` s), unlink the segment; idempotent."""
        if self.closed or os.getpid() != self.owner:
            return  # done already, or a forked child that owns nothing
        self.closed, self.stop.value = True, 1  # idle workers exit within poll_interval
        started = [p for p in self.procs if p.pid is not None]
        deadline = time.monotonic() + grace
        for proc in started:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in started:
            for stop in (proc.terminate, proc.kill):
                if proc.exitcode is None:
                    stop()
                    proc.join(1.0)
        for conn in self.conns:
            conn.close()
        self.tasks.cancel_join_thread()  # never block exit on undelivered tasks
        self.tasks.close()
        self.views = None
        held = {id(hold.shm) for hold in list(self.holds)}
        for shm in self.shms:
            if id(shm) not in held:  # an array lent from a slot keeps its segment mapped until it goes
                with suppress(BufferError):
                    shm.close()
            with suppress(FileNotFoundError):
                shm.unlink()


class _ThreadBackend:
    """Worker threads (``workers >= 1``) or synchronous production (``workers == 0``)."""

    def __init__(self, producer: Any, fields: Fields, num_slots: int, rows: int, workers: int,
                 name: str) -> None:
        self.producer, self.rows, self.shms = producer, rows, []
        self.holds: weakref.WeakSet = weakref.WeakSet()
        self.views: list | None = [{n: aligned_empty(shape, dtype) for n, (shape, dtype, _) in
                                    fields.items()} for _ in range(num_slots)]
        self.setup = _Once(getattr(producer, "setup", None))
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.results: queue.SimpleQueue = queue.SimpleQueue()
        self.queued: dict[int, tuple[int, Any]] = {}  # synchronous mode only
        self.threads = [threading.Thread(target=_thread_worker, name=f"{name}-worker-{i}",
                                         daemon=True, args=(producer, self.setup, self.views,
                                                            rows, self.tasks, self.results))
                        for i in range(workers)]
        for thread in self.threads:
            thread.start()

    def send(self, ticket: int, slot: int, task: Any) -> None:
        if self.threads:
            self.tasks.put((ticket, slot, task))
        else:
            self.queued[ticket] = (slot, task)

    def collect(self, timeout: float, want: int | None) -> tuple[list, tuple | None]:
        if not self.threads:  # synchronous: run the wanted task (else the oldest) right now
            if not self.queued:
                return [], None
            ticket = want if want in self.queued else next(iter(self.queued))
            slot, task = self.queued.pop(ticket)
            return [(None, _produce(self.producer, self.setup, self.views[slot], self.rows,
                                    ticket, lambda: task))], None
        msgs = []
        with suppress(queue.Empty):
            msgs.append((None, self.results.get(timeout=timeout)))
            while True:
                msgs.append((None, self.results.get_nowait()))
        dead = [t.name for t in self.threads if not t.is_alive()]
        return msgs, (None, f"worker thread {dead[0]} stopped") if dead else None

    def shutdown(self, grace: float = _GRACE) -> None:
        """Ask the threads to stop; threads cannot be killed, daemon ones die with the process."""
        for _ in self.threads if self.views is not None else ():
            self.tasks.put(None)
        deadline = time.monotonic() + grace
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.views = None


class _SlotHold:
    """Alive while an array lent from a slot is; keeps the slot's segment mapped meanwhile."""

    __slots__ = ("shm", "__weakref__")

    def __init__(self, shm: Any) -> None:
        self.shm = shm


class _Entry:
    """Book-keeping of one submitted task."""

    __slots__ = ("key", "ticket", "task", "slot", "state", "n", "data", "error", "worker",
                 "discarded")

    def __init__(self, key: Hashable, ticket: int, task: Any) -> None:
        self.key, self.ticket, self.task, self.slot = key, ticket, task, None
        self.state = "waiting"  # waiting (for a slot) -> queued -> done | failed
        self.n, self.data, self.error, self.worker, self.discarded = 0, None, None, None, False


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

    Notes
    -----
    :meth:`submit` never blocks: with every slot busy the task waits in an
    internal backlog and goes to a worker when a slot frees. Use the pool from
    one thread. A failing ``produce`` raises :class:`~streamseg.errors.WorkerError`
    for that key only; a dead worker raises :class:`~streamseg.errors.WorkerDiedError`
    and closes the pool. Workers and shared memory never outlive :meth:`close`,
    the ``with`` block, garbage collection or interpreter exit.
    """

    def __init__(self, producer: Producer, slots: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                 *, workers: int = 1, use_processes: bool = True, num_slots: int = 4,
                 start_method: str | None = None, poll_interval: float = 0.1,
                 name: str = "streamseg", lend: int = 0,
                 allocate: Callable[..., np.ndarray] | None = None) -> None:
        if not callable(getattr(producer, "produce", None)):
            raise OptionError(f"producer needs a produce(task, out) method; got {producer!r}")
        if int(workers) < 0 or int(num_slots) < 1 or not poll_interval > 0:
            raise OptionError(f"need workers >= 0, num_slots >= 1 and poll_interval > 0; "
                              f"got {workers}, {num_slots}, {poll_interval}")
        fields, stride, self._rows = _layout(slots)
        self._poll, self._next_ticket, self._broken = float(poll_interval), 0, None
        self._allocate = allocate or aligned_empty
        self._lend_max, self._lent = max(0, int(lend)), set()
        self._returned: deque[int] = deque()  # lent slots given back, from any thread
        self._pending: dict[Hashable, _Entry] = {}  # by key, in submission order
        self._tickets: dict[int, _Entry] = {}  # sent to a worker and not reported yet
        self._backlog: deque[_Entry] = deque()
        self._free = list(range(int(num_slots)))[::-1]
        if use_processes and workers > 0:
            self._backend: Any = _ProcessBackend(producer, fields, stride, int(num_slots),
                                                 self._rows, int(workers), start_method,
                                                 self._poll, name)
        else:
            self._backend = _ThreadBackend(producer, fields, int(num_slots), self._rows,
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
        if self._backend.shms:  # pickle now: fail here, not in the feeder thread
            task = pickle.dumps(task, protocol=pickle.HIGHEST_PROTOCOL)
        entry = _Entry(key, self._next_ticket, task)
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
            raise WorkerError(f"producing key {key!r} failed in a worker: {kind}: {message}"
                              f"\n\nWorker traceback:\n{trace.rstrip()}") from original
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

    def _dispatch(self) -> None:
        """Give free slots to backlogged tasks, oldest first, and send them to the workers."""
        self._reclaim()
        while self._backlog and self._free:
            entry = self._backlog.popleft()
            entry.slot, entry.state = self._free.pop(), "queued"
            self._tickets[entry.ticket] = entry
            self._backend.send(entry.ticket, entry.slot, entry.task)
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
            entry = self._tickets.get(ticket)
            if entry is None:
                continue
            if kind == "start":
                entry.worker = worker
                continue
            del self._tickets[ticket]
            entry.state, entry.n, entry.error = ("done", value, None) if kind == "done" else \
                ("failed", 0, value)
            if entry.discarded or kind != "done":
                self._release(entry)  # failed results need no slot
        if dead is not None:
            busy = [e.key for e in self._pending.values()
                    if e.state == "queued" and e.worker == dead[0]]
            doing = f"while producing key(s) {busy!r}" if busy else "while idle"
            self._broken = (f"{dead[1]} {doing}; pending keys: {list(self._pending)!r}. "
                            f"The pool has been closed; create a new one.")
            self._backend.shutdown(grace=0.0)  # the pool is unusable: do not wait for busy ones
            self.close()
            raise WorkerDiedError(self._broken)
