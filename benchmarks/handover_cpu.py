"""Main-process CPU per batch of the worker pool and the hand-over thread alone.

The workers' ``BatchProducer.produce`` is replaced by a fixed sleep (``--produce-ms``), and the
consumer sleeps ``--consume-ms`` per batch, so the CPU time this process uses (all its threads,
``os.times``) is what the pool, the feeder and the hand-over thread cost per batch: task
pickling and sending, collecting the workers' messages, lending the slots.  Each repeat is a
fresh dataset (workers started anew); the first ``--warmup`` batches are not timed.

Usage::

    python benchmarks/handover_cpu.py --repeats 3
    PYTHONPATH=/tmp/old python benchmarks/handover_cpu.py      # an older code copy, for an A/B

``os.times`` counts in clock ticks (10 ms here): over 250 batches one tick is 0.04 ms per batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

__all__ = ["measure", "main"]


def _cpu() -> float:
    return sum(os.times()[:2])


def measure(store: str, *, produce_ms: float, consume_ms: float, epochs: int, warmup: int,
            workers: int = 2, batch_size: int = 32) -> float:
    """Main-process CPU milliseconds per batch over ``epochs`` epochs after ``warmup`` batches."""
    from streamseg import SegmentationDataset
    from streamseg.pipeline import batches

    def produce(self, task, out):  # noqa: ANN001 - the producer's own signature
        time.sleep(produce_ms / 1e3)
        return len(task[1])

    batches.BatchProducer.produce = produce  # forked workers inherit it
    ds = SegmentationDataset(store, batch_size, augment="standard", shuffle="window", workers=workers,
                             use_multiprocessing=True, drop_remainder=True)
    n, c0 = 0, None
    try:
        for _ in range(epochs):
            for _batch in ds:
                n += 1
                if n == warmup:
                    c0 = _cpu()
                time.sleep(consume_ms / 1e3)
            ds.on_epoch_end()
        return 1e3 * (_cpu() - c0) / (n - warmup)
    finally:
        ds.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default=None, help="store path (default: the synthetic zarr store of --count)")
    p.add_argument("--data", default=str(ROOT / "bench_data"))
    p.add_argument("--count", type=int, default=2048)
    p.add_argument("--produce-ms", type=float, default=4.0)
    p.add_argument("--consume-ms", type=float, default=5.0)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import streamseg  # before compare, which puts this checkout first on sys.path: PYTHONPATH decides

    store = args.store
    if store is None:
        from compare import prepare_stores

        store = prepare_stores(args.data, args.count, formats=("zarr",))["zarr"]
    runs = [measure(store, produce_ms=args.produce_ms, consume_ms=args.consume_ms, epochs=args.epochs,
                    warmup=args.warmup) for _ in range(args.repeats)]
    result = {"store": store, "code": str(Path(streamseg.__file__).parent), **vars(args),
              "main_cpu_ms_per_batch": runs, "median": statistics.median(runs)}
    print(f"main-process CPU per batch ({streamseg.__file__}): " + ", ".join(f"{r:.3f}" for r in runs)
          + f" ms (median {result['median']:.3f})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
