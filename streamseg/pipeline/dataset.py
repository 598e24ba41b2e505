"""``SegmentationDataset``: lazy, jointly augmented batches for ``model.fit``.

The dataset is a ``keras.utils.PyDataset`` (Keras 3's ``Sequence``): ``len(ds)`` batches,
``ds[i] -> (images, masks)``.  It is also a Keras data adapter, so ``model.fit(ds)`` hands
iteration to streamseg instead of Keras's ``OrderedEnqueuer``: batches come in order from
a warm worker pool that writes into shared memory (no per-epoch pool, no pickled
batches, no hang when a worker dies), and the tf.data signature is known without reading
a batch.  ``fit``'s ``shuffle`` and ``class_weight`` arguments are therefore ignored:
shuffling is the dataset's own, per epoch.

Randomness is a pure function of ``(seed, epoch, sample index)``; the epoch advances in
:meth:`SegmentationDataset.on_epoch_end`, and ``fit`` sets it through ``ds.epoch_callback()``
(see :mod:`.resume`, also for ``state()`` / ``load_state()``).
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
import threading
import weakref
from typing import Any

from numpy.typing import ArrayLike

import numpy as np

from .augment import Augment
from .batches import MASK_MODES, SHUFFLE_MODES, BatchOptions, BatchProducer, epoch_order, validate_choice, window_group
from .adapter import KerasAdapterMixin
from .handover import HandoverMixin
from .intensity import intensity_options
from .resume import ResumeMixin
from .split import split
from .transport import check_transport, normalization_layer
from ..errors import LabelError, OptionError, StreamsegError, reject_unknown_keywords, truncate
from ..parallel.feeder import Feeder
from ..parallel.workers import check_priority, fill_the_cores
from ..store.reader import Store, open_store

try:  # Keras 3
    from keras.utils import PyDataset
except ImportError:  # pragma: no cover - Keras 3 is a dependency
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDataset

try:  # a custom adapter is accepted by keras.src.trainers.data_adapters.get_data_adapter
    from keras.src.trainers.data_adapters.data_adapter import DataAdapter as _DataAdapter
except ImportError:  # pragma: no cover - fall back to the plain PyDataset protocol
    _DataAdapter = object  # type: ignore[assignment,misc]

__all__ = ["SegmentationDataset", "split"]

_OPTIONS = ("indices", "shuffle", "seed", "augment", "mask_mode", "num_classes", "normalize", "window",
            "dtype", "drop_remainder", "shard", "window_chunks", "workers", "use_multiprocessing",
            "max_queue_size", "start_method", "keep_alive", "worker_priority")


class SegmentationDataset(HandoverMixin, PyDataset, KerasAdapterMixin, ResumeMixin, _DataAdapter):  # type: ignore[misc,valid-type]
    """Batches of ``(images, masks)`` read lazily from a store, augmented per sample.

    Parameters
    ----------
    store : Store or path
        A store from :func:`streamseg.open_store` / :meth:`Store.from_arrays`, or its path.
    batch_size : int
        Samples per batch.
    indices : array-like of int, optional
        Subset of samples (e.g. from :func:`split`); default all.
    shuffle : {"window", "uniform", "none"} or bool
        Per-epoch order.  True means ``"window"``: chunks in random order and samples mixed
        within windows of whole batches (``window_chunks``), so a batch reads few chunks.
        ``"uniform"`` is a true uniform shuffle (slower on zarr: every batch touches
        ~batch_size chunks).  False / ``"none"`` keeps the given order.
    seed : int
        Seed of shuffling and augmentation.
    augment : Augment, dict, str or None
        Joint augmentation (an :class:`Augment`, its config, or a preset name).
    mask_mode : {"sparse", "onehot", "binary"}
        ``"sparse"``: int32 labels ``(B, H, W, 1)``; ``"onehot"``: float32 ``(B, H, W, K)``;
        ``"binary"``: float32 ``(B, H, W, 1)`` with 1 where the label is non-zero.
    num_classes : int, optional
        Number of classes K (default: largest label in the manifest + 1).  Labels >= K
        raise :class:`LabelError` naming the sample.
    normalize : {"unit", "standardize", "window", "zscore", "ct", None}
        ``"unit"`` scales by the dtype range (255 or 65535; refused for int16 / float32
        images, which have none); ``"standardize"`` uses the store's per-channel mean/std;
        ``"window"``: ``clip((x - lo) / (hi - lo), 0, 1)`` with ``window=(lo, hi)`` (CT soft
        tissue: ``(-175, 250)`` HU); ``"zscore"``: per case, ``(x - mean) / std`` with the
        case's own statistics; ``"ct"``: nnU-Net's CT scheme, clip to the data set's
        foreground 0.5/99.5 percentiles, then ``(x - mean) / std`` with its foreground
        mean/std.  "zscore" and "ct" need a store converted from volumes (the statistics are
        in the manifest's ``params.source``).  None keeps stored values (as float32).
        int16 / float32 stores, and the modes "window", "zscore" and "ct", are normalised
        *before* augmentation: photometric ops then act on normalised values (brightness
        0.1 = a tenth of the window, or 0.1 std; with None: stored units), ``fill_value`` is a
        normalised value, and "window" output is clipped to [0, 1] again (see
        :mod:`streamseg.pipeline.intensity`).
    window : (float, float), optional
        ``(lo, hi)`` of ``normalize="window"``, ``lo < hi``, in stored units; required there
        and refused with any other mode.
    dtype : {"float32", "uint8"}
        Images as normalised float32 (default), or as uint8 that the model normalises with
        :meth:`normalization_layer` (uint8 stores, ``normalize`` "unit"/"standardize"/None):
        4x fewer bytes per batch through shared memory and onto the device; sparse masks are
        uint8 too.  See :mod:`streamseg.pipeline.transport`.
    drop_remainder : bool
        Drop the last partial batch.
    shard : (index, count), optional
        Read only every ``count``-th batch starting at ``index`` (disjoint shards).
    window_chunks : int, optional
        Window width for ``shuffle="window"`` in chunks (default: two batches).  Windows hold a
        whole number of batches (the width is rounded up to one), so no batch draws from two
        windows.
    workers : int
        Worker processes (or threads) producing batches ahead of the training loop; 0 makes
        batches in the calling thread.
    use_multiprocessing : bool
        Processes with shared-memory handover instead of threads.  When there are at least as
        many worker processes as usable cores, each runs OpenCV on its own thread only.
    max_queue_size : int
        Batches produced ahead (at most ``2 * workers``).
    start_method : {"fork", "forkserver", "spawn"} or None
        Multiprocessing start method (default: the platform's).
    keep_alive : float
        Seconds workers stay up after an epoch with no new request (default 5).
    worker_priority : {"normal", "low", "idle"}
        Scheduling priority of the worker processes (``use_multiprocessing=True``):
        ``"normal"`` (default) as the training loop; ``"low"``: nice 19; ``"idle"`` (Linux):
        ``SCHED_IDLE``, the workers run only on a core that nothing else wants, so the training
        loop never waits for a core they hold.  With as many workers as cores, "idle" keeps the
        input stall near zero (benchmarks/RESULTS.md); on a machine other jobs keep busy it
        starves the workers.
    verify_reads : bool, optional
        Check reads against the store's checksums (see :func:`streamseg.open_store`);
        default: the store's own setting (on for a path).
    """

    @reject_unknown_keywords
    def __init__(
        self,
        store: Store | str | os.PathLike,
        batch_size: int = 32,
        *,
        indices: ArrayLike | None = None,
        shuffle: str | bool = True,
        seed: int = 0,
        augment: Augment | dict[str, Any] | str | None = None,
        mask_mode: str = "sparse",
        num_classes: int | None = None,
        normalize: str | None = "unit",
        window: tuple[float, float] | None = None,
        dtype: str = "float32",
        drop_remainder: bool = False,
        shard: tuple[int, int] | None = None,
        window_chunks: int | None = None,
        workers: int = 1,
        use_multiprocessing: bool = False,
        max_queue_size: int = 10,
        start_method: str | None = None,
        keep_alive: float = 5.0,
        worker_priority: str = "normal",
        verify_reads: bool | None = None,
    ) -> None:
        given = locals()
        o: dict[str, Any] = {name: given[name] for name in _OPTIONS}
        super().__init__(workers=o["workers"], use_multiprocessing=o["use_multiprocessing"],
                         max_queue_size=o["max_queue_size"])
        if not isinstance(store, Store):
            store = open_store(store) if isinstance(store, (str, os.PathLike)) else store
            if getattr(store, "layout", None) == "volumes":
                raise OptionError(f"{store.path} is a --layout volumes store (one 3D entry per case): train on it "
                                  "with PatchDataset, or convert with --layout slices for SegmentationDataset. "
                                  "Received: a VolumeStore")
            if not isinstance(store, Store):
                raise OptionError(f"store must be a Store or the path of one. Received: {truncate(store)}")
        self.store = store.with_verify_reads(verify_reads)
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise OptionError(f"batch_size must be a positive integer. Received: batch_size={truncate(batch_size)}")
        self.batch_size_value = int(batch_size)
        self._init_order(o)
        self._init_batches(o)
        self._init_workers(o)
        self._init_state()

    def _init_state(self) -> None:
        """Epoch, position and pass bookkeeping of a new dataset (shared with PatchDataset)."""
        self._epoch = 0
        self._epoch_used = False
        self._next_batch = self._start_at = 0  # position in the epoch; where load_state resumes
        self._orders: dict[int, np.ndarray] = {}
        self._carry: Any = None  # handover._Carry: the next epoch's first batch
        self._passes = 0  # passes started over __iter__ with workers
        self._closes = 0  # explicit close() calls: a pass begun before one must not restart workers
        self._tf_pass: Any = None  # the pass over __iter__ that get_tf_dataset's iterator reads
        self._tf_lock = threading.Lock()
        self._tf_calls: Any = None  # tf.data's calls into _tf_batch, waited for at exit
        self._tf_starts = 0  # tf.data passes started (batch 0 asked for): adapter.EpochDataset

    # ------------------------------------------------------------------ construction helpers
    def _init_order(self, o: dict[str, Any]) -> None:
        n = len(self.store)
        shuffle = o["shuffle"]
        shuffle = {True: "window", False: "none"}.get(shuffle, shuffle) if isinstance(shuffle, bool) else shuffle
        validate_choice("shuffle", shuffle, SHUFFLE_MODES + (True, False))
        self.shuffle_mode: str = shuffle
        if o["indices"] is None:
            self.indices = np.arange(n, dtype=np.int64)
        else:
            idx = np.asarray(o["indices"])
            if idx.ndim != 1 or idx.size == 0 or idx.dtype.kind not in "iu":
                raise OptionError(f"indices must be a non-empty 1-D integer array. Received: {truncate(o['indices'])}")
            if idx.min() < 0 or idx.max() >= n:
                raise OptionError(f"indices must lie in [0, {n}) for this store. "
                                  f"Received: min {int(idx.min())}, max {int(idx.max())}")
            self.indices = idx.astype(np.int64)
        if not isinstance(o["seed"], (int, np.integer)):
            raise OptionError(f"seed must be an integer. Received: seed={truncate(o['seed'])}")
        self.seed = int(o["seed"])
        self.drop_remainder = bool(o["drop_remainder"])
        shard = o["shard"]
        if shard is not None and (len(shard) != 2 or not 0 <= shard[0] < shard[1]):
            raise OptionError(f"shard must be (index, count) with 0 <= index < count. Received: shard={truncate(shard)}")
        self.shard = tuple(shard) if shard is not None else None
        cs = self.store.chunk_samples
        b = self.batch_size_value
        wc = o["window_chunks"]
        if wc is not None and (isinstance(wc, bool) or not isinstance(wc, (int, np.integer)) or wc < 1):
            raise OptionError(f"window_chunks must be a positive integer. Received: window_chunks={truncate(wc)}")
        # windows of whole batches (two by default, else window_chunks' samples rounded up):
        # no batch straddles two windows, so the batches of a window read its chunks alone
        # and one worker decodes them (straddling batches made 2 workers decode ~2.2x per epoch)
        self.window_samples = 2 * b if wc is None else -(-int(wc) * cs // b) * b
        self.window_chunks = int(wc) if wc is not None else max(1, -(-self.window_samples // cs))
        full = self.indices.size // self.batch_size_value
        total = full if self.drop_remainder else -(-self.indices.size // self.batch_size_value)
        if total == 0:
            raise OptionError(f"{self.indices.size} samples make no full batch of {self.batch_size_value} "
                              "with drop_remainder=True. Received: drop_remainder=True")
        self._batch_ids = np.arange(total)[shard[0]::shard[1]] if shard else np.arange(total)

    def _init_batches(self, o: dict[str, Any]) -> None:
        validate_choice("mask_mode", o["mask_mode"], MASK_MODES)
        intensity = intensity_options(self.store, o["normalize"], o["window"])  # validates both
        meta = self.store.meta
        labels = [int(v) for v in meta.get("label_values", [])]
        num_classes = o["num_classes"]
        if num_classes is None:
            if "label_values" not in meta and o["mask_mode"] != "binary":
                raise OptionError("num_classes is needed: these wrapped masks are over 256 MiB, so their labels "
                                  "were not scanned. Pass num_classes=K (labels 0..K-1). Received: num_classes=None")
            num_classes = max(labels) + 1 if labels else 2
            if o["mask_mode"] != "binary" and labels and num_classes > 2 * len(labels) and num_classes > 8:
                raise LabelError(f"The store's labels are {labels}: sparse/onehot masks need labels 0..K-1. "
                                 "Use mask_mode='binary' for 0/255 masks, or pass num_classes. "
                                 f"Received: labels {truncate(labels)}")
        if not isinstance(num_classes, (int, np.integer)) or num_classes < 1 or num_classes > 256:
            raise OptionError(f"num_classes must be an integer in [1, 256]. Received: {truncate(num_classes)}")
        augment = Augment.from_config(o["augment"])
        if augment is not None:
            augment.check_2d()  # dflip / rot90_plane are for PatchDataset
        if augment is not None and augment.is_identity:
            augment = None
        transport = check_transport(o["dtype"], image_dtype=self.store.image_dtype, channels=self.store.image_shape[2],
                                    normalize=intensity["normalize"], normalize_first=intensity["normalize_first"],
                                    augment=augment)
        self.options = BatchOptions(seed=self.seed, augment=augment, mask_mode=o["mask_mode"],
                                    num_classes=int(num_classes), transport=transport, **intensity)
        self.augment = augment
        self.mask_mode = o["mask_mode"]
        self.num_classes = int(num_classes)

    @staticmethod
    def _worker_priority(o: dict[str, Any]) -> str:
        """Check the worker options (shared with PatchDataset); return the worker priority."""
        workers, queue = o["workers"], o["max_queue_size"]
        if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 0:
            raise OptionError(f"workers must be a non-negative integer. Received: workers={truncate(workers)}")
        if isinstance(queue, bool) or not isinstance(queue, (int, np.integer)) or queue < 1:
            raise OptionError(f"max_queue_size must be a positive integer. Received: {truncate(queue)}")
        validate_choice("start_method", o["start_method"], (None, "fork", "forkserver", "spawn"))
        return check_priority(o.get("worker_priority", "normal"), bool(o["use_multiprocessing"]))

    def _init_workers(self, o: dict[str, Any]) -> None:
        workers, mp_flag, queue = o["workers"], o["use_multiprocessing"], o["max_queue_size"]
        priority = self._worker_priority(o)
        h, w, c = self.store.image_shape
        b = self.batch_size_value
        slots = {"images": self.options.image_spec(b, h, w, c), "masks": self.options.mask_spec(b, h, w)}
        affinity = None
        if self.shuffle_mode == "window" and self.store.backend == "zarr":  # decode each chunk ~once
            # a window spans ceil(W / chunk) chunks, one more where it starts inside a chunk
            self.options.cache_chunks = -(-self.window_samples // self.store.chunk_samples) + 2
            affinity = functools.partial(window_group, batch_size=b, batch_ids=self._batch_ids,
                                         window_samples=self.window_samples)
        fills_cores = fill_the_cores(workers, mp_flag)
        producer = BatchProducer(self.store, self.options, sequential_opencv=fills_cores,
                                 yield_between_samples=fills_cores)
        self._feeder = Feeder(producer, slots, workers=int(workers),
                              use_multiprocessing=bool(mp_flag), max_queue_size=int(queue),
                              start_method=o["start_method"], keep_alive=float(o["keep_alive"]),
                              on_close=weakref.WeakMethod(self._forget_carry), priority=priority,
                              affinity=affinity)

    def _forget_carry(self) -> None:
        """The workers stopped (close(), keep_alive or an error): drop the next epoch's batch."""
        self._carry = None

    def normalization_layer(self) -> Any:
        """Keras layer normalising this dataset's images in the model (``Rescaling`` for
        ``dtype="uint8"``, ``Identity`` for float32 batches): see :mod:`.transport`."""
        return normalization_layer(self.options)

    def distribute(self, strategy: Any, *, global_batch_size: int | None = None, remainder: str | None = None,
                   prefetch: int = 1, input_options: Any = None) -> Any:
        """``strategy.distribute_datasets_from_function`` over shards of this dataset, one per input
        pipeline (see :func:`streamseg.pipeline.distribute.distribute_dataset`; pass
        ``callbacks=[ds.epoch_callback()]`` to ``fit``)."""
        from .distribute import distribute_dataset

        return distribute_dataset(self, strategy, global_batch_size=global_batch_size, remainder=remainder,
                                  prefetch=prefetch, input_options=input_options)

    # ------------------------------------------------------------------ Sequence protocol
    def __len__(self) -> int:
        return int(self._batch_ids.size)

    @property
    def num_batches(self) -> int:
        """Batches per epoch (Keras PyDataset / DataAdapter protocol)."""
        return len(self)

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        """Sample order of an epoch (all batches, before sharding)."""
        epoch = self._epoch if epoch is None else epoch
        order = self._orders.get(epoch)
        if order is None:  # threads may race here: each returns its own result, never a cleared key
            order = epoch_order(self.indices, seed=self.seed, epoch=epoch, mode=self.shuffle_mode,
                                chunk_samples=self.store.chunk_samples, window_chunks=self.window_chunks,
                                window_samples=self.window_samples)
            if len(self._orders) > 4:
                self._orders.clear()
            self._orders[epoch] = order
        return order

    def batch_indices(self, i: int, epoch: int | None = None) -> np.ndarray:
        """Store indices of the samples in batch ``i`` of an epoch."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"Batch index {i} is out of range for {len(self)} batches.")
        b = int(self._batch_ids[i])
        return self.epoch_indices(epoch)[b * self.batch_size_value : (b + 1) * self.batch_size_value]

    def _task(self, epoch: int, i: int) -> tuple[tuple[int, int], tuple[int, np.ndarray]]:
        return (epoch, i), (epoch, self.batch_indices(i, epoch))

    def _fetch(self, epoch: int, i: int, upcoming: range, start: bool = True) -> tuple[np.ndarray, np.ndarray]:
        if epoch == self._epoch:
            self._epoch_used = True
        out = self._fetch_raw(epoch, i, upcoming, start=start)
        if out is None:  # start=False and no pool: close() ran during the pass
            raise StreamsegError(f"The dataset was closed while a pass over it was running, so batch {i} "
                                 "of that pass cannot be produced. Iterate again for a new pass. "
                                 f"Received: batch {i} of {len(self)}, epoch {epoch}")
        return out

    def _fetch_raw(self, epoch: int, i: int, upcoming: range, start: bool = True,
                   lend: bool = True) -> tuple[np.ndarray, np.ndarray] | None:
        key, task = self._task(epoch, i)
        # Ahead of the last batches of an epoch come the first ones of the next epoch (its
        # order is a pure function of (seed, epoch)), so the first step of an epoch does not
        # wait for the workers to start over.  A wrong guess is dropped by the next fetch.
        ahead = itertools.chain((self._task(epoch, j) for j in upcoming),
                                (self._task(epoch + 1, j) for j in range(len(self))))
        out = self._feeder.fetch(key, task, ahead, start=start, lend=lend)
        return None if out is None else (out["images"], out["masks"])

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        i = int(i)
        if i < 0:
            i += len(self)
        return self._fetch(self._epoch, i, range(i + 1, len(self)))

    def on_epoch_begin(self) -> None:
        """Nothing changes here: Keras 3.15 starts its pool before calling it."""

    def on_epoch_end(self) -> None:
        """Advance the epoch: the next epoch has a new order and new transforms.

        Only an epoch from which at least one batch was read advances: Keras calls
        ``on_epoch_end`` once before the first epoch of ``fit`` too.
        """
        if self._epoch_used:
            self._epoch += 1
            self._epoch_used = False
            self._next_batch = self._start_at = 0
        current = self._epoch
        self._feeder.epoch_finished(keep=lambda key: key[0] >= current, defer=True)

    def close(self) -> None:
        """Stop worker processes and free shared memory now.

        A pass over ``__iter__`` in progress then ends with a :class:`StreamsegError` instead
        of starting workers again; a new pass (or ``ds[i]``) starts them.
        """
        self._closes += 1
        self._carry = None
        with self._tf_lock:
            if self._tf_pass is not None:
                self._tf_pass.close()
                self._tf_pass = None
        self._feeder.close()

    def __enter__(self) -> "SegmentationDataset":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self, _finalizing: Any = sys.is_finalizing) -> None:  # bound now: at exit modules are gone
        feeder = self.__dict__.get("_feeder")
        if feeder is None or _finalizing():  # at exit the pools' own finalizers have cleaned up
            return
        feeder.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_feeder"] = None  # workers belong to the process that made them
        state["_orders"] = {}
        state["_carry"] = None  # holds a thread's event and a batch
        state["_tf_pass"] = state["_tf_lock"] = state["_tf_calls"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A copy that travelled to another process (e.g. into Keras's own worker pool) produces
        # its batches inline: a pool inside a pool would only oversubscribe the cores.
        self.__dict__.update(state)
        self._tf_lock = threading.Lock()
        self._init_workers({"workers": 0, "use_multiprocessing": False, "max_queue_size": 1,
                            "start_method": None, "keep_alive": 0.0})

    def __repr__(self) -> str:
        return (f"SegmentationDataset({self.store!r}, batch_size={self.batch_size_value}, batches={len(self)}, "
                f"shuffle={self.shuffle_mode!r}, mask_mode={self.mask_mode!r}, workers={self.workers}, "
                f"use_multiprocessing={self.use_multiprocessing})")
