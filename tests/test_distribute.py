"""tf.distribute input sharding: each pipeline reads its shard, every sample once per epoch.

Samples are index-encoded (image pixel and mask label of sample i are i), so the batches a
pipeline produced tell which samples it read.  In-process tests build the pipelines of
fabricated ``tf.distribute.InputContext``s; the slow ones run MirroredStrategy on two logical
CPU devices (which must be configured before TensorFlow initialises its devices: a fresh
interpreter) and a two-process MultiWorkerMirroredStrategy custom training loop on loopback.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from streamseg import OptionError, SegmentationDataset, Store
from streamseg.pipeline.distribute import distribute_dataset, input_pipeline, shard_batches

N, SIZE, SEED = 48, 8, 7


def make_store(n: int = N) -> Store:
    """Image i is filled with i (one channel), mask i with label i: chunks of 4 samples."""
    import zarr

    images = zarr.array(np.repeat(np.arange(n, dtype=np.uint8), SIZE * SIZE).reshape(n, SIZE, SIZE, 1),
                        chunks=(4, SIZE, SIZE, 1))
    masks = zarr.array(np.repeat(np.arange(n, dtype=np.uint8), SIZE * SIZE).reshape(n, SIZE, SIZE),
                       chunks=(4, SIZE, SIZE))
    return Store.from_arrays(images, masks)


def make_ds(store: Store, batch: int = 8, **kw) -> SegmentationDataset:
    kw = {"seed": SEED, "num_classes": 256, "normalize": None, "workers": 0, "augment": None,
          "drop_remainder": True, **kw}
    return SegmentationDataset(store, batch, **kw)


def context(pipeline: int, pipelines: int, replicas: int):
    import tensorflow as tf

    return tf.distribute.InputContext(num_input_pipelines=pipelines, input_pipeline_id=pipeline,
                                      num_replicas_in_sync=replicas)


def read_pass(dataset) -> list[np.ndarray]:
    """One pass: the sample index of every row of every batch, checking images match masks."""
    out = []
    for images, masks in dataset:
        images, masks = images.numpy(), masks.numpy()
        idx = masks[:, 0, 0, 0]
        np.testing.assert_array_equal(images[:, 0, 0, 0], idx)  # pairing
        assert (masks == idx[:, None, None, None]).all() and (images == idx[:, None, None, None]).all()
        out.append(idx)
    return out


@pytest.mark.parametrize("pipelines, replicas", [(1, 1), (2, 2), (4, 4), (2, 4)])
def test_every_sample_once_per_epoch_across_pipelines(pipelines, replicas):
    store = make_store()
    per_pipeline = []  # [pipeline][epoch] -> list of batches
    for p in range(pipelines):  # one dataset object per pipeline, as in one per worker process
        ds = make_ds(store, 8)
        pipe = input_pipeline(ds, context(p, pipelines, replicas))
        epochs = []
        for e in range(2):
            batches = read_pass(pipe)
            assert ds.epoch == e + 1  # a complete pass advances the epoch
            np.testing.assert_array_equal(np.stack(batches), shard_batches(ds, context(p, pipelines, replicas),
                                                                           epoch=e))
            epochs.append(batches)
        per_pipeline.append(epochs)
    b, k = 8 // replicas, replicas // pipelines
    reference = make_ds(store, 8)
    for e in range(2):
        seen = np.concatenate([np.concatenate(per_pipeline[p][e]) for p in range(pipelines)])
        np.testing.assert_array_equal(np.sort(seen), np.arange(N))  # exactly once
        assert all(batch.shape == (b,) for p in range(pipelines) for batch in per_pipeline[p][e])
        # global step s = positions [8s, 8s + 8) of the epoch order, split over the replicas
        steps = [np.concatenate([per_pipeline[p][e][s * k + r] for p in range(pipelines) for r in range(k)])
                 for s in range(N // 8)]
        np.testing.assert_array_equal(np.concatenate(steps), reference.epoch_indices(e))
    assert not np.array_equal(np.concatenate(per_pipeline[0][0]), np.concatenate(per_pipeline[0][1]))


def test_the_shard_is_a_pure_function_of_seed_epoch_and_pipeline():
    store = make_store()
    a = shard_batches(make_ds(store), context(1, 3, 3), epoch=5, global_batch_size=6)
    again = make_ds(store)
    again.epoch = 2  # the dataset's own epoch does not matter when one is given
    np.testing.assert_array_equal(shard_batches(again, context(1, 3, 3), epoch=5, global_batch_size=6), a)
    assert a.shape == (N // 6, 2)
    assert not np.array_equal(shard_batches(make_ds(store), context(1, 3, 3), epoch=6, global_batch_size=6), a)
    assert not np.array_equal(shard_batches(make_ds(store, seed=8), context(1, 3, 3), epoch=5,
                                            global_batch_size=6), a)
    union = np.concatenate([shard_batches(make_ds(store), context(p, 3, 3), epoch=5, global_batch_size=6).ravel()
                            for p in range(3)])
    np.testing.assert_array_equal(np.sort(union), np.arange(N))


def test_remainder_drop_leaves_out_the_tail_and_pad_fills_the_last_step():
    store = make_store(45)  # global batch 8: 5 full steps and 5 samples over
    dropped = [shard_batches(make_ds(store), context(p, 2, 2), remainder="drop") for p in range(2)]
    assert all(d.shape == (5, 4) for d in dropped)
    seen = np.concatenate([d.ravel() for d in dropped])
    order = make_ds(store).epoch_indices(0)
    np.testing.assert_array_equal(np.sort(seen), np.sort(order[:40]))  # the last 5 of the order left out
    padded = [shard_batches(make_ds(store), context(p, 2, 2), remainder="pad") for p in range(2)]
    assert all(d.shape == (6, 4) for d in padded)
    seen = np.concatenate([d.ravel() for d in padded])
    values, counts = np.unique(seen, return_counts=True)
    np.testing.assert_array_equal(values, np.arange(45))
    np.testing.assert_array_equal(np.sort(values[counts == 2]), np.sort(order[:3]))  # wrapped around
    # default: the dataset's drop_remainder, so an epoch has len(ds) steps
    assert shard_batches(make_ds(store, drop_remainder=False), context(0, 2, 2)).shape[0] == 6
    assert len(make_ds(store, drop_remainder=False)) == 6
    # a pipeline over the padded plan yields full batches only
    batches = read_pass(input_pipeline(make_ds(store), context(1, 2, 2), remainder="pad"))
    np.testing.assert_array_equal(np.stack(batches), padded[1])


def test_a_pass_reads_the_epoch_when_it_starts():
    ds = make_ds(make_store())
    pipe = input_pipeline(ds, context(0, 2, 2))
    ds.epoch = 3  # set after the pipeline was built: the pass starting now reads epoch 3
    first = read_pass(pipe)
    np.testing.assert_array_equal(np.stack(first), shard_batches(ds, context(0, 2, 2), epoch=3))
    assert ds.epoch == 4
    it = iter(pipe)  # an abandoned pass does not advance
    next(it)
    del it
    assert ds.epoch == 4
    ds.epoch = 3  # and setting the epoch back replays it
    np.testing.assert_array_equal(np.stack(read_pass(pipe)), np.stack(first))


@pytest.mark.parametrize("workers, mp", [(2, False), (2, True)])
def test_the_datasets_worker_pool_gives_the_same_batches(workers, mp):
    store = make_store()
    kw = {"augment": "standard", "normalize": "unit"}
    reference = [(x.numpy(), y.numpy()) for x, y in input_pipeline(make_ds(store, **kw), context(1, 2, 2))]
    ds = make_ds(store, workers=workers, use_multiprocessing=mp, keep_alive=0.5, **kw)
    with ds:
        got = [(x.numpy(), y.numpy()) for x, y in input_pipeline(ds, context(1, 2, 2))]
        assert ds._feeder.pool is not None  # produced by the dataset's own pool
    assert len(got) == len(reference) == N // 8
    for (ri, rm), (gi, gm) in zip(reference, got):
        np.testing.assert_array_equal(ri, gi)
        np.testing.assert_array_equal(rm, gm)


def test_distribute_dataset_under_the_default_strategy():
    import tensorflow as tf

    ds = make_ds(make_store())
    dist = distribute_dataset(ds, tf.distribute.get_strategy())  # the default strategy: a tf.data.Dataset
    assert int(dist.cardinality()) == len(ds) == N // 8
    seen = np.concatenate([y.numpy()[:, 0, 0, 0] for _, y in dist])
    np.testing.assert_array_equal(seen, ds.epoch_indices(0))  # one replica: the dataset's own order
    assert ds.epoch == 1


def test_options_are_checked():
    store = make_store()
    ds = make_ds(store, 8)
    with pytest.raises(OptionError, match="multiple of the 3 replicas"):
        input_pipeline(ds, context(0, 1, 3))
    with pytest.raises(OptionError, match="larger than the dataset's batch_size"):
        input_pipeline(ds, context(0, 1, 1), global_batch_size=16)
    with pytest.raises(OptionError, match="no global batch"):  # 6 samples, global batch 8
        input_pipeline(make_ds(make_store(6), 4), context(0, 1, 2), global_batch_size=8, remainder="drop")
    with pytest.raises(OptionError, match="without shard="):
        input_pipeline(make_ds(store, 8, shard=(0, 2)), context(0, 1, 1))
    with pytest.raises(OptionError, match="remainder"):
        input_pipeline(ds, context(0, 1, 1), remainder="wrap")
    with pytest.raises(OptionError, match="prefetch"):
        input_pipeline(ds, context(0, 1, 1), prefetch=-1)
    with pytest.raises(OptionError, match="global_batch_size must be a positive integer"):
        shard_batches(ds, context(0, 1, 1), global_batch_size=0)
    with pytest.raises(OptionError, match="SegmentationDataset"):
        shard_batches(object(), context(0, 1, 1))


# ---------------------------------------------------------------------------- slow: subprocesses
PREAMBLE = textwrap.dedent(f"""
    import json, os, sys, warnings
    import numpy as np
    sys.path.insert(0, {os.path.dirname(__file__)!r})
    from test_distribute import make_store, make_ds, N
    from streamseg.pipeline.distribute import distribute_dataset, shard_batches
    import tensorflow as tf
""")

MIRRORED = PREAMBLE + textwrap.dedent("""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    ds = make_ds(make_store(), 8, workers=2)
    dist = distribute_dataset(ds, strategy)
    out = {"replicas": strategy.num_replicas_in_sync, "cardinality": int(dist.cardinality), "epochs": []}
    for epoch in range(2):
        steps = []
        for x, y in dist:
            steps.append([t.numpy()[:, 0, 0, 0].tolist() for t in strategy.experimental_local_results(y)])
        out["epochs"].append(steps)
    out["orders"] = [ds.epoch_indices(e).tolist() for e in range(2)]
    with strategy.scope():
        inp = tf.keras.Input((8, 8, 1))
        model = tf.keras.Model(inp, tf.keras.layers.Conv2D(N, 1)(inp))
        model.compile("adam", tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    seen_epochs = []
    class Record(tf.keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen_epochs.append(ds.epoch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(dist, epochs=4, initial_epoch=1, shuffle=False, verbose=0,
                            callbacks=[ds.epoch_callback(), Record()])
    out["loss"] = history.history["loss"]
    out["epoch_after_fit"] = ds.epoch
    out["dataset_epoch_at_epoch_end"] = seen_epochs
    out["warnings"] = [str(w.message) for w in caught if "ran out of data" in str(w.message)
                       or "steps per epoch" in str(w.message)]
    ds.close()
    print("RESULT " + json.dumps(out))
""")


def run_script(script: str, timeout: float, env: dict | None = None) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_mirrored_strategy_on_two_devices_feeds_each_replica_its_half_and_fit_works():
    out = run_script(MIRRORED, timeout=150)
    assert out["replicas"] == 2 and out["cardinality"] == N // 8  # steps, not per-replica batches
    for steps, order in zip(out["epochs"], out["orders"]):
        assert len(steps) == N // 8
        assert all(len(replica) == 4 for step in steps for replica in step)  # per-replica batch 8 / 2
        seen = [i for step in steps for replica in step for i in replica]
        assert sorted(seen) == list(range(N))  # every sample once, over both replicas
        assert seen == order  # step s = positions [8s, 8s + 8) of the epoch order
    assert out["orders"][0] != out["orders"][1]
    assert len(out["loss"]) == 3 and np.isfinite(out["loss"]).all()
    # the epoch callback set fit's epochs 1, 2, 3; each complete pass advanced to the next
    assert out["dataset_epoch_at_epoch_end"] == [2, 3, 4] and out["epoch_after_fit"] == 4
    assert out["warnings"] == []


WORKER = PREAMBLE + textwrap.dedent("""
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    ds = make_ds(make_store(), 8)
    dist = distribute_dataset(ds, strategy)
    with strategy.scope():
        inp = tf.keras.Input((8, 8, 1))
        model = tf.keras.Model(inp, tf.keras.layers.Conv2D(N, 1)(inp))
        optimizer = tf.keras.optimizers.SGD(0.1)
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")

    @tf.function
    def train_step(x, y):
        def replica_step(x, y):
            with tf.GradientTape() as tape:
                per_sample = tf.reduce_mean(loss_fn(y, model(x, training=True)), axis=[1, 2])
                loss = tf.nn.compute_average_loss(per_sample, global_batch_size=8)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss, y[:, 0, 0, 0]
        loss, labels = strategy.run(replica_step, (x, y))
        return strategy.reduce("SUM", loss, axis=None), labels

    out = {"task": json.loads(os.environ["TF_CONFIG"])["task"]["index"], "epochs": [], "loss": []}
    for epoch in (0, 1):
        ds.epoch = epoch
        seen = []
        for x, y in dist:
            loss, labels = train_step(x, y)
            out["loss"].append(float(loss))
            seen.append([t.numpy().tolist() for t in strategy.experimental_local_results(labels)])
        out["epochs"].append(seen)
    print("RESULT " + json.dumps(out))
""")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.mark.slow
def test_two_worker_custom_loop_reads_disjoint_shards_that_cover_every_epoch():
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**env, "TF_CONFIG": json.dumps({"cluster": cluster,
                                                                              "task": {"type": "worker",
                                                                                       "index": i}})})
             for i in range(2)]
    deadline = time.monotonic() + 150
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break  # a peer failed: the other would wait for it forever
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        outputs = [p.communicate(timeout=30) for p in procs]
    results = []
    for p, (stdout, stderr) in zip(procs, outputs):
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        assert p.returncode == 0 and lines, f"worker exited {p.returncode}: {stderr[-3000:]}"
        results.append(json.loads(lines[-1][len("RESULT "):]))
    assert [r["task"] for r in results] == [0, 1]
    assert results[0]["loss"] == results[1]["loss"]  # replicas in sync: the same all-reduced loss
    store = make_store()
    for epoch in (0, 1):
        shards = []
        for r in results:
            batches = np.array([replica for step in r["epochs"][epoch] for replica in step])
            # the shard is what the pure function says for (seed, epoch, worker, 2 workers)
            np.testing.assert_array_equal(batches, shard_batches(make_ds(store), context(r["task"], 2, 2),
                                                                 epoch=epoch))
            shards.append(batches.ravel())
        assert not set(shards[0]) & set(shards[1])
        np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(N))
    assert not np.array_equal(results[0]["epochs"][0], results[0]["epochs"][1])
