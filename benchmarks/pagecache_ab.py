"""What a cold page cache costs one compare.py run: the same pipeline started on its store read
into the page cache (``warm``, compare.py's default since session 14) and dropped from it
(``cold``, what this VM's proactive reclaim does to a store untouched for a minute), alternating,
each run in a fresh process through compare.py's own harness (:func:`compare.run_one`).

Usage::

    python benchmarks/pagecache_ab.py --rounds 4 --pipelines streamseg_zarr \\
        --out benchmarks/results/pagecache_ab_s14.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT / "bench_data"))
    p.add_argument("--count", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--pipelines", nargs="+", default=["streamseg_zarr"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import compare

    data = compare.prepare_data(args.data, args.count)
    rows = []
    for r in range(args.rounds):
        for name in args.pipelines:
            for policy in (("warm", "cold") if r % 2 == 0 else ("cold", "warm")):
                spec = {"pipeline": name, "workers": args.workers, "step_ms": 0.0, "steps": args.steps,
                        "warmup": args.warmup, "batch_size": 32, "model": "simulated", "seed": 0, "size": 256,
                        "classes": 3, "data": data, "max_ram": None, "page_cache": policy}
                got = compare.run_one(spec, 300.0)
                res = got.get("result", {})
                rows.append({"round": r, "pipeline": name, "page_cache": got.get("page_cache"),
                             "status": got["status"], "samples_per_s": res.get("samples_per_s"),
                             "step_ms_max": res.get("step_ms_max"), "error": got.get("error")})
                print(json.dumps(rows[-1]), flush=True)
    from ab import paired_ratios, report

    summary = paired_ratios(rows, args.pipelines, lambda x: x["pipeline"],
                            lambda x: (x["page_cache"] or {}).get("policy"), "warm", "cold")  # warm / cold
    report(args, rows, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
