"""Pipeline efficiency: streamseg's full-speed rate against the single-thread floor of its own work.

The floor is the exact per-sample work the pipeline does, on one thread, in one process: a
:class:`streamseg.pipeline.batches.BatchProducer` (the object every worker runs) producing the
dataset's own batches in-process -- ``Store.read`` of the batch, the configured ``Augment``, the
normalisation and mask encoding -- after ``setup()`` (Blosc on one thread) and with OpenCV set
to one thread.  It runs in a fresh subprocess so that the thread setting does not reach the
measured pipeline.  Then, in the same run, the full-speed rate: a ``SegmentationDataset`` with
``--workers`` worker processes, iterated for ``--batches`` batches after a warm-up (epoch after
epoch, no model).  Floor and full speed alternate ``--rounds`` times (this machine is
shared and noisy: each ratio is of two measurements next to each other in time), and each
floor is the fastest of ``--passes`` passes over the same batches (noise only adds time: a
single pass read anywhere from 0.61 to 0.83 ms per sample within one series).  The
full speed is timed the same way: ``--passes`` consecutive stretches of ``--batches`` batches,
the fastest counts (the first stretch alone is printed too; before session 11 only one
stretch was timed, against the floor's fastest pass).  It prints, per round and as
min / median / max::

    efficiency = rate / (cores x floor rate)

1.0 means every core does nothing but the floor work; the rest is what the pipeline costs on
top (hand-over copy, scheduling, the consumer thread) or leaves idle.

Usage::

    python benchmarks/efficiency.py --backend zarr --workers 2 --batches 48
    python benchmarks/efficiency.py --store /data/s.memmap --augment heavy
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

__all__ = ["make_dataset", "floor", "full_speed", "main"]


def make_dataset(store: str, augment: str | None, batch_size: int, workers: int, seed: int = 0,
                 dtype: str = "float32") -> Any:
    """The measured SegmentationDataset (window shuffle, drop_remainder, worker processes)."""
    from streamseg import SegmentationDataset

    return SegmentationDataset(store, batch_size, augment=augment, shuffle="window", seed=seed, workers=workers,
                               use_multiprocessing=workers > 0, drop_remainder=True, dtype=dtype)


def floor(store: str, augment: str | None, batch_size: int, batches: int, seed: int = 0,
          dtype: str = "float32", passes: int = 3) -> dict[str, Any]:
    """Seconds per sample of BatchProducer.produce on one thread (read alone, and everything),
    from the fastest of ``passes`` passes over the same ``batches`` batches.

    Sets OpenCV to one thread for good: call in a fresh process.
    """
    import cv2
    import numpy as np

    cv2.setNumThreads(1)
    from streamseg.pipeline.batches import BatchProducer

    ds = make_dataset(store, augment, batch_size, workers=0, seed=seed, dtype=dtype)
    producer = BatchProducer(ds.store, ds.options)
    producer.setup()
    h, w, c = ds.store.image_shape
    (ishape, idt), (mshape, mdt) = ds.options.image_spec(batch_size, h, w, c), ds.options.mask_spec(batch_size, h, w)
    out = {"images": np.empty(ishape, idt), "masks": np.empty(mshape, mdt)}
    n = len(ds)
    tasks = [(k // n, ds.batch_indices(k % n, k // n)) for k in range(batches)]
    for task in tasks[:2]:  # warm: files opened, page cache, first-call costs
        producer.produce(task, out)
    read_s, total_s = [], []
    for _ in range(passes):  # noise only adds time: the fastest pass is the floor
        t0 = time.perf_counter()
        for task in tasks:
            ds.store.read(task[1])
        read_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for task in tasks:
            producer.produce(task, out)
        total_s.append(time.perf_counter() - t0)
    ds.close()
    samples = sum(len(t[1]) for t in tasks)
    return {"samples": samples, "passes": passes, "floor_s_per_sample": min(total_s) / samples,
            "read_s_per_sample": min(read_s) / samples, "floor_samples_per_s": samples / min(total_s),
            "pass_s": total_s}


def full_speed(store: str, augment: str | None, batch_size: int, workers: int, batches: int, warmup: int,
               seed: int = 0, dtype: str = "float32", passes: int = 1) -> dict[str, Any]:
    """samples/s of iterating the dataset with ``workers`` processes, no consumer work.

    After ``warmup`` batches, ``passes`` consecutive stretches of ``batches`` batches are timed
    one by one; ``samples_per_s`` is the fastest (as the floor's: noise only adds time) and
    ``first_pass_samples_per_s`` the first alone.
    """
    ds = make_dataset(store, augment, batch_size, workers=workers, seed=seed, dtype=dtype)
    got, marks = 0, []
    stops = {warmup + k * batches for k in range(passes + 1)}
    try:
        while got < warmup + passes * batches:
            for _ in ds:
                got += 1
                if got in stops:
                    marks.append((time.perf_counter(), _cpu_seconds()))
                if got == warmup + passes * batches:
                    break
            ds.on_epoch_end()
    finally:
        ds.close()
    walls = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    cpus = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
    best = min(range(passes), key=walls.__getitem__)
    return {"batches": batches, "passes": passes, "samples_per_s": batches * batch_size / walls[best],
            "first_pass_samples_per_s": batches * batch_size / walls[0],
            "pass_samples_per_s": [batches * batch_size / w for w in walls], "wall_s": walls[best],
            "cpu_s": cpus[best], "cpu_cores_busy": cpus[best] / walls[best]}


def _cpu_seconds() -> float:
    """CPU seconds of this process and its live children (psutil)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def main(argv: list[str] | None = None) -> int:
    """Measure the floor (fresh subprocess), then the full-speed rate; print the efficiency."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default=None, help="store path (default: synthetic data of --backend)")
    p.add_argument("--backend", choices=["zarr", "memmap"], default="zarr", help="synthetic store format")
    p.add_argument("--data", default=str(ROOT / "bench_data"), help="cache folder for the synthetic data")
    p.add_argument("--count", type=int, default=512, help="samples in the synthetic data set")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--augment", default="standard", help="augment preset name, or 'none'")
    p.add_argument("--workers", type=int, default=2, help="worker processes of the full-speed run")
    p.add_argument("--batches", type=int, default=48, help="timed batches (floor and full speed)")
    p.add_argument("--warmup", type=int, default=4, help="untimed batches before the full-speed timing")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cores", type=int, default=None, help="cores (default: this process's CPU affinity)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "uint8"], default="float32", help="batch image dtype")
    p.add_argument("--rounds", type=int, default=3, help="floor / full-speed pairs, alternating")
    p.add_argument("--passes", type=int, default=3,
                   help="floor passes and full-speed stretches per round (the fastest of each counts)")
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    p.add_argument("--floor-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    augment = None if args.augment == "none" else args.augment
    if args.floor_child:
        print(json.dumps(floor(args.store, augment, args.batch_size, args.batches, args.seed, args.dtype,
                               args.passes)))
        return 0
    store = args.store
    if store is None:
        from compare import prepare_stores

        store = prepare_stores(args.data, args.count, args.size, formats=(args.backend,))[args.backend]
    cmd = [sys.executable, __file__, "--floor-child", "--store", store, "--augment", args.augment,
           "--batches", str(args.batches), "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--dtype", args.dtype,
           "--passes", str(args.passes)]
    cores = args.cores or len(os.sched_getaffinity(0))
    print(f"store {store} (augment={args.augment}, batch {args.batch_size}, dtype {args.dtype}, cores {cores})")
    rounds = []
    for r in range(args.rounds):  # floor and full speed alternate: each ratio is of neighbours in time
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        fl = json.loads(proc.stdout.strip().splitlines()[-1])
        rate = full_speed(store, augment, args.batch_size, args.workers, args.batches, args.warmup, args.seed,
                          args.dtype, args.passes)
        eff = rate["samples_per_s"] / (cores * fl["floor_samples_per_s"])
        eff1 = rate["first_pass_samples_per_s"] / (cores * fl["floor_samples_per_s"])
        rounds.append({"floor": fl, "full_speed": rate, "efficiency": eff, "efficiency_first_pass": eff1})
        print(f"round {r}: floor (1 thread, BatchProducer.produce) {fl['floor_samples_per_s']:.1f} samples/s "
              f"({fl['floor_s_per_sample'] * 1e3:.3f} ms/sample, of which Store.read "
              f"{fl['read_s_per_sample'] * 1e3:.3f}); full speed ({args.workers} worker processes, fastest of "
              f"{args.passes} x {args.batches} batches) {rate['samples_per_s']:.1f} samples/s, CPU "
              f"{rate['cpu_cores_busy']:.2f} cores busy; efficiency = {rate['samples_per_s']:.1f} / ({cores} x "
              f"{fl['floor_samples_per_s']:.1f}) = {eff:.3f} (first pass alone {eff1:.3f})", flush=True)
    effs = [r["efficiency"] for r in rounds]
    summary = {"min": min(effs), "median": statistics.median(effs), "max": max(effs)}
    firsts = [r["efficiency_first_pass"] for r in rounds]
    summary_first = {"min": min(firsts), "median": statistics.median(firsts), "max": max(firsts)}
    result = {"store": store, "augment": args.augment, "dtype": args.dtype, "batch_size": args.batch_size,
              "workers": args.workers, "cores": cores, "rounds": rounds, "efficiency": summary,
              "efficiency_first_pass": summary_first}
    print(f"efficiency over {len(rounds)} rounds, min / median / max: {summary['min']:.3f} / "
          f"{summary['median']:.3f} / {summary['max']:.3f} (first full-speed pass alone: "
          f"{summary_first['min']:.3f} / {summary_first['median']:.3f} / {summary_first['max']:.3f})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
