"""The Keras data-adapter side of :class:`~streamseg.pipeline.dataset.SegmentationDataset`.

``model.fit(ds)`` asks a data adapter for an iterator in the backend's form; for TensorFlow,
:meth:`KerasAdapterMixin.get_tf_dataset` bridges each epoch's pass over the dataset's
``__iter__`` into tf.data through ``Dataset.range(n).map(numpy_function)``.
"""

from __future__ import annotations

import atexit
import functools
import sys
import threading
import time
import weakref
from typing import Any

import numpy as np

from ..errors import StreamsegError

__all__ = ["KerasAdapterMixin"]


class _TfCalls:
    """Counts tf.data's calls into Python that are in progress, so interpreter exit can wait
    for them.

    tf.data runs our ``numpy_function`` in its own threads (the prefetch thread).  A C++ thread
    that takes the GIL after the interpreter has begun finalizing is ended by CPython mid-call,
    and the iterator's destructor then waits for it forever (or aborts).  :meth:`quiesce`,
    called from an ``atexit`` hook (before finalization), refuses new calls and
    waits for running ones, and for their threads to leave Python.

    A call can also be *about to start*: once the consumer takes batch ``i`` from the
    prefetch buffer, tf.data's thread asks for batch ``i + 1`` at once, and may be waiting for
    the GIL, not yet in Python, while the main thread runs the exit hooks (in CI, 1 exit in
    about 20 hung that way).  So after a call that leaves batches to come, :meth:`quiesce`
    also waits (at most ``settle`` s) for the next call to arrive and be refused.  When the
    consumer has not taken the last batch, no call comes and the exit waits ``settle`` s.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.running = 0
        self.refused = False
        self.expected = False  # the last call left batches to come: tf.data may call again
        self.threads: set[int] = set()  # idents of the (tf.data) threads that called in

    def enter(self) -> bool:
        with self.cond:
            self.threads.add(threading.get_ident())
            self.expected = False
            if self.refused:
                self.cond.notify_all()
                return False
            self.running += 1
            return True

    def leave(self, more: bool = False) -> None:
        """End a call; ``more``: the pass has batches after this one."""
        with self.cond:
            self.running -= 1
            self.expected = more
            self.cond.notify_all()

    def quiesce(self, timeout: float = 30.0, settle: float = 1.0) -> None:
        """Refuse new calls and wait (at most ``timeout`` s) until no call is running, and (at
        most ``settle`` s) for a call the last one leaves to come, then until the calling
        threads have left Python altogether (tf.data's wrapper around our function runs Python
        before and after it; a fixed 50 ms wait was not always enough on a loaded machine)."""
        with self.cond:
            self.refused = True
            if not self.cond.wait_for(lambda: self.running == 0, timeout):
                print(f"streamseg: a tf.data call into the dataset was still running after {timeout:g} s "
                      "at exit; the interpreter may hang or abort while it finishes", file=sys.stderr)
                return
            self.cond.wait_for(lambda: not self.expected and self.running == 0, settle)
            threads = set(self.threads)
        # an ident of a tf.data thread that has ended may be reused by a Python thread (a
        # keep_alive timer, say) that never leaves Python: wait only for threads that
        # threading did not start
        threads -= {t.ident for t in threading.enumerate() if not isinstance(t, threading._DummyThread)}
        threads.discard(threading.get_ident())
        if not self.wait_out_of_python(threads, timeout=5.0):
            print("streamseg: a tf.data thread was still running Python 5 s after its last call into "
                  "the dataset at exit; the interpreter may hang or abort while it finishes", file=sys.stderr)

    @staticmethod
    def wait_out_of_python(threads: set[int], timeout: float) -> bool:
        """Wait until none of ``threads`` runs Python code (has a frame); False on timeout.

        A C++ thread calling into Python holds a thread state with frames only during the
        call, so its absence from ``sys._current_frames()`` means it is back in C++.
        """
        frames = getattr(sys, "_current_frames", None)
        if frames is None:  # not CPython: the old fixed wait
            time.sleep(0.05)
            return True
        deadline = time.monotonic() + timeout
        while threads & frames().keys():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True


@functools.lru_cache(maxsize=1)
def _epoch_dataset_class() -> type:
    """:class:`EpochDataset`, made once TensorFlow is imported (the module never imports it)."""
    from tensorflow.python.data.ops import dataset_ops

    class EpochDataset(dataset_ops.UnaryUnchangedStructureDataset):
        """The tf.data dataset ``fit`` reads: the same elements, but ``iter()`` hands back the
        iterator it made last time if nothing has read from it since.

        Keras 3 (``EpochIterator._enumerate_iterator``, no ``steps_per_epoch``) makes the next
        epoch's iterator at the end of an epoch, then throws it away unused and makes another
        at the start of the next.  Making one costs 2.9-3.7 ms for this ``map(numpy_function)``
        dataset (0.3-0.45 ms for ``from_tensors``), in the gap between two training steps
        (RESULTS.md 13m).  "Nothing has read": no pass over the dataset started since
        (``owner._tf_starts``, counted by ``_tf_next``), since an iterator's first element
        starts one.  A real ``tf.distribute`` strategy makes its own iterators from the
        dataset, not through this ``iter()``.
        """

        def __init__(self, inner: Any, owner: Any) -> None:
            self._owner = weakref.ref(owner)
            self._last: tuple[Any, int] | None = None  # (weakref to the iterator, passes started then)
            super().__init__(inner, inner._variant_tensor)

        def __iter__(self) -> Any:
            owner = self._owner()
            starts = owner._tf_starts if owner is not None else None
            if self._last is not None and starts is not None and self._last[1] == starts:
                last = self._last[0]()
                if last is not None:  # made, and no pass started since: never read from
                    return last
            iterator = super().__iter__()
            self._last = None if starts is None else (weakref.ref(iterator), starts)
            return iterator

    return EpochDataset


class KerasAdapterMixin:
    """Data-adapter methods; the class using it provides ``store``, ``options``,
    ``batch_size_value``, ``indices``, ``drop_remainder``, ``__len__``, ``__iter__``,
    ``_iterate(whole)``, ``_tf_lock``, ``_tf_pass``, ``_tf_calls`` and ``_tf_starts``."""

    def element_spec(self) -> tuple[Any, Any]:
        """``tf.TensorSpec`` pair of one batch (batch dimension unknown)."""
        import tensorflow as tf

        h, w, c = self.store.image_shape
        shape, dtype = self.options.mask_spec(self.batch_size_value, h, w)
        _, image_dtype = self.options.image_spec(self.batch_size_value, h, w, c)
        return (tf.TensorSpec((None, h, w, c), tf.as_dtype(image_dtype)),
                tf.TensorSpec((None,) + shape[1:], tf.as_dtype(dtype)))

    def get_numpy_iterator(self) -> Any:
        """Iterator over one epoch of NumPy batches."""
        return iter(self)

    def get_jax_iterator(self) -> Any:
        """Iterator over one epoch (NumPy arrays, which JAX accepts)."""
        return iter(self)

    def get_torch_dataloader(self) -> Any:
        """One epoch wrapped for the torch backend."""
        from keras.src.trainers.data_adapters import data_adapter_utils

        return data_adapter_utils.get_torch_dataloader(iter(self))

    def get_tf_dataset(self) -> Any:
        """The dataset ``fit`` reads: :meth:`to_tf_dataset`'s, whose ``iter()`` hands back an
        iterator nothing has read from yet instead of making another (``EpochDataset``: Keras
        makes one at the end of every epoch and throws it away)."""
        return _epoch_dataset_class()(self._tf_dataset(), self)

    def _tf_dataset(self) -> Any:
        """A ``tf.data.Dataset`` over one epoch per iteration (epoch taken when it starts).

        ``Dataset.range(len(self)).map(numpy_function)``: batch ``i`` of an iteration is the
        next batch of a pass over :meth:`__iter__`, and batch 0 starts a new pass, so one
        iterator at a time reads a given dataset object (as ``fit`` does).  Each iteration is a
        whole epoch, from batch 0 (a resume point of ``load_state`` is for ``iter(ds)``).  Cheaper than
        ``from_generator`` (about 0.4 ms per step and 20 ms per epoch less here), and the
        batches, 64-byte aligned, become tensors without a copy.  A ``prefetch(1)`` runs the
        call for the next batch (waiting for it, taking the GIL) during the current step
        instead of after it (input stall with 2 workers at 50% load: 0.022-0.034 without it,
        0.000-0.012 with it).  tf.data's own autotuning and injected prefetch are off: our workers already
        produce ahead.  At interpreter exit a finalizer waits for a call in progress (see
        ``_TfCalls``): a tf.data thread still inside Python when the interpreter finalizes hangs
        or aborts the exit.
        """
        import tensorflow as tf

        images_spec, masks_spec = self.element_spec()

        def load(i: Any) -> tuple[Any, Any]:
            images, masks = tf.numpy_function(self._tf_batch, [i], [images_spec.dtype, masks_spec.dtype],
                                              stateful=True)
            images.set_shape(images_spec.shape)
            masks.set_shape(masks_spec.shape)
            return images, masks

        if self._tf_calls is None:
            self._tf_calls = calls = _TfCalls()
            # At exit, quiesce must run before the pool's own finalizer stops the workers a
            # call may be waiting for.  weakref.finalize's exit hook runs finalizers newest
            # first, and the pool may be newer; atexit runs hooks last-registered first, so a
            # hook registered after weakref's own (ensured by the finalize below) runs before
            # every finalizer.  The finalize unregisters the hook when the dataset goes away.
            weakref.finalize(self, atexit.unregister, calls.quiesce).atexit = False
            atexit.register(calls.quiesce)
        # sequential map: batches stay in order; prefetch(1): the Python call for the next batch
        # overlaps the current training step instead of adding to it
        ds = tf.data.Dataset.range(len(self)).map(load).prefetch(1)
        options = tf.data.Options()
        options.autotune.enabled = False
        options.experimental_optimization.inject_prefetch = False
        return ds.with_options(options)

    def _tf_batch(self, i: Any) -> tuple[np.ndarray, np.ndarray]:
        """Batch ``i`` of the current tf.data pass; batch 0 starts a new pass."""
        calls = self._tf_calls
        if calls is not None and not calls.enter():
            raise StreamsegError(f"batch {int(i)} of a tf.data pass was asked for while the interpreter exits. "
                                 f"Received: batch {int(i)} of {len(self)}")
        more = False
        try:
            batch = self._tf_next(int(i))
            more = int(i) + 1 < len(self)
            return batch
        finally:
            if calls is not None:
                calls.leave(more)

    def _tf_next(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        with self._tf_lock:
            if i != 0 and self._tf_pass is None:
                raise StreamsegError(f"batch {i} of a tf.data pass was asked for, but that pass has ended: "
                                     "the dataset was closed, or the pass failed. Create a new iterator. "
                                     f"Received: batch {i} of {len(self)}")
            if i == 0:
                self._tf_starts += 1  # an iterator has been read from (see EpochDataset)
                if self._tf_pass is not None:
                    self._tf_pass.close()
                self._tf_pass = self._iterate(whole=True)  # tf.data reads len(self) batches
            try:
                return next(self._tf_pass)
            except StopIteration:
                self._tf_pass = None
                raise IndexError(f"batch {i} asked for after the end of the pass ({len(self)} batches)") from None

    def to_tf_dataset(self) -> Any:
        """A ``tf.data.Dataset`` yielding this dataset's batches, one epoch per pass (see
        :meth:`get_tf_dataset`: one iterator at a time reads a dataset object).

        Call :meth:`on_epoch_end` between passes to advance shuffling and augmentation.
        """
        return self._tf_dataset()

    @property
    def batch_size(self) -> int:
        """Samples per batch."""
        return self.batch_size_value

    @property
    def has_partial_batch(self) -> bool:
        """Whether the last batch is smaller than ``batch_size``."""
        return not self.drop_remainder and self.indices.size % self.batch_size_value != 0

    @property
    def partial_batch_size(self) -> int | None:
        """Size of the last batch when partial."""
        return self.indices.size % self.batch_size_value if self.has_partial_batch else None
