"""What the benchmark's own memory sampler costs a timed ``model.fit``: full samples (USS/PSS,
page-table walks of every process of the pipeline) held off during the timed steps (``held``,
``measure_fit``'s behaviour since session 15) against taken every ``full_every`` samples
throughout (``throughout``, before), alternating, each run in a fresh process.

A full sample costs ~15 ms of kernel time per process, more with large file mappings, so the
tax grows with a pipeline's process count (streamseg: main + 2 workers; a tf.data pipeline:
one process).  Prints samples/s per run and the per-round ratio held / throughout with
min/median/max per pipeline.

Usage::

    python benchmarks/sampler_ab.py --rounds 3 --pipelines streamseg_memmap streamseg_zarr \\
        tfdata_map_batch_memmap_repeat --out benchmarks/results/sampler_ab_s15.json
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
VARIANTS = ("held", "throughout")


def child(variant: str, name: str, *, data: str, count: int, workers: int, steps: int, warmup: int) -> dict:
    """One full-speed fit of pipeline ``name`` in this process, the store read into the page cache."""
    import compare
    import pagecache
    import peers
    from streamseg.bench import memory
    from streamseg.bench.measure import measure_fit

    paths = compare.prepare_data(data, count)
    backend = peers.BACKENDS.get(name, "memmap")
    pagecache.warm([paths[backend]])
    if variant == "throughout":  # the sampler before session 15: full samples inside the timing too
        memory.MemorySampler.hold_full = lambda self: None
    ds = peers.build_pipeline(name, paths, workers=workers, batch_size=32, seed=0)
    try:
        r = measure_fit(ds, model="simulated", step_ms=0.0, steps=steps, warmup=warmup, batch_size=32,
                        input_shape=(256, 256, 3), num_classes=3)
    finally:
        if hasattr(ds, "close"):
            ds.close()
    return {"variant": variant, "pipeline": name, "samples_per_s": r["samples_per_s"],
            "cpu_percent": r["cpu_percent"], "full_samples": r["memory"]["full_samples"],
            "samples": r["memory"]["samples"], "private_mib": r["memory"]["private"] / 2**20}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT / "bench_data"))
    p.add_argument("--count", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pipelines", nargs="+", default=["streamseg_memmap", "streamseg_zarr",
                                                      "tfdata_map_batch_memmap_repeat"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--out", default=None)
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "PIPELINE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    opts = {"data": args.data, "count": args.count, "workers": args.workers, "steps": args.steps,
            "warmup": args.warmup}
    if args.child:
        print("RESULT " + json.dumps(child(*args.child, **opts)), flush=True)
        return 0
    import compare
    from ab import paired_ratios, report, run_child

    compare.prepare_data(args.data, args.count)  # built once, outside the timing
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    rows = []
    base = [sys.executable, __file__, *sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in opts.items()), [])]
    for r in range(args.rounds):
        for name in (args.pipelines if r % 2 == 0 else args.pipelines[::-1]):
            for variant in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                rec = run_child([*base, "--child", variant, name], env, {"variant": variant, "pipeline": name})
                rows.append({"round": r, **rec})
                print(json.dumps(rows[-1]), flush=True)
    summary = paired_ratios(rows, args.pipelines, lambda x: x["pipeline"], lambda x: x["variant"], "held",
                            "throughout")
    report(args, rows, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
