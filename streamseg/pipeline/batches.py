"""Pure batch logic: epoch orders, per-sample randomness, batch assembly.

Everything here is a pure function of its arguments, so the same batch comes out bit
for bit whichever process, thread or order produces it:

- the sample order of an epoch depends on ``(seed, epoch)`` only;
- the random transform of a sample depends on ``(seed, epoch, sample index)`` only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import LabelError, OptionError, StreamsegError, WorkerError, truncate
from ..store.reader import Store
from .fused import augment_into, clip_into, fusable, normalize_into, uniform_pair

__all__ = ["BatchOptions", "epoch_order", "window_group", "normalize_into", "clip_into", "sample_rng", "BatchProducer",
           "SHUFFLE_MODES", "MASK_MODES", "NORMALIZE_MODES"]

SHUFFLE_MODES = ("window", "uniform", "none")
MASK_MODES = ("sparse", "onehot", "binary")
NORMALIZE_MODES = ("unit", "standardize", "window", "zscore", "ct", None)
_ORDER_SALT = 0x5EED_0001


def epoch_order(indices: np.ndarray, *, seed: int, epoch: int, mode: str, chunk_samples: int,
                window_chunks: int, window_samples: int | None = None) -> np.ndarray:
    """Sample order of one epoch: a pure function of ``(seed, epoch)``.

    Parameters
    ----------
    indices : numpy.ndarray
        The samples this dataset reads (store indices).
    seed, epoch : int
        Randomness comes from ``numpy.random.default_rng([seed, epoch, salt])``.
    mode : {"window", "uniform", "none"}
        ``"uniform"``: a uniform permutation.  ``"window"``: chunks in random order, samples
        shuffled within windows (like FFCV's quasi-random order), so a batch touches few
        chunks.  ``"none"``: as given.
    chunk_samples, window_chunks : int
        Chunk size of the store and window width in chunks.
    window_samples : int, optional
        Window width in samples instead (a multiple of the batch size, so that no batch
        straddles two windows): the samples, chunk after chunk in the random chunk order, are
        cut every ``window_samples``; a chunk at a cut lends samples to both windows.
    """
    if mode == "none":
        return indices
    rng = np.random.default_rng([seed, epoch, _ORDER_SALT])
    if mode == "uniform":
        return indices[rng.permutation(indices.size)]
    chunk_of = indices // chunk_samples
    chunks, inverse = np.unique(chunk_of, return_inverse=True)
    chunk_rank = np.empty(chunks.size, np.int64)
    chunk_rank[rng.permutation(chunks.size)] = np.arange(chunks.size)
    jitter = rng.random(indices.size)
    if window_samples is None:
        window = chunk_rank[inverse] // max(1, window_chunks)
    else:
        window = np.empty(indices.size, np.int64)
        window[np.lexsort((jitter, chunk_rank[inverse]))] = np.arange(indices.size) // max(1, window_samples)
    return indices[np.lexsort((jitter, window))]


def window_group(key: tuple[int, int], batch_size: int, window_samples: int, batch_ids: np.ndarray
                 ) -> tuple[int, int]:
    """The shuffle window batch ``key = (epoch, i)`` starts in: batches of one window read the
    same chunks, so the pool gives them to one worker (its decoded-chunk cache serves them)."""
    epoch, i = key
    return epoch, int(batch_ids[i]) * batch_size // max(1, window_samples)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Generator for the random transform of one sample in one epoch."""
    return np.random.default_rng([seed, epoch, int(index)])


@dataclass
class BatchOptions:
    """What turns stored samples into a training batch (picklable)."""

    seed: int = 0
    augment: Any = None
    mask_mode: str = "sparse"
    num_classes: int = 2
    normalize: str | None = "unit"
    image_offset: np.ndarray = field(default_factory=lambda: np.zeros(1, np.float32))
    image_scale: np.ndarray = field(default_factory=lambda: np.ones(1, np.float32))
    value_range: float = 255.0
    # intensity modes (see .intensity): y = clip_out((clip_in(x) - offset) * scale)
    clip_in: np.ndarray | None = None          # (2, C) bounds on stored values, or None
    clip_out: tuple[float, float] | None = None  # bounds on normalised values, or None
    sample_group: np.ndarray | None = None     # store index -> row of group_offset/scale
    group_offset: np.ndarray | None = None     # (G, C), replaces image_offset per sample
    group_scale: np.ndarray | None = None      # (G, C)
    normalize_first: bool = False              # normalise, then augment normalised values
    transport: str = "float32"                 # "uint8": images not normalised, sparse masks uint8
    cache_chunks: int = 0                      # decoded chunks each worker keeps per array (zarr)

    def image_spec(self, batch: int, h: int, w: int, c: int) -> tuple[tuple[int, ...], np.dtype]:
        return (batch, h, w, c), np.dtype(np.uint8 if self.transport == "uint8" else np.float32)

    def mask_spec(self, batch: int, h: int, w: int) -> tuple[tuple[int, ...], np.dtype]:
        if self.mask_mode == "onehot":
            return (batch, h, w, self.num_classes), np.dtype(np.float32)
        if self.mask_mode == "binary":
            return (batch, h, w, 1), np.dtype(np.float32)
        return (batch, h, w, 1), np.dtype(np.uint8 if self.transport == "uint8" else np.int32)


class BatchProducer:
    """Reads and augments batches; sent once to each worker (pickles as store path + options)."""

    def __init__(self, store: Store, options: BatchOptions, sequential_opencv: bool = False,
                 yield_between_samples: bool = False) -> None:
        self.store = store
        self.options = options
        self.sequential_opencv = sequential_opencv
        self.yield_between_samples = yield_between_samples
        self._aside: Any = None  # os.sched_yield in a worker process that yields between samples

    def setup_process(self) -> None:
        """Run once in each worker process: with ``sequential_opencv`` (the dataset sets it when
        its worker processes fill the cores), OpenCV runs on the worker's own thread; with
        ``yield_between_samples`` (set with it), the worker offers its core to any other
        runnable thread after every sample (``os.sched_yield``, where the platform has it).

        The yield is for the training loop's threads: woken on a core a worker holds, a thread
        of the main process waited for it up to the end of the worker's time slice (a 4 ms
        tick here, HZ=250), 1.2-3.1 ms in a ``perf sched`` trace, in the gap between two steps.
        After a sample (~0.4 ms) a worker gives the core to a thread that is waiting for it;
        with none waiting the call returns at once (about a microsecond).

        Left alone, each worker runs OpenCV's own pool (as many threads as cores): 2 workers on
        2 cores made 4 busy threads, each preempted 1,300-2,000 times a second (about 250 with
        one OpenCV thread).  ``setNumThreads(0)`` (sequential), not 1: OpenCV 5's
        ``setNumThreads(1)`` joins the pool's threads, which a forked child does not have, and
        waits forever.
        """
        if self.sequential_opencv:
            import cv2

            cv2.setNumThreads(0)
        if self.yield_between_samples:
            self._aside = getattr(os, "sched_yield", None)

    def setup(self) -> None:
        """Run once in each worker: Blosc decodes with one thread (the workers fill the cores).

        The store needs nothing here: it opens its files lazily in each process.
        """
        from numcodecs import blosc

        blosc.use_threads = False
        self.setup_inline()  # the decoded-chunk cache

    def setup_inline(self) -> None:
        """Run once in a process that produces batches inline (``workers=0``): the decoded-chunk
        cache of :meth:`setup`, which serves consecutive batches of a shuffle window there too;
        Blosc keeps its threads (nothing else fills the cores)."""
        if self.options.cache_chunks:
            self.store.keep_decoded_chunks(self.options.cache_chunks)

    def describe(self, task: tuple[int, np.ndarray], shown: int = 4) -> str:
        """Which samples ``task`` reads, their source names and the store, for error messages.

        E.g. ``"samples 8, 9, 10, 11, ... (16 in all; sources 's0008', 's0009', 's0010',
        's0011', ...) of store /data/s.zarr, epoch 0"``: the first ``shown`` samples only, and
        no sources where the store has none but the sample numbers (wrapped arrays).
        """
        epoch, idx = task
        idx = np.asarray(idx).ravel()
        head = [int(i) for i in idx[:shown]]
        more = ", ..." if idx.size > shown else ""
        notes = [f"{idx.size} in all"] if more else []
        try:
            names = self.store.names
            sources = [str(names[i]) for i in head] if names else []
        except (IndexError, OSError, TypeError, ValueError):
            sources = []
        if sources and sources != [str(i) for i in head]:
            notes.append(f"source{'s' if len(sources) > 1 else ''} "
                         + ", ".join(repr(n) for n in sources) + more)
        text = f"sample{'s' if idx.size != 1 else ''} {', '.join(map(str, head))}{more}"
        if notes:
            text += f" ({'; '.join(notes)})"
        return f"{text} of store {self._where()}, epoch {epoch}"

    def _where(self) -> str:
        url = getattr(self.store, "url", None)  # a RemoteStore: the URL, not its local mirror
        return url or (str(self.store.path) if self.store.path is not None else "in-memory arrays")

    def produce(self, task: tuple[int, np.ndarray], out: dict[str, np.ndarray]) -> int:
        """Fill ``out['images'][:n]`` and ``out['masks'][:n]`` for ``task = (epoch, indices)``.

        Raises
        ------
        WorkerError
            Whatever failed, with the original exception's type and message, which samples of
            which store were being read (:meth:`describe`), and the original as ``__cause__``.
            streamseg's own errors keep their type; those that do not already name the store
            get the same description in front of their message.
        """
        try:
            return self._produce(task, out)
        except StreamsegError as exc:
            if f"store {self._where()}" in str(exc):
                raise  # already names the sample and the store (e.g. LabelError)
            try:
                again = type(exc)(f"While producing {self.describe(task)}: {exc}")
            except Exception:  # noqa: BLE001 - a subclass taking other arguments: add a note
                exc.add_note(f"While producing {self.describe(task)}.")
                raise
            raise again from exc
        except Exception as exc:
            raise WorkerError(f"Could not produce a batch of {self.describe(task)}: "
                              f"{type(exc).__name__}: {exc}") from exc

    def _produce(self, task: tuple[int, np.ndarray], out: dict[str, np.ndarray]) -> int:
        epoch, idx = task
        n = len(idx)
        opts = self.options
        store, aug = self.store, opts.augment
        if (aug is not None and not opts.normalize_first and hasattr(store, "iter_samples")
                and fusable(aug, store.image_dtype, store.image_shape[-1])):
            return self._produce_streamed(epoch, idx, out)
        raw_images, raw_masks = self.store.read(idx)
        self._check_labels(idx, raw_masks)
        images, masks = out["images"], out["masks"]
        aug, aside = opts.augment, self._aside
        if aug is None:
            self._normalize(raw_images, images[:n], idx)
            label_src = raw_masks
        elif opts.normalize_first:
            label_src = np.empty_like(raw_masks)
            for j in range(n):
                self._normalize(raw_images[j:j + 1], images[j:j + 1], idx[j:j + 1])
                img, msk = aug(images[j], raw_masks[j], sample_rng(opts.seed, epoch, idx[j]), value_range=1.0)
                if opts.clip_out is not None:
                    np.clip(img, *opts.clip_out, out=img)
                images[j] = img
                label_src[j] = msk
                if aside is not None:
                    aside()
        else:
            label_src = np.empty_like(raw_masks)
            fused = fusable(aug, raw_images.dtype, raw_images.shape[-1])  # uint8: one pass per sample
            uniform = uniform_pair(opts.image_offset, opts.image_scale)
            for j in range(n):
                rng = sample_rng(opts.seed, epoch, idx[j])
                if fused:
                    label_src[j] = augment_into(aug, raw_images[j], raw_masks[j], rng, images[j], opts.image_offset,
                                                opts.image_scale, opts.value_range, uniform=uniform)
                else:
                    img, msk = aug(raw_images[j], raw_masks[j], rng, value_range=opts.value_range)
                    normalize_into(img, images[j], opts.image_offset, opts.image_scale)
                    label_src[j] = msk
                if aside is not None:
                    aside()
        self._encode_masks(label_src, masks[:n])
        return n

    def _produce_streamed(self, epoch: int, idx: np.ndarray, out: dict[str, np.ndarray]) -> int:
        """The fused path sample by sample, straight from the store's memory map or decoded
        chunk (:meth:`Store.iter_samples`): no copy of the batch's raw images first."""
        opts, store, n = self.options, self.store, len(idx)
        images, masks = out["images"], out["masks"]
        h, w, _ = store.image_shape
        label_src = np.empty((n, h, w, 1), store.mask_dtype)
        uniform = uniform_pair(opts.image_offset, opts.image_scale)
        aside = self._aside
        for j, image, mask in store.iter_samples(idx):
            self._check_labels(idx[j:j + 1], mask[None])
            label_src[j] = augment_into(opts.augment, image, mask, sample_rng(opts.seed, epoch, idx[j]), images[j],
                                        opts.image_offset, opts.image_scale, opts.value_range, uniform=uniform)
            if aside is not None:
                aside()  # a training-loop thread waiting for this core gets it now (setup_process)
        self._encode_masks(label_src, masks[:n])
        return n

    def _normalize(self, src: np.ndarray, dst: np.ndarray, idx: np.ndarray) -> None:
        """``dst = clip_out((clip_in(src) - offset) * scale)``, offsets per sample or per store."""
        opts = self.options
        if opts.clip_in is None and opts.clip_out is None and opts.sample_group is None:
            if dst.dtype == np.uint8:  # dtype="uint8": the model normalises
                np.copyto(dst, src)
            else:
                normalize_into(src, dst, opts.image_offset, opts.image_scale)
            return
        np.copyto(dst, src, casting="unsafe")
        if opts.clip_in is not None:
            clip_into(dst, opts.clip_in[0], opts.clip_in[1])
        if opts.sample_group is None:
            normalize_into(dst, dst, opts.image_offset, opts.image_scale)
        else:
            assert opts.group_offset is not None and opts.group_scale is not None
            for j, g in enumerate(opts.sample_group[np.asarray(idx)]):
                normalize_into(dst[j], dst[j], opts.group_offset[g], opts.group_scale[g])
        if opts.clip_out is not None:
            np.clip(dst, *opts.clip_out, out=dst)

    def _check_labels(self, idx: np.ndarray, masks: np.ndarray) -> None:
        opts = self.options
        if opts.mask_mode == "binary" or masks.size == 0:
            return
        if int(masks.max()) < opts.num_classes:
            return
        per_sample = masks.reshape(masks.shape[0], -1).max(axis=1)
        j = int(np.nonzero(per_sample >= opts.num_classes)[0][0])
        s = int(idx[j])
        where = self._where()
        try:
            name = f" ('{self.store.names[s]}')"
        except (IndexError, OSError):
            name = ""
        raise LabelError(
            f"Sample {s}{name} of store {where} has label {int(per_sample[j])}, outside "
            f"num_classes={opts.num_classes} (labels 0..{opts.num_classes - 1}). Pass a larger "
            "num_classes, or mask_mode='binary' for 0/255 masks."
        )

    def _encode_masks(self, src: np.ndarray, out: np.ndarray) -> None:
        mode = self.options.mask_mode
        if mode == "sparse":
            out[...] = src
        elif mode == "binary":
            np.not_equal(src, 0, out=out, casting="unsafe")
        else:
            labels = np.arange(self.options.num_classes, dtype=src.dtype)
            np.equal(src, labels, out=out, casting="unsafe")


def validate_choice(name: str, value: Any, allowed: tuple) -> None:
    """Raise :class:`OptionError` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        shown = ", ".join(repr(a) for a in allowed)
        raise OptionError(f"`{name}` must be one of {shown}. Received: {name}={truncate(value)}")
