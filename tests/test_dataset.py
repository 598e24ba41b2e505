"""SegmentationDataset: order, pairing, determinism across workers, augmentation, modes."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from streamseg import Augment, LabelError, OptionError, SegmentationDataset, Store, convert, split

N = 45


@pytest.fixture
def labelled_store(tmp_path, backend):
    """Mask of sample i is filled with label i; image pixel (0,0,0) holds i too."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (N, 24, 24, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(N)
    masks = np.repeat(np.arange(N, dtype=np.uint8), 24 * 24).reshape(N, 24, 24)
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "y.npy", masks)
    store = convert(images=tmp_path / "x.npy", masks=tmp_path / "y.npy", dst=tmp_path / "s", format=backend,
                    chunk_samples=4, progress=False)
    return store, images


def collect(ds, order=None):
    order = range(len(ds)) if order is None else order
    got = {i: ds[i] for i in order}
    return [got[i] for i in range(len(ds))]


def test_order_coverage_and_pairing(labelled_store):
    store, images = labelled_store
    ds = SegmentationDataset(store, 8, shuffle=False, num_classes=256)
    batches = collect(ds)
    masks = np.concatenate([m for _, m in batches])
    imgs = np.concatenate([i for i, _ in batches])
    assert len(ds) == 6 and masks.shape == (N, 24, 24, 1) and masks.dtype == np.int32
    np.testing.assert_array_equal(masks[:, 0, 0, 0], np.arange(N))  # order and coverage
    np.testing.assert_array_equal(np.round(imgs[:, 0, 0, 0] * 255), np.arange(N))  # pairing
    np.testing.assert_allclose(imgs, images / np.float32(255), rtol=1e-6)
    assert (masks == masks[:, :1, :1]).all()


@pytest.mark.parametrize("shuffle", ["window", "uniform"])
def test_shuffled_epochs_are_permutations_that_change(labelled_store, shuffle):
    store, _ = labelled_store
    ds = SegmentationDataset(store, 8, shuffle=shuffle, num_classes=256, seed=3)
    first = np.concatenate([m[:, 0, 0, 0] for _, m in collect(ds)])
    imgs = np.concatenate([i[:, 0, 0, 0] for i, _ in collect(ds)])
    np.testing.assert_array_equal(np.sort(first), np.arange(N))
    np.testing.assert_array_equal(np.round(imgs * 255), first)
    np.testing.assert_array_equal(first, ds.epoch_indices())
    ds.on_epoch_end()
    second = np.concatenate([m[:, 0, 0, 0] for _, m in collect(ds)])
    np.testing.assert_array_equal(np.sort(second), np.arange(N))
    assert not np.array_equal(first, second)
    again = SegmentationDataset(store, 8, shuffle=shuffle, num_classes=256, seed=3)
    np.testing.assert_array_equal(first, again.epoch_indices(0))


def test_window_shuffle_touches_few_chunks(labelled_store):
    store, _ = labelled_store
    ds = SegmentationDataset(store, 8, shuffle="window", num_classes=256, window_chunks=2)
    order = ds.epoch_indices()
    for b in range(len(ds)):
        assert len(np.unique(order[b * 8 : (b + 1) * 8] // 4)) <= 4


CONFIGS = [(0, False, None), (1, False, None), (2, False, None), (1, True, "fork"), (2, True, "fork"), (2, True, "forkserver"), (2, True, "spawn")]


@pytest.mark.parametrize("workers, mp, method", CONFIGS)
def test_identical_batches_whatever_the_workers(labelled_store, workers, mp, method):
    store, _ = labelled_store
    kw = dict(augment="heavy", num_classes=256, seed=5)
    reference = collect(SegmentationDataset(store, 8, workers=0, **kw))
    ds = SegmentationDataset(store, 8, workers=workers, use_multiprocessing=mp, start_method=method, **kw)
    with ds:
        ds[0]  # the main process reads the store before workers start
        shuffled = collect(ds, order=[3, 0, 5, 1, 4, 2])
        in_order = list(ds)
    for (ri, rm), (si, sm), (oi, om) in zip(reference, shuffled, in_order):
        np.testing.assert_array_equal(ri, si)
        np.testing.assert_array_equal(rm, sm)
        np.testing.assert_array_equal(ri, oi)
        np.testing.assert_array_equal(rm, om)


def test_transforms_differ_per_sample_and_epoch(tmp_path):
    images = np.repeat(np.linspace(0, 255, 32 * 32, dtype=np.uint8).reshape(1, 32, 32, 1), 8, axis=0)
    masks = np.zeros((8, 32, 32), np.uint8)
    masks[:, 4:12, 4:20] = 1
    store = Store.from_arrays(images, masks)
    aug = Augment(hflip=0.5, vflip=0.5, rotate=30, scale=(0.8, 1.2))
    ds = SegmentationDataset(store, 8, augment=aug, shuffle=False)
    imgs, msks = ds[0]
    distinct = {imgs[j].tobytes() for j in range(8)}
    assert len(distinct) >= 6  # one transform per sample, not per batch
    ds.on_epoch_end()
    imgs2, _ = ds[0]
    assert not np.array_equal(imgs, imgs2)
    assert set(np.unique(msks)) <= {0, 1}


def test_alignment_oracle_after_heavy_augmentation(tmp_path):
    rng = np.random.default_rng(0)
    masks = np.zeros((12, 64, 64), np.uint8)
    for m in masks:
        for label in (1, 2, 3):
            y, x = rng.integers(4, 44, 2)
            m[y : y + 16, x : x + 14] = label
    images = np.clip(masks[..., None] * 60 + rng.normal(0, 3, (12, 64, 64, 3)), 0, 255).astype(np.uint8)
    geometric = Augment(hflip=0.5, vflip=0.5, rot90=0.5, rotate=40, scale=(0.7, 1.3), translate=0.1,
                        shear=10, elastic=0.5)
    ds = SegmentationDataset(Store.from_arrays(images, masks), 12, augment=geometric, num_classes=4,
                             normalize=None, shuffle=False)
    imgs, msks = ds[0]
    predicted = np.clip(np.round(imgs[..., 0] / 60), 0, 3)
    agreement = (predicted == msks[..., 0]).mean()
    assert agreement >= 0.97
    assert not np.array_equal(msks[..., 0], masks)  # the augmentation did move things


def test_validation_data_is_untouched(labelled_store):
    store, images = labelled_store
    train_idx, val_idx = split(store, 0.2, seed=1)
    assert set(train_idx).isdisjoint(val_idx) and len(train_idx) + len(val_idx) == N
    val = SegmentationDataset(store, 4, indices=val_idx, shuffle=False, num_classes=256)
    got = np.concatenate([i for i, _ in collect(val)])
    np.testing.assert_allclose(got, images[val_idx] / np.float32(255), rtol=1e-6)


def test_mask_modes_and_normalisation(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    masks = rng.integers(0, 3, (10, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "y.npy", masks)
    store = convert(images=tmp_path / "x.npy", masks=tmp_path / "y.npy", dst=tmp_path / "s", progress=False)
    onehot = SegmentationDataset(store, 10, mask_mode="onehot", shuffle=False)[0][1]
    assert onehot.shape == (10, 8, 8, 3) and onehot.dtype == np.float32
    np.testing.assert_array_equal(onehot.argmax(-1), masks)
    binary = SegmentationDataset(store, 10, mask_mode="binary", shuffle=False)[0][1]
    np.testing.assert_array_equal(binary[..., 0], (masks > 0).astype(np.float32))
    std = SegmentationDataset(store, 10, normalize="standardize", shuffle=False)[0][0]
    np.testing.assert_allclose(std.reshape(-1, 3).mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(std.reshape(-1, 3).std(0), 1, atol=1e-4)
    raw = SegmentationDataset(store, 10, normalize=None, shuffle=False)[0][0]
    np.testing.assert_array_equal(raw, images.astype(np.float32))


def test_label_outside_num_classes_names_the_sample(labelled_store):
    store, _ = labelled_store
    ds = SegmentationDataset(store, 8, shuffle=False, num_classes=10)
    ds[0]
    with pytest.raises(LabelError, match=r"Sample 10 \('10'\) of store .*s has label 10"):
        ds[1]


def test_options_are_validated():
    store = Store.from_arrays(np.zeros((4, 8, 8, 1), np.uint8), np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(OptionError, match="Valid options: batch_size, indices, shuffle"):
        SegmentationDataset(store, 2, shufle=True)
    with pytest.raises(OptionError, match="Received: mask_mode='dense'"):
        SegmentationDataset(store, 2, mask_mode="dense")
    with pytest.raises(OptionError, match="batch_size"):
        SegmentationDataset(store, 0)
    with pytest.raises(OptionError, match="indices must lie"):
        SegmentationDataset(store, 2, indices=[0, 9])
    with pytest.raises(OptionError):
        Augment(rotate=-5)


def test_shards_are_disjoint_and_cover(labelled_store):
    store, _ = labelled_store
    seen = []
    for k in range(3):
        ds = SegmentationDataset(store, 4, shard=(k, 3), num_classes=256, seed=9)
        seen.append(np.concatenate([m[:, 0, 0, 0] for _, m in collect(ds)]))
    allseen = np.concatenate(seen)
    np.testing.assert_array_equal(np.sort(allseen), np.arange(N))


def test_dataset_pickles_as_options(labelled_store):
    store, _ = labelled_store
    ds = SegmentationDataset(store, 8, augment="standard", num_classes=256, workers=2)
    first = ds[2]
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again[2][0], first[0])
    ds.close()


def test_abandoned_epoch_stops_its_hand_over_thread(labelled_store):
    import threading
    import time

    store, _ = labelled_store
    before = set(threading.enumerate())  # another test's dataset may still run a pass

    def ours() -> list:
        return [t for t in threading.enumerate() if t.name == "streamseg-handover" and t not in before]

    ds = SegmentationDataset(store, 4, num_classes=256, workers=2)
    with ds:
        it = iter(ds)
        first = next(it)
        assert len(ours()) == 1
        np.testing.assert_array_equal(first[1], ds[0][1])
        it.close()  # what tf.data does when fit stops mid-epoch
        deadline = time.monotonic() + 5
        while ours() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not ours()
        assert len(list(ds)) == len(ds)  # a new pass still works


@pytest.mark.parametrize("mp", [False, True])
def test_next_epoch_is_produced_ahead_and_still_correct(labelled_store, mp):
    """The first batches of epoch e+1 are produced while epoch e ends; they are the same
    batches an inline dataset gives for epoch e+1."""
    store, _ = labelled_store
    kw = dict(augment="standard", num_classes=256, seed=7)
    reference = SegmentationDataset(store, 8, workers=0, **kw)
    ds = SegmentationDataset(store, 8, workers=2, use_multiprocessing=mp, max_queue_size=3, **kw)
    with ds:
        for epoch in range(3):
            got = list(ds)
            assert len(got) == len(reference) == 6
            for (gi, gm), (ri, rm) in zip(got, collect(reference)):
                np.testing.assert_array_equal(gi, ri)
                np.testing.assert_array_equal(gm, rm)
            ds.on_epoch_end()
            reference.on_epoch_end()
            carry = ds._carry  # batch 0 of the next epoch, collected by the last pass's thread
            assert carry is not None and carry.key == (epoch + 1, 0)
            assert carry.done.wait(30) and carry.batch is not None
            pending = ds._feeder.pool.pending()
            assert (epoch + 1, 1) in pending  # and the next ones are under way
            assert all(key[0] == epoch + 1 for key in pending)


def test_batches_are_aligned_and_their_memory_is_recycled(labelled_store):
    store, _ = labelled_store
    ds = SegmentationDataset(store, 8, num_classes=256, workers=2, use_multiprocessing=True)
    with ds:
        kept = []
        for i, (images, masks) in enumerate(ds):
            assert images.ctypes.data % 64 == 0 and masks.ctypes.data % 64 == 0
            if i < ds._feeder.LEND - 1:  # with the batch in hand and the next one, all lent slots
                kept.append(images[:1])  # a view keeps its batch's buffer out of reuse
        for images, masks in ds:
            assert not any(np.shares_memory(images, k) for k in kept)
        assert ds._feeder.buffers.reused > 0
        np.testing.assert_array_equal(np.round(kept[0][0, 0, 0, 0] * 255), ds.epoch_indices()[0])


def test_a_pass_does_not_keep_its_carry_batch_lent(labelled_store):
    """The first batch of a pass comes from the previous pass's carry; once the consumer drops
    it, its slot must go back to the pool (a pass that kept it referenced held one of the lent
    slots for the whole epoch, and a batch beyond them is copied)."""
    store, _ = labelled_store
    ds = SegmentationDataset(store, 8, num_classes=256, workers=2, use_multiprocessing=True)
    with ds:
        for _ in ds:
            pass
        ds.on_epoch_end()
        assert ds._carry is not None and ds._carry.done.wait(30) and ds._carry.batch is not None
        it = iter(ds)
        images, _ = next(it)
        where = images.ctypes.data
        del images, _
        for _ in range(3):
            next(it)
        pool = ds._feeder.pool
        lent = {pool._backend.views[slot]["images"].ctypes.data for slot in pool._lent}
        assert where not in lent
        for _ in it:
            pass


def test_a_pass_left_one_batch_short_does_not_block_the_next(labelled_store):
    """The last batch still queued for an iterator that is kept but not finished: the next
    pass must not wait for that pass's look-ahead into the next epoch."""
    import threading

    store, _ = labelled_store
    ds = SegmentationDataset(store, 8, num_classes=256, workers=2, use_multiprocessing=True)
    with ds:
        it = iter(ds)
        for _ in range(len(ds) - 1):
            next(it)
        ds.on_epoch_end()
        got = []
        reader = threading.Thread(target=lambda: got.append(next(iter(ds))), daemon=True)
        reader.start()
        reader.join(20)
        assert got, "the next pass blocked"
        np.testing.assert_array_equal(got[0][1][:, 0, 0, 0], ds.batch_indices(0))
        it.close()


def test_keep_alive_stops_workers_and_drops_the_next_epochs_batch(labelled_store):
    import time

    store, _ = labelled_store
    ds = SegmentationDataset(store, 8, num_classes=256, workers=2, use_multiprocessing=True, keep_alive=0.3)
    assert len(list(ds)) == len(ds)
    deadline = time.monotonic() + 10
    while (ds._feeder.pool is not None or ds._carry is not None) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ds._feeder.pool is None and ds._carry is None  # nothing held after keep_alive
    ds.on_epoch_end()
    assert len(list(ds)) == len(ds)  # and the next epoch starts the workers again
    ds.close()


@pytest.mark.parametrize("priority", ["low", "idle"])
def test_worker_priority_lowers_the_workers_only(labelled_store, priority):
    import os

    if priority == "idle" and not hasattr(os, "SCHED_IDLE"):
        pytest.skip("SCHED_IDLE is Linux-only")
    store, _ = labelled_store
    kw = dict(augment="heavy", num_classes=256, seed=5)
    reference = collect(SegmentationDataset(store, 8, workers=0, **kw))
    main_nice, main_policy = os.getpriority(os.PRIO_PROCESS, 0), os.sched_getscheduler(0)
    with SegmentationDataset(store, 8, workers=2, use_multiprocessing=True, worker_priority=priority, **kw) as ds:
        batches = list(ds)  # same batches, in order: the label encodes the sample index
        pids = ds._feeder.pool.pids
        assert len(pids) == 2
        for pid in pids:
            if priority == "low":
                assert os.getpriority(os.PRIO_PROCESS, pid) == 19
            else:
                assert os.sched_getscheduler(pid) == os.SCHED_IDLE
    assert (os.getpriority(os.PRIO_PROCESS, 0), os.sched_getscheduler(0)) == (main_nice, main_policy)
    for (ri, rm), (bi, bm) in zip(reference, batches, strict=True):
        np.testing.assert_array_equal(ri, bi)
        np.testing.assert_array_equal(rm, bm)


def test_only_worker_processes_that_fill_the_cores_run_opencv_sequentially_and_yield():
    """Both follow one condition: worker processes (not threads, which share the caller's
    process) at least as many as the cores; with fewer, OpenCV's own threads and the training
    loop use the rest."""
    from streamseg.parallel.workers import usable_cores

    store = Store.from_arrays(np.zeros((4, 8, 8, 1), np.uint8), np.zeros((4, 8, 8), np.uint8))
    cores = usable_cores()

    def flags(**kw):
        producer = SegmentationDataset(store, 2, **kw)._feeder.producer
        return producer.sequential_opencv, producer.yield_between_samples

    assert flags(workers=cores, use_multiprocessing=True) == (True, True)
    assert flags(workers=cores + 1, use_multiprocessing=True) == (True, True)
    assert flags(workers=cores, use_multiprocessing=False) == (False, False)
    assert flags(workers=0) == (False, False)
    if cores > 1:
        assert flags(workers=cores - 1, use_multiprocessing=True) == (False, False)


def test_worker_priority_is_validated():
    store = Store.from_arrays(np.zeros((4, 8, 8, 1), np.uint8), np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(OptionError, match="one of normal, low, idle. Received: worker_priority='lowest'"):
        SegmentationDataset(store, 2, workers=1, use_multiprocessing=True, worker_priority="lowest")
    with pytest.raises(OptionError, match="worker processes only .* use_multiprocessing=True"):
        SegmentationDataset(store, 2, workers=2, worker_priority="low")  # threads
    ds = SegmentationDataset(store, 2, workers=2, worker_priority="normal")
    assert ds[0][0].shape == (2, 8, 8, 1)
