"""Conversion throughput (pairs/s) at 1 and 2 workers, and peak memory for 1k vs 10k pairs.

Usage::

    python benchmarks/bench_convert.py --data bench_data --counts 1000 10000 --workers 1 2 \
        --out benchmarks/results/convert.json

Each conversion runs ``streamseg convert`` in a fresh subprocess on 256x256 PNG pairs written by
``streamseg synth``; a sampler polls the process tree every 50 ms for RSS and USS (main process
and workers).  Ratios (2 workers / 1 worker, 10k / 1k peak) come from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def ensure_pngs(data: Path, count: int) -> Path:
    folder = data / f"png_{count}"
    if (folder / "images").is_dir() and len(os.listdir(folder / "images")) == count:
        return folder
    subprocess.run([sys.executable, "-m", "streamseg.cli", "synth", str(folder), "--count", str(count),
                    "--size", "256", "256", "--classes", "3", "--quiet"], check=True, cwd=ROOT)
    return folder


def run_convert(src: Path, dst: Path, workers: int) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    cmd = [sys.executable, "-m", "streamseg.cli", "convert", str(src), str(dst), "--workers", str(workers),
           "--quiet"]
    t0 = time.perf_counter()
    proc = psutil.Popen(cmd, cwd=ROOT)
    peak_main_rss = peak_main_uss = peak_tree_rss = peak_tree_uss = 0
    while proc.poll() is None:
        try:
            tree = [proc] + proc.children(recursive=True)
            infos = []
            for p in tree:
                try:
                    infos.append(p.memory_full_info())
                except psutil.Error:
                    infos.append(None)
            if infos[0] is not None:
                peak_main_rss = max(peak_main_rss, infos[0].rss)
                peak_main_uss = max(peak_main_uss, infos[0].uss)
            peak_tree_rss = max(peak_tree_rss, sum(i.rss for i in infos if i))
            peak_tree_uss = max(peak_tree_uss, sum(i.uss for i in infos if i))
        except psutil.Error:
            pass
        time.sleep(0.05)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"convert failed with {proc.returncode}: {' '.join(cmd)}")
    count = len(os.listdir(src / "images"))
    return {"count": count, "workers": workers, "seconds": elapsed, "pairs_per_s": count / elapsed,
            "peak_main_rss_mib": peak_main_rss / 2**20, "peak_main_uss_mib": peak_main_uss / 2**20,
            "peak_tree_rss_mib": peak_tree_rss / 2**20, "peak_tree_uss_mib": peak_tree_uss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="bench_data")
    ap.add_argument("--counts", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=1, help="runs per setting (best is kept)")
    ap.add_argument("--out", default="benchmarks/results/convert.json")
    args = ap.parse_args()
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    runs = []
    for count in args.counts:
        src = ensure_pngs(data, count)
        for workers in args.workers:
            best = None
            for _ in range(args.repeat):
                r = run_convert(src, data / f"conv_{count}_{workers}.zarr", workers)
                print(json.dumps(r), flush=True)
                best = r if best is None or r["pairs_per_s"] > best["pairs_per_s"] else best
            runs.append(best)
            shutil.rmtree(data / f"conv_{count}_{workers}.zarr", ignore_errors=True)
    by = {(r["count"], r["workers"]): r for r in runs}
    ratios = {}
    for count in args.counts:
        if (count, 1) in by and (count, 2) in by:
            ratios[f"speedup_2_vs_1_workers_{count}"] = by[(count, 2)]["pairs_per_s"] / by[(count, 1)]["pairs_per_s"]
    lo, hi = min(args.counts), max(args.counts)
    for w in args.workers:
        if (lo, w) in by and (hi, w) in by and lo != hi:
            ratios[f"peak_main_rss_{hi}_vs_{lo}_w{w}"] = by[(hi, w)]["peak_main_rss_mib"] / by[(lo, w)]["peak_main_rss_mib"]
            ratios[f"peak_tree_uss_{hi}_vs_{lo}_w{w}"] = by[(hi, w)]["peak_tree_uss_mib"] / by[(lo, w)]["peak_tree_uss_mib"]
    result = {"machine": {"cpus": os.cpu_count(), "ram_gib": psutil.virtual_memory().total / 2**30,
                          "python": platform.python_version(), "platform": platform.platform()},
              "runs": runs, "ratios": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(ratios, indent=1))


if __name__ == "__main__":
    main()
