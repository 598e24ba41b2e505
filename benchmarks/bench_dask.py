"""Conversion wall time on a Dask LocalCluster with 1 vs 2 worker processes (``convert --dask``).

Usage::

    python benchmarks/bench_dask.py --count 400 --size 256 --rounds 3 --out benchmarks/results/dask.json

A synthetic source (:class:`streamseg.io.sources.SynthSource`: each sample is generated in the
worker, so the source costs CPU like decoding files does) is converted into a zarr store, in
alternating rounds (every setting once per round, so a machine that gets busier mid-run hurts
them alike), by:

``serial``
    ``convert_source(...)`` without Dask (the reference).
``local:N``
    ``convert_source(..., dask="local:N")``: what a user of ``--dask local:N`` waits for,
    starting and closing the LocalCluster included.
``cluster:N``
    ``dask="tcp://..."`` to a LocalCluster of N processes started once beforehand: the
    conversion alone.

Min / median / max wall seconds per setting, pairs/s at the median, and the 2-worker /
1-worker speedups of the medians are printed and written to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _summary(times: list[float], count: int) -> dict:
    med = statistics.median(times)
    return {"wall_s": [round(t, 4) for t in times], "min_s": round(min(times), 4), "median_s": round(med, 4),
            "max_s": round(max(times), 4), "pairs_per_s_median": round(count / med, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=400, help="synthetic pairs (default 400)")
    ap.add_argument("--size", type=int, default=256, help="image side (default 256)")
    ap.add_argument("--chunk-samples", type=int, default=None, help="default ~2 MiB of image data per chunk")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Dask worker processes (default 1 2)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    import logging

    import dask
    import psutil
    from distributed import LocalCluster

    from streamseg.io.sources import SynthSource
    from streamseg.store.converter import convert_source

    logging.getLogger("distributed").setLevel(logging.ERROR)  # no INFO lines as the clusters close
    source = SynthSource(args.count, size=(args.size, args.size), classes=3)
    work = Path(tempfile.mkdtemp(prefix="bench_dask_"))
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):  # as local:N does
        clusters = {n: LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                                    dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR)
                    for n in args.workers}
    settings = {"serial": None}
    settings.update({f"local:{n}": f"local:{n}" for n in args.workers})
    settings.update({f"cluster:{n}": clusters[n].scheduler_address for n in args.workers})
    times: dict[str, list[float]] = {name: [] for name in settings}
    manifests: dict[str, dict] = {}
    try:
        for r in range(args.rounds):
            for name, dask in settings.items():
                dst = work / name.replace(":", "_")
                shutil.rmtree(dst, ignore_errors=True)
                t0 = time.perf_counter()
                store = convert_source(source, dst, chunk_samples=args.chunk_samples, progress=False, dask=dask)
                times[name].append(time.perf_counter() - t0)
                manifests.setdefault(name, store.meta["checksums"])
                print(f"round {r + 1}/{args.rounds} {name:>10}: {times[name][-1]:.3f} s", flush=True)
    finally:
        for c in clusters.values():
            c.close()
        shutil.rmtree(work, ignore_errors=True)
    same = all(m == manifests["serial"] for m in manifests.values())
    results = {name: _summary(t, args.count) for name, t in times.items()}
    speedups = {}
    if 1 in args.workers:
        for n in args.workers:
            if n != 1:
                for kind in ("local", "cluster"):
                    speedups[f"{kind} {n}/1"] = round(results[f"{kind}:1"]["median_s"]
                                                      / results[f"{kind}:{n}"]["median_s"], 3)
    out = {"machine": {"cpus": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
                       "python": platform.python_version(), "platform": platform.platform(),
                       "load_avg_1m_end": round(os.getloadavg()[0], 2)},
           "config": {"count": args.count, "size": args.size, "chunk_samples": args.chunk_samples,
                      "rounds": args.rounds, "workers": args.workers, "format": "zarr", "compressor": "lz4"},
           "results": results, "speedup_median": speedups, "identical_checksums": same}
    for name, res in results.items():
        print(f"{name:>10}: min {res['min_s']:.3f}  median {res['median_s']:.3f}  max {res['max_s']:.3f} s  "
              f"({res['pairs_per_s_median']:.0f} pairs/s)")
    print(json.dumps({"speedup_median": speedups, "identical_checksums": same}))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
