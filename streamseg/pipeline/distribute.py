"""Input sharding for ``tf.distribute``: each input pipeline reads only its shard of an epoch.

:func:`distribute_dataset` returns what ``strategy.distribute_datasets_from_function`` builds
from a :class:`~streamseg.pipeline.dataset.SegmentationDataset`: per input context, a
``tf.data`` pipeline of per-replica batches (``input_context.get_per_replica_batch_size``)
made of the samples of that pipeline's shard only (``input_context.input_pipeline_id`` of
``num_input_pipelines``), produced by the dataset's own workers.

Which samples a pipeline reads is a pure function of ``(seed, epoch, pipeline id, number of
pipelines)`` (and the batch sizes): :func:`shard_batches` gives them.  Global step ``s`` of an
epoch trains on positions ``[s * G, (s + 1) * G)`` of the dataset's epoch order
(:meth:`~streamseg.pipeline.dataset.SegmentationDataset.epoch_indices`, ``G`` the global batch
size), as a single process with batches of ``G`` would; the replicas split that global batch
into consecutive per-replica slices, pipeline ``p`` taking the slices of its replicas.  So every
sample is read exactly once per epoch across all pipelines (``remainder="drop"``: but for the
last ``N mod G`` positions of the epoch order, which change with the epoch), and the shuffle of
an epoch is the same on any number of workers.

See ``docs/distributed.md`` for what works with the installed Keras (MirroredStrategy +
``fit``; MultiWorkerMirroredStrategy with a custom training loop) and what does not.
"""

from __future__ import annotations

import atexit
import itertools
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from .adapter import _TfCalls
from .batches import validate_choice
from ..errors import OptionError, StreamsegError, truncate

__all__ = ["REMAINDER_MODES", "ShardPlan", "distribute_dataset", "input_pipeline", "shard_batches"]

REMAINDER_MODES = ("drop", "pad")
"""What happens to the last ``N mod G`` positions of an epoch's order (``G``: global batch)."""


@dataclass(frozen=True)
class ShardPlan:
    """Which positions of an epoch's order one input pipeline reads, batch by batch.

    Attributes
    ----------
    samples : int
        Samples in an epoch's order (``ds.indices.size``).
    global_batch : int
        Samples per global step, over all replicas.
    per_replica : int
        Samples per replica batch (``global_batch // num_replicas``).
    num_replicas : int
        Replicas in sync, over all workers.
    pipeline_id, num_pipelines : int
        This input pipeline and how many there are (one per worker, usually).
    remainder : {"drop", "pad"}
        ``"drop"``: an epoch has ``samples // global_batch`` steps; ``"pad"``: ``ceil`` of it,
        the last step filled from the start of the same epoch's order.
    """

    samples: int
    global_batch: int
    per_replica: int
    num_replicas: int
    pipeline_id: int
    num_pipelines: int
    remainder: str

    @property
    def replicas_per_pipeline(self) -> int:
        """Replicas fed by one pipeline: consecutive per-replica batches go to them in turn."""
        return self.num_replicas // self.num_pipelines

    @property
    def steps(self) -> int:
        """Global steps per epoch."""
        if self.remainder == "pad":
            return -(-self.samples // self.global_batch)
        return self.samples // self.global_batch

    @property
    def batches(self) -> int:
        """Per-replica batches this pipeline yields per epoch (``steps * replicas_per_pipeline``)."""
        return self.steps * self.replicas_per_pipeline

    def positions(self, j: int) -> np.ndarray:
        """Positions in the epoch order of this pipeline's batch ``j`` (``0 <= j < batches``)."""
        k = self.replicas_per_pipeline
        step, local = divmod(int(j), k)
        start = step * self.global_batch + (self.pipeline_id * k + local) * self.per_replica
        return np.arange(start, start + self.per_replica, dtype=np.int64) % self.samples


def _check_dataset(ds: Any) -> None:
    from .dataset import SegmentationDataset  # here: dataset.py imports this module lazily too
    from .patches import PatchDataset

    if not isinstance(ds, SegmentationDataset) or isinstance(ds, PatchDataset):
        raise OptionError("distribute_dataset shards a SegmentationDataset (PatchDataset is not supported yet). "
                          f"Received: {truncate(type(ds))}")
    if ds.shard is not None:
        raise OptionError(f"distribute_dataset shards the dataset itself: make it without shard=. "
                          f"Received: shard={ds.shard}")


def _plan(ds: Any, input_context: Any, global_batch_size: int | None, remainder: str) -> ShardPlan:
    """Validate the options against ``ds`` and ``input_context``; the plan of that pipeline."""
    _check_dataset(ds)
    validate_choice("remainder", remainder, REMAINDER_MODES)
    g = ds.batch_size_value if global_batch_size is None else global_batch_size
    if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1:
        raise OptionError(f"global_batch_size must be a positive integer. Received: global_batch_size={truncate(g)}")
    g = int(g)
    replicas = int(input_context.num_replicas_in_sync)
    pipelines, pid = int(input_context.num_input_pipelines), int(input_context.input_pipeline_id)
    if g % replicas:
        raise OptionError(f"The global batch size must be a multiple of the {replicas} replicas in sync. "
                          f"Pass global_batch_size=, or make the dataset with such a batch_size. "
                          f"Received: global_batch_size={g}")
    b = int(input_context.get_per_replica_batch_size(g))
    if b > ds.batch_size_value:
        raise OptionError(f"A replica batch of {b} samples is larger than the dataset's batch_size "
                          f"{ds.batch_size_value}, whose worker buffers hold the batches: make the dataset with "
                          f"batch_size >= {b}, or pass a smaller global_batch_size. Received: global_batch_size={g}")
    if pipelines < 1 or replicas % pipelines or not 0 <= pid < pipelines:
        raise OptionError(f"Input pipeline {pid} of {pipelines} cannot feed {replicas} replicas in sync evenly. "
                          f"Received: input_context={truncate(input_context)}")
    n = int(ds.indices.size)
    plan = ShardPlan(samples=n, global_batch=g, per_replica=b, num_replicas=replicas, pipeline_id=pid,
                     num_pipelines=pipelines, remainder=remainder)
    if plan.steps == 0:
        raise OptionError(f"{n} samples make no global batch of {g} with remainder='drop': pass remainder='pad' "
                          f"or a smaller global_batch_size. Received: global_batch_size={g}")
    return plan


def shard_batches(ds: Any, input_context: Any, *, epoch: int | None = None, global_batch_size: int | None = None,
                  remainder: str | None = None) -> np.ndarray:
    """Store indices of the per-replica batches one input pipeline reads in an epoch.

    A pure function of ``(seed, epoch, pipeline id, number of pipelines)`` and the batch sizes:
    what :func:`input_pipeline` produces for ``input_context``, without reading a sample.

    Parameters
    ----------
    ds : SegmentationDataset
        The dataset (made without ``shard=``).
    input_context : tf.distribute.InputContext
        The pipeline: ``input_pipeline_id``, ``num_input_pipelines``, ``num_replicas_in_sync``.
    epoch : int, optional
        Default: ``ds.epoch``.
    global_batch_size, remainder
        As in :func:`distribute_dataset`.

    Returns
    -------
    numpy.ndarray
        ``(batches, per_replica)`` int64 store indices, in the order the pipeline yields them.
    """
    _check_dataset(ds)
    plan = _plan(ds, input_context, global_batch_size, _remainder(ds, remainder))
    order = ds.epoch_indices(epoch)
    return np.stack([order[plan.positions(j)] for j in range(plan.batches)])


class _Clock:
    """Advances ``ds.epoch`` once every local pipeline of one distributed dataset has read an epoch."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds
        self.lock = threading.Lock()
        self.pipelines: set[int] = set()
        self.finished: dict[int, set[int]] = {}
        self.calls = _TfCalls()
        # as in get_tf_dataset: at exit, wait for a tf.data call into Python before finalizing
        weakref.finalize(ds, atexit.unregister, self.calls.quiesce).atexit = False
        atexit.register(self.calls.quiesce)

    def finish(self, epoch: int, pipeline_id: int) -> None:
        with self.lock:
            done = self.finished.setdefault(epoch, set())
            done.add(pipeline_id)
            if not done >= self.pipelines:
                return
            for e in [e for e in self.finished if e <= epoch]:
                del self.finished[e]
        if self.ds.epoch == epoch:
            self.ds.epoch = epoch + 1  # drops other epochs' work ahead, arms keep_alive
        else:  # the epoch was set meanwhile (epoch_callback): keep_alive from now all the same
            self.ds._feeder.epoch_finished(keep=lambda key: key[0] > epoch)


class _Pipeline:
    """One input pipeline's shard of ``ds``: batch ``j`` of epoch ``e`` through the dataset's workers."""

    def __init__(self, ds: Any, plan: ShardPlan, clock: _Clock) -> None:
        self.ds, self.plan, self.clock = ds, plan, clock
        clock.pipelines.add(plan.pipeline_id)
        p = plan
        self.tag = ("distribute", p.pipeline_id, p.num_pipelines, p.global_batch, p.per_replica, p.remainder)

    def _task(self, epoch: int, j: int) -> tuple[Any, Any]:
        return (epoch, self.tag + (j,)), (epoch, self.ds.epoch_indices(epoch)[self.plan.positions(j)])

    def read_epoch(self) -> np.int64:
        """The epoch of a pass that begins now: ``ds.epoch``."""
        calls = self.clock.calls
        if not calls.enter():
            raise StreamsegError(f"input pipeline {self.plan.pipeline_id} was started while the interpreter exits. "
                                 f"Received: epoch {self.ds.epoch}")
        try:
            return np.int64(self.ds.epoch)
        finally:
            calls.leave()

    def batch(self, epoch: Any, j: Any) -> tuple[np.ndarray, np.ndarray]:
        calls = self.clock.calls
        epoch, j = int(epoch), int(j)
        if not calls.enter():
            raise StreamsegError(f"batch {j} of input pipeline {self.plan.pipeline_id} was asked for while the "
                                 f"interpreter exits. Received: batch {j} of {self.plan.batches}, epoch {epoch}")
        more = False
        try:
            n = self.plan.batches
            key, task = self._task(epoch, j)
            ahead = itertools.chain((self._task(epoch, i) for i in range(j + 1, n)),
                                    (self._task(epoch + 1, i) for i in range(n)))
            out = self.ds._feeder.fetch(key, task, ahead)
            if j == n - 1:
                self.clock.finish(epoch, self.plan.pipeline_id)
            more = j + 1 < n  # tf.data's prefetch thread may ask for batch j + 1 any moment
            return out["images"], out["masks"]
        finally:
            calls.leave(more)

    def dataset(self, prefetch: int) -> Any:
        import tensorflow as tf

        images_spec, masks_spec = self.ds.element_spec()
        b, n = self.plan.per_replica, self.plan.batches

        def load(epoch: Any, j: Any) -> tuple[Any, Any]:
            images, masks = tf.numpy_function(self.batch, [epoch, j], [images_spec.dtype, masks_spec.dtype],
                                              stateful=True)
            images.set_shape((b,) + tuple(images_spec.shape[1:]))
            masks.set_shape((b,) + tuple(masks_spec.shape[1:]))
            return images, masks

        def one_pass(epoch: Any) -> Any:
            return tf.data.Dataset.range(n).map(lambda j: (epoch, j))

        # the epoch is read once, when an iterator starts (each epoch of fit makes a new one);
        # every batch is then a pure function of (epoch, j), whichever iterator asks
        start = tf.data.Dataset.range(1).map(lambda _: tf.numpy_function(self.read_epoch, [], tf.int64,
                                                                          stateful=True))
        ds = start.flat_map(one_pass).map(load).apply(tf.data.experimental.assert_cardinality(n))
        if prefetch:
            ds = ds.prefetch(prefetch)
        options = tf.data.Options()
        options.autotune.enabled = False  # our workers already produce ahead
        options.experimental_optimization.inject_prefetch = False
        return ds.with_options(options)


def _check_prefetch(prefetch: Any) -> int:
    if isinstance(prefetch, bool) or not isinstance(prefetch, (int, np.integer)) or prefetch < 0:
        raise OptionError(f"prefetch must be a non-negative integer. Received: prefetch={truncate(prefetch)}")
    return int(prefetch)


def input_pipeline(ds: Any, input_context: Any, *, global_batch_size: int | None = None,
                   remainder: str | None = None, prefetch: int = 1) -> Any:
    """The ``tf.data.Dataset`` of one input pipeline: its shard, in per-replica batches.

    What :func:`distribute_dataset`'s dataset function returns for ``input_context``; useful
    on its own with a strategy's ``distribute_datasets_from_function`` of your own.  Yields
    ``(images, masks)`` batches of exactly ``per_replica`` samples (static shape), the rows of
    :func:`shard_batches`, ``batches`` of them per iteration.  Each iteration is an epoch: it
    reads ``ds.epoch`` when it starts, and once it has produced its last batch (in every local
    pipeline of one :func:`distribute_dataset`) sets ``ds.epoch`` to the next epoch.

    Parameters
    ----------
    ds : SegmentationDataset
        The dataset; its workers produce the batches.
    input_context : tf.distribute.InputContext
        Which pipeline of how many, feeding how many replicas.
    global_batch_size, remainder, prefetch
        As in :func:`distribute_dataset`.

    Returns
    -------
    tf.data.Dataset
    """
    prefetch = _check_prefetch(prefetch)
    _check_dataset(ds)
    plan = _plan(ds, input_context, global_batch_size, _remainder(ds, remainder))
    return _Pipeline(ds, plan, _Clock(ds)).dataset(prefetch)


def distribute_dataset(ds: Any, strategy: Any, *, global_batch_size: int | None = None, remainder: str | None = None,
                       prefetch: int = 1, input_options: Any = None) -> Any:
    """``strategy.distribute_datasets_from_function`` over shards of ``ds``, one per input pipeline.

    Each input pipeline (one per worker) reads only its shard of each epoch, in per-replica
    batches of ``global_batch_size // strategy.num_replicas_in_sync`` samples, produced by the
    dataset's own workers (its pool, its ``workers`` / ``use_multiprocessing`` settings), with
    a ``prefetch``.  Global step ``s`` trains on positions ``[s * G, (s + 1) * G)`` of
    :meth:`ds.epoch_indices(epoch) <streamseg.pipeline.dataset.SegmentationDataset.epoch_indices>`,
    so across all pipelines every sample is read exactly once per epoch (with ``"drop"``: but
    for the last ``N mod G`` positions), in the shuffle a single process would use; which
    samples a pipeline reads is a pure function of ``(seed, epoch, pipeline id, number of
    pipelines)``: :func:`shard_batches`.

    The epoch.  Every iteration over the result is one epoch, the one ``ds.epoch`` says when
    the iteration starts (its first batch is asked for); once every local pipeline has
    produced its last batch of an epoch, ``ds.epoch`` advances by one (as ``ds.on_epoch_end()``
    does; ``fit`` does not call that now: it sees the distributed dataset, not ``ds``).  So:

    - ``model.fit(dist, epochs=E, shuffle=False, callbacks=[ds.epoch_callback()])``: the
      callback sets ``ds.epoch`` to fit's epoch, so ``initial_epoch`` and ``BackupAndRestore``
      resume at the right epoch (without it epochs still advance, from ``ds.epoch``);
      ``steps_per_epoch`` must stay None (or the number of steps), else a pass ends early and
      does not advance; ``shuffle=False`` only silences Keras's warning that it cannot
      shuffle a dataset (the shuffle is the dataset's own);
    - a custom loop: ``for epoch in range(start, E): ds.epoch = epoch; for x, y in dist: ...``
      (setting it is optional when every epoch is read to its end).

    Every worker process runs the same code on its own dataset object (same store, seed and
    options), so every worker agrees on the epoch order.

    Parameters
    ----------
    ds : SegmentationDataset
        The training dataset, made without ``shard=``.
    strategy : tf.distribute.Strategy
        E.g. ``MirroredStrategy`` or ``MultiWorkerMirroredStrategy``.
    global_batch_size : int, optional
        Samples per step over all replicas; default ``ds.batch_size``.  Must be a multiple of
        ``strategy.num_replicas_in_sync``, and the per-replica batch at most ``ds.batch_size``
        (the size of the workers' buffers).
    remainder : {"drop", "pad"}, optional
        The last ``N mod G`` positions of an epoch's order: ``"drop"`` leaves them out of that
        epoch (the order changes every epoch, so other samples each time); ``"pad"`` runs one
        more step, filled up from the start of the same epoch's order (those samples are read
        twice in that epoch).  Every batch of every replica is full either way (static shape).
        Default: ``"drop"`` if ``ds.drop_remainder`` else ``"pad"``, so with the default
        ``global_batch_size`` an epoch has ``len(ds)`` steps, as ``ds.epoch_callback()`` expects.
    prefetch : int
        Batches each pipeline's ``tf.data`` prefetches (0: none).
    input_options : tf.distribute.InputOptions, optional
        Passed to ``distribute_datasets_from_function``.

    Returns
    -------
    tf.distribute.DistributedDataset
        Elements are per-replica ``(images, masks)``; its ``cardinality`` is the steps per
        epoch, so ``fit`` knows them.  (Under the default strategy, the one pipeline's
        ``tf.data.Dataset`` itself.)

    Raises
    ------
    OptionError
        For a PatchDataset or a sharded dataset, a global batch that the replicas cannot split
        evenly or whose replica batch exceeds ``ds.batch_size``, or no full step with "drop".
    """
    prefetch = _check_prefetch(prefetch)
    _check_dataset(ds)
    remainder = _remainder(ds, remainder)
    clock = _Clock(ds)
    plans: list[ShardPlan] = []

    def dataset_fn(input_context: Any) -> Any:
        plan = _plan(ds, input_context, global_batch_size, remainder)
        plans.append(plan)
        return _Pipeline(ds, plan, clock).dataset(prefetch)

    # fail here, not inside tf.distribute, when the strategy cannot split the global batch
    _plan(ds, _Context(strategy), global_batch_size, remainder)
    dist = strategy.distribute_datasets_from_function(dataset_fn, options=input_options)
    _fix_cardinality(dist, plans)
    return dist


def _remainder(ds: Any, remainder: str | None) -> str:
    if remainder is None:
        return "drop" if ds.drop_remainder else "pad"
    validate_choice("remainder", remainder, REMAINDER_MODES)
    return remainder


def _fix_cardinality(dist: Any, plans: list[ShardPlan]) -> None:
    """Make ``dist.cardinality`` the steps per epoch where TensorFlow reports per-replica batches.

    ``DistributedDatasetsFromFunction.cardinality`` is the cardinality of the first pipeline's
    dataset (TF 2.21 ``input_lib``): with several replicas per pipeline (MirroredStrategy on
    two devices) that counts per-replica batches, ``replicas_per_pipeline`` times the steps.
    Keras then expects that many steps, runs out of data every epoch and warns, and with
    ``steps_per_epoch`` reuses an exhausted iterator.  The attribute is only read for
    ``cardinality`` and an infinite/empty check, so it is set to the steps, and only when it
    has the value of the mistake (a TensorFlow that gets it right is left alone).
    """
    if not plans or getattr(dist, "_cardinality", None) is None:
        return
    plan = plans[0]
    if plan.replicas_per_pipeline > 1 and int(dist._cardinality) == plan.batches:
        dist._cardinality = np.int64(plan.steps)


class _Context:
    """An input context of pipeline 0 of 1 for ``strategy``'s replicas (validation only)."""

    def __init__(self, strategy: Any) -> None:
        self.num_replicas_in_sync = int(strategy.num_replicas_in_sync)
        self.num_input_pipelines, self.input_pipeline_id = 1, 0

    def get_per_replica_batch_size(self, global_batch_size: int) -> int:
        return global_batch_size // self.num_replicas_in_sync
