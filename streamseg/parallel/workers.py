"""Worker processes and threads of a :class:`~streamseg.parallel.pool.BatchPool`, and the slots they fill.

Process workers write into shared memory, one segment per slot (so an array lent from a slot
keeps only that slot's segment mapped), and report ``(ticket, n)`` through a pipe each; a
worker's death reads as EOF on its pipe.  Thread workers fill aligned NumPy slots.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import pickle
import queue
import re
import secrets
import select
import signal
import sys
import threading
import time
import traceback
import weakref
from contextlib import nullcontext, suppress
from multiprocessing import shared_memory
from typing import Any, Mapping

import numpy as np

from .buffers import ALIGN_BYTES, aligned_empty  # lent slot arrays must be aligned as TF needs
from ..errors import OptionError
from .forkguard import FORK_GUARD

PRIORITIES = ("normal", "low", "idle")
"""Scheduling priorities of worker processes: ``"normal"`` (as the main process), ``"low"``
(nice 19) and ``"idle"`` (Linux ``SCHED_IDLE``: runs only on a core nothing else wants)."""


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def fill_the_cores(workers: int, processes: bool) -> bool:
    """Whether ``workers`` worker processes (not threads, which share the caller's process) are
    at least as many as the usable cores: then each runs OpenCV on its own thread and offers its
    core to the training loop between samples (``BatchProducer.setup_process``)."""
    return bool(processes) and int(workers) >= usable_cores()


def check_priority(priority: Any, processes: bool) -> str:
    """Validate a worker priority for worker processes (``processes``) or threads/inline."""
    if priority not in PRIORITIES:
        raise OptionError(f"worker_priority must be one of {', '.join(PRIORITIES)}. "
                          f"Received: worker_priority={priority!r}")
    if priority == "normal":
        return priority
    if not processes:
        raise OptionError("worker_priority applies to worker processes only (threads share the GIL with "
                          "the training loop, so a low-priority thread would stall it): set "
                          "use_multiprocessing=True, or keep worker_priority='normal'. "
                          f"Received: worker_priority={priority!r}")
    if priority == "idle" and not hasattr(os, "SCHED_IDLE"):
        raise OptionError("worker_priority='idle' needs Linux's SCHED_IDLE, which this platform lacks; "
                          f"use 'low' (nice 19). Received: worker_priority={priority!r}")
    return priority


def _apply_priority(priority: str) -> None:
    """Lower the calling worker process's scheduling priority.  Never raises: a worker that
    may not lower it (a sandbox forbidding the call) says so on stderr and works on."""
    try:
        if priority == "low":
            os.setpriority(os.PRIO_PROCESS, 0, 19)
        elif priority == "idle":
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError) as exc:
        print(f"streamseg worker {os.getpid()}: could not set worker_priority={priority!r} "
              f"({type(exc).__name__}: {exc}); running at normal priority", file=sys.stderr)

__all__ = ["Fields", "ProcessBackend", "ThreadBackend", "fill_the_cores", "layout_slots", "pick_worker",
           "usable_cores"]

_GRACE = 1.0  # seconds close() gives busy workers before terminating them
Fields = dict  # name -> (shape, dtype, byte offset inside a slot)


def layout_slots(slots: Mapping[str, tuple[tuple[int, ...], Any]]) -> tuple[Fields, int, int]:
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
        rows, offset = shape[0], -(-offset // ALIGN_BYTES) * ALIGN_BYTES
        fields[name] = (shape, dtype, offset)
        offset += int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if rows is None:
        raise OptionError("slots must name at least one array, e.g. {'x': ((32, 64), 'f4')}")
    return fields, -(-offset // ALIGN_BYTES) * ALIGN_BYTES, rows


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


def _process_setup(producer: Any) -> Any:
    """A worker process's setup: the producer's ``setup_process()`` (process-wide settings,
    never run for thread workers, which share the caller's process), then its ``setup()``."""
    steps = [f for f in (getattr(producer, "setup_process", None), getattr(producer, "setup", None)) if f]
    if not steps:
        return None

    def run() -> None:
        for step in steps:
            step()

    return run


def _fresh_fork_locks() -> None:
    """Give the resource tracker a fresh lock in a new worker process.

    Under ``fork`` a lock that another parent thread held at that moment (a pool of another
    dataset unlinking its shared memory from a keep-alive timer, say) stays held forever in
    the child, and attaching a ``SharedMemory`` registers with the tracker under that lock.
    The child is single-threaded here, so a new lock is safe; under spawn/forkserver it is a
    no-op in effect.
    """
    with suppress(Exception):  # private CPython attribute: do nothing where it differs
        from multiprocessing import resource_tracker

        tracker = resource_tracker._resource_tracker
        tracker._lock = threading.RLock() if "RLock" in type(tracker._lock).__name__ else threading.Lock()


def _process_worker(producer: Any, shm_names: list[str], fields: Fields, rows: int, tasks: Any,
                    stop: Any, conn: Any, poll: float, priority: str = "normal") -> None:
    """Main loop of a worker process: take a task from the ``tasks`` pipe, fill its slot, send
    ``("done", ticket, n)`` (one message per task: each wakes the main process)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process' business
    # What a forked worker inherited stays out of the garbage collector: a full collection
    # would write into every inherited object and copy its pages (measured: +70 MiB per
    # worker over a 100-case PatchDataset epoch, benchmarks/RESULTS.md section 11).
    gc.freeze()
    _apply_priority(priority)
    _fresh_fork_locks()
    parent, ppid = mp.parent_process(), os.getppid()
    shms = [shared_memory.SharedMemory(name=n) for n in shm_names]  # registers with the parent's tracker
    views = _views([shm.buf for shm in shms], fields)
    setup = _Once(_process_setup(producer))
    try:
        while not stop.value:
            if not tasks.poll(poll):
                if os.getppid() != ppid or (parent is not None and not parent.is_alive()):
                    break  # orphaned: the main process is gone
                continue
            item = tasks.recv()
            if item is None or stop.value:
                break
            ticket, slot, payload = item
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
        with FORK_GUARD.producing():  # no fork of another pool's workers meanwhile
            msg = _produce(producer, setup, views[slot], rows, ticket, lambda: task)
        results.put(msg)


def _describe_exit(code: int | None) -> str:
    """Describe a process exit code, with a hint for the usual signals."""
    if code is None or code >= 0:
        return "closed its pipe" if code is None else f"exited with code {code}"
    sig = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
    hint = {"SIGKILL": " — often the out-of-memory killer (use fewer workers, smaller "
                       "batches or fewer slots)", "SIGSEGV": " — a crash in native code",
            "SIGBUS": " — often a full /dev/shm (docker run --shm-size)"}.get(sig, "")
    return f"killed by {sig}{hint}"


def pick_worker(outstanding: list[int], groups: dict[Any, int], group: Any, behind: int = 2) -> int:
    """The worker for a task of ``group``: the group's worker unless it has ``behind`` tasks
    waiting, else (and for ``group`` None) the least loaded one, which then keeps the group.

    ``outstanding``: tasks sent to each worker and not reported; ``groups``: recent group ->
    worker, updated here (at most four groups per worker are remembered, oldest dropped first).
    """
    least = min(range(len(outstanding)), key=outstanding.__getitem__)
    if group is None:
        return least
    worker = groups.get(group)
    if worker is None or outstanding[worker] >= behind:
        worker = groups[group] = least
        while len(groups) > 4 * len(outstanding):
            groups.pop(next(iter(groups)))
    return worker


class ProcessBackend:
    """Persistent worker processes writing into shared memory, one segment per slot (so an
    array lent from a slot keeps only that slot's segment mapped)."""

    def __init__(self, producer: Any, fields: Fields, stride: int, num_slots: int, rows: int,
                 workers: int, start_method: str | None, poll: float, name: str,
                 priority: str = "normal") -> None:
        ctx = mp.get_context(start_method)
        self.owner, self.closed, self.procs, self.conns = os.getpid(), False, [], []
        self.holds: weakref.WeakSet = weakref.WeakSet()  # of _SlotHold: lent slots in use
        # one task pipe per worker: batches of one group (the window of chunks they read) go to
        # the same worker while it is not behind, so its decoded-chunk cache serves them.  A
        # pipe, not a multiprocessing.Queue: a Queue wakes its feeder thread in this process and
        # pickles once more for every task
        self.tasks: list[Any] = []
        self.stop = ctx.RawValue("b", 0)
        self.outstanding = [0] * max(1, workers)  # tasks sent to each worker and not reported
        self._groups: dict[Any, int] = {}  # recent group -> worker
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
            with FORK_GUARD.forking() if ctx.get_start_method() == "fork" else nullcontext():
                self._start(ctx, producer, fields, rows, workers, poll, name, priority)
        except BaseException:
            self.shutdown()
            raise
        finally:
            if mask:
                signal.signal(signal.SIGINT, old)

    def _start(self, ctx: Any, producer: Any, fields: Fields, rows: int, workers: int, poll: float,
               name: str, priority: str) -> None:
        """Start the worker processes (under fork: with no producer call running here)."""
        for i in range(workers):
            reader, writer = ctx.Pipe(duplex=False)
            task_reader, task_writer = ctx.Pipe(duplex=False)
            self.procs.append(ctx.Process(
                target=_process_worker, name=f"{name}-worker-{i}", daemon=True,
                args=(producer, [shm.name for shm in self.shms], fields, rows, task_reader,
                      self.stop, writer, poll, priority)))
            self.conns.append(reader)
            self.tasks.append(task_writer)
            try:
                self.procs[-1].start()
            finally:
                writer.close()  # keep only the child's end, so its death reads as EOF
                task_reader.close()
        self._poller = select.poll()  # built once: multiprocessing's wait() builds a selector per call
        self._fds = {conn.fileno(): i for i, conn in enumerate(self.conns)}
        for fd in self._fds:
            self._poller.register(fd, select.POLLIN)
        for proc in self.procs:
            self._poller.register(proc.sentinel, select.POLLIN)

    def send(self, ticket: int, slot: int, payload: bytes, group: Any = None) -> int:
        """Queue a task on the worker of its ``group`` (if that one is not behind), else on the
        least loaded worker; return that worker's number (it runs its tasks in order)."""
        worker = pick_worker(self.outstanding, self._groups, group)
        self.outstanding[worker] += 1
        # a few hundred bytes, at most one per slot in flight: never fills the pipe's buffer
        with suppress(OSError):  # the worker died: collect() reports it
            self.tasks[worker].send((ticket, slot, payload))
        return worker

    def collect(self, timeout: float, want: int | None) -> tuple[list, tuple | None]:
        """Wait up to ``timeout``; return ([(worker, message)], (dead worker, text) or None)."""
        msgs, dead = [], []
        events = self._poller.poll(max(0, int(timeout * 1000 + 0.999)))
        while events:
            for fd, _ in events:
                i = self._fds.get(fd)
                if i is None or i in dead:
                    continue  # a sentinel: the exit codes below tell
                try:
                    msgs.append((i, self.conns[i].recv()))
                    self.outstanding[i] = max(0, self.outstanding[i] - 1)
                except (EOFError, OSError):
                    dead.append(i)
            events = [e for e in self._poller.poll(0) if e[0] in self._fds and self._fds[e[0]] not in dead]
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
        for tasks in self.tasks:
            tasks.close()
        self.views = None
        held = {id(hold.shm) for hold in list(self.holds)}
        for shm in self.shms:
            if id(shm) not in held:  # an array lent from a slot keeps its segment mapped until it goes
                with suppress(BufferError):
                    shm.close()
            with suppress(FileNotFoundError):
                shm.unlink()


class ThreadBackend:
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

    def send(self, ticket: int, slot: int, task: Any, group: Any = None) -> None:
        """Queue a task (threads share one queue and one process: ``group`` does not matter)."""
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
            with FORK_GUARD.producing():
                msg = _produce(self.producer, self.setup, self.views[slot], self.rows, ticket, lambda: task)
            return [(None, msg)], None
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
