"""Resuming :class:`~streamseg.pipeline.dataset.SegmentationDataset`: its epoch and position.

Randomness is a pure function of ``(seed, epoch, sample index)``, so a training run resumes
with the same order and transforms as an uninterrupted one as soon as the dataset knows the
epoch (and, mid-epoch, the batch) it is at:

- ``model.fit``: :meth:`ResumeMixin.epoch_callback` sets the dataset's epoch to fit's at every
  ``on_epoch_begin``, so ``initial_epoch`` and ``keras.callbacks.BackupAndRestore`` resume at
  the right epoch (like PyTorch's ``DistributedSampler.set_epoch``);
- custom loops: :meth:`ResumeMixin.state` / :meth:`ResumeMixin.load_state` save and restore
  ``(epoch, next batch)``; the next pass over the dataset continues at that batch with the
  batches an uninterrupted run gets (as Mosaic Streaming's deterministic resumption).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import OptionError, truncate

try:  # Keras 3
    from keras.callbacks import Callback as _Callback
except ImportError:  # pragma: no cover - Keras 3 is a dependency
    from keras.src.callbacks.callback import Callback as _Callback

__all__ = ["EpochCallback", "ResumeMixin", "STATE_VERSION"]

STATE_VERSION = 1
"""Version of the dict :meth:`ResumeMixin.state` returns."""

_STATE_KEYS = ("version", "epoch", "next_batch", "seed", "config", "fingerprint")


def _non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise OptionError(f"{name} must be a non-negative integer. Received: {name}={truncate(value)}")
    return int(value)


def _canonical(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples become lists), for comparisons after a save."""
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError):  # not from state(): compares unequal to anything state() made
        return {"unserialisable": repr(value)}


class EpochCallback(_Callback):
    """Keras callback that sets ``dataset.epoch`` to ``fit``'s epoch at every epoch begin.

    Made by :meth:`ResumeMixin.epoch_callback`; see there.

    Parameters
    ----------
    dataset : SegmentationDataset
        The training dataset given to ``fit``.
    """

    def __init__(self, dataset: Any) -> None:
        super().__init__()
        self.dataset = dataset

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        steps = (self.params or {}).get("steps")
        if steps is not None and steps != len(self.dataset):
            warnings.warn(f"fit runs {steps} steps per epoch but the dataset has {len(self.dataset)} batches: "
                          "a Keras epoch is then not one pass over the dataset, and a resumed fit does not "
                          "read the batches an uninterrupted one reads", stacklevel=2)

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.dataset.epoch = epoch


class ResumeMixin:
    """The epoch property, ``epoch_callback`` and ``state`` / ``load_state``.

    The class using it provides ``_epoch``, ``_epoch_used``, ``_next_batch``, ``_start_at``,
    ``_carry``, ``_feeder``, ``seed``, ``indices``, ``store``, ``options``, ``__len__`` and
    the construction options read by :meth:`_resume_config`.
    """

    @property
    def epoch(self) -> int:
        """The epoch the next pass reads (its order and transforms).

        Advanced by ``on_epoch_end`` (after an epoch from which a batch was read); under
        ``fit``, :meth:`epoch_callback` sets it to ``fit``'s epoch.  Setting it to the current
        value changes nothing; another value starts that epoch at batch 0, drops batches
        produced ahead for any other epoch and, like ``on_epoch_end``, starts the
        ``keep_alive`` countdown of idle workers.  Must be a non-negative integer
        (:class:`~streamseg.OptionError` otherwise).
        """
        return self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        value = _non_negative_int("epoch", value)
        if value == self._epoch:
            # the common case under fit: on_epoch_end advanced to e + 1 and epoch_callback's
            # on_epoch_begin sets e + 1: the look-ahead into e + 1 stays
            return
        self._epoch = value
        self._epoch_used = False
        self._next_batch = self._start_at = 0
        carry = self._carry
        if carry is not None and carry.key[0] != value:
            self._carry = None  # never served anyway (keys are (epoch, batch)); frees its batch
        self._feeder.epoch_finished(keep=lambda key: key[0] == value)  # drop work for other epochs

    def epoch_callback(self) -> EpochCallback:
        """A Keras callback that keeps this dataset's epoch equal to ``fit``'s epoch.

        ``model.fit(ds, callbacks=[ds.epoch_callback(), ...])`` sets :attr:`epoch` to fit's
        epoch at every ``on_epoch_begin``, so ``initial_epoch=2`` or a restart with
        ``keras.callbacks.BackupAndRestore`` trains epoch 2 on the dataset's epoch 2 (the
        order and transforms of an uninterrupted run) instead of replaying epoch 0.  In a
        normal run ``on_epoch_end`` has already advanced the epoch, so the callback changes
        nothing and the batches produced ahead across the epoch boundary are kept.  Its
        place in the callback list does not matter: fit reads the first batch of an epoch
        only after every callback's ``on_epoch_begin``.

        Why a callback: Keras 3.15 tells the epoch to callbacks only.  A data adapter gets
        ``on_epoch_begin()`` / ``on_epoch_end()`` without an epoch number (``EpochIterator``
        in ``keras/src/trainers/epoch_iterator.py``), is built before the callbacks, and
        never sees ``initial_epoch``, which ``fit``'s loop (``for epoch in
        range(initial_epoch, epochs)`` in ``keras/src/backend/*/trainer.py``) keeps to itself;
        ``BackupAndRestore`` restores the epoch into ``model._initial_epoch``, which the
        adapter cannot reach either.  Counting ``on_epoch_end`` calls (what the dataset does
        without the callback) cannot know where a resumed fit starts; reading fit's local
        variables off the call stack would be fragile.  So the callback is needed.

        A Keras epoch is one pass over the dataset only when ``steps_per_epoch`` is None or
        ``len(ds)``; otherwise fit keeps one pass across epochs and a resumed run differs
        (the callback warns at ``on_train_begin``).

        Returns
        -------
        EpochCallback
            A ``keras.callbacks.Callback``.
        """
        return EpochCallback(self)

    # ------------------------------------------------------------------ mid-epoch state
    def _resume_config(self) -> dict[str, Any]:
        """What fixes the batches of an epoch, apart from the seed (JSON-able)."""
        o = self.options
        augment = o.augment.get_config() if o.augment is not None else None
        return _canonical({
            "store_samples": len(self.store), "chunk_samples": int(self.store.chunk_samples),
            "image_shape": [int(v) for v in self.store.image_shape],
            "batch_size": int(self.batch_size_value), "batches": len(self),
            "samples": int(self.indices.size), "shuffle": self.shuffle_mode,
            "window_chunks": int(self.window_chunks),
            "window_samples": int(self.window_samples) if self.shuffle_mode == "window" else None,
            "drop_remainder": bool(self.drop_remainder),
            "shard": list(self.shard) if self.shard is not None else None,
            "mask_mode": o.mask_mode, "num_classes": int(o.num_classes), "normalize": o.normalize,
            "image_offset": [float(v) for v in o.image_offset], "image_scale": [float(v) for v in o.image_scale],
            "augment": augment,
            "indices_sha256": hashlib.sha256(np.ascontiguousarray(self.indices, "<i8").tobytes()).hexdigest(),
        })

    @staticmethod
    def _fingerprint(seed: int, config: Mapping[str, Any]) -> str:
        text = json.dumps({"seed": seed, "config": config}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def state(self) -> dict[str, Any]:
        """Where the dataset is: a JSON-serialisable dict for :meth:`load_state`.

        ``{"version", "epoch", "next_batch", "seed", "config", "fingerprint"}``:
        ``next_batch`` is the batch after the last one a pass over the dataset (``for batch in
        ds``, ``get_numpy_iterator()``) has handed out in :attr:`epoch`, so a state taken
        after training on a batch resumes at the following one; it is ``len(ds)`` after a
        complete pass (until ``on_epoch_end`` or a new epoch).  ``ds[i]`` does not move it.
        ``config`` describes what fixes the batches (store shape, batch size, sample indices,
        shuffle, augmentation, masks, normalisation) and ``fingerprint`` hashes it with the
        seed.  Worker settings are not part of it: they do not change the batches.
        """
        config = self._resume_config()
        return {"version": STATE_VERSION, "epoch": int(self._epoch), "next_batch": int(self._next_batch),
                "seed": int(self.seed), "config": config, "fingerprint": self._fingerprint(self.seed, config)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue where :meth:`state` was taken (by this dataset or one configured alike).

        Sets :attr:`epoch` to ``state["epoch"]``; the next pass over the dataset (``for
        batch in ds``, ``get_numpy_iterator()``) starts at batch ``state["next_batch"]`` and
        yields the batches an uninterrupted run yields there; the passes after it are whole
        epochs.  A loop that indexes ``ds[i]`` itself continues with ``i =
        state["next_batch"]``.  Call it between passes.  ``model.fit`` and
        ``to_tf_dataset()`` read whole epochs (fit resumes per epoch: see
        :meth:`epoch_callback`).

        Parameters
        ----------
        state : dict
            A dict from :meth:`state` (also after a JSON round trip).

        Raises
        ------
        OptionError
            If ``state`` is not such a dict, or was taken from a dataset with another seed or
            configuration (the message names what differs).
        """
        if not isinstance(state, Mapping):
            raise OptionError("load_state expects the dict returned by SegmentationDataset.state(). "
                              f"Received: {truncate(state)}")
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise OptionError(f"The dataset state lacks {', '.join(missing)}: it does not come from "
                              f"SegmentationDataset.state(). Received: keys {truncate(sorted(map(str, state)))}")
        if state["version"] != STATE_VERSION:
            raise OptionError(f"Dataset state version {STATE_VERSION} is supported. "
                              f"Received: version={truncate(state['version'])}")
        epoch = _non_negative_int("epoch", state["epoch"])
        next_batch = _non_negative_int("next_batch", state["next_batch"])
        if next_batch > len(self):
            raise OptionError(f"next_batch must be at most the {len(self)} batches of an epoch. "
                              f"Received: next_batch={next_batch}")
        if state["seed"] != self.seed:
            raise OptionError(f"The state was taken from a dataset with seed={truncate(state['seed'])}; this one "
                              f"has seed={self.seed}, so its batches differ. Received: seed={truncate(state['seed'])}")
        ours, theirs = self._resume_config(), state["config"]
        if not isinstance(theirs, Mapping):
            raise OptionError(f"The state's config must be a dict. Received: config={truncate(theirs)}")
        differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != _canonical(theirs.get(k)))
        if differ:
            what = "; ".join(f"{k}: {truncate(theirs.get(k), 60)} there, {truncate(ours.get(k), 60)} here"
                             for k in differ[:3])
            raise OptionError("The state was taken from a differently configured dataset, whose batches "
                              f"differ ({what}). Received: a state with {', '.join(differ)} differing")
        if state["fingerprint"] != self._fingerprint(self.seed, ours):
            raise OptionError("The state's fingerprint does not match its seed and config (edited?). "
                              f"Received: fingerprint={truncate(state['fingerprint'])}")
        self.epoch = epoch
        self._next_batch = self._start_at = next_batch
        self._epoch_used = next_batch > 0  # on_epoch_end after the rest of this epoch advances

    def _pass_start(self, epoch: int, whole: bool = False) -> int:
        """First batch of a pass over ``epoch`` that begins now: where :meth:`load_state` said
        (once), or 0 for a ``whole`` pass (tf.data's, which reads ``len(ds)`` batches)."""
        if epoch != self._epoch:
            return 0
        start, self._start_at = (0 if whole else self._start_at), 0
        self._next_batch = start
        return start

    def _handed(self, epoch: int, i: int) -> None:
        """A pass over ``epoch`` handed out batch ``i``."""
        if epoch == self._epoch:
            self._next_batch = i + 1
