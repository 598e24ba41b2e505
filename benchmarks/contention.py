"""What two busy cores cost the training loop itself: the scheduler or the neighbouring core?

``timeline.py --beside-load`` showed that the Keras loop on cached data (no input at all) waits
2.9-4.5% longer between steps beside two CPU-burning processes as busy as the workers.  Two
explanations predict different things: if the cost is *the scheduler* (the loop's threads wait for
a core a hog holds), a hog kept off the loop's core costs nothing; if it is *the hardware* (a busy
neighbour core slowing this one: shared caches, memory bandwidth, the hypervisor's SMT siblings),
it costs the loop even there.  Each round runs timeline.py's cached-data loop (``floor_run``, the
simulated accelerator sleeping ``--step-ms`` per step) in five settings, order reversed every
other round:

- ``quiet``: no hog, the loop on all cores;
- ``hogs``: as many hogs as cores, each busy ``--duty`` of the time (timeline.py's ``beside_hogs``);
- ``pinned_quiet``: no hog, the loop's process confined to CPU 0;
- ``pinned_hog_full``: the loop on CPU 0, one hog on CPU 1 busy all the time;
- ``pinned_hog_duty``: the loop on CPU 0, one hog on CPU 1 busy ``--duty`` of the time.

Reported per run: the share of the wall time spent in the gaps between steps of an epoch
(``inner_gap_share``), the median and 95th-percentile gap, the loop's CPU per step and the VM's
steal share.  Linux only (``sched_setaffinity``), 2 or more cores.

Usage::

    python benchmarks/contention.py --rounds 3 --out benchmarks/results/contention_s14.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import timeline  # noqa: E402  (benchmarks/ on the path first)

__all__ = ["CASES", "main", "run_case", "summarise"]
CASES = ("quiet", "hogs", "pinned_quiet", "pinned_hog_full", "pinned_hog_duty")


def run_case(case: str, store: str, *, duty: float, step_s: float, epochs: int, warmup: int) -> dict[str, Any]:
    """One cached-data fit in setting ``case``; return its gap figures."""
    common = dict(step_s=step_s, epochs=epochs, batch_size=32, dtype="float32")
    every = os.sched_getaffinity(0)
    if case.startswith("pinned"):
        os.sched_setaffinity(0, {0})  # threads TensorFlow starts later inherit it
    try:
        if case in ("quiet", "pinned_quiet"):
            tl = timeline.floor_run(store, **common)
        elif case == "hogs":
            tl = timeline.beside_hogs(len(every), duty, timeline.floor_run, store, **common)
        else:
            tl = timeline.beside_hogs(1, 1.0 if case == "pinned_hog_full" else duty, timeline.floor_run, store,
                                      cpus=[1], **common)
    finally:
        os.sched_setaffinity(0, every)
    a = timeline.analyse(tl, warmup)
    return {"case": case, "inner_gap_share": a["gap_s_inner_total"] / a["wall_s"],
            "gap_ms_median": a["gap_ms_median"], "gap_ms_p95": a["gap_ms_p95"],
            "main_cpu_ms_per_step": a["main_cpu_ms_per_step"], "steal_share": a["steal_share"]}


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per case: min/median/max of the inner gap share and of the 95th-percentile gap."""
    out: dict[str, dict[str, list[float]]] = {}
    for case in CASES:
        got = [r for r in rows if r["case"] == case]
        if got:
            share = [r["inner_gap_share"] for r in got]
            p95 = [r["gap_ms_p95"] for r in got]
            out[case] = {"inner_gap_share": [min(share), statistics.median(share), max(share)],
                         "gap_ms_p95": [min(p95), statistics.median(p95), max(p95)]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT / "bench_data"))
    p.add_argument("--count", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duty", type=float, default=0.55, help="share of the time each hog burns (workers: 50-60%%)")
    p.add_argument("--step-ms", type=float, default=18.0, help="simulated step (80%% of capacity: 16-20 ms)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        print("contention.py needs Linux and 2 or more usable cores", file=sys.stderr)
        return 2
    from compare import prepare_stores

    store = prepare_stores(args.data, args.count, formats=("memmap",))["memmap"]
    rows = []
    for r in range(args.rounds):
        for case in (CASES if r % 2 == 0 else CASES[::-1]):
            rows.append({"round": r, **run_case(case, store, duty=args.duty, step_s=args.step_ms / 1e3,
                                                epochs=args.epochs, warmup=args.warmup)})
            print(json.dumps(rows[-1]), flush=True)
    summary = summarise(rows)
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "runs": rows, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
