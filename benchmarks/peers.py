"""The input pipelines a user would otherwise write, for ``benchmarks/compare.py``.

Every pipeline returns something ``model.fit`` accepts and yields ``(images, masks)`` batches
of float32 images in [0, 1] ``(B, H, W, C)`` and int32 sparse masks ``(B, H, W, 1)``, with the
semantics of streamseg's ``'standard'`` augmentation preset where the tool allows it: flips
(p=0.5 each), a 90/180/270-degree turn (p=0.5), rotation in [-15, 15] degrees, zoom in
[0.9, 1.1], translation up to 5% (images linear, masks nearest, zero fill), brightness shift up
to 10% of the range and contrast factor in [0.9, 1.1].  Randomness per sample comes from
``(seed, epoch, index)`` (the tf.data peers draw from a per-iteration random stream instead).

Peers (what streamseg is compared against):

1. ``seed_article``: the seed article's approach -- the whole data set in RAM as NumPy, a
   ``keras.utils.PyDataset`` calling the legacy ``ImageDataGenerator`` (scipy ``ndimage``).
   Fixed only for fairness: one seed per *sample* shared by image and mask (the article drew
   one seed per batch, so every sample of a batch got the same transform), parameters drawn
   once and applied to both, images scaled to [0, 1] (the article's ``rescale`` is never
   applied by ``random_transform``).  Kept: the legacy API interpolates masks linearly
   (``order=1``); they are rounded back to integers, so boundary pixels between labels 0 and 2
   can become 1.  Added in NumPy because the legacy API lacks them: the 90-degree turns and
   brightness/contrast (its ``brightness_range`` is multiplicative, via PIL).  Its zoom is
   drawn per axis (legacy behaviour).  Images are kept in RAM as uint8 (the article's float64
   arrays would take 8x more); the RAM needed is checked first.
2. ``zarr_per_sample``: a plain ``PyDataset`` reading the same zarr store sample by sample
   (``zarr.open_group(path)["images"][i]``, group opened lazily once per process), OpenCV
   augmentation (one ``cv2.warpAffine`` per array), uniform shuffle per epoch.
3. ``tfdata_tfrecord``: tf.data over PNG-encoded TFRecord shards: ``interleave`` +
   ``map(parse, decode_png, augment, num_parallel_calls=AUTOTUNE)`` + ``batch`` +
   ``prefetch(AUTOTUNE)``; flips and turns on the stacked image+mask, rotation/zoom/shift with
   ``ImageProjectiveTransformV3`` (bilinear image, nearest mask), ``tf.image.adjust_contrast``
   (per-channel mean, where streamseg uses the mean of all pixels).  "workers" sets tf.data's
   private thread pool size.
4. ``tfdata_generator``: ``tf.data.Dataset.from_generator`` over the memmap store (``np.load``
   with ``mmap_mode="r"``), OpenCV augmentation in the generator; "workers" generators each
   read a disjoint part of the epoch's order, interleaved with ``num_parallel_calls=workers``
   (no private thread pool: nested generator calls deadlock in one of ``workers`` threads).

5. The parallel-map tf.data peers of :mod:`peers_tfdata` (issue 14): ``tfdata_map_batch_memmap``,
   ``tfdata_map_sample_memmap`` and ``tfdata_map_batch_zarr`` --
   ``range(n).shuffle(n)[.batch(B)].map(numpy_function(read + OpenCV augment), AUTOTUNE)`` --
   and the memmap two with ``.repeat()`` (``..._repeat``: one endless epoch, one iterator).
6. ``pydataset_memmap_threads`` / ``pydataset_memmap_processes``: a plain ``PyDataset`` over
   the memmap store (arrays mapped lazily once per process, one sorted fancy-index read per
   batch, OpenCV augmentation per sample, uniform shuffle per epoch), ``workers`` threads or
   processes (``use_multiprocessing`` False / True).

Every OpenCV peer runs the same :func:`cv2_standard_augment`.  :data:`BACKENDS` names the
store each pipeline reads, so a streamseg row can be set against the best peer on its backend.

Then streamseg itself: ``streamseg_zarr`` and ``streamseg_memmap`` (SegmentationDataset with
``augment="standard"``, window shuffle, worker processes).
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Any

import cv2
import keras
import numpy as np
import psutil
from keras.src.legacy.preprocessing.image import ImageDataGenerator

__all__ = ["PEERS", "PIPELINES", "LABELS", "PipelineSkipped", "standard_transform", "cv2_standard_augment",
           "SeedArticleSequence", "ZarrPerSamplePyDataset", "write_tfrecords", "tfrecord_dataset",
           "generator_dataset", "MemmapPyDataset", "build_pipeline", "BACKENDS"]

PEERS = ("seed_article", "zarr_per_sample", "tfdata_tfrecord", "tfdata_generator", "tfdata_map_batch_memmap",
         "tfdata_map_sample_memmap", "tfdata_map_batch_zarr", "tfdata_map_batch_memmap_repeat",
         "tfdata_map_sample_memmap_repeat", "pydataset_memmap_threads", "pydataset_memmap_processes")
PIPELINES = PEERS + ("streamseg_zarr", "streamseg_memmap", "streamseg_zarr_uint8", "streamseg_memmap_uint8")
LABELS = {
    "seed_article": "seed article: NumPy in RAM + legacy ImageDataGenerator",
    "zarr_per_sample": "Keras PyDataset, zarr arr[i] per sample + OpenCV",
    "tfdata_tfrecord": "tf.data: TFRecord/PNG + tf.image",
    "tfdata_generator": "tf.data.from_generator over memmap + OpenCV",
    "tfdata_map_batch_memmap": "tf.data: range.shuffle.batch.map(numpy_function: memmap batch + OpenCV)",
    "tfdata_map_sample_memmap": "tf.data: range.shuffle.map(numpy_function: memmap sample + OpenCV).batch",
    "tfdata_map_batch_zarr": "tf.data: range.shuffle.batch.map(numpy_function: zarr batch read + OpenCV)",
    "tfdata_map_batch_memmap_repeat": "tf.data: range.shuffle.repeat.batch.map(numpy_function: memmap batch + OpenCV), "
                                      "one endless epoch",
    "tfdata_map_sample_memmap_repeat": "tf.data: range.shuffle.repeat.map(numpy_function: memmap sample + OpenCV).batch, "
                                       "one endless epoch",
    "pydataset_memmap_threads": "Keras PyDataset over memmap + OpenCV, worker threads",
    "pydataset_memmap_processes": "Keras PyDataset over memmap + OpenCV, worker processes",
    "streamseg_zarr": "streamseg SegmentationDataset (zarr)",
    "streamseg_memmap": "streamseg SegmentationDataset (memmap)",
    "streamseg_zarr_uint8": "streamseg SegmentationDataset (zarr), dtype='uint8' (the model normalises)",
    "streamseg_memmap_uint8": "streamseg SegmentationDataset (memmap), dtype='uint8' (the model normalises)",
}
BACKENDS = {"seed_article": "ram", "zarr_per_sample": "zarr", "tfdata_tfrecord": "tfrecord",
            "tfdata_generator": "memmap", "tfdata_map_batch_memmap": "memmap", "tfdata_map_sample_memmap": "memmap",
            "tfdata_map_batch_zarr": "zarr", "tfdata_map_batch_memmap_repeat": "memmap",
            "tfdata_map_sample_memmap_repeat": "memmap", "pydataset_memmap_threads": "memmap",
            "pydataset_memmap_processes": "memmap", "streamseg_zarr": "zarr", "streamseg_memmap": "memmap",
            "streamseg_zarr_uint8": "zarr", "streamseg_memmap_uint8": "memmap"}
ROTATE, ZOOM, SHIFT, BRIGHTNESS, CONTRAST = 15.0, (0.9, 1.1), 0.05, 0.1, 0.1


class PipelineSkipped(Exception):
    """The pipeline was not run (e.g. the data set does not fit in the RAM budget)."""


def _sample_seed(seed: int, epoch: int, index: int) -> list[int]:
    return [int(seed), int(epoch), int(index)]


def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x0DE7]).permutation(n)


# ---------------------------------------------------------------------------------- augmentation
def standard_transform(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, float, float]:
    """Draw the 'standard' preset: forward 2x3 affine (input -> output pixels), brightness, contrast."""
    u = rng.random(10)
    lin = np.diag([-1.0 if u[0] < 0.5 else 1.0, -1.0 if u[1] < 0.5 else 1.0])
    if u[2] < 0.5:
        k = 1 + min(int(u[3] * 3), 2) if h == w else 2
        lin = np.linalg.matrix_power(np.array([[0.0, 1.0], [-1.0, 0.0]]), k) @ lin
    angle = math.radians((2 * u[4] - 1) * ROTATE)
    c, s = math.cos(angle), math.sin(angle)
    lin = (ZOOM[0] + (ZOOM[1] - ZOOM[0]) * u[5]) * (np.array([[c, s], [-s, c]]) @ lin)
    centre = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    shift = np.array([(2 * u[6] - 1) * SHIFT * w, (2 * u[7] - 1) * SHIFT * h])
    matrix = np.hstack([lin, (centre + shift - lin @ centre)[:, None]])
    return matrix, (2 * u[8] - 1) * BRIGHTNESS, 1.0 + (2 * u[9] - 1) * CONTRAST


def _photometric(img: np.ndarray, brightness: float, contrast: float, value_range: float) -> np.ndarray:
    """Contrast around the mean of all pixels, additive brightness, clip, scale to [0, 1] (in place)."""
    offset = brightness * value_range + float(img.mean()) * (1.0 - contrast)
    img *= np.float32(contrast)
    img += np.float32(offset)
    np.clip(img, 0.0, value_range, out=img)
    img *= np.float32(1.0 / value_range)
    return img


def cv2_standard_augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
                         ) -> tuple[np.ndarray, np.ndarray]:
    """One 'standard' transform with OpenCV: uint8 ``(H, W, C)`` + ``(H, W[, 1])`` -> float32 [0, 1], int32."""
    h, w = image.shape[:2]
    matrix, brightness, contrast = standard_transform(rng, h, w)
    img = cv2.warpAffine(np.ascontiguousarray(image), matrix, (w, h), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    msk = cv2.warpAffine(np.ascontiguousarray(mask.reshape(h, w)), matrix, (w, h), flags=cv2.INTER_NEAREST,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    out = _photometric(img.reshape(h, w, -1).astype(np.float32), brightness, contrast, 255.0)
    return out, msk.reshape(h, w, 1).astype(np.int32)


# ---------------------------------------------------------------------------------- 1. seed article
_LEGACY_LOCK = threading.Lock()  # get_random_transform seeds numpy's global generator


class SeedArticleSequence(keras.utils.PyDataset):
    """The seed article's Sequence over arrays in RAM, with per-sample seeds (see the module notes)."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, batch_size: int = 32, seed: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.images, self.masks, self.batch_size, self.seed, self.epoch = images, masks, batch_size, seed, 0
        self.datagen = ImageDataGenerator(rotation_range=ROTATE, width_shift_range=SHIFT,
                                          height_shift_range=SHIFT, zoom_range=ZOOM[1] - 1.0,
                                          horizontal_flip=True, vertical_flip=True, fill_mode="constant",
                                          cval=0.0)

    def __len__(self) -> int:
        return len(self.images) // self.batch_size

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        idx = _epoch_order(len(self.images), self.seed, self.epoch)[i * self.batch_size:(i + 1) * self.batch_size]
        h, w, c = self.images.shape[1:]
        x = np.empty((len(idx), h, w, c), np.float32)
        y = np.empty((len(idx), h, w, 1), np.int32)
        for j, s in enumerate(idx):
            seq = np.random.SeedSequence(_sample_seed(self.seed, self.epoch, s))
            with _LEGACY_LOCK:
                params = self.datagen.get_random_transform((h, w, c), seed=int(seq.generate_state(1)[0]))
            img = self.datagen.apply_transform(self.images[s].astype(np.float32) / 255.0, params)
            msk = self.datagen.apply_transform(self.masks[s].reshape(h, w, 1).astype(np.float32), params)
            rng = np.random.default_rng(seq)
            u = rng.random(5)
            if u[0] < 0.5:
                k = 1 + min(int(u[1] * 3), 2)
                img, msk = np.rot90(img, k), np.rot90(msk, k)
            img = _photometric(np.array(img, np.float32), (2 * u[2] - 1) * BRIGHTNESS,
                               1.0 + (2 * u[3] - 1) * CONTRAST, 1.0)
            x[j], y[j] = img, np.rint(msk)
        return x, y

    def on_epoch_end(self) -> None:
        self.epoch += 1



def load_in_ram(memmap_store: str | os.PathLike, max_ram: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load a memmap store's arrays into RAM, or raise PipelineSkipped when they do not fit."""
    path = Path(memmap_store)
    images, masks = np.load(path / "images.npy", mmap_mode="r"), np.load(path / "masks.npy", mmap_mode="r")
    need = images.nbytes + masks.nbytes
    budget = psutil.virtual_memory().available * 0.8
    where = "80% of available RAM"
    if max_ram is not None and max_ram < budget:
        budget, where = float(max_ram), "--max-ram"
    if need > budget:
        raise PipelineSkipped(f"skipped: needs {need / 2**30:.2f} GiB, {budget / 2**30:.2f} GiB available ({where})")
    return np.array(images), np.array(masks)


# ---------------------------------------------------------------------------------- 2. zarr per sample
class ZarrPerSamplePyDataset(keras.utils.PyDataset):
    """Plain Keras PyDataset reading a zarr store sample by sample (see the module notes)."""

    def __init__(self, path: str | os.PathLike, batch_size: int = 32, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path, self.batch_size, self.seed, self.epoch = str(path), batch_size, seed, 0
        self.n = json.loads((Path(path) / "manifest.json").read_text())["count"]
        self._pid, self._arrays = None, None

    def _open(self) -> tuple[Any, Any]:
        if self._pid != os.getpid():  # once per process (workers are forked)
            import zarr

            group = zarr.open_group(self.path, mode="r")
            self._arrays, self._pid = (group["images"], group["masks"]), os.getpid()
        return self._arrays

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        images, masks = self._open()
        idx = _epoch_order(self.n, self.seed, self.epoch)[i * self.batch_size:(i + 1) * self.batch_size]
        h, w, c = images.shape[1:]
        x = np.empty((len(idx), h, w, c), np.float32)
        y = np.empty((len(idx), h, w, 1), np.int32)
        for j, s in enumerate(idx):
            rng = np.random.default_rng(_sample_seed(self.seed, self.epoch, s))
            x[j], y[j] = cv2_standard_augment(images[int(s)], masks[int(s)], rng)
        return x, y

    def on_epoch_end(self) -> None:
        self.epoch += 1


# ---------------------------------------------------------------------------------- 3. tf.data TFRecord
def write_tfrecords(memmap_store: str | os.PathLike, out_dir: str | os.PathLike, shards: int = 8) -> list[str]:
    """Write the store as ``shards`` TFRecord files of PNG pairs (reused when already complete)."""
    import tensorflow as tf

    out = Path(out_dir)
    files = [str(out / f"part-{k:03d}-of-{shards:03d}.tfrecord") for k in range(shards)]
    if (out / "_complete").exists():
        return files
    out.mkdir(parents=True, exist_ok=True)
    images = np.load(Path(memmap_store) / "images.npy", mmap_mode="r")
    masks = np.load(Path(memmap_store) / "masks.npy", mmap_mode="r")

    def feature(value: bytes) -> Any:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    for k, name in enumerate(files):
        with tf.io.TFRecordWriter(name) as writer:
            for i in range(k, len(images), shards):
                png_i = cv2.imencode(".png", np.ascontiguousarray(images[i][..., ::-1]))[1].tobytes()  # RGB file
                png_m = cv2.imencode(".png", np.ascontiguousarray(masks[i]))[1].tobytes()
                ex = tf.train.Example(features=tf.train.Features(feature={"image": feature(png_i),
                                                                          "mask": feature(png_m)}))
                writer.write(ex.SerializeToString())
    (out / "_complete").write_text(json.dumps({"count": int(len(images)), "shards": shards}))
    return files


def _tf_augment(image: Any, mask: Any, seed: Any) -> tuple[Any, Any]:
    """The 'standard' preset in TensorFlow ops, jointly on a stacked image + mask."""
    import tensorflow as tf

    u = tf.random.stateless_uniform([10], seed=seed)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    c = tf.shape(image)[2]
    x = tf.concat([tf.cast(image, tf.float32), tf.cast(mask, tf.float32)], axis=-1)
    x = tf.cond(u[0] < 0.5, lambda: tf.reverse(x, [1]), lambda: x)
    x = tf.cond(u[1] < 0.5, lambda: tf.reverse(x, [0]), lambda: x)
    k = tf.where(u[2] < 0.5, 1 + tf.minimum(tf.cast(u[3] * 3.0, tf.int32), 2), 0)
    x = tf.image.rot90(x, k)
    angle = (2.0 * u[4] - 1.0) * ROTATE * math.pi / 180.0
    zoom = ZOOM[0] + (ZOOM[1] - ZOOM[0]) * u[5]
    fw, fh = tf.cast(w, tf.float32), tf.cast(h, tf.float32)
    sx, sy = (2.0 * u[6] - 1.0) * SHIFT * fw, (2.0 * u[7] - 1.0) * SHIFT * fh
    cx, cy = (fw - 1.0) / 2.0, (fh - 1.0) / 2.0
    ca, sa = tf.cos(angle) / zoom, tf.sin(angle) / zoom   # inverse map: output pixel -> input pixel
    a0, a1, b0, b1 = ca, -sa, sa, ca
    a2 = cx - a0 * (cx + sx) - a1 * (cy + sy)
    b2 = cy - b0 * (cx + sx) - b1 * (cy + sy)
    transform = tf.reshape(tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0]), [1, 8])

    def warp(t: Any, how: str) -> Any:
        return tf.raw_ops.ImageProjectiveTransformV3(images=t[None], transforms=transform, output_shape=[h, w],
                                                     fill_value=0.0, interpolation=how, fill_mode="CONSTANT")[0]

    img = warp(x[..., :c], "BILINEAR")
    msk = warp(x[..., c:], "NEAREST")
    img = tf.image.adjust_contrast(img, 1.0 + (2.0 * u[9] - 1.0) * CONTRAST)
    img = tf.clip_by_value(img + (2.0 * u[8] - 1.0) * BRIGHTNESS * 255.0, 0.0, 255.0) / 255.0
    return img, tf.cast(tf.round(msk), tf.int32)


def _threading(ds: Any, workers: int) -> Any:
    """Cap tf.data's threads at ``workers`` (a private thread pool)."""
    import tensorflow as tf

    opts = tf.data.Options()
    opts.threading.private_threadpool_size = max(1, workers)
    opts.threading.max_intra_op_parallelism = 1
    return ds.with_options(opts)


def tfrecord_dataset(files: list[str], count: int, batch_size: int = 32, seed: int = 0, workers: int = 2) -> Any:
    """tf.data pipeline over PNG TFRecord shards (see the module notes)."""
    import tensorflow as tf

    auto = tf.data.AUTOTUNE
    spec = {"image": tf.io.FixedLenFeature([], tf.string), "mask": tf.io.FixedLenFeature([], tf.string)}

    def parse(record: Any, rand: Any) -> tuple[Any, Any]:
        f = tf.io.parse_single_example(record, spec)
        image, mask = tf.io.decode_png(f["image"], channels=3), tf.io.decode_png(f["mask"], channels=1)
        return _tf_augment(image, mask, tf.stack([rand, tf.constant(seed, tf.int64)]))

    ds = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=len(files), num_parallel_calls=auto,
                       deterministic=False)
    ds = ds.shuffle(256, seed=seed, reshuffle_each_iteration=True)
    rand = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    ds = tf.data.Dataset.zip((ds, rand)).map(parse, num_parallel_calls=auto, deterministic=False)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(auto)
    return _threading(ds.apply(tf.data.experimental.assert_cardinality(count // batch_size)), workers)


# ---------------------------------------------------------------------------------- 4. from_generator
class _MemmapGenerator:
    """Generator of augmented samples from a memmap store, one disjoint share per ``shard``."""

    def __init__(self, store: str | os.PathLike, seed: int, shards: int) -> None:
        self.store, self.seed, self.shards = Path(store), seed, shards
        self.calls = [0] * shards
        self.arrays: tuple[np.ndarray, np.ndarray] | None = None

    def __call__(self, shard: Any) -> Any:
        shard = int(shard)
        if self.arrays is None:
            self.arrays = (np.load(self.store / "images.npy", mmap_mode="r"),
                           np.load(self.store / "masks.npy", mmap_mode="r"))
        images, masks = self.arrays
        epoch, self.calls[shard] = self.calls[shard], self.calls[shard] + 1
        for s in _epoch_order(len(images), self.seed, epoch)[shard::self.shards]:
            yield cv2_standard_augment(images[s], masks[s], np.random.default_rng(_sample_seed(self.seed, epoch, s)))


def generator_dataset(store: str | os.PathLike, batch_size: int = 32, seed: int = 0, workers: int = 2) -> Any:
    """``tf.data.Dataset.from_generator`` over a memmap store, ``workers`` generators interleaved."""
    import tensorflow as tf

    meta = json.loads((Path(store) / "manifest.json").read_text())
    h, w, c = meta["image_shape"]
    workers = max(1, workers)
    gen = _MemmapGenerator(store, seed, workers)
    sig = (tf.TensorSpec((h, w, c), tf.float32), tf.TensorSpec((h, w, 1), tf.int32))
    ds = tf.data.Dataset.range(workers).interleave(
        lambda k: tf.data.Dataset.from_generator(gen, args=(k,), output_signature=sig),
        cycle_length=workers, num_parallel_calls=workers, deterministic=False)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    # No private thread pool here: generators run as nested py_funcs, which deadlock when the
    # interleave's calls hold every thread of a pool of ``workers`` threads.
    return ds.apply(tf.data.experimental.assert_cardinality(meta["count"] // batch_size))


# ---------------------------------------------------------------------------------- 6. PyDataset over memmap
class MemmapPyDataset(keras.utils.PyDataset):
    """Plain Keras PyDataset over the memmap store: one sorted fancy-index read per batch + OpenCV."""

    def __init__(self, path: str | os.PathLike, batch_size: int = 32, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path, self.batch_size, self.seed, self.epoch = Path(path), batch_size, seed, 0
        self.n = json.loads((self.path / "manifest.json").read_text())["count"]
        self._pid, self._arrays = None, None

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        if self._pid != os.getpid():  # once per process (workers are forked); threads share it
            self._arrays = (np.load(self.path / "images.npy", mmap_mode="r"),
                            np.load(self.path / "masks.npy", mmap_mode="r"))
            self._pid = os.getpid()
        return self._arrays

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        images, masks = self._open()
        idx = np.sort(_epoch_order(self.n, self.seed, self.epoch)[i * self.batch_size:(i + 1) * self.batch_size])
        raw_x, raw_y = images[idx], masks[idx]
        h, w, c = images.shape[1:]
        x = np.empty((len(idx), h, w, c), np.float32)
        y = np.empty((len(idx), h, w, 1), np.int32)
        for j, s in enumerate(idx):
            x[j], y[j] = cv2_standard_augment(raw_x[j], raw_y[j], np.random.default_rng(
                _sample_seed(self.seed, self.epoch, s)))
        return x, y

    def on_epoch_end(self) -> None:
        self.epoch += 1


# ---------------------------------------------------------------------------------- factory
def build_pipeline(name: str, data: dict[str, str], *, workers: int, batch_size: int = 32, seed: int = 0,
                   max_ram: int | None = None) -> Any:
    """Build pipeline ``name`` over ``data`` (paths ``zarr``, ``memmap``, ``tfrecord``).

    Raises
    ------
    PipelineSkipped
        When the pipeline cannot run here (the seed article's data set exceeds the RAM budget).
    """
    if name == "seed_article":
        images, masks = load_in_ram(data["memmap"], max_ram)
        return SeedArticleSequence(images, masks, batch_size, seed, workers=workers, use_multiprocessing=True)
    if name == "zarr_per_sample":
        return ZarrPerSamplePyDataset(data["zarr"], batch_size, seed, workers=workers, use_multiprocessing=True)
    if name == "tfdata_tfrecord":
        count = json.loads((Path(data["tfrecord"]) / "_complete").read_text())["count"]
        files = sorted(str(p) for p in Path(data["tfrecord"]).glob("*.tfrecord"))
        return tfrecord_dataset(files, count, batch_size, seed, workers)
    if name == "tfdata_generator":
        return generator_dataset(data["memmap"], batch_size, seed, workers)
    if name.startswith("tfdata_map_"):
        from peers_tfdata import build_tfdata_map  # imports this module

        return build_tfdata_map(name, data, workers=workers, batch_size=batch_size, seed=seed)
    if name in ("pydataset_memmap_threads", "pydataset_memmap_processes"):
        return MemmapPyDataset(data["memmap"], batch_size, seed, workers=workers,
                               use_multiprocessing=name.endswith("_processes"))
    if name in ("streamseg_zarr", "streamseg_memmap", "streamseg_zarr_uint8", "streamseg_memmap_uint8"):
        from streamseg import SegmentationDataset

        return SegmentationDataset(data[name.split("_")[1]], batch_size, augment="standard", shuffle="window",
                                   seed=seed, workers=workers, use_multiprocessing=True, drop_remainder=True,
                                   dtype="uint8" if name.endswith("_uint8") else "float32")
    raise ValueError(f"Unknown pipeline {name!r}; choose from {', '.join(PIPELINES)}. Received: {name!r}")
