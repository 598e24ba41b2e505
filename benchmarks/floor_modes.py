"""The cached-data loop of ``timeline.py`` (the stall's floor), run several times in one process,
with each run's CPU per step split by thread name: is a fast floor a faster schedule or the
same work done in less CPU time?

Usage::

    python benchmarks/floor_modes.py --runs 2 --processes 5 --out benchmarks/results/floor_modes.json

Each process (a fresh interpreter, ``--processes`` of them one after the other) runs
``timeline.floor_run`` (one cached batch, ``tf.data.Dataset.from_tensors``, the simulated
accelerator sleeping ``--step-ms`` per step) ``--runs`` times and prints per run: the median gap
between steps inside epochs, and per thread name (``/proc/self/task/*/comm``) the CPU time per
step, the time spent runnable but waiting for a core per step (``schedstat``) and the voluntary /
involuntary context switches per step.  The first run of a process also holds TensorFlow's start
(its ``python`` CPU is large); compare the later runs.  Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

__all__ = ["main", "thread_stats"]


def thread_stats() -> dict[str, tuple[str, int, int, int, int]]:
    """Per thread id: name, voluntary and involuntary switches, ns on a core, ns waiting for one."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            base = f"/proc/self/task/{tid}"
            name = Path(base, "comm").read_text().strip()
            switches = {line.split(":")[0]: int(line.split()[1])
                        for line in Path(base, "status").read_text().splitlines() if "ctxt_switches" in line}
            ran, waited, _ = map(int, Path(base, "schedstat").read_text().split())
        except OSError:  # a thread that ended meanwhile
            continue
        out[tid] = (name, switches["voluntary_ctxt_switches"], switches["nonvoluntary_ctxt_switches"], ran, waited)
    return out


def _child(store: str, runs: int, step_s: float) -> list[dict[str, Any]]:
    import timeline

    results = []
    for _ in range(runs):
        before = thread_stats()
        floor = timeline.floor_run(store, step_s=step_s, epochs=3, batch_size=32, dtype="float32")
        after = thread_stats()
        steps = len(floor["steps"])
        per_name: dict[str, list[float]] = {}
        for tid, (name, vol, invol, ran, waited) in after.items():
            _, vol0, invol0, ran0, waited0 = before.get(tid, (name, 0, 0, 0, 0))
            acc = per_name.setdefault(name, [0.0, 0.0, 0.0, 0.0])
            acc[0] += (ran - ran0) / 1e6 / steps
            acc[1] += (waited - waited0) / 1e6 / steps
            acc[2] += (vol - vol0) / steps
            acc[3] += (invol - invol0) / steps
        results.append({"gap_ms_median": timeline.analyse(floor, 4)["gap_ms_median"],
                        "per_thread_name": {name: {"cpu_ms_per_step": round(a[0], 3), "wait_ms_per_step": round(a[1], 3),
                                                   "voluntary_per_step": round(a[2], 2),
                                                   "involuntary_per_step": round(a[3], 2)}
                                            for name, a in per_name.items() if a[0] > 0.05}})
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT / "bench_data"))
    p.add_argument("--count", type=int, default=2048)
    p.add_argument("--runs", type=int, default=2, help="cached-loop runs per process")
    p.add_argument("--processes", type=int, default=5)
    p.add_argument("--step-ms", type=float, default=11.0)
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.runs, args.step_ms / 1e3)))
        return 0
    from compare import prepare_stores

    store = prepare_stores(args.data, args.count, formats=("zarr",))["zarr"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    processes = []
    for k in range(args.processes):
        done = subprocess.run([sys.executable, __file__, "--child", str(store), "--runs", str(args.runs),
                               "--step-ms", str(args.step_ms)], capture_output=True, text=True, env=env, check=True)
        runs = json.loads(done.stdout.strip().splitlines()[-1])
        processes.append(runs)
        for r, run in enumerate(runs):
            threads = ", ".join(f"{name} {v['cpu_ms_per_step']:.2f} ms (wait {v['wait_ms_per_step']:.2f})"
                                for name, v in sorted(run["per_thread_name"].items()))
            print(f"process {k} run {r}: median gap {run['gap_ms_median']:.2f} ms; CPU per step: {threads}")
    if args.out:
        Path(args.out).write_text(json.dumps({"step_ms": args.step_ms, "processes": processes}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
