"""Run conversion tasks in worker processes, a bounded number queued at a time.

Shared by the 2D converter and the volume writer.  May import nothing of streamseg.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

__all__ = ["run_bounded"]


def run_bounded(fn: Callable[[Any], Any], items: Iterable[Any], *, workers: int,
                initializer: Callable[..., None], initargs: tuple, on_result: Callable[[Any], None]) -> None:
    """Call ``fn(item)`` for every item in ``workers`` processes, at most ``2 x workers`` queued.

    ``on_result`` runs in this process for each result as it completes (e.g. to append a
    progress line).  On any error, including KeyboardInterrupt, the tasks not started are
    cancelled, the workers are waited for, and the error is re-raised (a worker's own
    exception comes back as raised there).
    """
    pending: set[Future] = set()
    queue = iter(items)
    with ProcessPoolExecutor(max_workers=workers, initializer=initializer, initargs=initargs) as pool:
        try:
            for item in queue:
                pending.add(pool.submit(fn, item))
                if len(pending) >= 2 * workers:
                    break
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    on_result(fut.result())
                    nxt = next(queue, None)
                    if nxt is not None:
                        pending.add(pool.submit(fn, nxt))
        except BaseException:
            for fut in pending:
                fut.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
