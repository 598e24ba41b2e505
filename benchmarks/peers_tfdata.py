"""The parallel-map tf.data peers of :mod:`peers` (issue 14): what a good engineer writes with tf.data.

Each is ``Dataset.range(n).shuffle(n)`` (a uniform shuffle, reshuffled every epoch), then a
``tf.numpy_function`` doing the work in NumPy/OpenCV, mapped with
``num_parallel_calls=AUTOTUNE`` (non-deterministic order) and ``prefetch(AUTOTUNE)``:

- ``tfdata_map_batch_memmap``: ``.batch(B).map(read_batch)``: one call per batch reads the
  batch's indices from the memmap store (``np.load(mmap_mode="r")``, sorted fancy index) and
  runs :func:`peers.cv2_standard_augment` per sample (float32 in [0, 1], i.e. ``/255``).
- ``tfdata_map_sample_memmap``: ``.map(read_sample).batch(B)``: one call per sample.
- ``tfdata_map_batch_zarr``: as the first over the zarr store, one
  ``arr.get_orthogonal_selection`` of the batch's sorted indices per array and batch; the
  group is opened lazily once per thread (and process).
- ``tfdata_map_batch_memmap_repeat`` / ``tfdata_map_sample_memmap_repeat``: the memmap
  peers with ``.repeat()`` after the shuffle (reshuffled every pass): an endless dataset that
  ``fit`` runs as one epoch of ``steps_per_epoch`` steps, so the iterator, its AUTOTUNE
  parallelism and its prefetch buffer live on across passes (the finite peers pay a new
  iterator every epoch: their slowest step, at an epoch boundary, took 0.2-2.5 s in
  RESULTS.md 13j), and a batch may hold the end of one pass and the start of the next.

Randomness per sample: ``default_rng([seed, r, index])`` with ``r`` from
``tf.data.Dataset.random`` (a per-iteration stream, as the other tf.data peers).  "workers"
sets tf.data's private thread pool size (:func:`peers._threading`), as for the TFRecord peer.
OpenCV keeps its own thread pool, as in every OpenCV peer.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np

from peers import _threading, cv2_standard_augment

__all__ = ["TFDATA_MAP_PEERS", "MemmapReader", "ZarrReader", "map_batch_dataset", "map_sample_dataset",
           "build_tfdata_map"]

TFDATA_MAP_PEERS = ("tfdata_map_batch_memmap", "tfdata_map_sample_memmap", "tfdata_map_batch_zarr",
                    "tfdata_map_batch_memmap_repeat", "tfdata_map_sample_memmap_repeat")


def _augment_batch(images: np.ndarray, masks: np.ndarray, idx: np.ndarray, seed: int, rand: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    n, h, w, c = images.shape
    x = np.empty((n, h, w, c), np.float32)
    y = np.empty((n, h, w, 1), np.int32)
    for j in range(n):
        rng = np.random.default_rng([seed, int(rand) & 0x7FFFFFFFFFFFFFFF, int(idx[j])])
        x[j], y[j] = cv2_standard_augment(images[j], masks[j], rng)
    return x, y


class MemmapReader:
    """Reads samples of a memmap store (arrays mapped lazily, once per process)."""

    def __init__(self, store: str | os.PathLike, seed: int) -> None:
        self.store, self.seed = Path(store), int(seed)
        self._pid: int | None = None
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._pid != os.getpid():
            self._arrays = (np.load(self.store / "images.npy", mmap_mode="r"),
                            np.load(self.store / "masks.npy", mmap_mode="r"))
            self._pid = os.getpid()
        assert self._arrays is not None
        return self._arrays

    def read(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw uint8 images and masks of ``idx`` (in ``idx``'s order; read in sorted order)."""
        images, masks = self.arrays()
        order = np.argsort(idx, kind="stable")
        srt = idx[order]
        x, y = images[srt], masks[srt]
        inv = np.empty_like(order)
        inv[order] = np.arange(order.size)
        return x[inv], y[inv]

    def batch(self, idx: np.ndarray, rand: Any) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(idx, np.int64)
        images, masks = self.read(idx)
        return _augment_batch(images, masks, idx, self.seed, int(rand))

    def sample(self, i: Any, rand: Any) -> tuple[np.ndarray, np.ndarray]:
        images, masks = self.arrays()
        i = int(i)
        rng = np.random.default_rng([self.seed, int(rand) & 0x7FFFFFFFFFFFFFFF, i])
        return cv2_standard_augment(images[i], masks[i], rng)


class ZarrReader(MemmapReader):
    """Reads batches of the zarr store: one orthogonal selection of sorted indices per array."""

    def __init__(self, store: str | os.PathLike, seed: int) -> None:
        super().__init__(store, seed)
        self._local = threading.local()

    def arrays(self) -> tuple[Any, Any]:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            import zarr

            group = zarr.open_group(str(self.store), mode="r")
            local.arrays, local.pid = (group["images"], group["masks"]), os.getpid()
        return local.arrays

    def read(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images, masks = self.arrays()
        order = np.argsort(idx, kind="stable")
        srt = idx[order]
        x = images.get_orthogonal_selection((srt,) + (slice(None),) * (images.ndim - 1))
        y = masks.get_orthogonal_selection((srt,) + (slice(None),) * (masks.ndim - 1))
        inv = np.empty_like(order)
        inv[order] = np.arange(order.size)
        return x[inv], y[inv]

    def __getstate__(self) -> dict[str, Any]:
        return {"store": self.store, "seed": self.seed, "_pid": None, "_arrays": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()


def _meta(store: str | os.PathLike) -> tuple[int, tuple[int, int, int]]:
    meta = json.loads((Path(store) / "manifest.json").read_text())
    return int(meta["count"]), tuple(meta["image_shape"])  # type: ignore[return-value]


def _py(fn: Callable[..., Any], shape_x: tuple, shape_y: tuple) -> Callable[[Any, Any], tuple[Any, Any]]:
    import tensorflow as tf

    def call(idx: Any, rand: Any) -> tuple[Any, Any]:
        x, y = tf.numpy_function(fn, [idx, rand], [tf.float32, tf.int32], stateful=False)
        return tf.ensure_shape(x, shape_x), tf.ensure_shape(y, shape_y)

    return call


def _indices(count: int, seed: int, repeat: bool) -> Any:
    """``range(n).shuffle(n)``, reshuffled every pass; endless with ``repeat``."""
    import tensorflow as tf

    ds = tf.data.Dataset.range(count).shuffle(count, seed=seed, reshuffle_each_iteration=True)
    return ds.repeat() if repeat else ds


def _finish(ds: Any, batches: int, repeat: bool, workers: int) -> Any:
    import tensorflow as tf

    if not repeat:
        ds = ds.apply(tf.data.experimental.assert_cardinality(batches))
    return _threading(ds, workers)


def map_batch_dataset(reader: MemmapReader, count: int, shape: tuple[int, int, int], batch_size: int = 32,
                      seed: int = 0, workers: int = 2, repeat: bool = False) -> Any:
    """``range(n).shuffle(n)[.repeat()].batch(B).map(numpy_function(read + augment a batch), AUTOTUNE).prefetch``."""
    import tensorflow as tf

    auto = tf.data.AUTOTUNE
    h, w, c = shape
    ds = _indices(count, seed, repeat)
    ds = ds.batch(batch_size, drop_remainder=True)
    rand = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    ds = tf.data.Dataset.zip((ds, rand))
    ds = ds.map(_py(reader.batch, (batch_size, h, w, c), (batch_size, h, w, 1)), num_parallel_calls=auto,
                deterministic=False).prefetch(auto)
    return _finish(ds, count // batch_size, repeat, workers)


def map_sample_dataset(reader: MemmapReader, count: int, shape: tuple[int, int, int], batch_size: int = 32,
                       seed: int = 0, workers: int = 2, repeat: bool = False) -> Any:
    """``range(n).shuffle(n)[.repeat()].map(numpy_function(read + augment a sample), AUTOTUNE).batch(B).prefetch``."""
    import tensorflow as tf

    auto = tf.data.AUTOTUNE
    h, w, c = shape
    ds = _indices(count, seed, repeat)
    rand = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    ds = tf.data.Dataset.zip((ds, rand))
    ds = ds.map(_py(reader.sample, (h, w, c), (h, w, 1)), num_parallel_calls=auto, deterministic=False)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(auto)
    return _finish(ds, count // batch_size, repeat, workers)


def build_tfdata_map(name: str, data: dict[str, str], *, workers: int, batch_size: int = 32, seed: int = 0) -> Any:
    """Build one of :data:`TFDATA_MAP_PEERS` over ``data`` (paths ``zarr`` and ``memmap``)."""
    backend = "zarr" if name.endswith("_zarr") else "memmap"
    count, shape = _meta(data[backend])
    reader = ZarrReader(data["zarr"], seed) if backend == "zarr" else MemmapReader(data["memmap"], seed)
    repeat = name.endswith("_repeat")
    if name in ("tfdata_map_batch_memmap", "tfdata_map_batch_zarr", "tfdata_map_batch_memmap_repeat"):
        return map_batch_dataset(reader, count, shape, batch_size, seed, workers, repeat)
    if name in ("tfdata_map_sample_memmap", "tfdata_map_sample_memmap_repeat"):
        return map_sample_dataset(reader, count, shape, batch_size, seed, workers, repeat)
    raise ValueError(f"Unknown tf.data map peer {name!r}; choose from {', '.join(TFDATA_MAP_PEERS)}. "
                     f"Received: {name!r}")
