"""Inline reads (``workers=0``) of a zarr store with the window shuffle: one epoch with the
decoded-chunk cache (``BatchProducer.setup_inline``, the default) and without it (the hook
replaced by a no-op, as before session 13), alternating; samples/s and image chunks decoded.

Usage::

    python benchmarks/inline_cache_ab.py --rounds 3 --augment standard \\
        --out benchmarks/results/inline_cache_ab_standard_s13.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

__all__ = ["one_epoch", "main"]


def one_epoch(store: str, *, cache: bool, augment: str, batch_size: int) -> dict:
    """Read one epoch inline (batch 0 first, untimed: it opens the files); return the rate."""
    import streamseg.pipeline.batches as batches
    from streamseg import SegmentationDataset

    real = batches.BatchProducer.setup_inline
    if not cache:
        batches.BatchProducer.setup_inline = lambda self: None
    try:
        ds = SegmentationDataset(store, batch_size, shuffle="window", workers=0, augment=augment,
                                 drop_remainder=True)
        reader = ds.store.chunk_reader("images")
        decoded = [0]
        inner = reader._decode_into

        def counted(raw, k, out):
            decoded[0] += 1
            return inner(raw, k, out)

        reader._decode_into = counted
        ds[0]
        decoded[0] = 0
        t0 = time.perf_counter()
        for i in range(1, len(ds)):
            ds[i]
        wall = time.perf_counter() - t0
        ds.close()
    finally:
        batches.BatchProducer.setup_inline = real
    return {"cache": cache, "samples_per_s": (len(ds) - 1) * batch_size / wall,
            "image_chunk_decodes": decoded[0], "batches": len(ds) - 1}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT / "bench_data"))
    p.add_argument("--count", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--augment", default="standard")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from compare import prepare_stores

    store = prepare_stores(args.data, args.count, formats=("zarr",))["zarr"]
    rows = []
    for r in range(args.rounds):
        for cache in ((True, False) if r % 2 == 0 else (False, True)):
            rows.append({"round": r, **one_epoch(store, cache=cache, augment=args.augment,
                                                 batch_size=args.batch_size)})
            print(json.dumps(rows[-1]), flush=True)
    ratios = [next(x["samples_per_s"] for x in rows if x["round"] == r and x["cache"])
              / next(x["samples_per_s"] for x in rows if x["round"] == r and not x["cache"])
              for r in range(args.rounds)]
    summary = {"ratio_per_round": ratios, "ratio_min_median_max": [min(ratios), sorted(ratios)[len(ratios) // 2],
                                                                   max(ratios)]}
    print(json.dumps(summary))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "runs": rows, **summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
