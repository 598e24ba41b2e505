"""model.fit end to end with worker processes: loss, cleanup, errors reaching fit."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import psutil
import pytest

from streamseg import LabelError, SegmentationDataset, StreamsegError, WorkerDiedError, convert, split

pytestmark = pytest.mark.slow


def worker_children() -> list[psutil.Process]:
    """Children of this process, apart from multiprocessing's resource tracker and fork server."""
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
            if "resource_tracker" not in cmd and "forkserver" not in cmd:
                out.append(child)
        except psutil.Error:
            continue
    return out


def wait_no_workers(timeout: float = 15.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while worker_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    return worker_children()


@pytest.fixture(scope="module")
def synth_store(tmp_path_factory):
    from streamseg.store.converter import convert_source
    from streamseg.io.sources import SynthSource

    dst = tmp_path_factory.mktemp("fit") / "s.zarr"
    return convert_source(SynthSource(48, size=(32, 32), classes=3), dst, chunk_samples=4, progress=False)


def test_fit_two_epochs_with_worker_processes(synth_store):
    from streamseg.models import small_unet

    train_idx, val_idx = split(synth_store, 0.25)
    train = SegmentationDataset(synth_store, 8, indices=train_idx, augment="standard", workers=2,
                                use_multiprocessing=True, keep_alive=0.5)
    val = SegmentationDataset(synth_store, 8, indices=val_idx, shuffle=False)
    model = small_unet((32, 32, 3), train.num_classes, base_filters=4)
    history = model.fit(train, validation_data=val, epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2
    assert np.isfinite(history.history["loss"]).all() and np.isfinite(history.history["val_loss"]).all()
    assert train.epoch == 2  # one advance per epoch actually read
    assert wait_no_workers() == []
    train.close()


def test_fit_stopping_mid_epoch_does_not_hang(synth_store):
    """steps_per_epoch < len(ds): tf.data drops the iterator while batches are still coming."""
    from streamseg.models import small_unet

    for workers, mp in ((2, True), (1, False), (0, False)):
        ds = SegmentationDataset(synth_store, 4, augment="light", workers=workers, use_multiprocessing=mp)
        model = small_unet((32, 32, 3), ds.num_classes, base_filters=4)
        with ds:
            history = model.fit(ds, epochs=2, steps_per_epoch=3, verbose=0)
        assert len(history.history["loss"]) == 2
    assert wait_no_workers() == []


class SlowArray:
    """An array-like whose reads take a while, like a cold disk."""

    def __init__(self, data: np.ndarray, delay: float) -> None:
        self.data, self.delay = data, delay
        self.shape, self.dtype = data.shape, data.dtype

    def __getitem__(self, i):
        time.sleep(self.delay)
        return self.data[i]


def test_fit_ends_while_a_batch_is_still_being_read():
    """tf.data must not tear down its iterator while a thread waits inside our generator."""
    from streamseg import Store
    from streamseg.models import small_unet

    images = np.zeros((64, 16, 16, 3), np.uint8)
    masks = np.zeros((64, 16, 16), np.uint8)
    store = Store.from_arrays(SlowArray(images, 0.1), masks)
    ds = SegmentationDataset(store, 4, workers=0, num_classes=2)
    model = small_unet((16, 16, 3), 2, base_filters=4)
    history = model.fit(ds, epochs=1, steps_per_epoch=1, verbose=0)
    assert len(history.history["loss"]) == 1


def test_worker_exception_reaches_fit(tmp_path):
    from streamseg.models import small_unet

    images = np.zeros((16, 16, 16, 3), np.uint8)
    masks = np.zeros((16, 16, 16), np.uint8)
    masks[13] = 7  # a bad label in the last batch
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "y.npy", masks)
    store = convert(images=tmp_path / "x.npy", masks=tmp_path / "y.npy", dst=tmp_path / "bad", progress=False)
    ds = SegmentationDataset(store, 4, shuffle=False, num_classes=3, workers=2, use_multiprocessing=True)
    model = small_unet((16, 16, 3), 3, base_filters=4)
    with pytest.raises(Exception, match=r"Sample 13 .* of store .*bad has label 7") as info:
        model.fit(ds, epochs=1, verbose=0)
    assert "LabelError" in str(info.value) or isinstance(info.value, LabelError)
    ds.close()
    assert wait_no_workers() == []


def test_dead_worker_raises_quickly(synth_store):
    ds = SegmentationDataset(synth_store, 4, augment="heavy", workers=2, use_multiprocessing=True)
    ds[0]
    victim = ds._feeder.pool.pids[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while psutil.Process(victim).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.01)  # dead, not yet reaped: the pool must notice on the next request
    with pytest.raises(WorkerDiedError, match=f"{victim}.*SIGKILL"):
        for i in range(1, len(ds)):
            ds[i]
    assert wait_no_workers(5) == []
    ds.close()


def test_to_tf_dataset_matches_getitem(synth_store):
    ds = SegmentationDataset(synth_store, 8, augment="light", seed=2)
    expected = [ds[i] for i in range(len(ds))]
    got = list(ds.to_tf_dataset().as_numpy_iterator())
    assert len(got) == len(expected)
    for (ei, em), (gi, gm) in zip(expected, got):
        np.testing.assert_array_equal(ei, gi)
        np.testing.assert_array_equal(em, gm)


@pytest.mark.parametrize("workers, mp", [(0, False), (2, True)])
def test_interpreter_exits_with_a_tf_iterator_left_mid_epoch(tmp_path, workers, mp):
    """The interpreter exits cleanly with an iterator left mid-epoch, while tf.data's prefetch
    thread is inside our Python code producing the next batch (~0.3 s each without workers).
    Without the exit finalizer (``_TfCalls.quiesce``) this hung in 4 of 5 runs by hand."""
    import subprocess
    import sys
    import textwrap

    from streamseg.store.converter import convert_source
    from streamseg.io.sources import SynthSource

    store = convert_source(SynthSource(96, size=(256, 256), classes=3), tmp_path / "s.zarr", progress=False)
    script = textwrap.dedent(f"""
        from streamseg import SegmentationDataset
        ds = SegmentationDataset({str(store.path)!r}, 32, augment="heavy", num_classes=3, workers={workers},
                                 use_multiprocessing={mp})
        it = iter(ds.to_tf_dataset())
        next(it)
        next(it)
        print("left mid-epoch", flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "left mid-epoch" in out.stdout


def test_tf_iterator_deleted_mid_epoch_while_a_call_runs(synth_store):
    """Deleting an iterator whose prefetch thread is inside our code waits for that call
    (the GIL is released meanwhile), then the next iterator starts a fresh pass."""
    import gc

    with SegmentationDataset(synth_store, 8, augment="heavy", seed=3) as ds:
        expected = [ds[i] for i in range(2)]
        it = iter(ds.to_tf_dataset())
        next(it)
        del it
        gc.collect()
        got = list(ds.to_tf_dataset().take(2).as_numpy_iterator())
    for (ei, em), (gi, gm) in zip(expected, got):
        np.testing.assert_array_equal(ei, gi)
        np.testing.assert_array_equal(em, gm)


def test_tf_calls_quiesce_waits_for_a_running_call_and_refuses_new_ones():
    import threading

    from streamseg.pipeline.adapter import _TfCalls

    calls, inside, release, order = _TfCalls(), threading.Event(), threading.Event(), []

    def call():
        assert calls.enter()
        inside.set()
        release.wait(10)
        order.append("call done")
        calls.leave()

    t = threading.Thread(target=call)
    t.start()
    inside.wait(10)
    threading.Timer(0.2, release.set).start()
    calls.quiesce(timeout=10)
    order.append("quiesced")
    t.join()
    assert order == ["call done", "quiesced"]
    assert calls.enter() is False and calls.running == 0


def test_tf_calls_quiesce_waits_until_the_calling_thread_leaves_python():
    """After our function returns, tf.data's wrapper still runs Python in that thread; exit
    must wait for it too (a fixed 50 ms wait did not always suffice on a loaded machine)."""
    import _thread
    import threading

    from streamseg.pipeline.adapter import _TfCalls

    calls, left, done, order = _TfCalls(), threading.Event(), threading.Event(), []

    def call():  # stands for tf.data's thread: our function, then more Python in the wrapper
        assert calls.enter()
        calls.leave()
        left.set()
        time.sleep(0.4)
        order.append("wrapper done")
        done.set()

    _thread.start_new_thread(call, ())  # like tf.data's C++ thread: not one threading started
    left.wait(10)
    calls.quiesce(timeout=10)
    order.append("quiesced")
    done.wait(10)
    assert order == ["wrapper done", "quiesced"]
    assert _TfCalls.wait_out_of_python({threading.get_ident()}, timeout=0.05) is False  # this thread runs Python


def test_tf_calls_quiesce_waits_for_a_call_that_is_due_but_not_yet_in_python():
    """After a call that leaves batches to come, tf.data's thread asks for the next one as soon
    as the consumer takes a batch, and may still be waiting for the GIL when the exit hooks run
    (the CI hang): quiesce waits for that call to arrive and be refused."""
    import _thread
    import threading

    from streamseg.pipeline.adapter import _TfCalls

    calls, done, order = _TfCalls(), threading.Event(), []
    assert calls.enter()
    calls.leave(more=True)  # batch i served; batch i + 1 exists

    def late_call():  # the next call, arriving after quiesce has begun
        time.sleep(0.3)
        order.append(("refused", calls.enter() is False))
        done.set()

    _thread.start_new_thread(late_call, ())
    calls.quiesce(timeout=10, settle=10)
    order.append("quiesced")
    done.wait(10)
    assert order == [("refused", True), "quiesced"]


def test_tf_calls_quiesce_does_not_wait_after_the_last_batch():
    from streamseg.pipeline.adapter import _TfCalls

    import threading

    calls = _TfCalls()
    assert calls.enter()
    calls.leave(more=False)  # the pass's last batch: no call is due
    t = threading.Thread(target=calls.quiesce, kwargs={"timeout": 600, "settle": 600})
    t.start()
    t.join(60)  # a wait for a call that never comes would block for 600 s
    assert not t.is_alive() and calls.enter() is False


def test_tf_calls_quiesce_ignores_python_threads_that_reuse_a_tf_ident(capsys):
    """An ended tf.data thread's ident may be reused by a Python thread that never leaves
    Python (a keep_alive timer waiting): exit must not wait 5 s for it."""
    import threading

    from streamseg.pipeline.adapter import _TfCalls

    calls, release = _TfCalls(), threading.Event()
    t = threading.Thread(target=release.wait, args=(30,))
    t.start()
    calls.threads.add(t.ident)  # as if a finished tf.data thread had had this ident
    calls.quiesce(timeout=10)
    alive = t.is_alive()
    release.set()
    t.join()
    assert alive and "still running Python" not in capsys.readouterr().err


def test_tf_iterator_after_close_says_so(synth_store):
    ds = SegmentationDataset(synth_store, 8, workers=2, use_multiprocessing=True)
    expected = ds[1][0]
    it = iter(ds.to_tf_dataset())
    next(it)
    ds.close()
    got = []  # a batch prefetched before close is whole and valid; then the pass says it ended
    with pytest.raises(Exception, match="the dataset was closed, or the pass failed") as info:
        for _ in range(3):
            got.append(next(it)[0].numpy())
    assert len(got) <= 1 and all(np.array_equal(g, expected) for g in got)
    assert f"Received: batch {1 + len(got)} of 6" in str(info.value)
    assert wait_no_workers() == []


def test_close_during_a_pass_does_not_bring_workers_back(synth_store):
    # the pass's hand-over thread runs ahead of the consumer; once close() has stopped the
    # workers, its next fetch must fail instead of starting a new pool behind the caller's back
    ds = SegmentationDataset(synth_store, 8, workers=2, use_multiprocessing=True, shuffle=False)
    expected = [ds[i][1].copy() for i in range(len(ds))]
    gen = iter(ds)
    got = [next(gen)[1].copy()]
    ds.close()
    with pytest.raises(StreamsegError, match="closed while a pass over it was running") as info:
        for _, mask in gen:
            got.append(mask.copy())
    assert 1 <= len(got) < len(ds) and all(np.array_equal(g, e) for g, e in zip(got, expected))
    assert "Received: batch" in str(info.value)
    assert wait_no_workers() == []
    assert [m for _, m in ds][0].shape == expected[0].shape  # a new pass starts the workers again
    ds.close()
    assert wait_no_workers() == []


def test_keep_alive_expiring_mid_pass_restarts_the_workers(synth_store):
    # fit with steps_per_epoch < len(ds) keeps one pass across epochs and calls on_epoch_end
    # in between; a validation longer than keep_alive closes the pool mid-pass: the pass goes on
    ds = SegmentationDataset(synth_store, 8, workers=2, use_multiprocessing=True, shuffle=False, keep_alive=0.2)
    expected = [ds[i][1].copy() for i in range(len(ds))]
    gen = iter(ds)
    got = [next(gen)[1].copy(), next(gen)[1].copy()]
    time.sleep(1.0)  # the hand-over thread fetches ahead until the hand-over queue is full
    ds.on_epoch_end()
    deadline = time.monotonic() + 10
    while ds._feeder.pool is not None and time.monotonic() < deadline:
        time.sleep(0.05)  # the keep_alive timer closes the pool
    assert ds._feeder.pool is None
    got += [mask.copy() for _, mask in gen]
    assert len(got) == len(ds) and all(np.array_equal(g, e) for g, e in zip(got, expected))
    ds.close()


def test_fit_lends_every_batch_from_its_slot(synth_store, monkeypatch):
    """Under fit with a consumer slower than the workers every batch is lent in place: the
    batches TensorFlow keeps alive at once (step, prefetch buffer, hand-over) fit in LEND, so
    none is copied out of its slot in the gap before a step."""
    import keras
    import tensorflow as tf

    from streamseg.parallel.pool import BatchPool

    copies = []
    original = BatchPool._copy

    def counting_copy(self, entry):
        copies.append(entry.key)
        return original(self, entry)

    monkeypatch.setattr(BatchPool, "_copy", counting_copy)

    def compute(x):
        time.sleep(0.01)  # a consumer slower than the workers: everything ahead fills up
        return np.float32(0.0)

    class Slow(keras.Model):
        def call(self, inputs):
            return inputs

        def train_step(self, data):
            return {"loss": tf.numpy_function(compute, [tf.reshape(data[0], [-1])[:1]], tf.float32)}

    model = Slow()
    model.compile()
    with SegmentationDataset(synth_store, 4, augment="light", workers=2, use_multiprocessing=True) as ds:
        history = model.fit(ds, epochs=2, verbose=0, callbacks=[ds.epoch_callback()])
    assert len(history.history["loss"]) == 2
    assert copies == []
