"""A pass over a dataset's batches with worker processes: a hand-over thread collects the next
batch while the consumer works on the current one, and after a complete pass the first batch of
the next epoch (the *carry*), which the next pass takes if it is for that epoch."""

from __future__ import annotations

import contextlib
import itertools
import queue
import sys
import threading
from typing import Any

import numpy as np

__all__ = ["HandoverMixin"]


_END_OF_EPOCH = object()


class _Carry:
    """The first batch of the next epoch, collected at the end of a pass."""

    __slots__ = ("key", "batch", "done")

    def __init__(self, key: tuple[int, int]) -> None:
        self.key = key
        self.batch: tuple[np.ndarray, np.ndarray] | None = None
        self.done = threading.Event()


class HandoverMixin:
    """``__iter__`` of :class:`~streamseg.pipeline.dataset.SegmentationDataset`; the class using
    it provides ``_epoch``, ``_closes``, ``_passes``, ``_carry``, ``_epoch_used``, ``_feeder``,
    ``__len__``, ``_pass_start``, ``_fetch``, ``_fetch_raw`` and ``_handed``."""

    def __iter__(self) -> Any:
        """One epoch of batches, in order (from the batch :meth:`load_state` resumes at).

        With workers, a hand-over thread collects the next batch (copy out of its
        shared-memory slot) while the consumer works on the current one.  After a complete
        pass it also collects the first batch of the next epoch, which the next pass takes
        if it is for that epoch (Keras spends ~20 ms between epochs meanwhile).
        """
        return self._iterate(whole=False)

    def _iterate(self, whole: bool) -> Any:
        """A pass over the current epoch; ``whole``: from batch 0 whatever load_state said."""
        epoch, n, closes = self._epoch, len(self), self._closes
        start = self._pass_start(epoch, whole)
        if self._feeder.inline:
            for i in range(start, n):
                batch = self._fetch(epoch, i, range(i + 1, n))
                self._handed(epoch, i)
                yield batch
            return
        self._passes += 1
        carry, self._carry = self._carry, None
        first = None
        if carry is not None and carry.key == (epoch, start):
            carry.done.wait()  # the previous pass's thread may still be collecting it
            first, carry.batch = carry.batch, None
            if first is not None and epoch == self._epoch:
                self._epoch_used = True
        # the thread takes the carry batch out of this list: no local of the pass keeps it (and
        # its lent slot) once the consumer has dropped it
        carried = [first] if first is not None else []
        begin = start + len(carried)
        del first, carry
        handed: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()

        def offer(item: Any) -> bool:
            while not stop.is_set():
                with contextlib.suppress(queue.Full):
                    handed.put(item, timeout=0.1)
                    return True
            return False

        def hand_over() -> None:
            carry = None
            try:
                if carried and not offer(carried.pop()):
                    return
                for i in range(begin, n):
                    if stop.is_set():
                        return  # abandoned: fetch nothing more
                    # after an explicit close() the pass must not bring the workers back behind
                    # the caller's back; a keep_alive expiry (on_epoch_end mid-pass, when fit
                    # has steps_per_epoch < len) or a failure restarts them as usual
                    if not offer(self._fetch(epoch, i, range(i + 1, n), start=self._closes == closes)):
                        return
                # Only after a complete pass: an abandoned generator may be closed by tf.data's
                # iterator destructor at interpreter exit, where starting timers is unsafe.
                self._feeder.epoch_finished(keep=lambda key: key[0] > epoch)
                # Published only once the consumer has taken every batch (the end marker went
                # in): a next pass never waits on a carry whose pass is still in progress.
                if offer(_END_OF_EPOCH) and not sys.is_finalizing():
                    carry = self._carry = _Carry((epoch + 1, 0))
                    self._collect_carry(carry, epoch, n)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer's thread
                offer(exc)
            finally:
                if carry is not None:
                    carry.done.set()  # collected, or abandoned with nothing in it

        threading.Thread(target=hand_over, name="streamseg-handover", daemon=True).start()
        try:
            for i in itertools.count(start):
                item = handed.get()
                if item is _END_OF_EPOCH:
                    return
                if isinstance(item, BaseException):
                    raise item
                self._handed(epoch, i)
                yield item
        finally:
            stop.set()  # abandoned or failed: the hand-over thread stops by itself

    def _collect_carry(self, carry: _Carry, epoch: int, n: int) -> None:
        """Collect batch 0 of ``epoch + 1`` for the next pass (a guess: unused if it is not)."""
        passes = self._passes
        try:
            # lent from its shared-memory slot, not copied: under fit the next pass takes it within
            # ~20 ms, and the copy (33 MiB for 32x256x256x3 float32 + masks, into fresh pages) sat on
            # the critical path of every epoch boundary (55-95 ms measured, RESULTS.md 13c); a carry
            # nobody takes holds one of the pool's lent slots until the dataset drops it
            carry.batch = self._fetch_raw(epoch + 1, 0, range(1, n), start=False, lend=True)
            if self._passes == passes:  # no pass started meanwhile (it would lose its look-ahead)
                self._feeder.epoch_finished(keep=lambda key: key[0] > epoch)  # re-arm keep_alive
        except BaseException:  # noqa: BLE001 - the next pass asks again and gets the error itself
            carry.batch = None
        finally:
            carry.done.set()
