"""Volume conversion: throughput and peak memory against the number of cases, and the cost of a
batch of slices from the store against reading the same slices from ``.nii.gz`` per batch.

Usage::

    python benchmarks/bench_volumes.py --counts 20 200 --shape 256 256 128 \
        --out benchmarks/results/volumes.json

For each count, a synthetic CT-like NIfTI set (``write_synth_volumes``, cached in ``--data``) is
converted by ``streamseg convert`` in a child process (``--layout slices``, axial, 2 workers);
wall time, cases/s, raw MB/s and the children's peak RSS (``ru_maxrss`` of the convert process
and its workers, the largest of them) are printed.  Then batches of ``--batch`` random slices
are read from the largest store (``Store.read``) and, as a user without a store would, by
loading each needed case's ``.nii.gz`` with nibabel and slicing it (the cases a batch touches
are loaded once per batch); the median per-batch times of both are printed with their ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _convert(src: Path, dst: Path, workers: int, layout: str = "slices") -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "streamseg.cli", "convert", str(src), str(dst), "--overwrite",
                    "--workers", str(workers), "--layout", layout, "--quiet"], check=True)
    wall = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"wall_s": wall, "children_peak_rss_mib": max(peak_kib, before) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[20, 200])
    ap.add_argument("--shape", type=int, nargs=3, default=[256, 256, 128])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--data", default="bench_data")
    ap.add_argument("--out", default=None)
    ap.add_argument("--layout", choices=["slices", "volumes"], default="slices",
                    help="store layout; with volumes only conversion is measured (bench_patches.py reads them)")
    args = ap.parse_args()

    import nibabel as nib

    from streamseg import open_store
    from streamseg.io.synth_volumes import write_synth_volumes

    shape = tuple(args.shape)
    results: dict = {"shape": list(shape), "runs": []}
    for count in args.counts:
        src = Path(args.data) / f"ct_{count}_{'x'.join(map(str, shape))}"
        if not (src / "dataset.json").exists():
            print(f"[data] writing {count} cases of {shape} to {src}", flush=True)
            write_synth_volumes(src, count, shape=shape, progress=False)
        dst = src.with_suffix(".zarr") if args.layout == "slices" else src.with_suffix(".layout-volumes.zarr")
        # a fresh child per count: RUSAGE_CHILDREN's maximum would otherwise carry over
        code = ("import sys; sys.path.insert(0, %r); import bench_volumes as b; import json; from pathlib import Path; "
                "print(json.dumps(b._convert(Path(%r), Path(%r), %d, %r)))"
                % (str(Path(__file__).parent), str(src), str(dst), args.workers, args.layout))
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
        run = json.loads(out.stdout.strip().splitlines()[-1])
        raw_mb = count * int(np.prod(shape)) * 2 / 1e6  # int16 images
        run.update(count=count, cases_per_s=count / run["wall_s"], raw_mb_per_s=raw_mb / run["wall_s"])
        results["runs"].append(run)
        print(f"{count:5d} cases: {run['wall_s']:.1f} s, {run['cases_per_s']:.2f} cases/s, "
              f"{run['raw_mb_per_s']:.1f} MB/s raw, peak RSS (largest process) {run['children_peak_rss_mib']:.0f} MiB",
              flush=True)

    if args.layout == "volumes":
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
        return
    store = open_store(dst)
    names = store.names
    rng = np.random.default_rng(0)
    t_store, t_nifti = [], []
    for _ in range(args.batches):
        idx = np.sort(rng.choice(len(store), args.batch, replace=False))
        t0 = time.perf_counter()
        store.read(idx)
        t_store.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        by_case: dict[str, list[int]] = {}
        for i in idx:
            case, z = names[i].rsplit(":", 1)
            by_case.setdefault(case, []).append(int(z))
        for case, zs in by_case.items():
            vol = np.asanyarray(nib.as_closest_canonical(nib.load(src / "imagesTr" / f"{case}.nii.gz")).dataobj)
            lab = np.asanyarray(nib.as_closest_canonical(nib.load(src / "labelsTr" / f"{case}.nii.gz")).dataobj)
            _ = [(vol[:, :, z].copy(), lab[:, :, z].copy()) for z in zs]
        t_nifti.append(time.perf_counter() - t0)
    ms_store, ms_nifti = statistics.median(t_store) * 1e3, statistics.median(t_nifti) * 1e3
    results["batch"] = {"size": args.batch, "store_ms": ms_store, "nifti_gz_ms": ms_nifti,
                        "ratio": ms_nifti / ms_store, "min_store_ms": min(t_store) * 1e3,
                        "max_store_ms": max(t_store) * 1e3, "min_nifti_ms": min(t_nifti) * 1e3,
                        "max_nifti_ms": max(t_nifti) * 1e3}
    print(f"batch of {args.batch} random slices: store {ms_store:.1f} ms (median), .nii.gz per batch "
          f"{ms_nifti:.0f} ms: {ms_nifti / ms_store:.0f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
