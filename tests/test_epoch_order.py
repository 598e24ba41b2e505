"""epoch_order: the window shuffle cut into windows of whole batches (numpy as the reference)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamseg import OptionError, SegmentationDataset, convert
from streamseg.pipeline.batches import epoch_order


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 400), chunk=st.integers(1, 17), batch=st.integers(1, 40), per_window=st.integers(1, 4),
       keep=st.sampled_from([1.0, 1.0, 0.7, 0.4]), seed=st.integers(0, 2**31), epoch=st.integers(0, 50))
def test_windows_of_whole_batches_are_runs_of_the_chunk_order(n, chunk, batch, per_window, keep, seed, epoch):
    """Each window of ``window_samples`` consecutive positions holds the samples of a run of
    chunks in the epoch's chunk order: two windows share at most one chunk, and a chunk lends
    samples to consecutive windows only; so a batch (window_samples is a multiple of it) reads
    the chunks of one window."""
    width = batch * per_window
    rng = np.random.default_rng(seed)
    indices = np.flatnonzero(rng.random(n) < keep)
    if indices.size == 0:
        indices = np.array([n - 1])
    order = epoch_order(indices, seed=seed, epoch=epoch, mode="window", chunk_samples=chunk, window_chunks=1,
                        window_samples=width)
    np.testing.assert_array_equal(np.sort(order), indices)  # a permutation of the subset
    again = epoch_order(indices, seed=seed, epoch=epoch, mode="window", chunk_samples=chunk, window_chunks=1,
                        window_samples=width)
    np.testing.assert_array_equal(order, again)  # a pure function of (seed, epoch)
    windows = [set((order[s : s + width] // chunk).tolist()) for s in range(0, order.size, width)]
    for a in range(len(windows)):
        for b in range(a + 1, len(windows)):
            assert len(windows[a] & windows[b]) <= 1, (a, b)
    for k in set((order // chunk).tolist()):  # a chunk lends samples to consecutive windows only
        held = [w for w, ks in enumerate(windows) if k in ks]
        assert held == list(range(held[0], held[-1] + 1)), (k, held)
    if indices.size == n and n % chunk == 0:  # full chunks: a window reads at most ceil(width / chunk)
        # chunks, one more where it starts inside a chunk
        assert max(len(w) for w in windows) <= -(-width // chunk) + 1


def test_windows_shuffle_samples_and_change_with_the_epoch():
    indices = np.arange(640)
    kw = dict(seed=7, mode="window", chunk_samples=10, window_chunks=7, window_samples=64)
    first, second = epoch_order(indices, epoch=0, **kw), epoch_order(indices, epoch=1, **kw)
    assert not np.array_equal(first, second)
    # within a window the samples are mixed, not left chunk after chunk
    window = first[:64] // 10
    assert (np.diff(window) != 0).sum() > 20


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """96 samples in zarr chunks of 10."""
    folder = tmp_path_factory.mktemp("order")
    images = np.zeros((96, 4, 4, 1), np.uint8)
    images[:, 0, 0, 0] = np.arange(96)
    np.save(folder / "x.npy", images)
    np.save(folder / "y.npy", np.zeros((96, 4, 4), np.uint8))
    return convert(images=folder / "x.npy", masks=folder / "y.npy", dst=folder / "s", format="zarr",
                   chunk_samples=10, progress=False)


@pytest.mark.parametrize("window_chunks, width", [(None, 16), (1, 16), (2, 24), (3, 32)])
def test_dataset_windows_are_whole_batches(store, window_chunks, width):
    ds = SegmentationDataset(store, 8, window_chunks=window_chunks, seed=1)
    assert ds.window_samples == width
    order = ds.epoch_indices(0)
    for s in range(0, order.size, width):  # a window's batches read its chunks only
        assert len(set((order[s : s + width] // 10).tolist())) <= -(-width // 10) + 1
    if window_chunks is not None:
        assert ds.window_chunks == window_chunks
    assert ds.state()["config"]["window_samples"] == width


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "3"])
def test_window_chunks_checked(store, bad):
    with pytest.raises(OptionError, match=r"window_chunks must be a positive integer\. Received: window_chunks="):
        SegmentationDataset(store, 8, window_chunks=bad)


def test_state_from_before_whole_batch_windows_is_refused(store):
    ds = SegmentationDataset(store, 8, seed=1)
    state = ds.state()
    del state["config"]["window_samples"]  # what a dataset of the previous order wrote
    with pytest.raises(OptionError, match="window_samples"):
        SegmentationDataset(store, 8, seed=1).load_state(state)
