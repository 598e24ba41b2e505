"""Datasets used where streamseg does not drive iteration, worker errors, and clean exits.

- Keras's stock ``PyDatasetAdapter`` (and a plain ``multiprocessing.Pool``) call ``ds[i]`` in
  daemonic worker processes, which may not start streamseg's own workers: batches are then
  produced inline, and equal ``ds[i]``.
- A failure while producing a batch names its samples, their source names and the store.
- A script that stops mid-epoch leaves no shared memory and no resource-tracker warning.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # children inherit sys.path

from conftest import write_pairs  # noqa: E402

from streamseg import Augment, CorruptChunkError, SegmentationDataset, WorkerDiedError, WorkerError  # noqa: E402
from streamseg.parallel.pool import EXIT_GATE, BatchPool  # noqa: E402
from streamseg.store.reader import Store  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
N = 12  # samples, in chunks of 4: batch k of an unshuffled dataset of batch size 4 is chunk k
TIMEOUT = 120  # seconds any child interpreter may take before the test fails instead of hanging
DAEMONIC = "is a daemonic process"


@pytest.fixture(scope="module")
def named_store(tmp_path_factory):
    """A zarr store from files s0000.png ...: sample i has label i everywhere, pixel (0,0,0) = i."""
    from streamseg import convert

    root = tmp_path_factory.mktemp("foreign")
    images = np.random.default_rng(4).integers(0, 256, (N, 8, 8, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(N)
    masks = np.repeat(np.arange(N, dtype=np.uint8), 64).reshape(N, 8, 8)
    write_pairs(root / "src", images, masks)
    return convert(root / "src", root / "s.zarr", chunk_samples=4, progress=False)


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True,
                              text=True, timeout=TIMEOUT, env=env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the script hung for {TIMEOUT} s; stderr: {str(exc.stderr)[-3000:]}")


def segments(prefix: str) -> list[str]:
    return [f for f in os.listdir("/dev/shm") if f.startswith(prefix)]


def daemonic_lines(err: str) -> list[int]:
    """Pids of the 'producing batches inline' notices on stderr."""
    return [int(p) for p in re.findall(rf"streamseg: process (\d+) \(.*?\) {DAEMONIC}", err)]


# ---------------------------------------------------------------------- item 8: daemonic processes
KERAS_ADAPTER = """
    import sys
    import numpy as np
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter
    from streamseg import Augment, SegmentationDataset

    ds = SegmentationDataset(sys.argv[1], 4, shuffle="uniform", seed=3, num_classes=256, workers=2,
                             use_multiprocessing=True, augment=Augment(brightness=0.3, contrast=0.3))
    want = [ds[i] for i in range(len(ds))]  # our pool is up when Keras forks its workers
    got = list(PyDatasetAdapter(ds, shuffle=False).get_numpy_iterator())
    assert len(got) == len(want), (len(got), len(want))
    for (gi, gm), (wi, wm) in zip(got, want):
        np.testing.assert_array_equal(gi, wi)
        np.testing.assert_array_equal(gm, wm)
    labels = sorted(int(v) for _, m in got for v in m[:, 0, 0, 0])
    assert labels == list(range({n})), labels
    ds.close()
    print("OK", len(got), flush=True)
"""


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="Keras forks its workers")
def test_keras_stock_adapter_with_worker_processes_gives_the_batches_of_getitem(named_store):
    """Keras's own adapter calls ds[i] in daemonic pool workers: before, 'daemonic processes are
    not allowed to have children' in every run, sometimes followed by a hang."""
    out = run_script(KERAS_ADAPTER.format(n=N), str(named_store.path))
    assert out.returncode == 0 and "OK 3" in out.stdout, out.stderr[-3000:]
    assert "daemonic processes are not allowed" not in out.stderr
    pids = daemonic_lines(out.stderr)
    assert pids and len(pids) == len(set(pids)), out.stderr[-3000:]  # said once per process


def _batch_in_a_pool_worker(args: tuple[str, int]) -> tuple[int, np.ndarray, np.ndarray]:
    path, i = args
    with SegmentationDataset(path, 4, shuffle=False, num_classes=256, workers=2,
                             use_multiprocessing=True, augment=Augment(brightness=0.3)) as ds:
        images, masks = ds[i]
        ds[(i + 1) % len(ds)]  # a second batch in the same process: no second notice
        return os.getpid(), np.array(images), np.array(masks)


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs fork")
def test_dataset_made_inside_a_multiprocessing_pool_worker_produces_inline(named_store, capfd):
    ds = SegmentationDataset(named_store, 4, shuffle=False, num_classes=256, workers=0,
                             augment=Augment(brightness=0.3))
    pool = mp.get_context("fork").Pool(2)
    try:
        got = pool.map_async(_batch_in_a_pool_worker, [(str(named_store.path), i) for i in range(len(ds))]
                             ).get(timeout=TIMEOUT)
    finally:
        pool.terminate()
        pool.join()
    for i, (_, images, masks) in enumerate(got):
        want_images, want_masks = ds[i]
        np.testing.assert_array_equal(images, want_images)
        np.testing.assert_array_equal(masks, want_masks)
        assert masks[:, 0, 0, 0].tolist() == list(range(4 * i, 4 * i + 4))
    said = daemonic_lines(capfd.readouterr().err)
    assert sorted(said) == sorted(set(pid for pid, _, _ in got))  # once in each worker that made one


# ---------------------------------------------------------------------- item 7: errors name samples
@pytest.fixture
def read_fails_at_sample_9(monkeypatch):
    """Store.read raises a plain ValueError for batches holding sample 9 (inherited by forks)."""
    original = Store.read

    def read(self, indices):
        if 9 in np.asarray(indices).tolist():
            raise ValueError("disk said no")
        return original(self, indices)

    monkeypatch.setattr(Store, "read", read)


@pytest.mark.parametrize("workers, processes", [(0, False), (2, False), (2, True)])
def test_a_failing_batch_names_its_samples_sources_and_store(named_store, read_fails_at_sample_9,
                                                            workers, processes):
    if processes and mp.get_start_method() != "fork":
        pytest.skip("the patched Store.read reaches the workers through fork only")
    with SegmentationDataset(named_store, 4, shuffle=False, num_classes=256, workers=workers,
                             use_multiprocessing=processes) as ds:
        ds[0]
        with pytest.raises(WorkerError) as info:
            ds[2]
    text = str(info.value)
    assert ("Could not produce a batch of samples 8, 9, 10, 11 (sources 's0008', 's0009', 's0010', "
            f"'s0011') of store {named_store.path}, epoch 0: ValueError: disk said no") in text
    if workers == 0:
        assert isinstance(info.value.__cause__, ValueError)  # the original, for tracebacks
    else:  # the worker's traceback, the original's included, is in a note
        assert "ValueError: disk said no" in "".join(getattr(info.value, "__notes__", []))


def test_long_batches_are_described_compactly(named_store):
    from streamseg.pipeline.batches import BatchOptions, BatchProducer

    producer = BatchProducer(named_store, BatchOptions())
    text = producer.describe((3, np.array([7, 1, 2, 3, 4, 5])))
    assert text == (f"samples 7, 1, 2, 3, ... (6 in all; sources 's0007', 's0001', 's0002', 's0003', ...) "
                    f"of store {named_store.path}, epoch 3")
    wrapped = BatchProducer(Store.from_arrays(np.zeros((3, 4, 4, 1), np.uint8), np.zeros((3, 4, 4), np.uint8)),
                            BatchOptions())
    assert wrapped.describe((0, np.array([2]))) == "sample 2 of store in-memory arrays, epoch 0"


@pytest.mark.parametrize("workers, processes", [(0, False), (2, True)])
def test_a_damaged_chunk_keeps_its_type_and_gets_the_samples(tmp_path, named_store, workers, processes):
    import shutil

    store_path = tmp_path / "damaged.zarr"
    shutil.copytree(named_store.path, store_path)
    chunk = next((store_path / "images" / "c" / "2").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    chunk.write_bytes(b"not a blosc frame" * 10)
    with SegmentationDataset(str(store_path), 4, shuffle=False, num_classes=256, workers=workers,
                             use_multiprocessing=processes) as ds:
        ds[0]
        with pytest.raises(CorruptChunkError) as info:
            ds[2]
    assert f"While producing samples 8, 9, 10, 11 (sources 's0008'" in str(info.value)
    assert f"of store {store_path}, epoch 0: Chunk 2 of 'images'" in str(info.value)


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="the patched read needs fork")
def test_a_dead_worker_names_the_samples_it_was_producing(named_store, monkeypatch, tmp_path):
    import signal

    marker = tmp_path / "busy"
    original = Store.read

    def read(self, indices):
        if 5 in np.asarray(indices).tolist():
            marker.write_text(str(os.getpid()))
            time.sleep(60)  # killed long before
        return original(self, indices)

    monkeypatch.setattr(Store, "read", read)
    with SegmentationDataset(named_store, 4, shuffle=False, num_classes=256, workers=1,
                             use_multiprocessing=True, start_method="fork") as ds:
        ds[0]  # batch 1 was submitted ahead; the one worker takes it next
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(int(marker.read_text()), signal.SIGKILL)
        with pytest.raises(WorkerDiedError) as info:
            ds[1]
    assert re.search(r"killed by SIGKILL.* while producing key \(0, 1\) \(samples 4, 5, 6, 7 "
                     r"\(sources 's0004'", str(info.value)), str(info.value)
    assert f"of store {named_store.path}, epoch 0)" in str(info.value)


# ---------------------------------------------------------------------- item 9: clean exits
def test_no_pool_starts_once_the_exit_gate_is_closed(monkeypatch):
    import _pool_helpers as H

    before = set(segments("sstgate"))
    monkeypatch.setattr(EXIT_GATE, "closed", True)
    with pytest.raises(RuntimeError, match="interpreter is exiting"):
        BatchPool(H.Producer(), H.SLOTS, workers=1, name="sstgate")
    assert set(segments("sstgate")) == before


LATE = """
    import atexit, sys

    def late():  # registered first, so it runs last: after every pool's exit finalizer
        try:
            ds[2]
            print("late: produced", flush=True)
        except RuntimeError as exc:
            print(f"late: refused ({exc})", flush=True)

    atexit.register(late)
    from streamseg import SegmentationDataset

    ds = SegmentationDataset(sys.argv[1], 4, shuffle=False, num_classes=256, workers=2,
                             use_multiprocessing=True)
    ds[0]
    print("POOL", ds._feeder.pool.shm_names[0].rsplit("_", 1)[0], flush=True)
"""


def test_a_batch_asked_for_after_the_exit_finalizers_starts_no_pool(named_store):
    """What a daemon thread (the hand-over thread of a tf.data pass) did at exit in about 1 run
    of 20: ask for a batch after the pools' exit finalizers ran, so a new pool started that
    nothing shut down ('There appear to be 9 leaked shared_memory objects')."""
    out = run_script(LATE, str(named_store.path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "late: refused (the interpreter is exiting" in out.stdout, out.stdout
    assert "leaked" not in out.stderr, out.stderr[-3000:]
    prefix = re.search(r"POOL (\S+)", out.stdout).group(1).rsplit("_", 1)[0]  # streamseg_<pid>
    assert segments(prefix + "_") == []


MID_EPOCH = """
    import sys
    from streamseg import SegmentationDataset

    ds = SegmentationDataset(sys.argv[1], 2, augment="heavy", num_classes=256, workers=2,
                             use_multiprocessing=True)
    it = iter(ds.to_tf_dataset())
    next(it)
    next(it)
    print("left mid-epoch", flush=True)
    sys.exit(0)
"""


def test_scripts_stopping_mid_epoch_leave_no_shared_memory(named_store):
    """Five scripts, run at once, leaving a tf.data pass mid-epoch (the leak showed in 2 of 20)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(MID_EPOCH), str(named_store.path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(5)]
    deadline = time.monotonic() + 2 * TIMEOUT
    try:
        results = [(proc.pid, proc.returncode, *proc.communicate(timeout=max(1.0, deadline - time.monotonic())))
                   for proc in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"a script left mid-epoch did not exit within {2 * TIMEOUT} s")
    finally:
        for proc in procs:
            proc.kill()
    for pid, _, out, err in results:
        assert "left mid-epoch" in out and "leaked" not in err, err[-3000:]
    assert [proc.returncode for proc in procs] == [0] * 5
    for pid, *_ in results:
        end = time.monotonic() + 10  # orphaned workers, if any, would unmap within a poll
        while segments(f"streamseg_{pid}_") and time.monotonic() < end:
            time.sleep(0.1)
        assert segments(f"streamseg_{pid}_") == []
