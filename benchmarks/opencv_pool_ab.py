"""OpenCV in the worker processes: sequential (the default when the workers fill the cores) against
OpenCV's own thread pool, under ``model.fit`` at full speed, alternating, each run in a fresh process.

The dataset is compare.py's ``streamseg_<backend>`` pipeline (``peers.build_pipeline``); the ``pool``
variant clears the producer's ``sequential_opencv`` flag before the workers start, so each worker
keeps OpenCV's pool (as many threads as cores).  Prints samples/s, CPU % and the per-round ratio
pool / sequential with min/median/max per backend.

Usage::

    python benchmarks/opencv_pool_ab.py --rounds 6 --backends zarr memmap \\
        --out benchmarks/results/opencv_pool_ab_s14.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

__all__ = ["child", "main"]
VARIANTS = ("sequential", "pool")


def child(variant: str, backend: str, *, data: str, count: int, workers: int, steps: int, warmup: int,
          step_ms: float, dtype: str) -> dict:
    """One fit in this process; return its rate."""
    import peers
    from compare import prepare_stores
    from streamseg.bench.measure import measure_fit

    store = prepare_stores(data, count, formats=(backend,))[backend]
    name = f"streamseg_{backend}" + ("_uint8" if dtype == "uint8" else "")
    ds = peers.build_pipeline(name, {backend: store}, workers=workers, batch_size=32, seed=0)
    default = ds._feeder.producer.sequential_opencv
    if variant == "pool":
        ds._feeder.producer.sequential_opencv = False
    try:
        r = measure_fit(ds, model="simulated", step_ms=step_ms, steps=steps, warmup=warmup, batch_size=32,
                        input_shape=(256, 256, 3), num_classes=3)
    finally:
        ds.close()
    return {"variant": variant, "backend": backend, "dtype": dtype, "default_sequential": default,
            "samples_per_s": r["samples_per_s"], "cpu_percent": r["cpu_percent"], "stall": r["stall_fraction"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT / "bench_data"))
    p.add_argument("--count", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--backends", nargs="+", default=["zarr", "memmap"], choices=["zarr", "memmap"])
    p.add_argument("--dtype", default="float32", choices=["float32", "uint8"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--step-ms", type=float, default=0.0)
    p.add_argument("--out", default=None)
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "BACKEND"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    opts = {"data": args.data, "count": args.count, "workers": args.workers, "steps": args.steps,
            "warmup": args.warmup, "step_ms": args.step_ms, "dtype": args.dtype}
    if args.child:
        print("RESULT " + json.dumps(child(*args.child, **opts)), flush=True)
        return 0
    from ab import paired_ratios, report, run_child
    from compare import prepare_stores

    prepare_stores(args.data, args.count, formats=tuple(args.backends))  # built once, outside the timing
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    rows = []
    base = [sys.executable, __file__, *sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in opts.items()), [])]
    for r in range(args.rounds):
        for backend in args.backends:
            for variant in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                rec = run_child([*base, "--child", variant, backend], env, {"variant": variant, "backend": backend})
                rows.append({"round": r, **rec})
                print(json.dumps(rows[-1]), flush=True)
    summary = paired_ratios(rows, args.backends, lambda x: x["backend"], lambda x: x["variant"], "pool",
                            "sequential")  # {backend: {"ratios": pool / sequential per round, ...}}
    report(args, rows, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
