"""zarr against memmap batch production: full-speed rates of the two backends, alternating.

Each round runs :func:`efficiency.full_speed` (a ``SegmentationDataset`` with ``--workers``
worker processes, iterated with no consumer work) on the memmap store and on the zarr store
of the same synthetic data (memmap first in even rounds, zarr first in odd ones since session
15), each in a fresh subprocess that first reads its store into the page cache (this VM's
proactive reclaim drops files untouched for about a minute); it prints the rates and the
memmap / zarr ratio per round, and min / median / max over the rounds.  Issue 14's target:
zarr batch production within 1.2x of memmap.

Usage::

    python benchmarks/backends_ab.py --count 512 --rounds 5 --batches 96 \\
        --out benchmarks/results/backends_ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Alternate memmap and zarr full-speed runs; print rates and ratios."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT / "bench_data"), help="cache folder for the synthetic data")
    p.add_argument("--count", type=int, default=512)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--augment", default="standard")
    p.add_argument("--dtype", choices=["float32", "uint8"], default="float32")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=96)
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None)
    p.add_argument("--child", nargs=1, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    augment = None if args.augment == "none" else args.augment
    if args.child:
        import pagecache
        from efficiency import full_speed

        pagecache.warm([args.child[0]])
        r = full_speed(args.child[0], augment, 32, args.workers, args.batches, args.warmup, 0, args.dtype)
        print(json.dumps(r))
        return 0
    from compare import prepare_stores

    stores = prepare_stores(args.data, args.count, args.size, formats=("memmap", "zarr"))
    rounds = []
    for r in range(args.rounds):
        rates = {}
        for backend in (("memmap", "zarr") if r % 2 == 0 else ("zarr", "memmap")):
            cmd = [sys.executable, __file__, "--child", stores[backend], "--augment", args.augment,
                   "--dtype", args.dtype, "--workers", str(args.workers), "--batches", str(args.batches),
                   "--warmup", str(args.warmup)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            rates[backend] = json.loads(proc.stdout.strip().splitlines()[-1])["samples_per_s"]
        ratio = rates["memmap"] / rates["zarr"]
        rounds.append({"memmap": rates["memmap"], "zarr": rates["zarr"], "memmap_over_zarr": ratio})
        print(f"round {r}: memmap {rates['memmap']:.1f}, zarr {rates['zarr']:.1f} samples/s: "
              f"memmap / zarr = {ratio:.2f}x", flush=True)
    ratios = [x["memmap_over_zarr"] for x in rounds]
    summary = {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios)}
    print(f"memmap / zarr over {len(rounds)} rounds, min / median / max: {summary['min']:.2f} / "
          f"{summary['median']:.2f} / {summary['max']:.2f}x (target: zarr within 1.2x)")
    if args.out:
        Path(args.out).write_text(json.dumps({"config": vars(args), "rounds": rounds, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
