"""Input stall when the consumer asks for a given share of the measured pipeline capacity.

Usage::

    python benchmarks/stall.py STORE --workers 2 --share 0.8 --steps 200 --out benchmarks/results/stall.json

First ``streamseg bench --step-ms 0`` measures the pipeline's capacity (batches/s); then the
simulated accelerator is set to spend ``1 / (share * capacity)`` per batch, so it asks for
``share`` of that capacity, and the stall fraction of that run is reported: ``stall`` against
the same loop fed from memory (``floor_s``), ``overhead`` against the bare simulated compute.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(store: str, step_ms: float, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "streamseg.cli", "bench", store, "--step-ms", f"{step_ms:.3f}",
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--workers", str(args.workers),
               "--augment", args.augment, "--worker-priority", args.worker_priority, "--json", str(out)]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--share", type=float, nargs="+", default=[0.8])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--augment", default="standard")
    ap.add_argument("--worker-priority", default="normal", choices=["normal", "low", "idle"])
    ap.add_argument("--repeat", type=int, default=1, help="runs per share (each with its own floor)")
    ap.add_argument("--out", default="benchmarks/results/stall.json")
    args = ap.parse_args()
    capacity = bench(args.store, 0.0, args)
    rows = [{"share": 0.0, "step_ms": 0.0, "batches_per_s": capacity["batches_per_s"],
             "samples_per_s": capacity["samples_per_s"], "stall": None}]
    for share in [s for s in args.share for _ in range(args.repeat)]:
        step_ms = 1000.0 / (share * capacity["batches_per_s"])
        r = bench(args.store, step_ms, args)
        rows.append({"share": share, "step_ms": step_ms, "batches_per_s": r["batches_per_s"],
                     "samples_per_s": r["samples_per_s"], "stall": r["stall_fraction"],
                     "overhead": r["overhead_fraction"], "floor_s": r["floor_s"], "wall_s": r["wall_s"],
                     "step_ms_p50": r["step_ms_p50"], "step_ms_p95": r["step_ms_p95"]})
    for row in rows:
        print(json.dumps(row))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
