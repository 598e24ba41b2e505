"""Micro-benchmarks: store reads, augmentation, batch assembly, transport.

Run with::

    python -m pytest benchmarks/test_micro.py --benchmark-only --benchmark-json benchmarks/results/micro.json

Batches are 32 samples of 256x256x3 uint8 with a 1-channel mask.
"""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest

from streamseg.pipeline.augment import Augment
from streamseg.pipeline.batches import BatchOptions, BatchProducer, epoch_order
from streamseg.parallel.pool import BatchPool

B = 32


def _indices(store, kind: str, rng: np.random.Generator) -> np.ndarray:
    n = len(store)
    if kind == "sequential":
        start = int(rng.integers(0, n - B))
        return np.arange(start, start + B)
    if kind == "uniform":
        return rng.choice(n, B, replace=False)
    order = epoch_order(np.arange(n), seed=0, epoch=int(rng.integers(1 << 30)), mode="window",
                        chunk_samples=store.chunk_samples, window_chunks=-(-2 * B // store.chunk_samples))
    start = int(rng.integers(0, n // B)) * B
    return order[start : start + B]


@pytest.mark.parametrize("kind", ["sequential", "window", "uniform"])
@pytest.mark.parametrize("fmt", ["zarr", "memmap"])
def test_store_read_batch(benchmark, stores, fmt, kind):
    store = stores[fmt]
    rng = np.random.default_rng(0)
    benchmark.group = f"store.read batch of {B} ({kind})"
    benchmark.extra_info["per_sample_ms"] = None
    benchmark(lambda: store.read(_indices(store, kind, rng)))
    benchmark.extra_info["per_sample_ms"] = benchmark.stats.stats.mean * 1000 / B


def test_zarr_per_sample_arr_i(benchmark, stores):
    """What a plain PyDataset does: zarr-python ``arr[i]`` per sample (image + mask)."""
    import zarr

    group = zarr.open_group(stores["zarr"].path, mode="r")
    images, masks = group["images"], group["masks"]
    rng = np.random.default_rng(0)
    benchmark.group = f"store.read batch of {B} (uniform)"

    def read():
        idx = rng.choice(images.shape[0], B, replace=False)
        return [(images[int(i)], masks[int(i)]) for i in idx]

    benchmark(read)
    benchmark.extra_info["per_sample_ms"] = benchmark.stats.stats.mean * 1000 / B


@pytest.mark.parametrize("preset", ["light", "standard", "heavy"])
def test_augment_per_sample(benchmark, stores, preset):
    image, mask = stores["memmap"].read([3])
    aug = Augment.preset(preset)
    rng = np.random.default_rng(0)
    benchmark.group = "augment one sample"
    benchmark(lambda: aug(image[0], mask[0], rng))


@pytest.mark.parametrize("preset", ["none", "standard"])
@pytest.mark.parametrize("fmt", ["zarr", "memmap"])
def test_batch_assembly(benchmark, stores, fmt, preset):
    store = stores[fmt]
    opts = BatchOptions(augment=None if preset == "none" else Augment.preset(preset), num_classes=3,
                        image_scale=np.full(3, 1 / 255, np.float32), image_offset=np.zeros(3, np.float32))
    producer = BatchProducer(store, opts)
    out = {"images": np.empty((B, 256, 256, 3), np.float32), "masks": np.empty((B, 256, 256, 1), np.int32)}
    order = epoch_order(np.arange(len(store)), seed=0, epoch=0, mode="window", chunk_samples=store.chunk_samples,
                        window_chunks=-(-2 * B // store.chunk_samples))
    state = {"b": 0}

    def assemble():
        b = state["b"] % (len(store) // B)
        state["b"] += 1
        return producer.produce((0, order[b * B : (b + 1) * B]), out)

    benchmark.group = f"assemble a float32 batch of {B}"
    benchmark(assemble)


class _Fill:
    def setup(self) -> None:
        pass

    def produce(self, task, out):
        out["images"][:] = 0.5
        out["masks"][:] = 1
        return out["images"].shape[0]


@pytest.mark.parametrize("lend", [0, 1], ids=["copied-out", "lent-in-place"])
def test_transport_shared_memory(benchmark, lend):
    """The worker fills a slot (33.6 MB); the main process copies it out, or gets it lent."""
    slots = {"images": ((B, 256, 256, 3), np.dtype(np.float32)), "masks": ((B, 256, 256, 1), np.dtype(np.int32))}
    with BatchPool(_Fill(), slots, workers=1, use_processes=True, num_slots=2 + lend, start_method="fork",
                   lend=lend) as pool:
        counter = iter(range(10**9))

        def handover():
            key = next(counter)
            pool.submit(key, None)
            return pool.result(key)

        benchmark.group = "hand a batch to the main process"
        benchmark(handover)


def _pickle_worker(q_in, q_out):
    batch = (np.full((B, 256, 256, 3), 0.5, np.float32), np.ones((B, 256, 256, 1), np.int32))
    while q_in.get() is not None:
        q_out.put(batch)


def test_transport_pickled_queue(benchmark):
    ctx = mp.get_context("fork")
    q_in, q_out = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_pickle_worker, args=(q_in, q_out), daemon=True)
    proc.start()
    try:
        def handover():
            q_in.put(1)
            return q_out.get()

        benchmark.group = "hand a batch to the main process"
        benchmark(handover)
    finally:
        q_in.put(None)
        proc.join(5)
