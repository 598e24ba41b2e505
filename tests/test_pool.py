"""Tests of streamseg.parallel.pool.BatchPool (processes under fork/forkserver/spawn, threads, sync)."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # children inherit sys.path

import _pool_helpers as H  # noqa: E402

from streamseg.errors import OptionError, WorkerDiedError, WorkerError  # noqa: E402
from streamseg.parallel.pool import BatchPool  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WAIT = 30.0  # generous result() timeout: a hang fails with TimeoutError instead of hanging
METHODS = [m for m in ("fork", "forkserver", "spawn") if m in mp.get_all_start_methods()]
KINDS = [pytest.param(("process", m), id=m) for m in METHODS] + [
    pytest.param(("threads", None), id="threads"), pytest.param(("sync", None), id="sync")]


def make_pool(kind: tuple, **kw) -> BatchPool:
    what, method = kind
    kw.setdefault("workers", 0 if what == "sync" else 2)
    return BatchPool(H.Producer(), H.SLOTS, use_processes=what == "process",
                     start_method=method, name=f"sst{os.getpid()}", **kw)


def helper_pids() -> set[int]:
    """Long-lived multiprocessing helpers (resource tracker, forkserver) that may be children."""
    from multiprocessing import forkserver, resource_tracker

    pids = {getattr(resource_tracker._resource_tracker, "_pid", None),
            getattr(forkserver._forkserver, "_forkserver_pid", None)}
    return {p for p in pids if p}


def assert_clean(pool: BatchPool, worker_pids: list[int], shm_names: list[str]) -> None:
    assert pool.closed
    children = {c.pid for c in psutil.Process().children(recursive=True)}
    assert not children & set(worker_pids)
    assert not children - helper_pids(), "stray child processes after close()"
    assert not any(Path("/dev/shm", name).exists() for name in shm_names)


def check(result: dict, i: int, n: int = H.ROWS) -> None:
    want = H.expected(i, n)
    assert set(result) == set(want)
    for name, arr in want.items():
        assert result[name].dtype == H.SLOTS[name][1]
        np.testing.assert_array_equal(result[name], arr)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_results_match_in_process(kind):
    pool = make_pool(kind, num_slots=3)
    pids, shm_names = pool.pids, pool.shm_names
    assert len(pids) == (2 if kind[0] == "process" else 0)
    assert pool.workers == (0 if kind[0] == "sync" else 2)
    with pool:
        sizes = {i: H.ROWS for i in range(7)} | {6: 2}  # last batch is partial
        for i, n in sizes.items():  # more tasks than slots: the rest wait in the backlog
            pool.submit(("batch", i), H.task(i, n))
        assert pool.pending() == {("batch", i) for i in sizes}
        for i in (6, 2, 0, 1, 5, 3, 4):  # out of order; 6 first forces evicting finished slots
            out = pool.result(("batch", i), timeout=WAIT)
            check(out, i, sizes[i])
            assert out["x"].shape[0] == sizes[i]
        assert pool.pending() == set()
        for epoch in range(2):  # the same workers serve later epochs
            for i in range(3):
                pool.submit(i, H.task(10 * epoch + i))
            for i in range(3):
                check(pool.result(i, timeout=WAIT), 10 * epoch + i)
        assert pool.pids == pids
    assert_clean(pool, pids, shm_names)
    pool.close()  # idempotent


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_worker_exception_surfaces_and_pool_survives(kind):
    with make_pool(kind) as pool:
        pool.submit("ok1", H.task(1))
        pool.submit("bad", H.task(2, fail=True))
        pool.submit("ok3", H.task(3))
        with pytest.raises(WorkerError) as info:
            pool.result("bad", timeout=WAIT)
        assert not isinstance(info.value, WorkerDiedError)
        text = str(info.value)
        assert "ValueError" in text and "bad sample 2" in text
        assert "Traceback" in text and "_pool_helpers.py" in text and "in produce" in text
        assert pool.pending() == {"ok1", "ok3"}
        check(pool.result("ok3", timeout=WAIT), 3)
        check(pool.result("ok1", timeout=WAIT), 1)
        for i in range(6):  # the slot of the failed task was freed
            pool.submit(i, H.task(i))
            check(pool.result(i, timeout=WAIT), i)


class BadCount(H.Producer):
    def produce(self, task, out):
        return H.ROWS + 1


def test_produce_returning_bad_count_is_an_error():
    with BatchPool(BadCount(), H.SLOTS, workers=1, use_processes=False) as pool:
        pool.submit(0, H.task(0))
        with pytest.raises(WorkerError, match="number of rows"):
            pool.result(0, timeout=WAIT)


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in ("fork", "spawn") if m in METHODS])
def test_killed_worker_raises_worker_died(method):
    pool = make_pool(("process", method), workers=1)
    pids, shm_names = pool.pids, pool.shm_names
    pool.submit("quick", H.task(0))
    check(pool.result("quick", timeout=WAIT), 0)  # the worker is up and running
    pool.submit("slow", H.task(1, sleep=60))
    pool.submit("next", H.task(2))
    time.sleep(0.3)  # let the worker pick up the slow task
    os.kill(pids[0], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerDiedError) as info:
        pool.result("next", timeout=WAIT)  # noticed within ~poll_interval, never hangs
    print(f"WorkerDiedError after {time.monotonic() - start:.2f} s")
    text = str(info.value)
    assert str(pids[0]) in text and "SIGKILL" in text and "out-of-memory" in text
    assert "'slow'" in text and "'next'" in text
    assert_clean(pool, pids, shm_names)
    with pytest.raises(WorkerDiedError):  # the pool stays closed and says why
        pool.submit("again", H.task(3))
    pool.close()


class Exiter(H.Producer):
    def produce(self, task, out):
        os._exit(3)


def test_worker_exit_code_is_reported():
    pool = BatchPool(Exiter(), H.SLOTS, workers=2, start_method="fork")
    pids, shm_names = pool.pids, pool.shm_names
    pool.submit("k", H.task(0))
    with pytest.raises(WorkerDiedError, match="exited with code 3") as info:
        pool.result("k", timeout=WAIT)
    assert "'k'" in str(info.value)
    assert_clean(pool, pids, shm_names)


@pytest.mark.parametrize("kind", [KINDS[0], KINDS[-2], KINDS[-1]])
def test_results_are_independent_copies(kind):
    with make_pool(kind, workers=0 if kind[0] == "sync" else 1, num_slots=1) as pool:
        pool.submit("a", H.task(1))
        first = pool.result("a", timeout=WAIT)
        # private, writable and 64-byte aligned (so TensorFlow adopts them without a copy)
        assert all(arr.flags.writeable and arr.ctypes.data % 64 == 0 for arr in first.values())
        assert not any(np.shares_memory(arr, view) for arr in first.values()
                       for slot in pool._backend.views for view in slot.values())
        first["x"][:] = 12345.0  # must not write into the (reused) slot
        pool.submit("b", H.task(1))
        second = pool.result("b", timeout=WAIT)
        check(second, 1)
        assert not np.shares_memory(first["x"], second["x"])
        pool.submit("c", H.task(2))
        check(pool.result("c", timeout=WAIT), 2)
        check(second, 1)  # a later result does not overwrite an earlier one
        assert (first["x"] == 12345.0).all()


@pytest.mark.parametrize("kind", [KINDS[0], KINDS[-2]])
def test_timeout_discard_and_backlog(kind):
    with make_pool(kind, workers=1, num_slots=1) as pool:
        pool.submit("slow", H.task(0, sleep=0.8))
        with pytest.raises(TimeoutError):
            pool.result("slow", timeout=0.05)
        assert pool.pending() == {"slow"}  # still pending after a timeout
        pool.submit("next", H.task(5))  # no free slot: waits in the backlog
        pool.discard("slow")
        pool.discard("unknown")  # no error
        assert pool.pending() == {"next"}
        check(pool.result("next", timeout=WAIT), 5)  # gets the slot once "slow" finishes
        for i in range(3):
            pool.submit(i, H.task(i))
        pool.discard_all()
        assert pool.pending() == set()
        pool.submit("slow", H.task(7))  # a discarded key can be reused
        check(pool.result("slow", timeout=WAIT), 7)


def test_usage_errors():
    with pytest.raises(OptionError):
        BatchPool(H.Producer(), {})
    with pytest.raises(OptionError):
        BatchPool(H.Producer(), {"x": ((4, 2), np.float32), "y": ((3,), np.int32)})
    with pytest.raises(OptionError):
        BatchPool(H.Producer(), {"x": ((4,), object)}, use_processes=False)
    with pytest.raises(OptionError):
        BatchPool(object(), H.SLOTS)
    with pytest.raises(OptionError):
        BatchPool(H.Producer(), H.SLOTS, num_slots=0)
    pool = make_pool(("threads", None))
    pool.submit(1, H.task(1))
    with pytest.raises(ValueError, match="already pending"):
        pool.submit(1, H.task(1))
    with pytest.raises(KeyError):
        pool.result(2)
    pool.close()
    pool.close()
    assert pool.pending() == set()
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(3, H.task(3))
    with pytest.raises(RuntimeError, match="closed"):
        pool.result(1)


def test_unpicklable_task_fails_in_submit():
    with make_pool(("process", "fork"), workers=1) as pool:
        with pytest.raises(Exception):
            pool.submit("k", lambda: None)
        assert pool.pending() == set()
        pool.submit("k", H.task(1))
        check(pool.result("k", timeout=WAIT), 1)


def test_garbage_collected_pool_cleans_up():
    pool = make_pool(("process", "fork"))
    pids, shm_names = pool.pids, pool.shm_names
    pool.submit(0, H.task(0, sleep=5))
    assert len(shm_names) == 4 and all(Path("/dev/shm", name).exists() for name in shm_names)
    del pool
    gc.collect()
    children = {c.pid for c in psutil.Process().children(recursive=True)}
    assert not children & set(pids)
    assert not any(Path("/dev/shm", name).exists() for name in shm_names)


def test_exception_in_caller_closes_pool():
    with pytest.raises(ZeroDivisionError):
        with make_pool(("process", "fork")) as pool:
            pids, shm_names = pool.pids, pool.shm_names
            pool.submit(0, H.task(0, sleep=5))
            1 / 0
    assert_clean(pool, pids, shm_names)


SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {tests!r})
    import _pool_helpers as H
    from streamseg.parallel.pool import BatchPool
    from streamseg.errors import WorkerDiedError

    def main(mode, method):
        pool = BatchPool(H.Producer(), H.SLOTS, workers=2, start_method=method, name={name!r})
        print("PIDS", *pool.pids, flush=True)
        for i in range(5):
            pool.submit(i, H.task(i))
        for i in range(5):
            pool.result(i, timeout=30)
        pool.submit("slow", H.task(9, sleep=10))
        if mode == "close":
            pool.close()
        elif mode == "kill":
            time.sleep(0.3)
            os.kill(pool.pids[0], signal.SIGKILL)
            try:
                pool.result("slow", timeout=30)
            except WorkerDiedError as exc:
                print("DIED", exc, flush=True)
        elif mode == "raise":
            with pool:
                raise SystemExit(0)
        elif mode == "parent-killed":
            os.kill(os.getpid(), signal.SIGKILL)
        elif mode == "ctrl-c":  # the test sends SIGINT to the whole process group
            with pool:
                print("READY", flush=True)
                pool.result("slow", timeout=30)
        # mode "forget": exit with the pool still open; the finalizer must clean up

    if __name__ == "__main__":
        main(sys.argv[1], sys.argv[2])
""")


@pytest.mark.slow
@pytest.mark.parametrize("mode,method", [("forget", "spawn"), ("forget", "fork"),
                                         ("close", "forkserver"), ("kill", "fork"),
                                         ("raise", "fork"), ("parent-killed", "fork"),
                                         ("ctrl-c", "fork"), ("ctrl-c", "spawn")])
def test_no_leaks_at_interpreter_exit(tmp_path, mode, method):
    if method not in METHODS:
        pytest.skip(f"{method} not available")
    name = f"sstx{os.getpid()}"
    script = tmp_path / "use_pool.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).resolve().parent), name=name))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(script), mode, method], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,  # own process group, like a terminal job
                            # a shell's background job ignores SIGINT, and children inherit
                            # that; a terminal job does not: give the script the terminal's
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        lines = [proc.stdout.readline()]
        if mode == "ctrl-c":
            lines.append(proc.stdout.readline())
            assert lines[-1].startswith("READY"), lines
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    out = "".join(lines) + out
    pids = [int(p) for line in out.splitlines() if line.startswith("PIDS")
            for p in line.split()[1:]]
    assert len(pids) == 2, out + err
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # orphaned workers notice their parent is gone
        alive = [p for p in pids if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        shm = [f for f in os.listdir("/dev/shm") if f.startswith(name)]
        if not alive and not shm:
            break
        time.sleep(0.1)
    assert not alive, f"workers outlived their parent: {alive}"
    assert not shm, f"shared memory left behind: {shm}"
    if mode == "parent-killed":
        assert proc.returncode == -signal.SIGKILL
        return  # the resource tracker's leak warning is expected there
    assert "leaked" not in err, err
    if mode == "ctrl-c":  # one traceback, from the main process only
        assert proc.returncode != 0 and err.count("Traceback") == 1, err
        assert "KeyboardInterrupt" in err and "_process_worker" not in err, err
        return
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert ("DIED" in out) == (mode == "kill")


def shares_a_slot(arr: np.ndarray, pool: BatchPool) -> bool:
    return any(np.shares_memory(arr, view) for slot in pool._backend.views for view in slot.values())


@pytest.mark.parametrize("kind", [KINDS[0], KINDS[-2]])
def test_lent_results_are_in_place_and_their_slot_waits_for_them(kind):
    with make_pool(kind, workers=1, num_slots=2, lend=1) as pool:
        pool.submit("a", H.task(1))
        a = pool.result("a", timeout=WAIT)
        assert shares_a_slot(a["x"], pool) and a["x"].ctypes.data % 64 == 0  # no copy
        held = a["x"][1:]  # a view holds the slot as well
        del a
        gc.collect()
        pool.submit("b", H.task(2))
        b = pool.result("b", timeout=WAIT)  # one lent already: copied
        assert not shares_a_slot(b["x"], pool)
        check(b, 2)
        for i in range(3, 9):  # the one free slot turns over; the lent one is not touched
            pool.submit(i, H.task(i))
            check(pool.result(i, timeout=WAIT), i)
            np.testing.assert_array_equal(held, H.expected(1)["x"][1:])
        del held
        gc.collect()
        pool.submit("c", H.task(9))
        c = pool.result("c", timeout=WAIT)
        assert shares_a_slot(c["x"], pool)  # the slot came back: lending again
        check(c, 9)


def test_lent_results_outlive_close():
    pool = make_pool(KINDS[0].values[0], workers=1, num_slots=3, lend=2)
    pids, shm_names = pool.pids, pool.shm_names
    pool.submit("a", H.task(4))
    a = pool.result("a", timeout=WAIT)
    shms = pool._backend.shms
    pool.close()
    assert_clean(pool, pids, shm_names)  # workers gone, names unlinked ...
    check(a, 4)  # ... the lent memory still readable until the arrays go ...
    assert sum(shm._mmap is not None for shm in shms) == 1  # ... and only its slot still mapped
    del a
    gc.collect()


def test_a_worker_that_may_not_lower_its_priority_says_so(monkeypatch, capsys):
    from streamseg.parallel import workers

    def deny(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(workers.os, "setpriority", deny)  # never really lowers this process
    workers._apply_priority("low")
    err = capsys.readouterr().err
    assert "could not set worker_priority='low'" in err and "running at normal priority" in err


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_worker_gets_a_resource_tracker_lock_a_parent_thread_held():
    """A parent thread holding the tracker's lock at fork time must not deadlock the worker
    when it attaches its shared memory (seen once as a hung forked worker in a full test run)."""
    import threading
    from multiprocessing import resource_tracker

    from streamseg.parallel.workers import _fresh_fork_locks

    tracker = resource_tracker._resource_tracker
    held, release = threading.Event(), threading.Event()

    def hold():
        with tracker._lock:
            held.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(10)
        codes = []
        for fresh in (False, True):
            pid = os.fork()
            if pid == 0:  # child: only tiny code, then _exit
                if fresh:
                    _fresh_fork_locks()
                os._exit(0 if tracker._lock.acquire(timeout=1.0) else 1)
            codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        assert codes == [1, 0]  # inherited: held forever; fresh: free
    finally:
        release.set()
        t.join()


class _Recording(H.Producer):
    """Thread-worker producer that says when it is inside produce() and when it leaves."""

    def __init__(self, inside, order) -> None:
        super().__init__()
        self.inside, self.order = inside, order

    def produce(self, task, out):
        self.inside.set()
        n = super().produce(task, out)
        self.order.append("produce done")
        return n


@pytest.mark.skipif("fork" not in METHODS, reason="fork is not available here")
def test_fork_waits_for_producer_calls_in_this_process():
    # a fork while another thread runs native producer code (OpenCV) could copy a held lock
    # into the worker; so forking waits until no producer call of this process is running
    import threading

    from streamseg.parallel.forkguard import FORK_GUARD

    inside, order = threading.Event(), []
    threads = BatchPool(_Recording(inside, order), H.SLOTS, workers=1, use_processes=False)
    forked = None
    try:
        threads.submit("slow", H.task(1, sleep=0.5))
        assert inside.wait(WAIT)
        forked = make_pool(("process", "fork"), workers=1)
        order.append("forked")
        assert order == ["produce done", "forked"]
        assert FORK_GUARD.producing_now == 0
        np.testing.assert_array_equal(threads.result("slow", timeout=WAIT)["x"], H.expected(1)["x"])
        forked.submit(2, H.task(2))
        np.testing.assert_array_equal(forked.result(2, timeout=WAIT)["x"], H.expected(2)["x"])
    finally:
        threads.close()
        if forked is not None:
            forked.close()


def test_fork_guard_gives_up_after_its_timeout(capsys):
    from streamseg.parallel.forkguard import ForkGuard

    guard, order = ForkGuard(), []
    with guard.producing():
        with guard.forking(timeout=0.05):  # a call that never ends delays a fork, never blocks it
            order.append("forked")
    assert order == ["forked"] and guard.producing_now == 0
    assert "still being produced in this process after 0.05 s" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "register_at_fork"), reason="needs os.fork")
def test_a_child_forked_during_a_fork_starts_with_a_free_guard():
    # the workers are forked while the guard is held: they must not inherit a pending fork,
    # or a producer call in them would wait for good
    from streamseg.parallel.forkguard import FORK_GUARD

    with FORK_GUARD.forking():
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            ok = FORK_GUARD._forking == 0 and FORK_GUARD.producing_now == 0
            if ok:
                with FORK_GUARD.producing():
                    pass
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("processes", [True, False], ids=["processes", "threads"])
def test_setup_process_runs_in_worker_processes_only(processes):
    """Process-wide settings (setup_process) are for worker processes: thread workers share
    the caller's process, which keeps its own settings."""
    with BatchPool(H.ThreadsReporter(), H.THREADS_SLOTS, workers=2, use_processes=processes,
                   start_method="fork" if processes else None) as pool:
        pool.submit("a", None)
        _, ran_in, pid = pool.result("a", timeout=WAIT)["v"][0]
    if processes:
        assert pid != os.getpid() and ran_in == pid
    else:
        assert pid == os.getpid() and ran_in == 0


@pytest.mark.parametrize("sequential", [True, False])
def test_batch_producer_runs_opencv_sequentially_in_workers_that_fill_the_cores(sequential):
    """With sequential_opencv a forked worker runs OpenCV on its own thread (setNumThreads(0):
    1 would wait forever for pool threads a forked child lacks); the parent keeps its own."""
    import cv2

    from streamseg.pipeline.batches import BatchOptions, BatchProducer
    from streamseg.store.reader import Store

    cv2.setNumThreads(2)
    for _ in range(3):  # the parent has used OpenCV's pool before the fork
        cv2.warpAffine(np.zeros((512, 512, 3), np.uint8), np.eye(2, 3), (512, 512))
    store = Store.from_arrays(np.zeros((2, 8, 8, 1), np.uint8), np.zeros((2, 8, 8), np.uint8))
    inner = BatchProducer(store, BatchOptions(), sequential_opencv=sequential)
    with BatchPool(H.ThreadsReporter(inner), H.THREADS_SLOTS, workers=1, use_processes=True,
                   start_method="fork") as pool:
        pool.submit("a", None)
        threads, _, pid = pool.result("a", timeout=WAIT)["v"][0]
    assert pid != os.getpid()
    assert threads == (1 if sequential else 2)
    assert cv2.getNumThreads() == 2
