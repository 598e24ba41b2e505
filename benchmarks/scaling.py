"""Main-process private memory and samples/s against dataset size (1, 4, 16 GB raw).

Usage::

    python benchmarks/scaling.py --stores bench_data/scale_4096.memmap bench_data/scale_16384.memmap \
        bench_data/scale_65536.memmap --steps 200 --out benchmarks/results/scaling.json

Each store is measured by ``streamseg bench`` in a fresh process with the same options
(simulated accelerator, batch 32, 'standard' augmentation, 2 worker processes); the last
store may be run under ``--memory-cap`` too.  Stores are made with
``streamseg synth DST --to memmap --count N --size 256 256 --workers 2``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(store: str, args: argparse.Namespace, cap: str | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "streamseg.cli", "bench", store, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--step-ms", str(args.step_ms), "--workers", str(args.workers),
               "--augment", args.augment, "--json", str(out)]
        if cap:
            cmd += ["--memory-cap", cap]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            return {"store": store, "error": proc.stderr.strip().splitlines()[-3:]}
        return json.loads(out.read_text())


def row(result: dict) -> dict:
    if "error" in result:
        return result
    mem = result["memory"]
    return {"store": result["store"]["path"], "raw_gib": result["store"]["raw_bytes"] / 2**30,
            "samples_per_s": result["samples_per_s"], "stall": result["stall_fraction"],
            "main_uss_mib": mem["main_uss"] / 2**20, "main_rss_anon_mib": mem["main_rss_anon"] / 2**20,
            "main_rss_file_mib": mem["main_rss_file"] / 2**20, "workers_pss_mib": mem["workers_pss"] / 2**20,
            "tree_anon_pss_mib": mem["tree_anon_pss"] / 2**20, "steps_run": result.get("steps"),
            "memory_cap": result.get("memory_cap")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stores", nargs="+", required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--step-ms", type=float, default=20.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--augment", default="standard")
    ap.add_argument("--cap-last", default=None, help="also run the last store under this memory cap, e.g. 4G")
    ap.add_argument("--out", default="benchmarks/results/scaling.json")
    args = ap.parse_args()
    rows = [row(bench(s, args)) for s in args.stores]
    if args.cap_last:
        rows.append({**row(bench(args.stores[-1], args, cap=args.cap_last)), "cap": args.cap_last})
    for r in rows:
        print(json.dumps(r))
    ok = [r for r in rows if "error" not in r and not r.get("cap")]
    if len(ok) >= 2:
        lo, hi = ok[0], ok[-1]
        for key in ("main_rss_anon_mib", "main_uss_mib", "tree_anon_pss_mib"):
            print(f"{key} {hi['raw_gib']:.0f} GiB vs {lo['raw_gib']:.0f} GiB: "
                  f"{(hi[key] / lo[key] - 1) * 100:+.1f}%")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        x = [r["raw_gib"] for r in ok]
        for key, label in (("main_uss_mib", "main USS"), ("main_rss_anon_mib", "main RssAnon"),
                           ("tree_anon_pss_mib", "all processes: anonymous + shm PSS"),
                           ("main_rss_file_mib", "main RssFile (page cache, reclaimable)"),
                           ("workers_pss_mib", "workers PSS (incl. mapped file pages)")):
            ax.plot(x, [r[key] for r in ok], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("dataset size (GiB, raw)")
        ax.set_yscale("log")
        ax.set_ylabel("MiB (log scale)")
        ax.set_title("Memory vs dataset size (streamseg, memmap, 2 workers)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(Path(args.out).with_suffix(".png"), dpi=110)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
