"""Fused per-pixel passes (uint8 images), uint8 batches and their normalisation layer, and an
epoch end that does not wait for the next epoch's first batch."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from streamseg import OptionError, SegmentationDataset, Store
from streamseg.parallel.feeder import Feeder
from streamseg.pipeline.augment import Augment
from streamseg.pipeline.batches import sample_rng
from streamseg.pipeline.fused import augment_into, fusable, lookup_table, normalize_into

UNIT = (np.zeros(1, np.float32), np.full(1, 1 / 255, np.float32))
PER_CHANNEL = (np.array([3.0, 13.0, 23.0], np.float32), np.array([0.01, 0.02, 0.03], np.float32))


def reference(aug, image, mask, i, offset, scale):
    img, msk = aug(image, mask, sample_rng(0, 0, i), value_range=255.0)
    out = np.empty(image.shape, np.float32)
    normalize_into(img.reshape(image.shape), out, offset, scale)
    return out, msk, img


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("preset", ["none", "light", "standard", "heavy"])
@pytest.mark.parametrize("norm", ["unit", "uniform", "per_channel"])
def test_augment_into_matches_augment_then_normalize(channels, preset, norm):
    rng = np.random.default_rng(channels)
    image = rng.integers(0, 256, (24, 40, channels), dtype=np.uint8)
    mask = rng.integers(0, 3, (24, 40, 1), dtype=np.uint8)
    aug = Augment.preset(preset)
    offset, scale = {"unit": UNIT,
                     "uniform": (np.full(channels, 100.0, np.float32), np.full(channels, 0.02, np.float32)),
                     "per_channel": (np.arange(channels, dtype=np.float32) * 10 + 3,
                                     np.linspace(0.01, 0.03, channels).astype(np.float32))}[norm]
    for i in range(12):
        want, want_mask, photo = reference(aug, image, mask, i, offset, scale)
        got = np.full(image.shape, np.nan, np.float32)
        got_mask = augment_into(aug, image, mask, sample_rng(0, 0, i), got, offset, scale, 255.0)
        np.testing.assert_array_equal(got_mask, want_mask)
        # table path (gamma, normalisation only) bit for bit; the affine path to float32 rounding
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * max(1.0, float(np.abs(want).max())))
        as_u8 = np.empty(image.shape, np.uint8)
        augment_into(aug, image, mask, sample_rng(0, 0, i), as_u8, offset, scale, 255.0)
        assert np.abs(as_u8.astype(np.float32) - photo.reshape(image.shape)).max() <= 0.5 + 1e-3


def test_lookup_table_path_is_bit_exact_with_gamma():
    aug = Augment(gamma=(0.7, 1.4), contrast=0.2, brightness=0.1, hflip=0.5)
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mask = np.zeros((16, 16, 1), np.uint8)
    for i in range(10):
        want, _, _ = reference(aug, image, mask, i, *PER_CHANNEL)
        got = np.empty_like(want)
        augment_into(aug, image, mask, sample_rng(0, 0, i), got, *PER_CHANNEL, 255.0)
        np.testing.assert_array_equal(got, want)


def test_lookup_table_normalises_per_channel():
    table = lookup_table(None, 255.0, None, *PER_CHANNEL, 3, np.dtype(np.float32))
    want = np.empty((256, 3), np.float32)
    normalize_into(np.repeat(np.arange(256, dtype=np.float32)[:, None], 3, axis=1), want, *PER_CHANNEL)
    assert table.shape == (256, 1, 3)
    np.testing.assert_array_equal(table[:, 0, :], want)


def test_fusable_only_for_uint8_with_a_uint8_fill():
    assert fusable(None, np.dtype(np.uint8), 3)
    assert not fusable(None, np.dtype(np.uint16), 3)
    assert not fusable(None, np.dtype(np.uint8), 5)
    assert not fusable(Augment(rotate=10, fill_value=-1.0), np.dtype(np.uint8), 3)
    assert not fusable(Augment(rotate=10, fill_value=0.5), np.dtype(np.uint8), 1)


# ------------------------------------------------------------------------------------ uint8 batches
def _store(n=40, h=16, w=16, c=3, dtype=np.uint8):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256 if dtype == np.uint8 else 2000, (n, h, w, c)).astype(dtype)
    masks = rng.integers(0, 3, (n, h, w, 1), dtype=np.uint8)
    return Store.from_arrays(images, masks)


def _converted(tmp_path, backend):
    from streamseg import convert

    rng = np.random.default_rng(2)
    np.save(tmp_path / "x.npy", rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8))
    np.save(tmp_path / "y.npy", rng.integers(0, 3, (40, 16, 16), dtype=np.uint8))
    return convert(images=tmp_path / "x.npy", masks=tmp_path / "y.npy", dst=tmp_path / f"s.{backend}",
                   format=backend, chunk_samples=8, progress=False)


@pytest.mark.parametrize("normalize", ["unit", "standardize"])
def test_uint8_batches_normalised_by_the_layer_match_float32_batches(normalize, tmp_path, backend):
    store = _converted(tmp_path, backend)
    common = dict(batch_size=8, seed=5, augment="standard", normalize=normalize, workers=0)
    f32 = SegmentationDataset(store, **common)
    u8 = SegmentationDataset(store, dtype="uint8", **common)
    layer = u8.normalization_layer()
    assert type(f32.normalization_layer()).__name__ == "Identity"
    scale = float(np.max(u8.options.image_scale))
    for i in range(len(f32)):
        (x32, y32), (x8, y8) = f32[i], u8[i]
        assert x8.dtype == np.uint8 and y8.dtype == np.uint8 and y32.dtype == np.int32
        np.testing.assert_array_equal(y8.astype(np.int32), y32)
        back = np.asarray(layer(x8))
        assert back.dtype == np.float32
        # rounding to whole grey levels after the photometric ops: at most half a level
        np.testing.assert_allclose(back, x32, rtol=0, atol=0.5 * scale + 1e-5)
    spec = u8.element_spec()
    assert spec[0].dtype.name == "uint8" and spec[1].dtype.name == "uint8"


def test_uint8_batches_without_augmentation_are_the_stored_bytes():
    store = _store()
    ds = SegmentationDataset(store, batch_size=8, shuffle=False, augment=None, dtype="uint8", workers=0)
    x, y = ds[1]
    np.testing.assert_array_equal(x, store.read(np.arange(8, 16))[0])


@pytest.mark.parametrize("kwargs, words", [
    ({"dtype": "float16"}, "dtype must be one of"),
    ({"dtype": "uint8", "normalize": "window", "window": (0, 100)}, "normalize='window'"),
])
def test_uint8_batches_refused_where_the_model_cannot_normalise(kwargs, words):
    with pytest.raises(OptionError, match="Received") as info:
        SegmentationDataset(_store(), 8, workers=0, **kwargs)
    assert words in str(info.value)


def test_uint8_batches_refused_for_other_store_dtypes():
    with pytest.raises(OptionError, match="need a uint8 store"):
        SegmentationDataset(_store(dtype=np.uint16), 8, workers=0, dtype="uint8")


@pytest.mark.slow
def test_fit_on_uint8_batches_with_worker_processes():
    from streamseg.models import small_unet

    ds = SegmentationDataset(_store(n=48), 8, augment="light", dtype="uint8", workers=2, use_multiprocessing=True)
    try:
        model = small_unet((16, 16, 3), ds.num_classes, base_filters=4, preprocess=ds.normalization_layer())
        history = model.fit(ds, epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][0])
        x = ds[0][0]
        assert model.predict(x, verbose=0).shape == (8, 16, 16, ds.num_classes)
    finally:
        ds.close()


# ------------------------------------------------------------------------ epoch end without waiting
class _GatedProducer:
    """Produces batches of a constant; batch key 'slow' waits for ``gate``."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()

    def setup(self) -> None:
        pass

    def produce(self, task, out) -> int:
        if task == "slow":
            self.started.set()
            self.gate.wait(30)
        out["x"][...] = 1.0
        return out["x"].shape[0]


def test_epoch_finished_defers_to_a_waiting_fetch_instead_of_blocking():
    producer = _GatedProducer()
    feeder = Feeder(producer, {"x": ((2, 3), np.dtype(np.float32))}, workers=2, use_multiprocessing=False,
                    max_queue_size=4, start_method=None, keep_alive=30.0)
    try:
        got = {}
        waiter = threading.Thread(target=lambda: got.setdefault("b", feeder.fetch((1, 0), "slow",
                                                                                  [((0, 5), "fast")])))
        waiter.start()
        assert producer.started.wait(10)
        ender = threading.Thread(target=feeder.epoch_finished, kwargs={"keep": lambda k: k[0] >= 1, "defer": True})
        ender.start()
        ender.join(10)
        assert not ender.is_alive(), "epoch_finished(defer=True) waited for another thread's batch"
        assert producer.gate.is_set() is False and "b" not in got
        producer.gate.set()
        waiter.join(10)
        assert got["b"]["x"].sum() == 6.0
        assert (0, 5) not in feeder.pool.pending()  # the deferred work ran: key[0] < 1 dropped
        assert feeder._timer is not None  # and keep_alive was armed
    finally:
        producer.gate.set()
        feeder.close()


# ------------------------------------------------------------- window affinity, decoded-chunk cache
def test_pick_worker_keeps_a_group_on_one_worker_until_it_is_behind():
    from streamseg.parallel.workers import pick_worker

    outstanding, groups = [0, 0], {}
    assert pick_worker(outstanding, groups, None) == 0
    w = pick_worker(outstanding, groups, "g1")
    outstanding[w] += 1
    assert pick_worker(outstanding, groups, "g1") == w  # one task waiting: still its worker
    outstanding[w] += 1
    other = pick_worker(outstanding, groups, "g1")  # two waiting: behind, the idle one takes over
    assert other != w and groups["g1"] == other
    for g in range(20):
        pick_worker(outstanding, groups, g)
    assert len(groups) <= 8 and "g1" not in groups  # bounded memory of groups, oldest dropped


def test_decoded_chunk_cache_decodes_once_and_sees_rewritten_files(arrays_store, backend, monkeypatch):
    import os

    store, images, _ = arrays_store
    if backend != "zarr":
        pytest.skip("decoded chunks are cached for zarr stores")
    store.keep_decoded_chunks(2)
    reader = store.chunk_reader("images")
    calls = []
    real = reader._decode_into
    monkeypatch.setattr(reader, "_decode_into", lambda raw, k, out: calls.append(k) or real(raw, k, out))
    first, _ = store.read([0, 1, 2])
    again, _ = store.read([3, 1])
    np.testing.assert_array_equal(first, images[:3])
    np.testing.assert_array_equal(again, images[[3, 1]])
    assert calls == [0]  # chunk 0 (samples 0-3) decoded once for both reads
    store.read([4, 8])
    store.read([12])
    assert len(reader._scratch.cache) == 2  # bounded: least recently used chunks evicted
    # a rewritten chunk file (new identity) is decoded again, never served stale
    path = reader.chunk_path(3)
    raw = path.read_bytes()
    os.replace(path, path.with_name("moved"))
    path.write_bytes(raw)
    calls.clear()
    np.testing.assert_array_equal(store.read([12])[0], images[[12]])
    assert calls == [3]


def test_inline_reads_decode_each_chunk_once_per_epoch(arrays_store, backend, monkeypatch):
    """workers=0 produces batches in the calling thread; it keeps the decoded-chunk cache the
    workers keep, so the batches of one shuffle window (which read the same chunks) decode each
    chunk at most once per epoch, and the batches hold the samples they name."""
    from collections import Counter

    from streamseg import SegmentationDataset

    store, images, _ = arrays_store
    if backend != "zarr":
        pytest.skip("decoded chunks are cached for zarr stores")
    ds = SegmentationDataset(store, batch_size=3, shuffle="window", workers=0, seed=5)
    reader = ds.store.chunk_reader("images")
    calls = []
    real = reader._decode_into
    monkeypatch.setattr(reader, "_decode_into", lambda raw, k, out: calls.append(k) or real(raw, k, out))
    for epoch in range(2):
        ds.epoch = epoch
        calls.clear()
        for i in range(len(ds)):
            x, _ = ds[i]
            idx = ds.batch_indices(i, epoch)
            np.testing.assert_array_equal(np.rint(x[:, 0, 0, 0] * 255).astype(int), images[idx, 0, 0, 0])
        assert max(Counter(calls).values()) == 1, calls  # no chunk decoded twice in an epoch
        if epoch == 0:
            assert sorted(calls) == list(range(6))  # (later epochs find some still cached)
    ds.close()


@pytest.mark.parametrize("verify", [False, True])
def test_iter_samples_yields_every_requested_sample_once_as_read_does(arrays_store, verify):
    """Store.iter_samples: each position of the request once (repeats and any order included),
    the same bytes as read(), views that the next item does not overwrite before it is used."""
    store, images, masks = arrays_store
    store = Store(store.path, verify_reads=verify)
    idx = np.array([5, 0, 22, 5, 9, 8, 13, 1, 21], np.int64)
    want_i, want_m = store.read(idx)
    seen = []
    for j, image, mask in store.iter_samples(idx):
        np.testing.assert_array_equal(image, images[idx[j]])
        np.testing.assert_array_equal(mask.reshape(masks.shape[1:]), masks[idx[j]])
        np.testing.assert_array_equal(image, want_i[j])
        np.testing.assert_array_equal(mask, want_m[j])
        seen.append(j)
    assert sorted(seen) == list(range(idx.size))
    if not (verify and store.backend == "memmap"):  # first (checking) memmap reads go through read()
        assert seen == sorted(seen, key=lambda j: (idx[j], j))  # storage order: each chunk once
    again = [j for j, *_ in store.iter_samples(idx)]  # every sample checked now: views, storage order
    assert again == sorted(again, key=lambda j: (idx[j], j))
    assert list(store.iter_samples(np.array([], np.int64))) == []
    wrapped = Store.from_arrays(images, masks)
    assert [j for j, *_ in wrapped.iter_samples(idx)] == list(range(idx.size))


class _CopyOnly:
    """A store with its read and nothing else (no ``iter_samples``): the producer's
    read-then-augment path."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        if name == "iter_samples":
            raise AttributeError(name)
        return getattr(self.inner, name)


@pytest.mark.parametrize("preset, dtype", [("standard", "float32"), ("heavy", "float32"), ("light", "uint8")])
def test_streamed_batches_equal_batches_made_from_a_read_copy(arrays_store, preset, dtype):
    """The fused path reading straight from the store (iter_samples) makes the same batches,
    bit for bit, as the same producer on a copy of the batch (a store without iter_samples)."""
    from streamseg.pipeline.batches import BatchProducer

    store, _, _ = arrays_store

    ds = SegmentationDataset(store, 7, augment=preset, seed=3, workers=0, num_classes=5, dtype=dtype)
    outs = []
    for s in (store, _CopyOnly(store)):
        producer = BatchProducer(s, ds.options)
        got = []
        for epoch in (0, 1):
            for k in range(len(ds)):
                idx = ds.batch_indices(k, epoch)
                (ishape, idt), (mshape, mdt) = ds.options.image_spec(7, 16, 20, 3), ds.options.mask_spec(7, 16, 20)
                out = {"images": np.zeros(ishape, idt), "masks": np.zeros(mshape, mdt)}
                n = producer.produce((epoch, idx), out)
                got.append((out["images"][:n].copy(), out["masks"][:n].copy()))
        outs.append(got)
    assert len(outs[0]) == 2 * len(ds)
    for (xa, ya), (xb, yb) in zip(*outs):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
        assert np.isfinite(xa).all() and xa.std() > 0


@pytest.mark.parametrize("path", ["streamed", "copy", "normalize_first"])
def test_producer_yields_after_every_sample_only_once_set_up_in_a_worker(arrays_store, path, monkeypatch):
    """With ``yield_between_samples`` a worker offers its core after every sample (one
    ``os.sched_yield`` per sample, on each per-sample path) once ``setup_process`` has run in it;
    not before (the main process never runs it), and the batches are the same bit for bit."""
    import dataclasses

    from streamseg.pipeline.batches import BatchProducer

    store, _, _ = arrays_store
    calls = []
    monkeypatch.setattr(os, "sched_yield", lambda: calls.append(1), raising=False)

    ds = SegmentationDataset(store, 7, augment="standard", seed=3, workers=0, num_classes=5)
    options = dataclasses.replace(ds.options, normalize_first=True) if path == "normalize_first" else ds.options
    source = _CopyOnly(store) if path == "copy" else store
    idx = ds.batch_indices(1, 0)
    (ishape, idt), (mshape, mdt) = options.image_spec(7, 16, 20, 3), options.mask_spec(7, 16, 20)

    def batch(producer):
        out = {"images": np.zeros(ishape, idt), "masks": np.zeros(mshape, mdt)}
        n = producer.produce((0, idx), out)
        return out["images"][:n], out["masks"][:n]

    plain = batch(BatchProducer(source, options))
    yielding = BatchProducer(source, options, yield_between_samples=True)
    before_setup = batch(yielding)
    assert calls == []  # not set up in a worker process: no yield
    yielding.setup_process()
    got = batch(yielding)
    assert len(calls) == idx.size
    for a, b, c in zip(plain, before_setup, got, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
