"""Two versions of streamseg under ``model.fit`` at full speed, alternating: the working tree
against another checkout (``--against``, e.g. ``git worktree add /tmp/before HEAD~1``), each run
a fresh process through compare.py's own harness (the other checkout's ``compare.py`` and
package for its runs), the store read into the page cache first.  Prints the per-round ratio
this tree / the other, min / median / max per pipeline.

Usage::

    git worktree add /tmp/before <commit>
    python benchmarks/code_ab.py --against /tmp/before --rounds 5 \\
        --pipelines streamseg_zarr streamseg_memmap --out benchmarks/results/code_ab.json
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
    p.add_argument("--against", required=True, help="the other checkout (its root folder)")
    p.add_argument("--data", default=str(ROOT / "bench_data"))
    p.add_argument("--count", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--pipelines", nargs="+", default=["streamseg_zarr", "streamseg_memmap"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    other = Path(args.against).resolve()
    if not (other / "benchmarks" / "compare.py").is_file() or not (other / "streamseg").is_dir():
        p.error(f"--against must be a streamseg checkout (with benchmarks/compare.py). Received: {other}")
    import compare
    from ab import paired_ratios, report

    data = compare.prepare_data(args.data, args.count)
    trees = {"this": None, "other": str(other)}
    rows = []
    for r in range(args.rounds):
        for name in (args.pipelines if r % 2 == 0 else args.pipelines[::-1]):
            for variant in (("this", "other") if r % 2 == 0 else ("other", "this")):
                spec = {"pipeline": name, "workers": args.workers, "step_ms": 0.0, "steps": args.steps,
                        "warmup": args.warmup, "batch_size": 32, "model": "simulated", "seed": 0, "size": 256,
                        "classes": 3, "data": data, "max_ram": None, "page_cache": "warm"}
                got = compare.run_one(spec, 300.0, tree=trees[variant])
                res = got.get("result", {})
                rows.append({"round": r, "pipeline": name, "variant": variant, "status": got["status"],
                             "samples_per_s": res.get("samples_per_s"), "step_ms_p95": res.get("step_ms_p95"),
                             "error": got.get("error")})
                print(json.dumps(rows[-1]), flush=True)
    summary = paired_ratios(rows, args.pipelines, lambda x: x["pipeline"], lambda x: x["variant"], "this", "other")
    report(args, rows, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
