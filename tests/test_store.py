"""Store reading: round trips, index handling, pickling, incomplete stores."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamseg import IncompleteStoreError, OptionError, Store, StoreNotFoundError, open_store


def test_round_trip_and_manifest(arrays_store, backend):
    store, images, masks = arrays_store
    assert len(store) == 23 and store.backend == backend
    got_i, got_m = store.read(np.arange(23))
    np.testing.assert_array_equal(got_i, images)
    np.testing.assert_array_equal(got_m[..., 0], masks)
    meta = store.meta
    assert meta["complete"] and meta["count"] == 23 and meta["num_chunks"] == 6
    assert meta["image_shape"] == [16, 20, 3] and meta["image_dtype"] == "uint8"
    labels, counts = np.unique(masks, return_counts=True)
    assert meta["labels"] == {str(int(v)): int(c) for v, c in zip(labels, counts)}
    np.testing.assert_allclose(meta["image_mean"], images.reshape(-1, 3).mean(0))
    np.testing.assert_allclose(meta["image_std"], images.reshape(-1, 3).std(0), rtol=1e-9)
    assert store.names == [str(i) for i in range(23)]
    assert len(meta["checksums"]["chunks"]) == 6


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(-23, 22), min_size=0, max_size=40))
def test_read_any_indices_matches_numpy(arrays_store, indices):
    store, images, masks = arrays_store
    got_i, got_m = store.read(indices)
    np.testing.assert_array_equal(got_i, images[indices])
    np.testing.assert_array_equal(got_m[..., 0], masks[indices])


def test_read_out_of_range(arrays_store):
    store, _, _ = arrays_store
    with pytest.raises(IndexError, match="out of range"):
        store.read([0, 23])
    with pytest.raises(OptionError, match="Received"):
        store.read([[1, 2]])


def test_pickles_as_path(arrays_store):
    store, images, _ = arrays_store
    store.read([0])  # opened files must not travel
    blob = pickle.dumps(store)
    assert len(blob) < 2000
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again.read([5, 1])[0], images[[5, 1]])


def test_plain_zarr_and_numpy_read_the_store(arrays_store, backend):
    store, images, masks = arrays_store
    if backend == "zarr":
        group = zarr.open_group(store.path, mode="r")
        np.testing.assert_array_equal(group["images"][:], images)
        np.testing.assert_array_equal(group["masks"][:][..., 0], masks)
    else:
        np.testing.assert_array_equal(np.load(store.path / "images.npy", mmap_mode="r"), images)
    assert store.images.shape == (23, 16, 20, 3)
    assert store.masks.shape == (23, 16, 20, 1)


def test_open_missing_and_not_a_store(tmp_path):
    with pytest.raises(StoreNotFoundError, match="No store at"):
        open_store(tmp_path / "nothing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="not a streamseg store"):
        open_store(tmp_path / "plain")


def test_incomplete_store_is_refused(arrays_store):
    store, _, _ = arrays_store
    manifest = store.path / "manifest.json"
    meta = json.loads(manifest.read_text())
    meta["complete"] = False
    manifest.write_text(json.dumps(meta))
    with pytest.raises(IncompleteStoreError, match="--resume"):
        open_store(store.path)


def test_from_arrays_numpy_memmap_zarr(tmp_path):
    from conftest import index_encoded

    images, masks = index_encoded(9)
    np.save(tmp_path / "i.npy", images)
    mm = np.load(tmp_path / "i.npy", mmap_mode="r")
    z = zarr.create_array(tmp_path / "m.zarr", shape=masks.shape, chunks=(3, 16, 20), dtype="uint8")
    z[:] = masks
    for imgs, msks in ((images, masks), (mm, masks), (images, z)):
        store = Store.from_arrays(imgs, msks)
        got_i, got_m = store.read([8, 0, 8])
        np.testing.assert_array_equal(got_i, images[[8, 0, 8]])
        np.testing.assert_array_equal(got_m[..., 0], masks[[8, 0, 8]])
    # a memmap pickles as its file, not its contents
    blob = pickle.dumps(Store.from_arrays(mm, masks[:, :, :, None]))
    assert len(blob) < images.nbytes
    np.testing.assert_array_equal(pickle.loads(blob).read([3])[0], images[[3]])


def test_from_arrays_rejects_bad_shapes():
    with pytest.raises(OptionError, match="same count"):
        Store.from_arrays(np.zeros((3, 4, 4, 3), np.uint8), np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(OptionError, match="integer labels"):
        Store.from_arrays(np.zeros((3, 4, 4, 3), np.uint8), np.zeros((3, 4, 4), np.float32))


def test_from_arrays_h5py(tmp_path):
    h5py = pytest.importorskip("h5py")
    from conftest import index_encoded

    images, masks = index_encoded(6)
    with h5py.File(tmp_path / "d.h5", "w") as fh:
        fh["x"], fh["y"] = images, masks
    with h5py.File(tmp_path / "d.h5", "r") as fh:
        store = Store.from_arrays(fh["x"], fh["y"])
        got_i, got_m = store.read([5, 2, 5])
        np.testing.assert_array_equal(got_i, images[[5, 2, 5]])
        np.testing.assert_array_equal(got_m[..., 0], masks[[5, 2, 5]])
        with pytest.raises(OptionError, match="h5py"):
            pickle.dumps(store)
