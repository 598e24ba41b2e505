"""What a Python-fed tf.data pipeline costs ``model.fit`` even when its batches are ready.

Usage::

    python benchmarks/bridge_floor.py --step-ms 26.27 --epochs 6

Fits the simulated accelerator (``streamseg.bench.measure.simulated_accelerator``) on the same
ready-made 32x256x256x3 float32 batch (64-byte aligned, so no copy) fed three ways, 32 batches
per epoch: ``Dataset.from_tensors`` (no Python per step: the floor ``streamseg bench``
measures stall against), ``Dataset.from_generator``, ``Dataset.range(n).map`` over a
``tf.numpy_function`` (streamseg's bridge in session 2), and the same with ``prefetch(1)``
(streamseg's bridge now: the call for the next batch runs during the current step).  Prints, from the second epoch on, the first
step of an epoch, the mean of the others, the whole epoch, and the main process's CPU
time per step.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step-ms", type=float, default=26.27)
    ap.add_argument("--epochs", type=int, default=6)
    args = ap.parse_args()

    import keras
    import tensorflow as tf

    from streamseg.bench.measure import simulated_accelerator
    from streamseg.parallel.buffers import aligned_empty

    n = 32
    x = aligned_empty((32, 256, 256, 3), np.float32)
    x[...] = 0.5
    y = aligned_empty((32, 256, 256, 1), np.float32)
    y[...] = 1.0
    sig = (tf.TensorSpec(x.shape, tf.float32), tf.TensorSpec(y.shape, tf.float32))
    opts = tf.data.Options()
    opts.autotune.enabled = False
    opts.experimental_optimization.inject_prefetch = False

    class Timer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.t: list[float] = []

        def on_train_batch_end(self, batch: int, logs: object = None) -> None:
            self.t.append(time.perf_counter())

    def gen():
        for _ in range(n):
            yield x, y

    def load(i):
        a, b = tf.numpy_function(lambda _: (x, y), [i], [tf.float32, tf.float32], stateful=True)
        a.set_shape(x.shape)
        b.set_shape(y.shape)
        return a, b

    feeds = {
        "from_tensors": tf.data.Dataset.from_tensors((x, y)).repeat(n),
        "from_generator": tf.data.Dataset.from_generator(gen, output_signature=sig).apply(
            tf.data.experimental.assert_cardinality(n)),
        "range.map(numpy_function)": tf.data.Dataset.range(n).map(load),
        "range.map(numpy_fn).prefetch(1)": tf.data.Dataset.range(n).map(load).prefetch(1),
    }
    print(f"simulated step {args.step_ms} ms, {n} batches per epoch, epochs 2..{args.epochs}")
    print(f"{'feed':<32} {'1st step ms':>11} {'other steps ms':>14} {'epoch ms':>9} {'main CPU ms/step':>16}")
    for name, ds in feeds.items():
        model, timer = simulated_accelerator(args.step_ms), Timer()
        c0 = time.process_time()
        model.fit(ds.with_options(opts), epochs=args.epochs, verbose=0, callbacks=[timer])
        cpu = (time.process_time() - c0) / len(timer.t) * 1000.0
        d = (np.diff(timer.t) * 1000.0)[n - 1:]  # d[0] is the first step of epoch 2
        per = d[: len(d) // n * n].reshape(-1, n)
        print(f"{name:<32} {per[:, 0].mean():>11.1f} {per[:, 1:].mean():>14.2f} {per.sum(1).mean():>9.0f} {cpu:>16.2f}")


if __name__ == "__main__":
    main()
