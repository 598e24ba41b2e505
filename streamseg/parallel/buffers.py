"""Batch buffers for the main process: aligned, so TensorFlow adopts them, and recycled.

TensorFlow turns a NumPy array into a tensor without copying it only when the array's data
starts on an ``EIGEN_MAX_ALIGN_BYTES`` boundary (64 bytes on AVX-512 builds); NumPy only
promises 16 bytes, and TensorFlow then copied every ~34 MB batch inside the training step.
Every batch handed to Keras is therefore 64-byte aligned: lent in place from a worker's
shared-memory slot (:func:`lend`, laid out with :data:`ALIGN_BYTES`), or copied into an
aligned buffer.

A fresh 34 MB buffer per batch also costs page faults when it is first written and an
``munmap`` when it is freed.  :class:`BufferRecycler` hands out arrays whose memory returns
to a small free list once nothing references them any more, TensorFlow tensors that adopted
them included (used for batches copied out of a slot, and for batches built inline).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np

__all__ = ["ALIGN_BYTES", "aligned_empty", "BufferRecycler", "lend"]

ALIGN_BYTES = 64


def aligned_empty(shape: tuple[int, ...], dtype: Any, align: int = ALIGN_BYTES) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ``align``-byte boundary.

    Parameters
    ----------
    shape : tuple of int
        Array shape.
    dtype : numpy dtype-like
        Element type.
    align : int
        Alignment in bytes (a power of two).

    Returns
    -------
    numpy.ndarray
        A view on a slightly larger byte buffer, which it keeps alive.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


class _Lease:
    """Exposes a buffer through ``__array_interface__``: every array made from it, and every
    view of those arrays, keeps this object alive, so its death means the buffer is unused.
    ``buffer`` is released before ``hold`` when it dies (slots are cleared in order)."""

    __slots__ = ("buffer", "__array_interface__", "hold", "__weakref__")

    def __init__(self, buffer: np.ndarray, hold: Any = None) -> None:
        if not buffer.flags.c_contiguous:
            raise ValueError("only C-contiguous arrays can be lent")
        self.buffer = buffer
        self.__array_interface__ = {"shape": buffer.shape, "typestr": buffer.dtype.str, "version": 3,
                                    "data": (buffer.ctypes.data, False), "strides": None}
        self.hold = hold


def lend(view: np.ndarray, hold: Any) -> np.ndarray:
    """An array on ``view``'s memory that keeps ``hold`` alive, as does every view of it.

    A weak reference (``weakref.finalize``) on ``hold`` then tells when nothing uses the
    memory any more, e.g. to give a shared-memory slot back to its pool.

    Parameters
    ----------
    view : numpy.ndarray
        C-contiguous memory to lend.
    hold : object
        Any weak-referenceable object, shared by the arrays lent from one slot.

    Returns
    -------
    numpy.ndarray
        Same shape, dtype and memory as ``view``.
    """
    return np.asarray(_Lease(view, hold))


class BufferRecycler:
    """Hand out aligned arrays and reuse their memory once nothing references them.

    Parameters
    ----------
    max_free : int
        Unused buffers kept per (shape, dtype); more are freed.  Each kept buffer is private
        memory of the main process, so this bounds what recycling costs.

    Notes
    -----
    A buffer comes back when the last array or view on it is garbage collected, in
    whichever thread that happens; arrays kept by the caller are simply never reused.
    """

    def __init__(self, max_free: int = 2) -> None:
        if max_free < 0:
            raise ValueError(f"max_free must be >= 0. Received: max_free={max_free}")
        self.max_free = max_free
        self._free: dict[tuple[tuple[int, ...], str], list[np.ndarray]] = {}
        self._lock = threading.RLock()  # a finaliser may run while this thread holds the lock
        self.allocated = 0
        self.reused = 0

    def empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An uninitialised aligned array of ``shape`` and ``dtype``, recycled when possible."""
        key = (tuple(int(d) for d in shape), np.dtype(dtype).str)
        with self._lock:
            spare = self._free.get(key)
            buffer = spare.pop() if spare else None
            if buffer is None:
                self.allocated += 1
            else:
                self.reused += 1
        if buffer is None:
            buffer = aligned_empty(key[0], dtype)
        lease = _Lease(buffer)
        weakref.finalize(lease, self._give_back, key, buffer).atexit = False
        return np.asarray(lease)

    def _give_back(self, key: tuple[tuple[int, ...], str], buffer: np.ndarray) -> None:
        with self._lock:
            spare = self._free.setdefault(key, [])
            if len(spare) < self.max_free:
                spare.append(buffer)

    def clear(self) -> None:
        """Free every unused buffer now."""
        with self._lock:
            self._free.clear()

    @property
    def free_buffers(self) -> int:
        """Unused buffers currently kept."""
        with self._lock:
            return sum(len(v) for v in self._free.values())
