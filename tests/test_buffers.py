"""Aligned, recycled batch buffers (streamseg.parallel.buffers)."""

from __future__ import annotations

import gc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamseg.parallel.buffers import BufferRecycler, aligned_empty


@settings(max_examples=50, deadline=None)
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=4),
       dtype=st.sampled_from([np.uint8, np.int32, np.float32, np.float64]),
       align=st.sampled_from([16, 64, 4096]))
def test_aligned_empty(shape, dtype, align):
    a = aligned_empty(tuple(shape), dtype, align)
    assert a.shape == tuple(shape) and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable
    assert a.ctypes.data % align == 0
    a[...] = 1  # the whole array is writable memory
    assert a.sum() == a.size


def test_recycler_reuses_only_unreferenced_buffers():
    r = BufferRecycler(max_free=2)
    a = r.empty((4, 5), np.float32)
    address = a.ctypes.data
    view = a[1:]  # keeps the buffer in use after `a` is gone
    del a
    gc.collect()
    b = r.empty((4, 5), np.float32)
    assert b.ctypes.data != address and r.reused == 0
    del view
    c = r.empty((4, 5), np.float32)
    assert c.ctypes.data == address and r.reused == 1 and r.allocated == 2
    assert r.empty((4, 6), np.float32).ctypes.data not in (address, b.ctypes.data)  # shapes not mixed
    assert all(x.ctypes.data % 64 == 0 for x in (b, c))


def test_recycler_keeps_at_most_max_free():
    r = BufferRecycler(max_free=1)
    arrays = [r.empty((8,), np.uint8) for _ in range(3)]
    del arrays
    assert r.free_buffers == 1
    r.clear()
    assert r.free_buffers == 0
    with pytest.raises(ValueError, match="Received: max_free=-1"):
        BufferRecycler(max_free=-1)


def test_tensorflow_adopts_the_buffer_and_it_is_not_reused_meanwhile():
    tf = pytest.importorskip("tensorflow")
    r = BufferRecycler()
    a = r.empty((2, 64, 64, 3), np.float32)
    a[...] = 1.0
    box = [a]

    def gen():
        yield (box.pop(),)

    ds = tf.data.Dataset.from_generator(gen, output_signature=(tf.TensorSpec(a.shape, tf.float32),))
    (t,) = next(iter(ds))
    a[0, 0, 0, 0] = 7.0
    assert float(t[0, 0, 0, 0]) == 7.0  # no copy: the tensor reads the buffer
    del a, ds  # the generator popped its reference
    gc.collect()
    b = r.empty((2, 64, 64, 3), np.float32)
    b[...] = -1.0  # must not be the tensor's memory
    assert float(tf.reduce_min(t)) == 1.0 and float(t[0, 0, 0, 0]) == 7.0
