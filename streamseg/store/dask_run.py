"""Write a store's chunks on a Dask cluster (``convert(..., dask=...)``, ``streamseg convert --dask``).

The scheduling is Dask's own (:mod:`distributed`): one task per output chunk, so no two
tasks ever write one chunk (two writers into one zarr chunk would lose each other's
samples).  Each task runs the converter's ordinary chunk task (load, check, resize, write
the chunk, return its small statistics record) in a Dask worker, and the records come back
to this process in completion order (:class:`distributed.as_completed`), where each is
appended to the store's progress log at once and advances the progress bar.  Everything
else is the serial conversion: the same plan, the same records, the same
:func:`~streamseg.store.writer.finalize_store`, so the store is identical to a serial one,
and ``--resume`` after a dead client (even a ``SIGKILL``) redoes only the chunks without a
progress line, with or without Dask.

A task whose worker dies is rerun on another worker by the scheduler (a task that kills
``distributed.scheduler.allowed-failures`` workers, 3 by default, fails the conversion);
a task that raises an unexpected exception (a transient ``OSError`` of a shared file
system) is retried twice (``retries=2``).  Errors about the input (a bad image, a size
mismatch) are not retried: they come back as the one-line error a serial run raises.

Schedulers:

``tcp://HOST:PORT``
    A running Dask scheduler (``dask scheduler``; workers started with ``dask worker``).
    The workers write the chunks themselves, so the destination must be a path that every
    worker sees the same way (a shared file system mounted at the same path), and
    streamseg (with this version) must be importable on the workers.  A worker that cannot
    see the destination fails its chunk with a one-line error saying so.  (Workers started
    by a nanny get ``MALLOC_TRIM_THRESHOLD_=65536`` from Dask, which made chunk tasks
    1.5-1.9x slower here; ``local:N`` unsets it, and for ``dask worker`` a Dask config of
    ``distributed: nanny: pre-spawn-environ: MALLOC_TRIM_THRESHOLD_: null`` on the worker
    machines does the same.)  When a client dies, the chunk tasks already running on a
    shared cluster still finish; one that ``--resume`` reruns meanwhile writes the same bytes
    (chunk files are replaced atomically), and the store is marked complete only after every
    chunk on disk matches its record.  A scheduler without workers makes the conversion wait.
``local:N``
    A :class:`distributed.LocalCluster` of ``N`` worker processes (one thread each) on
    127.0.0.1, started for this conversion and closed after it; the destination is on the
    local disk.  Its workers start with ``spawn``, which re-imports the main script, so a
    script calling ``convert(..., dask="local:N")`` must do so under
    ``if __name__ == "__main__":``.

Medical volumes converted to slices work as 2D sources do (each task reads the case of its
chunk; consecutive chunks of one case on one worker reuse the cached case);
``layout="volumes"`` is refused with ``dask``.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from types import TracebackType
from typing import Any

from ..errors import DestinationError, OptionError, StreamsegError, WorkerDiedError, WorkerError, truncate
from .reader import PLAN_NAME

__all__ = ["CONNECT_TIMEOUT_S", "DaskRunner", "check_dask_options", "dask_runner", "memory_workers",
           "parse_scheduler"]

#: Seconds to wait for a ``tcp://`` scheduler before giving up with a one-line error.
CONNECT_TIMEOUT_S = 5.0
_RETRIES = 2
_SPAWN_ENV = "distributed.nanny.pre-spawn-environ"
_LOCAL = re.compile(r"local:(\d+)")
_TCP = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d+)")
_FORM = ("--dask must be tcp://HOST:PORT (a running Dask scheduler whose workers all see the destination) "
         "or local:N (a cluster of N worker processes on this machine)")


def parse_scheduler(spec: Any) -> tuple[str, Any]:
    """Validate a ``--dask`` value.

    Parameters
    ----------
    spec : str
        ``"tcp://HOST:PORT"`` or ``"local:N"``.

    Returns
    -------
    ("tcp", str) or ("local", int)
        The scheduler address, or the number of local worker processes.

    Raises
    ------
    OptionError
        Anything else (one line, with the value received).
    """
    if isinstance(spec, str):
        text = spec.strip()
        local = _LOCAL.fullmatch(text)
        if local:
            n = int(local.group(1))
            if not 1 <= n <= 1024:
                raise OptionError(f"--dask local:N needs 1 to 1024 worker processes. Received: {truncate(spec)}")
            return "local", n
        tcp = _TCP.fullmatch(text)
        if tcp and 1 <= int(tcp.group(2)) <= 65535:
            return "tcp", text
    raise OptionError(f"{_FORM}. Received: {truncate(spec)}")


def check_dask_options(spec: Any, *, workers: int, layout: str | None) -> None:
    """Refuse ``dask`` with options that do not apply to it, before anything is read.

    Raises
    ------
    OptionError
        A bad scheduler string, ``workers`` other than 1 (the cluster's workers write the
        chunks), or ``layout="volumes"``.
    """
    parse_scheduler(spec)
    if workers != 1:
        raise OptionError("--workers sets the local process pool; with --dask the cluster's workers write the "
                          f"chunks (local:N for N processes here), so drop --workers. Received: --workers {workers}")
    if layout == "volumes":
        raise OptionError("--dask converts 2D stores and sliced volumes only, not --layout volumes; drop --dask "
                          "(and use --workers) for a volume store. Received: --layout volumes")


def memory_workers(spec: str | None, workers: int) -> int:
    """Processes on this machine that will each hold a chunk: N for ``local:N``, 0 for a remote cluster."""
    if spec is None:
        return workers
    kind, value = parse_scheduler(spec)
    return int(value) if kind == "local" else 0


def _run_chunk(k: int, task: Callable[[int], dict[str, Any]]) -> Any:
    """Write chunk ``k`` in a Dask worker; input errors come back as values (not retried)."""
    from numcodecs import blosc

    blosc.use_threads = False  # one core per task: the worker's threads are the parallelism
    sink = getattr(task, "sink", None)
    if sink is not None and not (Path(sink.path) / PLAN_NAME).is_file():
        import socket

        return DestinationError(
            f"Dask worker on {socket.gethostname()} cannot see the destination {sink.path} (its {PLAN_NAME} is "
            "missing there); with tcp:// schedulers the destination must be a path every worker sees (a shared "
            "file system at the same path)."
        )
    try:
        return task(k)
    except StreamsegError as exc:
        return exc


def _hold(task: Any) -> Any:
    """The chunk task itself, kept on the cluster once instead of shipped with every chunk."""
    return task


class DaskRunner:
    """A Dask client for one conversion (a context manager that connects or starts the cluster).

    Parameters
    ----------
    spec : str
        ``"tcp://HOST:PORT"`` (the scheduler must answer within :data:`CONNECT_TIMEOUT_S`)
        or ``"local:N"`` (a LocalCluster of N processes on 127.0.0.1, closed on exit).

    Raises
    ------
    OptionError
        A bad scheduler string, or a scheduler that does not answer.
    WorkerError
        The local cluster could not start.
    """

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.kind, self.value = parse_scheduler(spec)
        self.client: Any = None
        self._cluster: Any = None
        self._environ: dict[str, str | None] = {}

    def __enter__(self) -> "DaskRunner":
        try:
            self._connect()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _connect(self) -> None:
        from distributed import Client, LocalCluster

        if self.kind == "tcp":
            try:
                self.client = Client(self.value, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
            except (OSError, ValueError) as exc:
                raise OptionError(
                    f"Cannot reach the Dask scheduler {self.value} within {CONNECT_TIMEOUT_S:g} s "
                    f"({_reason(exc)}); start it (dask scheduler, dask worker) or check the address, or pass "
                    f"--dask local:N. Received: --dask {truncate(self.spec)}"
                ) from None
            return
        import dask

        # The nannies set these in os.environ (of this process too) before each spawn: put them back after.
        self._environ = {k: os.environ.get(k) for k in [*dask.config.get(_SPAWN_ENV), "PYTHONHASHSEED"]}
        try:
            # Dask's MALLOC_TRIM_THRESHOLD_=65536 turns off glibc's adaptive mmap threshold, so every
            # sample-sized array is a fresh mmap: chunk tasks ran 1.5-1.9x slower with it here.
            with dask.config.set({f"{_SPAWN_ENV}.MALLOC_TRIM_THRESHOLD_": None}):
                self._cluster = LocalCluster(n_workers=self.value, threads_per_worker=1, processes=True,
                                             host="127.0.0.1", dashboard_address="127.0.0.1:0",
                                             silence_logs=logging.ERROR)  # all on 127.0.0.1, free ports
            self.client = Client(self._cluster, set_as_default=False)
        except (OSError, RuntimeError, TimeoutError) as exc:
            raise WorkerError(
                f"Could not start a local Dask cluster of {self.value} worker process(es) ({_reason(exc)}); in a "
                "script, call convert() under `if __name__ == \"__main__\":` (Dask starts workers with spawn, "
                f"which re-imports the script), or pass fewer workers. Received: --dask {truncate(self.spec)}"
            ) from None

    def close(self) -> None:
        """Disconnect, and stop the local cluster when this runner started it."""
        client, cluster, self.client, self._cluster = self.client, self._cluster, None, None
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
        environ, self._environ = self._environ, {}
        for key, value in environ.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    def run(self, task: Callable[[int], dict[str, Any]], chunks: Sequence[int],
            on_record: Callable[[dict[str, Any]], None]) -> None:
        """Run ``task(k)`` for every chunk on the cluster, one task each; ``on_record`` here as each ends.

        On any error (including KeyboardInterrupt) the remaining tasks are cancelled and the
        error is raised; the records already handed to ``on_record`` stay valid for ``--resume``.

        Raises
        ------
        StreamsegError
            The chunk's own error (bad input), a worker that cannot see the destination,
            :class:`~streamseg.errors.WorkerDiedError` for a chunk that killed its workers,
            :class:`~streamseg.errors.WorkerError` for a lost scheduler.
        """
        if not chunks:
            return
        from distributed import as_completed

        client = self.client
        run = uuid.uuid4().hex[:12]  # names this conversion's tasks on a shared cluster
        held = client.submit(_hold, task, key=f"streamseg-task-{run}", pure=False, retries=_RETRIES)
        keys = [f"streamseg-chunk-{k}-{run}" for k in chunks]
        futures = client.map(_run_chunk, list(chunks), task=held, key=keys, pure=False, retries=_RETRIES)
        pending = {f.key: (k, f) for f, k in zip(futures, chunks)}
        del futures
        try:
            for fut, result in as_completed([f for _, f in pending.values()], loop=client.loop, with_results=True,
                                            raise_errors=False):
                k, _ = pending.pop(fut.key)
                if fut.status == "error":
                    raise self._error(k, result[1]) from None
                if isinstance(result, StreamsegError):  # the chunk's own error, as a serial run raises it
                    raise result
                if fut.status != "finished" or isinstance(result, BaseException):
                    raise self._error(k, result if isinstance(result, BaseException) else None) from None
                fut.release()  # its record is here now: the worker may forget it
                on_record(result)
        except BaseException:
            client.cancel([f for _, f in pending.values()] + [held])
            raise
        finally:
            held.release()

    def _error(self, k: int, exc: BaseException | None) -> BaseException:
        """A one-line error for chunk ``k`` failing on the cluster (other exceptions as they are)."""
        from distributed import KilledWorker
        from distributed.utils import CancelledError

        if isinstance(exc, KilledWorker):
            return WorkerDiedError(
                f"Chunk {k} was running on Dask workers that died each time (killed, out of memory, crashed); the "
                "chunks finished so far are kept: rerun with --resume (give the workers more memory, or pass a "
                f"smaller --chunk-samples). Received: --dask {truncate(self.spec)}"
            )
        if isinstance(exc, ImportError):
            return WorkerError(
                f"A Dask worker cannot import {exc.name or 'a module'} for chunk {k} ({_reason(exc)}); install "
                f"streamseg (this version) on every worker. Received: --dask {truncate(self.spec)}"
            )
        if exc is None or isinstance(exc, CancelledError):
            why = f" ({_reason(exc)})" if exc is not None else ""
            return WorkerError(
                f"Chunk {k} was cancelled on the Dask cluster{why}; the chunks finished so far are kept: rerun "
                f"with --resume once the cluster is back. Received: --dask {truncate(self.spec)}"
            )
        return exc


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return text[:160]


def dask_runner(spec: str | None) -> AbstractContextManager[DaskRunner | None]:
    """A :class:`DaskRunner` for ``spec``, or a context holding None when ``spec`` is None."""
    return nullcontext() if spec is None else DaskRunner(spec)
