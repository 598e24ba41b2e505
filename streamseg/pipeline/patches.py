"""``PatchDataset``: 3D patches of a volume store for ``model.fit``, foreground oversampled.

A ``keras.utils.PyDataset`` and Keras data adapter built on the same machinery as
:class:`~streamseg.pipeline.dataset.SegmentationDataset` (warm worker pool, shared-memory
hand-over, ``epoch_callback()``, ``state()`` / ``load_state()``).  An epoch holds
``samples_per_volume`` patches of every case (:func:`~.patch_sampling.epoch_plan`, a pure
function of ``(seed, epoch)``); in every batch at least ``ceil(foreground_fraction * B)``
patches are centred on a foreground voxel drawn from the case's precomputed foreground
sample (class uniform among those present, or by ``class_weights``), the rest are uniform.
Everything about patch ``p`` of an epoch (its corner and its augmentation) comes from
``(seed, epoch, p)``, so batches are identical whatever the workers and start method.

Only the chunks a patch touches are decoded (:class:`~streamseg.store.volume_reader.VolumeStore`);
voxels outside the volume are ``pad_value`` in the (normalised) image and 0 in the mask.
"""

from __future__ import annotations

import collections
import os
import weakref
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from ..errors import LabelError, OptionError, reject_unknown_keywords, truncate
from ..parallel.feeder import Feeder
from ..parallel.workers import fill_the_cores
from ..store.volume_reader import VolumeStore
from .augment import Augment
from .batches import MASK_MODES, BatchOptions, BatchProducer, sample_rng, validate_choice
from .dataset import SegmentationDataset
from .intensity import intensity_options
from .patch_sampling import draw_corner, epoch_plan, patch_rng, validate_patch_options

__all__ = ["PatchDataset", "PatchProducer", "Normalizer"]

_FOREGROUND_CACHE = 32  # cases whose foreground samples a worker keeps


class _IntensityView:
    """What :func:`~.intensity.intensity_options` reads, for a volume store (one group per case)."""

    def __init__(self, store: VolumeStore) -> None:
        self.image_dtype = store.image_dtype
        self.image_shape = (1, 1, store.channels)
        self.path = store.path
        source = dict((store.meta.get("params") or {}).get("source") or {})
        source["cases"] = [dict(c, selected=1) for c in store.cases]
        self.meta = {"params": {"source": source}, "label_values": store.label_values}
        self.names = [f"{c['name']}:0" for c in store.cases]

    def __len__(self) -> int:
        return len(self.names)


class Normalizer:
    """The intensity mapping of a :class:`PatchDataset`, for a whole volume (e.g. for
    :func:`~streamseg.pipeline.predict.predict_volume`): ``f(array) -> float32 (X, Y, Z, C)``.

    ``"window"`` and ``"ct"`` use the data set's fixed values; ``"zscore"`` uses the given
    volume's own mean and std (as it does per case in training); None casts to float32.
    """

    def __init__(self, options: BatchOptions) -> None:
        self.mode = options.normalize
        self.offset, self.scale = options.image_offset, options.image_scale
        self.clip_in, self.clip_out = options.clip_in, options.clip_out

    def __call__(self, array: np.ndarray) -> np.ndarray:
        x = np.asarray(array, np.float32)
        if x.ndim == 3:
            x = x[..., np.newaxis]
        if self.mode == "zscore":
            flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
            mean, std = flat.mean(axis=0), flat.std(axis=0)
            return ((x - mean) / np.maximum(std, 1e-8)).astype(np.float32)
        if self.clip_in is not None:
            x = np.clip(x, self.clip_in[0], self.clip_in[1])
        x = (x - self.offset) * self.scale
        if self.clip_out is not None:
            x = np.clip(x, *self.clip_out)
        return x.astype(np.float32, copy=False)


class PatchProducer(BatchProducer):
    """Reads, normalises, augments and encodes the patches of one batch (runs in the workers).

    A task is ``(epoch, positions, cases, forced)``: the positions of the batch's patches in
    the epoch, their cases and whether each is centred on foreground.
    """

    def __init__(self, store: VolumeStore, options: BatchOptions, patch_size: tuple[int, int, int],
                 class_weights: dict[int, float] | None, pad_value: float,
                 yield_between_samples: bool = False) -> None:
        super().__init__(store, options, yield_between_samples=yield_between_samples)  # type: ignore[arg-type]
        self.patch_size = patch_size
        self.class_weights = class_weights
        self.pad_value = float(pad_value)
        self._fg: collections.OrderedDict[int, dict[int, np.ndarray]] = collections.OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fg"] = collections.OrderedDict()
        return state

    def describe(self, task: Any, shown: int = 4) -> str:
        epoch, positions, cases, _ = task
        names = self.store.names
        head = ", ".join(f"{int(p)} (case {names[int(c)]!r})" for p, c in zip(positions[:shown], cases[:shown]))
        more = f", ... ({len(positions)} in all)" if len(positions) > shown else ""
        return f"patches {head}{more} of store {self._where()}, epoch {epoch}"

    def _foreground(self, case: int) -> dict[int, np.ndarray]:
        fg = self._fg.get(case)
        if fg is None:
            fg = self.store.foreground(case)
            self._fg[case] = fg
            if len(self._fg) > _FOREGROUND_CACHE:
                self._fg.popitem(last=False)
        else:
            self._fg.move_to_end(case)
        return fg

    def patch(self, epoch: int, position: int, case: int, forced: bool) -> tuple[np.ndarray, np.ndarray, int]:
        """One patch: normalised float32 image ``(PX, PY, PZ, C)``, labels ``(PX, PY, PZ)``, and
        the class it was centred on (-1: uniform), before augmentation."""
        opts = self.options
        shape = self.store.shape(case)
        rng = patch_rng(opts.seed, epoch, position)
        fg = self._foreground(case) if forced else None
        corner, label = draw_corner(rng, shape, self.patch_size, forced=bool(forced), class_locations=fg,
                                    class_weights=self.class_weights)
        size = self.patch_size
        lo = [max(0, int(a)) for a in corner]
        hi = [min(n, int(a) + s) for a, s, n in zip(corner, size, shape)]
        image = np.full((*size, self.store.channels), self.pad_value, np.float32)
        mask = np.zeros(size, self.store.mask_dtype)
        if all(b > a for a, b in zip(lo, hi)):
            raw, labels = self.store.read_box(case, lo, hi)
            inside = tuple(slice(a - int(c), b - int(c)) for a, b, c in zip(lo, hi, corner))
            if raw.shape[:3] == tuple(size):  # the whole patch lies inside: normalise in place
                self._normalize(raw[np.newaxis], image[np.newaxis], np.array([case]))
            else:  # normalize_into needs a C-contiguous destination
                part = np.empty(raw.shape, np.float32)
                self._normalize(raw[np.newaxis], part[np.newaxis], np.array([case]))
                image[inside] = part
            mask[inside] = labels
        return image, mask, label

    def _produce(self, task: Any, out: dict[str, np.ndarray]) -> int:
        epoch, positions, cases, forced = task
        opts = self.options
        aug = opts.augment
        n = len(positions)
        labels = np.empty((n, *self.patch_size), self.store.mask_dtype)
        aside = self._aside  # os.sched_yield in workers that fill the cores (BatchProducer.setup_process)
        for j in range(n):
            image, mask, _ = self.patch(epoch, int(positions[j]), int(cases[j]), bool(forced[j]))
            if aug is not None:
                from .augment3d import augment_patch

                image, mask = augment_patch(aug, image, mask, sample_rng(opts.seed, epoch, int(positions[j])))
                if opts.clip_out is not None:
                    np.clip(image, *opts.clip_out, out=image)
            out["images"][j] = image
            labels[j] = mask
            if aside is not None:
                aside()
        self._check_patch_labels(positions, cases, labels)
        self._encode_masks(labels[..., np.newaxis], out["masks"][:n])
        return n

    def _check_patch_labels(self, positions: np.ndarray, cases: np.ndarray, labels: np.ndarray) -> None:
        opts = self.options
        if opts.mask_mode == "binary" or labels.size == 0 or int(labels.max()) < opts.num_classes:
            return
        j = int(np.argmax(labels.reshape(len(labels), -1).max(axis=1) >= opts.num_classes))
        case = int(cases[j])
        raise LabelError(f"Patch {int(positions[j])} of case {case} ({self.store.names[case]!r}) of store "
                         f"{self._where()} has label {int(labels[j].max())}, outside num_classes="
                         f"{opts.num_classes} (labels 0..{opts.num_classes - 1}). Pass a larger num_classes, "
                         "or mask_mode='binary'.")


class PatchDataset(SegmentationDataset):
    """Batches of 3D patches ``(images, masks)`` from a ``--layout volumes`` store.

    Parameters
    ----------
    store : VolumeStore or path
        A store converted with ``streamseg convert SRC DST --layout volumes``.
    batch_size : int
        Patches per batch.
    patch_size : (PX, PY, PZ)
        Patch size in voxels, RAS axis order.
    samples_per_volume : int
        Patches per case per epoch: ``len(ds) = ceil(cases * samples_per_volume / batch_size)``.
    foreground_fraction : float
        At least ``ceil(foreground_fraction * b)`` patches of every batch of ``b`` are centred
        on a foreground voxel (the last ones of the batch, as nnU-Net; a case without
        foreground gives a uniform patch instead).
    class_weights : mapping {label: weight} or sequence indexed by label, optional
        How the class of a foreground-centred patch is drawn among the classes present in
        the case (default uniform).
    cases : array-like of int, optional
        Subset of the store's cases (e.g. a train / validation split of cases).
    shuffle : bool
        Shuffle the epoch's patches (case order) per epoch.
    seed : int
        Seed of sampling and augmentation.
    augment : Augment, dict, str or None
        Joint 3D augmentation (:mod:`streamseg.pipeline.augment3d`): ``hflip``/``vflip``/
        ``dflip`` flip X/Y/Z, ``rot90`` turns in ``rot90_plane``, ``rotate`` about each axis,
        ``scale``/``translate`` in 3D, elastic, and photometric ops on normalised images.
    mask_mode : {"sparse", "onehot", "binary"}
        ``(B, PX, PY, PZ, 1)`` int32 labels, ``(B, PX, PY, PZ, K)`` float32 or
        ``(B, PX, PY, PZ, 1)`` float32 foreground.
    num_classes : int, optional
        K (default: largest stored label + 1).
    normalize : {"unit", "window", "zscore", "ct", None}
        As for :class:`SegmentationDataset` (``"zscore"``: per case; ``"ct"``: the data set's
        foreground statistics); applied before augmentation.
    window : (lo, hi), optional
        For ``normalize="window"``.
    pad_value : float
        Normalised image value outside the volume (default 0).
    drop_remainder, workers, use_multiprocessing, max_queue_size, start_method, keep_alive,
    worker_priority, verify_reads
        As for :class:`SegmentationDataset`.
    """

    @reject_unknown_keywords
    def __init__(
        self,
        store: VolumeStore | str | os.PathLike,
        batch_size: int = 2,
        patch_size: tuple[int, int, int] = (64, 64, 64),
        *,
        samples_per_volume: int = 1,
        foreground_fraction: float = 0.33,
        class_weights: Any = None,
        cases: ArrayLike | None = None,
        shuffle: bool = True,
        seed: int = 0,
        augment: Augment | dict[str, Any] | str | None = None,
        mask_mode: str = "sparse",
        num_classes: int | None = None,
        normalize: str | None = "unit",
        window: tuple[float, float] | None = None,
        pad_value: float = 0.0,
        drop_remainder: bool = False,
        workers: int = 1,
        use_multiprocessing: bool = False,
        max_queue_size: int = 10,
        start_method: str | None = None,
        keep_alive: float = 5.0,
        worker_priority: str = "normal",
        verify_reads: bool | None = None,
    ) -> None:
        from keras.utils import PyDataset

        PyDataset.__init__(self, workers=workers, use_multiprocessing=use_multiprocessing,
                           max_queue_size=max_queue_size)
        if not isinstance(store, VolumeStore):
            from ..store.reader import open_store

            store = open_store(store, verify_reads=True if verify_reads is None else bool(verify_reads))
            if not isinstance(store, VolumeStore):
                raise OptionError(f"PatchDataset reads a --layout volumes store (one 3D entry per case); "
                                  f"{store.path} holds 2D samples: use SegmentationDataset, or convert with "
                                  "--layout volumes. Received: a 2D store")
        elif verify_reads is not None:
            store.verify_reads = bool(verify_reads)
        self.store = store
        popts = validate_patch_options(patch_size, samples_per_volume, foreground_fraction, class_weights,
                                       batch_size)
        self.patch_size = tuple(popts.patch_size)
        self.samples_per_volume = popts.samples_per_volume
        self.foreground_fraction = popts.foreground_fraction
        self.class_weights = popts.class_weights
        self.batch_size_value = popts.batch_size
        self._init_cases(cases, shuffle, seed, drop_remainder)
        self._init_patch_batches(augment, mask_mode, num_classes, normalize, window, pad_value)
        self._init_workers({"workers": workers, "use_multiprocessing": use_multiprocessing,
                            "max_queue_size": max_queue_size, "start_method": start_method,
                            "keep_alive": keep_alive, "worker_priority": worker_priority})
        self._init_state()

    # ------------------------------------------------------------------ construction helpers
    def _init_cases(self, cases: Any, shuffle: Any, seed: Any, drop_remainder: Any) -> None:
        n = len(self.store)
        if cases is None:
            self.cases = np.arange(n, dtype=np.int64)
        else:
            idx = np.asarray(cases)
            if idx.ndim != 1 or idx.size == 0 or idx.dtype.kind not in "iu" or idx.min() < 0 or idx.max() >= n:
                raise OptionError(f"cases must be a non-empty 1-D array of case indices in [0, {n}). "
                                  f"Received: cases={truncate(cases)}")
            self.cases = idx.astype(np.int64)
        if not isinstance(shuffle, (bool, np.bool_)):
            raise OptionError(f"shuffle must be True or False for patches. Received: shuffle={truncate(shuffle)}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise OptionError(f"seed must be an integer >= 0. Received: seed={truncate(seed)}")
        self.shuffle_mode = "uniform" if shuffle else "none"
        self.seed = int(seed)
        self.drop_remainder = bool(drop_remainder)
        self.shard = None
        self.window_chunks = 1
        total_samples = self.cases.size * self.samples_per_volume
        self.indices = np.arange(total_samples, dtype=np.int64)  # patch positions of an epoch
        b = self.batch_size_value
        total = total_samples // b if self.drop_remainder else -(-total_samples // b)
        if total == 0:
            raise OptionError(f"{total_samples} patches make no full batch of {b} with drop_remainder=True. "
                              "Received: drop_remainder=True")
        self._batch_ids = np.arange(total)

    def _init_patch_batches(self, augment: Any, mask_mode: str, num_classes: Any, normalize: Any,
                            window: Any, pad_value: Any) -> None:
        validate_choice("mask_mode", mask_mode, MASK_MODES)
        if normalize == "standardize":
            raise OptionError("normalize='standardize' is for 2D stores; a volume store normalises per case "
                              "('zscore') or with the data set's foreground statistics ('ct'). "
                              "Received: normalize='standardize'")
        intensity = intensity_options(_IntensityView(self.store), normalize, window)  # type: ignore[arg-type]
        intensity["normalize_first"] = True
        intensity["value_range"] = 1.0
        labels = self.store.label_values
        if num_classes is None:
            num_classes = max(labels) + 1 if labels else 2
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
                or not 1 <= num_classes <= 256:
            raise OptionError(f"num_classes must be an integer in [1, 256]. Received: {truncate(num_classes)}")
        if isinstance(pad_value, bool) or not isinstance(pad_value, (int, float, np.number)) \
                or not np.isfinite(pad_value):
            raise OptionError(f"pad_value must be a finite number. Received: pad_value={truncate(pad_value)}")
        aug = Augment.from_config(augment)
        if aug is not None:
            from .augment3d import check_3d

            check_3d(aug)  # shear / crop have no 3D meaning here
        if aug is not None and aug.is_identity:
            aug = None
        self.options = BatchOptions(seed=self.seed, augment=aug, mask_mode=mask_mode,
                                    num_classes=int(num_classes), **intensity)
        self.augment, self.mask_mode, self.num_classes = aug, mask_mode, int(num_classes)
        self.pad_value = float(pad_value)

    def _init_workers(self, o: dict[str, Any]) -> None:
        workers, mp_flag, queue = o["workers"], o["use_multiprocessing"], o["max_queue_size"]
        priority = self._worker_priority(o)
        slots = {"images": ((self.batch_size_value, *self.patch_size, self.store.channels), np.dtype(np.float32)),
                 "masks": self._mask_spec()}
        producer = PatchProducer(self.store, self.options, self.patch_size, self.class_weights, self.pad_value,
                                 yield_between_samples=fill_the_cores(workers, mp_flag))
        self._feeder = Feeder(producer, slots, workers=int(workers), use_multiprocessing=bool(mp_flag),
                              max_queue_size=int(queue), start_method=o["start_method"],
                              keep_alive=float(o["keep_alive"]), on_close=weakref.WeakMethod(self._forget_carry),
                              priority=priority)

    def _mask_spec(self) -> tuple[tuple[int, ...], np.dtype]:
        b, p = self.batch_size_value, self.patch_size
        if self.options.mask_mode == "onehot":
            return (b, *p, self.options.num_classes), np.dtype(np.float32)
        return (b, *p, 1), np.dtype(np.float32 if self.options.mask_mode == "binary" else np.int32)

    # ------------------------------------------------------------------ epochs and batches
    def epoch_plan(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(cases, forced)`` of every patch of an epoch, in order (store case indices)."""
        epoch = self._epoch if epoch is None else epoch
        plan = self._orders.get(epoch)
        if plan is None:
            local, forced = epoch_plan(self.cases.size, samples_per_volume=self.samples_per_volume,
                                       batch_size=self.batch_size_value,
                                       foreground_fraction=self.foreground_fraction,
                                       shuffle=self.shuffle_mode != "none", seed=self.seed, epoch=epoch)
            plan = (self.cases[local], forced)
            if len(self._orders) > 4:
                self._orders.clear()
            self._orders[epoch] = plan  # type: ignore[assignment]
        return plan  # type: ignore[return-value]

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        """Case of every patch of an epoch, in order."""
        return self.epoch_plan(epoch)[0]

    def batch_indices(self, i: int, epoch: int | None = None) -> np.ndarray:
        """Store case indices of the patches of batch ``i``."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"Batch index {i} is out of range for {len(self)} batches.")
        b = int(self._batch_ids[i])
        return self.epoch_indices(epoch)[b * self.batch_size_value:(b + 1) * self.batch_size_value]

    def _task(self, epoch: int, i: int) -> tuple[tuple[int, int], Any]:
        cases, forced = self.epoch_plan(epoch)
        b = int(self._batch_ids[i])
        sl = slice(b * self.batch_size_value, (b + 1) * self.batch_size_value)
        return (epoch, i), (epoch, self.indices[sl], cases[sl], forced[sl])

    def patch_info(self, i: int, epoch: int | None = None) -> list[dict[str, Any]]:
        """Where each patch of batch ``i`` comes from: case, corner and centring class (-1: uniform)."""
        epoch = self._epoch if epoch is None else epoch
        _, (_, positions, cases, forced) = self._task(epoch, i)
        out = []
        for p, c, f in zip(positions, cases, forced):
            shape = self.store.shape(int(c))
            fg = self.store.foreground(int(c)) if f else None
            corner, label = draw_corner(patch_rng(self.seed, epoch, int(p)), shape, self.patch_size,
                                        forced=bool(f), class_locations=fg, class_weights=self.class_weights)
            out.append({"position": int(p), "case": int(c), "name": self.store.names[int(c)],
                        "corner": [int(v) for v in corner], "label": int(label), "forced": bool(f)})
        return out

    def normalizer(self) -> Normalizer:
        """This dataset's intensity mapping as a callable on whole volumes (see :class:`Normalizer`)."""
        return Normalizer(self.options)

    # ------------------------------------------------------------------ adapter / resume hooks
    def element_spec(self) -> tuple[Any, Any]:
        """``tf.TensorSpec`` pair of one batch (batch dimension unknown)."""
        import tensorflow as tf

        shape, dtype = self._mask_spec()
        return (tf.TensorSpec((None, *self.patch_size, self.store.channels), tf.float32),
                tf.TensorSpec((None,) + shape[1:], tf.as_dtype(dtype)))

    def _resume_config(self) -> dict[str, Any]:
        from .resume import _canonical

        o = self.options
        return _canonical({
            "store_cases": len(self.store), "cases": [int(c) for c in self.cases],
            "patch_size": list(self.patch_size), "samples_per_volume": self.samples_per_volume,
            "foreground_fraction": self.foreground_fraction, "class_weights": self.class_weights,
            "batch_size": self.batch_size_value, "batches": len(self), "shuffle": self.shuffle_mode,
            "drop_remainder": self.drop_remainder, "mask_mode": o.mask_mode, "num_classes": o.num_classes,
            "normalize": o.normalize, "pad_value": self.pad_value,
            "augment": o.augment.get_config() if o.augment is not None else None,
        })

    def __repr__(self) -> str:
        return (f"PatchDataset({self.store!r}, batch_size={self.batch_size_value}, patch_size={self.patch_size}, "
                f"batches={len(self)}, samples_per_volume={self.samples_per_volume}, "
                f"foreground_fraction={self.foreground_fraction}, workers={self.workers}, "
                f"use_multiprocessing={self.use_multiprocessing})")
