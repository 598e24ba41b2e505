"""Resuming: fit's epoch reaches the dataset (epoch_callback, BackupAndRestore), and a
mid-epoch state()/load_state() continues with the batches of an uninterrupted run.

Run as a script (``python tests/test_resume.py OUT BACKUP WORKERS [--kill-after E]``) it is the
training process of the BackupAndRestore test.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from streamseg import Augment, OptionError, SegmentationDataset, Store

N, SIZE, BATCH, CLASSES, SEED = 24, 8, 4, 5, 11
AUG = Augment(hflip=0.5, vflip=0.5, rot90=0.5, brightness=0.2)


def make_store() -> Store:
    """Index-encoded samples: pixel (0, 0, 0) of image i is i, its mask is a ramp offset by i."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (N, SIZE, SIZE, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(N)
    ramp = np.add.outer(np.arange(SIZE), 2 * np.arange(SIZE))
    masks = ((ramp[None] + np.arange(N)[:, None, None]) % CLASSES).astype(np.uint8)
    return Store.from_arrays(images, masks)


def digest(batch: tuple[np.ndarray, np.ndarray]) -> str:
    images, masks = batch
    return hashlib.sha1(np.ascontiguousarray(images).tobytes() + np.ascontiguousarray(masks).tobytes()).hexdigest()


class Recording(SegmentationDataset):
    """Records the digest of every batch a pass hands out, under the pass's ``label``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.label: int | None = None
        self.served: dict[int | None, list[str]] = {}
        self.pass_epochs: list[int] = []

    def _iterate(self, whole: bool):
        self.pass_epochs.append(self.epoch)
        record = self.served.setdefault(self.label, [])
        for batch in super()._iterate(whole):
            record.append(digest(batch))
            yield batch


def reference(epoch: int, **kw) -> list[str]:
    """Digests of an epoch's batches from a fresh inline dataset told the epoch."""
    ds = SegmentationDataset(make_store(), BATCH, augment=AUG, seed=SEED, num_classes=CLASSES, workers=0, **kw)
    ds.epoch = epoch
    return [digest(ds[i]) for i in range(len(ds))]


def tiny_model():
    import keras

    model = keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.Conv2D(CLASSES, 1, activation="softmax")])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    return model


def labelling_callback(ds: Recording, out: Path | None = None):
    """Labels each pass with fit's epoch; with ``out``, writes epoch E's digests to out/E.json."""
    import keras

    class Label(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            ds.label = epoch

        def on_epoch_end(self, epoch, logs=None):
            if out is not None:
                (out / f"{epoch}.json").write_text(json.dumps(ds.served[epoch]))

    return Label()


# ---------------------------------------------------------------------------- the epoch property
def test_epoch_is_validated():
    ds = SegmentationDataset(make_store(), BATCH, workers=0, num_classes=CLASSES)
    for bad in (-1, 1.5, True, "2", None):
        with pytest.raises(OptionError, match=r"epoch must be a non-negative integer\. Received: epoch="):
            ds.epoch = bad
    ds.epoch = np.int64(3)
    assert ds.epoch == 3 and type(ds.epoch) is int


def published_carry(ds: SegmentationDataset, timeout: float = 30.0):
    """The look-ahead into the next epoch, which the hand-over thread publishes just after
    the end marker of a complete pass went in (so a moment after the pass returned)."""
    deadline = time.monotonic() + timeout
    while ds._carry is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return ds._carry


@pytest.mark.slow
def test_setting_the_epoch_keeps_or_drops_the_look_ahead():
    """The same epoch keeps the batches produced ahead; another one drops them, and a carry
    for a wrong epoch is never served."""
    ds = SegmentationDataset(make_store(), BATCH, augment=AUG, seed=SEED, num_classes=CLASSES, workers=2,
                             use_multiprocessing=True, max_queue_size=3)
    with ds:
        assert [digest(b) for b in ds] == reference(0)
        ds.on_epoch_end()
        carry = published_carry(ds)
        assert carry is not None and carry.key == (1, 0) and carry.done.wait(30)
        pending = ds._feeder.pool.pending()
        assert (1, 1) in pending
        ds.epoch = 1  # what epoch_callback does at a normal epoch boundary: nothing
        assert ds._carry is carry and ds._feeder.pool.pending() == pending
        ds.epoch = 4
        assert ds._carry is None and all(key[0] == 4 for key in ds._feeder.pool.pending())
        assert [digest(b) for b in ds] == reference(4)
        carry = published_carry(ds)
        assert carry is not None and carry.key == (5, 0)  # a look-ahead into epoch 5...
        ds.epoch = 7  # ...that must not be served for epoch 7
        assert [digest(b) for b in ds] == reference(7)


# ---------------------------------------------------------------------------- fit
@pytest.mark.slow
@pytest.mark.parametrize("workers, mp", [(0, False), (2, True)])
def test_initial_epoch_trains_on_fits_epochs(workers, mp):
    ds = Recording(make_store(), BATCH, augment=AUG, seed=SEED, num_classes=CLASSES, workers=workers,
                   use_multiprocessing=mp)
    with ds:
        tiny_model().fit(ds, epochs=4, initial_epoch=2, verbose=0,
                         callbacks=[labelling_callback(ds), ds.epoch_callback()])
    assert ds.pass_epochs == [2, 3]
    assert ds.served[2] == reference(2) and ds.served[3] == reference(3)
    assert ds.epoch == 4


@pytest.mark.slow
def test_a_normal_fit_with_the_callback_keeps_the_look_ahead():
    """At each boundary on_epoch_end advances to e+1 and the callback sets e+1: batch 0 of
    e+1, produced ahead while epoch e ended, is what the next epoch starts with."""
    produced: list[tuple[int, int]] = []

    class Counting(Recording):
        def _fetch_raw(self, epoch, i, *args, **kwargs):
            produced.append((epoch, i))
            return super()._fetch_raw(epoch, i, *args, **kwargs)

    ds = Counting(make_store(), BATCH, augment=AUG, seed=SEED, num_classes=CLASSES, workers=1)
    with ds:
        tiny_model().fit(ds, epochs=3, verbose=0, callbacks=[ds.epoch_callback(), labelling_callback(ds)])
    assert ds.pass_epochs == [0, 1, 2]
    assert [ds.served[e] for e in range(3)] == [reference(e) for e in range(3)]
    assert produced.count((1, 0)) == 1 and produced.count((2, 0)) == 1  # asked for once: by the look-ahead


def test_the_callback_warns_when_an_epoch_is_not_a_pass():
    ds = SegmentationDataset(make_store(), BATCH, workers=0, num_classes=CLASSES)
    callback = ds.epoch_callback()
    callback.set_params({"epochs": 2, "steps": 2})
    with pytest.warns(UserWarning, match="fit runs 2 steps per epoch but the dataset has 6 batches"):
        callback.on_train_begin()
    callback.on_epoch_begin(5)
    assert ds.epoch == 5


def run_training(out: Path, backup: Path, workers: int, kill_after: int | None = None) -> None:
    """Fit 4 epochs with BackupAndRestore; SIGKILL this process after epoch ``kill_after``."""
    import keras

    out.mkdir(parents=True, exist_ok=True)
    ds = Recording(make_store(), BATCH, augment=AUG, seed=SEED, num_classes=CLASSES, workers=workers)

    class Kill(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == kill_after:  # after BackupAndRestore (earlier in the list) saved
                os.kill(os.getpid(), signal.SIGKILL)

    callbacks = [keras.callbacks.BackupAndRestore(str(backup)), ds.epoch_callback(), labelling_callback(ds, out),
                 Kill()]
    model = tiny_model()
    history = model.fit(ds, epochs=4, verbose=0, callbacks=callbacks)
    (out / "history.json").write_text(json.dumps({"epochs": history.epoch, "pass_epochs": ds.pass_epochs}))
    ds.close()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_backup_and_restore_resumes_with_the_uninterrupted_batches(tmp_path, workers):
    script = [sys.executable, str(Path(__file__).resolve())]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    backup = tmp_path / "backup"
    killed = subprocess.run(script + [str(tmp_path / "run1"), str(backup), str(workers), "--kill-after", "1"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "run1").iterdir()) == ["0.json", "1.json"]
    assert json.loads((backup / "training_metadata.json").read_text())["epoch"] == 2
    resumed = subprocess.run(script + [str(tmp_path / "run2"), str(backup), str(workers)],
                             env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    history = json.loads((tmp_path / "run2" / "history.json").read_text())
    assert history == {"epochs": [2, 3], "pass_epochs": [2, 3]}

    run_training(tmp_path / "whole", tmp_path / "backup-whole", workers)  # uninterrupted, here
    whole = {e: json.loads((tmp_path / "whole" / f"{e}.json").read_text()) for e in range(4)}
    for e in (0, 1):
        assert json.loads((tmp_path / "run1" / f"{e}.json").read_text()) == whole[e]
    for e in (2, 3):
        assert json.loads((tmp_path / "run2" / f"{e}.json").read_text()) == whole[e]
    assert whole[2] != whole[0] and whole[2] == reference(2)  # not a replay of epoch 0


# ---------------------------------------------------------------------------- state / load_state
@pytest.mark.slow
@pytest.mark.parametrize("workers, mp", [(0, False), (2, True)])
def test_load_state_continues_at_the_next_batch(workers, mp):
    kw = dict(augment=AUG, seed=SEED, num_classes=CLASSES)
    ds = SegmentationDataset(make_store(), BATCH, workers=0, **kw)
    assert ds.state()["epoch"] == 0 and ds.state()["next_batch"] == 0
    list(ds)
    assert ds.state()["next_batch"] == len(ds)  # a complete pass, before on_epoch_end
    ds.on_epoch_end()
    it = iter(ds)
    before = [digest(next(it)) for _ in range(3)]
    state = json.loads(json.dumps(ds.state()))  # what a checkpoint keeps
    assert (state["epoch"], state["next_batch"], state["seed"]) == (1, 3, SEED)
    rest = [digest(b) for b in it]
    ds.on_epoch_end()
    after = [digest(b) for b in ds]
    assert before + rest == reference(1) and after == reference(2)

    other = SegmentationDataset(make_store(), BATCH, workers=workers, use_multiprocessing=mp, **kw)
    with other:
        other[0]  # reads of epoch 0 (and batches produced ahead for it) before the load
        other.load_state(state)
        assert other.epoch == 1 and other.state() == state
        assert [digest(b) for b in other] == rest
        assert other.state()["next_batch"] == len(other)
        other.on_epoch_end()
        assert other.epoch == 2 and [digest(b) for b in other] == after  # then whole epochs

        other.load_state(state)  # a loop that indexes batches itself continues at next_batch
        assert [digest(other[i]) for i in range(state["next_batch"], len(other))] == rest


def test_load_state_at_the_end_of_an_epoch_then_on_epoch_end_advances():
    ds = SegmentationDataset(make_store(), BATCH, workers=0, num_classes=CLASSES, augment=AUG, seed=SEED)
    list(ds)
    state = ds.state()
    other = SegmentationDataset(make_store(), BATCH, workers=0, num_classes=CLASSES, augment=AUG, seed=SEED)
    other.load_state(state)
    assert list(other) == []
    other.on_epoch_end()
    assert other.epoch == 1 and [digest(b) for b in other] == reference(1)


def test_tf_passes_read_whole_epochs_after_load_state():
    ds = SegmentationDataset(make_store(), BATCH, workers=0, num_classes=CLASSES, augment=AUG, seed=SEED)
    state = {**ds.state(), "next_batch": 4}
    ds.load_state(state)
    got = [digest(b) for b in ds.to_tf_dataset().as_numpy_iterator()]
    assert got == reference(0)


def test_load_state_rejects_other_datasets_and_bad_input():
    kw = dict(augment=AUG, seed=SEED, num_classes=CLASSES, workers=0)
    state = SegmentationDataset(make_store(), BATCH, **kw).state()
    ds = SegmentationDataset(make_store(), BATCH, **kw)
    cases = [
        ([1, 2], r"expects the dict returned by SegmentationDataset\.state\(\)\. Received: \[1, 2\]"),
        ({"epoch": 1}, r"lacks version, next_batch, seed, config, fingerprint.*Received: keys \['epoch'\]"),
        ({**state, "version": 9}, r"Received: version=9"),
        ({**state, "epoch": -1}, r"epoch must be a non-negative integer\. Received: epoch=-1"),
        ({**state, "next_batch": 7}, r"at most the 6 batches of an epoch\. Received: next_batch=7"),
        ({**state, "seed": 12}, r"seed=12; this one has seed=11.*Received: seed=12"),
        ({**state, "fingerprint": "x"}, r"fingerprint does not match.*Received: fingerprint='x'"),
        ({**state, "config": 3}, r"config must be a dict\. Received: config=3"),
        ({**state, "config": {**state["config"], "augment": object()}}, r"differently configured.*augment"),
    ]
    for bad, message in cases:
        with pytest.raises(OptionError, match=message):
            ds.load_state(bad)
    others = [
        (SegmentationDataset(make_store(), 3, **kw), r"batch_size: 4 there, 3 here"),
        (SegmentationDataset(make_store(), BATCH, indices=np.arange(1, N), **kw), r"indices_sha256"),
        (SegmentationDataset(make_store(), BATCH, **{**kw, "augment": "light"}), r"augment: "),
        (SegmentationDataset(make_store(), BATCH, shuffle="uniform", **kw), r"shuffle: 'window' there, 'uniform'"),
    ]
    for other, message in others:
        with pytest.raises(OptionError, match=r"differently configured dataset.*" + message + r".*Received: "):
            other.load_state(state)
    assert ds.epoch == 0 and ds.state() == state  # nothing changed by a refused state


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("backup", type=Path)
    parser.add_argument("workers", type=int)
    parser.add_argument("--kill-after", type=int, default=None)
    args = parser.parse_args()
    run_training(args.out, args.backup, args.workers, args.kill_after)


def test_fit_reuses_the_iterator_keras_makes_and_throws_away_at_each_epoch_end(monkeypatch):
    """Keras 3 makes the next epoch's iterator at the end of every epoch, then another at the
    start of the next; the dataset hands the unused one back: epochs + 1 iterators instead of
    2 x epochs, and every epoch still reads its own order and augmentation."""
    from tensorflow.python.data.ops import iterator_ops

    made = []
    original = iterator_ops.OwnedIterator.__init__

    def counting(self, dataset=None, *args, **kwargs):
        if dataset is not None:  # a new iterator over a dataset (tracing rebuilds others from components)
            made.append(1)
        original(self, dataset, *args, **kwargs)

    monkeypatch.setattr(iterator_ops.OwnedIterator, "__init__", counting)
    ds = Recording(make_store(), BATCH, augment=AUG, seed=SEED, num_classes=CLASSES, workers=0)
    tiny_model().fit(ds, epochs=3, verbose=0, callbacks=[labelling_callback(ds), ds.epoch_callback()])
    assert [ds.served[e] for e in range(3)] == [reference(e) for e in range(3)]
    assert len(made) == 3 + 1


def test_epoch_dataset_hands_back_an_iterator_only_while_nothing_read_from_it():
    ds = SegmentationDataset(make_store(), BATCH, seed=SEED, num_classes=CLASSES, workers=0)
    tf_ds = ds.get_tf_dataset()
    first = iter(tf_ds)
    assert iter(tf_ds) is first  # made, never read: handed back
    x, _ = next(first)
    assert x.shape[0] == BATCH
    second = iter(tf_ds)
    assert second is not first  # the first has been read from
    assert [tuple(b[0].shape) for b in second][-1][0] == BATCH and iter(tf_ds) is not second
    plain = ds.to_tf_dataset()  # what users get stays a plain tf.data pipeline
    assert type(plain).__name__ != "EpochDataset" and iter(plain) is not iter(plain)
    assert len(list(plain.take(2).as_numpy_iterator())) == 2
