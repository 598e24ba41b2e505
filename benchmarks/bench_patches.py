"""3D patches: ``PatchDataset`` against the nibabel ``PyDataset`` users write today (issue 13).

Usage::

    python benchmarks/bench_patches.py --batches 50 --gc-freeze --out benchmarks/results/patches.json
    python benchmarks/bench_patches.py --chunk-shape 64 64 64 --skip aug memory   # other chunks
    python benchmarks/bench_patches.py --quick          # smoke run: 4/8 cases of 96x96x64, ~1 min

Four measurements, in one run:

1. **Augmentation alone**: ``augment_patch`` (the same :class:`~streamseg.Augment` both loaders
   use) on window-normalised patches, one calling thread, in a child process: with OpenCV's
   default thread count and with ``cv2.setNumThreads(1)`` (the per-patch cost on one core).
2. **Throughput**, alternating rounds: per round, a fresh ``PatchDataset`` (``--layout
   volumes`` store, ``workers`` worker processes) and a fresh ``NiftiPatchBaseline``
   (``benchmarks/baseline_patches.py``: nibabel loads the whole ``.nii.gz`` per patch; the same
   window normalisation and ``augment_patch`` in its ``augment_fn``; ``workers`` processes,
   ``use_multiprocessing=True``) each run ONE whole epoch of ``--batches`` batches over the same
   ``--batches`` cases (``samples_per_volume=2``, batch 2), iterated through Keras's own
   adapter machinery: ``PatchDataset.get_numpy_iterator()`` (it is its own Keras data adapter)
   and ``PyDatasetAdapter(baseline).get_numpy_iterator()`` (Keras's ``OrderedEnqueuer`` and
   ``multiprocessing.Pool``, what ``model.fit`` uses).  The consumer does nothing with a batch.
   Patches/s over the whole epoch (pool start included) and after the first batch, per round.
3. **Bytes read per patch**: one ``PatchDataset`` in-process (``workers=0``), its store's
   ``read_stats`` (compressed bytes of chunk files read, voxels decoded; image and mask
   chunks both) per patch, against the patch's voxels and raw bytes.
4. **Memory against the number of cases**: for the small and the large store, a child process
   runs ``PatchDataset`` with ``workers`` processes for ``--memory-batches`` batches (whole
   epochs); a sampler thread reads ``/proc/PID/smaps_rollup`` and ``/proc/PID/status`` of the
   main process and of each worker every 0.2 s: peak and end-of-run RSS, USS, RssAnon, PSS.
   ``--gc-freeze`` adds a run of each with ``gc.freeze()`` before the workers are forked.

Data: synthetic CT-like cases (``write_synth_volumes``, int16 HU, labels 0..2) cached under
``--data``, each converted once with ``streamseg convert SRC DST --layout volumes`` (child).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = Path(__file__).resolve().parent
MIB = 1024 * 1024


# ---------------------------------------------------------------------------- data
def dataset(data: Path, count: int, shape: tuple[int, int, int], workers: int,
            chunk_shape: list[int] | None = None) -> tuple[Path, Path]:
    """``(nifti folder, volume store)`` of ``count`` synthetic cases, written/converted if missing."""
    from streamseg.io.synth_volumes import write_synth_volumes

    src = data / f"ct_{count}_{'x'.join(map(str, shape))}"
    tag = "" if chunk_shape is None else "_c" + "x".join(map(str, chunk_shape))
    dst = src.parent / (src.name + tag + ".volumes")
    extra = [] if chunk_shape is None else ["--chunk-shape", *map(str, chunk_shape)]
    if not (src / "dataset.json").exists():
        t0 = time.perf_counter()
        print(f"[data] writing {count} cases of {shape} to {src}", flush=True)
        write_synth_volumes(src, count, shape=shape, seed=0, progress=False)
        print(f"[data]   {time.perf_counter() - t0:.0f} s", flush=True)
    if not (dst / "manifest.json").exists():
        t0 = time.perf_counter()
        print(f"[data] converting {src} -> {dst} (--layout volumes)", flush=True)
        subprocess.run([sys.executable, "-m", "streamseg.cli", "convert", str(src), str(dst), "--layout", "volumes",
                        "--workers", str(workers), "--quiet", "--overwrite", *extra], check=True)
        print(f"[data]   {time.perf_counter() - t0:.0f} s", flush=True)
    return src, dst


def case_pairs(src: Path, count: int) -> list[tuple[Path, Path]]:
    return [(src / "imagesTr" / f"case_{i:03d}.nii.gz", src / "labelsTr" / f"case_{i:03d}.nii.gz")
            for i in range(count)]


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def warm_page_cache(*paths: Path) -> None:
    """Read every file once, so both loaders read from the page cache."""
    for root in paths:
        for f in root.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.read(1 << 24):
                        pass


# ------------------------------------------------------------------- shared config
def make_augment(cfg: dict[str, Any]) -> Any:
    from streamseg import Augment

    return Augment(**cfg)


class WindowAugment:
    """The baseline's ``augment_fn``: window normalisation, then ``augment_patch``, as PatchDataset does.

    ``PatchDataset(normalize="window")`` computes ``clip((x - lo) / (hi - lo), 0, 1)`` in float32,
    augments, and clips to ``[0, 1]`` again; so does this.
    """

    def __init__(self, aug_cfg: dict[str, Any], window: tuple[float, float]) -> None:
        self.aug = make_augment(aug_cfg)
        self.lo, self.scale = float(window[0]), 1.0 / (float(window[1]) - float(window[0]))

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        from streamseg.pipeline.augment3d import augment_patch

        x = np.empty((*image.shape, 1), np.float32)
        np.subtract(image, np.float32(self.lo), out=x[..., 0], casting="unsafe")
        x *= np.float32(self.scale)
        np.clip(x, 0.0, 1.0, out=x)
        x, m = augment_patch(self.aug, x, mask, rng)
        np.clip(x, 0.0, 1.0, out=x)
        return x[..., 0], m


def patch_dataset(store: Any, a: argparse.Namespace, *, workers: int, cases: Any = None, seed: int = 0) -> Any:
    from streamseg.pipeline.patches import PatchDataset

    return PatchDataset(store, batch_size=a.batch, patch_size=tuple(a.patch), samples_per_volume=2,
                        foreground_fraction=0.33, cases=cases, seed=seed, augment=make_augment(a.aug_cfg),
                        normalize="window", window=tuple(a.window), workers=workers,
                        use_multiprocessing=workers > 0)


# ------------------------------------------------------------------ augmentation
def aug_cost(store_path: str, a: argparse.Namespace, patches: int) -> dict[str, float]:
    """ms per patch of window normalisation + ``augment_patch`` alone (run in a child process)."""
    import cv2

    from streamseg import open_store

    store = open_store(store_path)
    fn = WindowAugment(a.aug_cfg, tuple(a.window))
    rng = np.random.default_rng(0)
    pats = []
    for i in range(min(4, len(store))):
        shape = np.array(store.shape(i))
        corner = rng.integers(0, np.maximum(shape - a.patch, 0) + 1)
        img, msk = store.read_box(i, corner, np.minimum(corner + a.patch, shape))
        pats.append((img[..., 0], msk))
    out: dict[str, float] = {"default_cv2_threads": float(cv2.getNumThreads())}
    for label, threads in (("default_threads", None), ("one_thread", 1)):
        if threads is not None:
            cv2.setNumThreads(threads)
        fn(*pats[0], np.random.default_rng(1))  # warm-up
        times = []
        for k in range(patches):
            img, msk = pats[k % len(pats)]
            t0 = time.perf_counter()
            fn(img, msk, np.random.default_rng([7, k]))
            times.append(time.perf_counter() - t0)
        out[f"{label}_ms_median"] = statistics.median(times) * 1e3
        out[f"{label}_ms_min"] = min(times) * 1e3
    t0 = time.perf_counter()  # the normalisation part alone (one thread)
    for k in range(patches):
        img = pats[k % len(pats)][0]
        x = (img.astype(np.float32) - np.float32(a.window[0])) * np.float32(1.0 / (a.window[1] - a.window[0]))
        np.clip(x, 0.0, 1.0, out=x)
    out["normalize_ms"] = (time.perf_counter() - t0) / patches * 1e3
    return out


# -------------------------------------------------------------------- throughput
def _iterate(it: Any, n_batches: int) -> tuple[float, float, int]:
    """(seconds to the last batch, seconds to the first batch, patches) over an iterator."""
    t0 = time.perf_counter()
    first, patches, seen = None, 0, 0
    for x, _y in it:
        patches += len(x)
        seen += 1
        if first is None:
            first = time.perf_counter() - t0
        if seen == n_batches:
            break
    return time.perf_counter() - t0, float(first or 0.0), patches


def _rates(wall: float, first: float, patches: int, batch: int) -> dict[str, float]:
    steady = (patches - batch) / (wall - first) if wall > first and patches > batch else float("nan")
    return {"wall_s": wall, "first_batch_s": first, "patches": patches, "patches_per_s": patches / wall,
            "patches_per_s_after_first": steady}


def _workers(proc: Any) -> list[Any]:
    """Live descendants of ``proc`` that produce batches (not multiprocessing's resource tracker)."""
    import psutil

    out = []
    for c in proc.children(recursive=True):
        try:
            if c.status() == psutil.STATUS_ZOMBIE or "resource_tracker" in " ".join(c.cmdline()):
                continue
        except psutil.Error:
            continue
        out.append(c)
    return out


def _wait_children_gone(timeout: float = 30.0) -> None:
    """Wait until the last round's worker processes have exited (so they take no CPU from the next)."""
    import psutil

    me = psutil.Process()
    end = time.monotonic() + timeout
    while time.monotonic() < end and _workers(me):
        time.sleep(0.05)


def run_patchdataset(store_path: Path, a: argparse.Namespace, cases: np.ndarray, seed: int) -> dict[str, float]:
    ds = patch_dataset(store_path, a, workers=a.workers, cases=cases, seed=seed)
    try:
        n = len(ds)
        wall, first, patches = _iterate(ds.get_numpy_iterator(), n)
    finally:
        ds.close()
    return _rates(wall, first, patches, a.batch)


def run_baseline(pairs: list[tuple[Path, Path]], a: argparse.Namespace, seed: int) -> dict[str, float]:
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

    from baseline_patches import NiftiPatchBaseline

    ds = NiftiPatchBaseline(pairs, a.batch, tuple(a.patch), samples_per_volume=2, foreground_fraction=0.33,
                            augment_fn=WindowAugment(a.aug_cfg, tuple(a.window)), seed=seed,
                            workers=a.workers, use_multiprocessing=True)
    adapter = PyDatasetAdapter(ds, shuffle=False)
    n = len(ds)
    wall, first, patches = _iterate(adapter.get_numpy_iterator(), n)
    if adapter.enqueuer is not None:
        adapter.enqueuer.stop()
    return _rates(wall, first, patches, a.batch)


def throughput(src: Path, store: Path, count: int, a: argparse.Namespace) -> dict[str, Any]:
    pairs = case_pairs(src, count)
    rounds = []
    for r in range(a.rounds + 1):  # round 0: warm-up, not reported
        start = (r * a.batches) % count
        cases = np.array([(start + j) % count for j in range(a.batches)])
        order = ("patchdataset", "baseline") if r % 2 == 0 else ("baseline", "patchdataset")
        row: dict[str, Any] = {"round": r, "cases": [int(c) for c in cases], "order": list(order)}
        for name in order:
            if name == "patchdataset":
                row[name] = run_patchdataset(store, a, cases, seed=r)
            else:
                row[name] = run_baseline([pairs[c] for c in cases], a, seed=r)
            t0 = time.perf_counter()
            _wait_children_gone()
            row[name]["workers_exit_wait_s"] = time.perf_counter() - t0
        row["ratio"] = row["patchdataset"]["patches_per_s"] / row["baseline"]["patches_per_s"]
        row["ratio_after_first"] = (row["patchdataset"]["patches_per_s_after_first"]
                                    / row["baseline"]["patches_per_s_after_first"])
        tag = "warm-up" if r == 0 else f"round {r}"
        print(f"[rate] {tag}: PatchDataset {row['patchdataset']['patches_per_s']:.2f} patches/s "
              f"({row['patchdataset']['patches_per_s_after_first']:.2f} after the first batch), baseline "
              f"{row['baseline']['patches_per_s']:.2f} ({row['baseline']['patches_per_s_after_first']:.2f}): "
              f"{row['ratio']:.2f}x ({row['ratio_after_first']:.2f}x)", flush=True)
        rounds.append(row)
    measured = rounds[1:]

    def mmm(values: list[float]) -> dict[str, float]:
        return {"min": min(values), "median": statistics.median(values), "max": max(values)}

    summary = {k: mmm([r[k] for r in measured]) for k in ("ratio", "ratio_after_first")}
    for name in ("patchdataset", "baseline"):
        for k in ("patches_per_s", "patches_per_s_after_first"):
            summary[f"{name}_{k}"] = mmm([r[name][k] for r in measured])
    return {"rounds": rounds, "summary": summary}


# -------------------------------------------------------------------- bytes read
def bytes_per_patch(src: Path, store_path: Path, a: argparse.Namespace, batches: int) -> dict[str, Any]:
    from streamseg import open_store

    store = open_store(store_path)
    ds = patch_dataset(store, a, workers=0)
    n = 0
    for i in range(min(batches, len(ds))):
        n += len(ds[i][0])
    stats = dict(store.read_stats)
    ds.close()
    pv = int(np.prod(a.patch))
    img_b, msk_b = store.image_dtype.itemsize, store.mask_dtype.itemsize
    case_raw = int(np.prod(store.shape(0))) * (img_b + msk_b)
    nifti = sum(p.stat().st_size for p in case_pairs(src, 1)[0])
    from streamseg.store.volume_layout import case_dir

    chunks0 = du(case_dir(store_path, 0))
    out = {"patches": n, "read_stats": stats, "patch_voxels": pv, "patch_raw_bytes": pv * (img_b + msk_b),
           "bytes_read_per_patch": stats["bytes_read"] / n, "chunks_per_patch": stats["chunks"] / n,
           "voxels_decoded_per_patch": stats["voxels_decoded"] / n,
           "image_voxels_decoded_per_patch": stats["voxels_decoded"] / n / 2,
           "decoded_over_patch_voxels": stats["voxels_decoded"] / n / 2 / pv,
           "bytes_read_over_patch_raw": stats["bytes_read"] / n / (pv * (img_b + msk_b)),
           "case_raw_bytes": case_raw, "store_bytes_per_case": chunks0, "nifti_gz_bytes_per_case": nifti,
           "chunk_shape": list(store.chunk_shape)}
    print(f"[bytes] {n} patches of {tuple(a.patch)} ({pv / 1e6:.2f} M voxels, {pv * (img_b + msk_b) / MIB:.2f} MiB "
          f"raw image+mask): {out['chunks_per_patch']:.1f} chunks, {out['bytes_read_per_patch'] / MIB:.2f} MiB read "
          f"({out['bytes_read_over_patch_raw']:.2f}x the raw patch), "
          f"{out['image_voxels_decoded_per_patch'] / 1e6:.2f} M "
          f"image voxels decoded ({out['decoded_over_patch_voxels']:.2f}x the patch); the baseline reads "
          f"{nifti / MIB:.1f} MiB of .nii.gz and decodes {case_raw / (img_b + msk_b) / 1e6:.1f} M voxels x 2 per patch",
          flush=True)
    return out


# ------------------------------------------------------------------------ memory
def _proc_mem(pid: int) -> dict[str, int]:
    from streamseg.bench.memory import smaps_rollup

    r = smaps_rollup(pid)
    out = {"rss": r.get("Rss", 0), "pss": r.get("Pss", 0),
           "uss": r.get("Private_Clean", 0) + r.get("Private_Dirty", 0)}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    out["rss_anon"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def memory_child(store_path: str, a: argparse.Namespace, batches: int, gc_freeze: bool = False) -> dict[str, Any]:
    """Run in a fresh process: PatchDataset with process workers for ``batches`` batches.

    ``gc_freeze``: call ``gc.freeze()`` before the workers are forked (their first batch), so
    that a full garbage collection in a worker does not write to (and so copy) every page of
    the Python heap inherited from this process.
    """
    import gc

    import psutil

    me = psutil.Process()
    peaks: dict[str, int] = {}
    workers_seen: set[int] = set()
    stop = threading.Event()

    last: dict[str, int] = {}

    def sample() -> None:
        m = _proc_mem(me.pid)
        last.clear()
        for k, v in m.items():
            peaks[f"main_{k}"] = max(peaks.get(f"main_{k}", 0), v)
            last[f"main_{k}"] = v
        sums: dict[str, int] = {}
        for c in _workers(me):
            cm = _proc_mem(c.pid)
            if not cm["rss"]:
                continue
            workers_seen.add(c.pid)
            for k, v in cm.items():
                peaks[f"worker_max_{k}"] = max(peaks.get(f"worker_max_{k}", 0), v)
                last[f"worker_max_{k}"] = max(last.get(f"worker_max_{k}", 0), v)
                sums[k] = sums.get(k, 0) + v
        for k, v in sums.items():
            peaks[f"workers_sum_{k}"] = max(peaks.get(f"workers_sum_{k}", 0), v)
            last[f"workers_sum_{k}"] = v
        tree = m["pss"] + sums.get("pss", 0)  # PSS of main + workers: the tree's own footprint
        peaks["tree_pss"] = max(peaks.get("tree_pss", 0), tree)
        last["tree_pss"] = tree

    def loop() -> None:
        while not stop.wait(0.2):
            sample()

    sample()
    base = dict(peaks)
    th = threading.Thread(target=loop, daemon=True)
    th.start()
    ds = patch_dataset(store_path, a, workers=a.workers)
    if gc_freeze:
        gc.freeze()
    t0 = time.perf_counter()
    done = epochs = 0
    while done < batches:
        for _x, _y in ds.get_numpy_iterator():
            done += 1
            if done % 10 == 0:
                sample()
        ds.on_epoch_end()
        epochs += 1
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    sample()
    end = dict(last)
    ds.close()
    import resource

    return {"cases": len(ds.store), "gc_freeze": gc_freeze, "batches": done, "epochs": epochs, "wall_s": wall,
            "patches_per_s": done * a.batch / wall, "workers_seen": len(workers_seen),
            "peak_mib": {k: v / MIB for k, v in sorted(peaks.items())},
            "before_dataset_mib": {k: v / MIB for k, v in sorted(base.items())},
            "end_mib": {k: v / MIB for k, v in sorted(end.items())},
            "main_ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _child(fn: str, *args: Any) -> Any:
    """Run ``fn(*args)`` of this module in a fresh Python process; return its JSON result."""
    code = (f"import sys, json, argparse; sys.path.insert(0, {str(HERE)!r}); import bench_patches as b; "
            f"args = json.loads(sys.argv[1]); args[1] = argparse.Namespace(**args[1]); "
            f"print('@@' + json.dumps(b.{fn}(*args)))")
    enc = [vars(x) if isinstance(x, argparse.Namespace) else x for x in args]
    out = subprocess.run([sys.executable, "-c", code, json.dumps(enc)], check=True, capture_output=True, text=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("@@")][-1]
    return json.loads(line[2:])


# -------------------------------------------------------------------------- main
def machine() -> dict[str, Any]:
    import psutil

    return {"nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "ram_gib": psutil.virtual_memory().total / 2**30, "python": platform.python_version(),
            "platform": platform.platform(), "load_avg_start": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 cases of 96x96x64, small patches, 4 batches")
    ap.add_argument("--counts", type=int, nargs=2, default=[10, 100], metavar=("SMALL", "LARGE"),
                    help="cases of the two stores of the memory check; the large one is used for throughput")
    ap.add_argument("--shape", type=int, nargs=3, default=[256, 256, 128])
    ap.add_argument("--patch", type=int, nargs=3, default=[128, 128, 64])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--batches", type=int, default=50, help="batches per throughput round (one epoch of as many cases)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--window", type=float, nargs=2, default=[-175.0, 250.0])
    ap.add_argument("--memory-batches", type=int, default=100)
    ap.add_argument("--bytes-batches", type=int, default=25)
    ap.add_argument("--aug-patches", type=int, default=30)
    ap.add_argument("--chunk-shape", type=int, nargs=3, default=None,
                    help="convert with --chunk-shape (default: the converter's, 32 32 32)")
    ap.add_argument("--gc-freeze", action="store_true",
                    help="memory check: also run each store with gc.freeze() before the workers start")
    ap.add_argument("--data", default="bench_data/patches")
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip", nargs="*", default=[], choices=["aug", "rate", "bytes", "memory"])
    a = ap.parse_args()
    if a.quick:
        a.counts, a.shape, a.patch = [4, 8], [96, 96, 64], [64, 64, 32]
        a.batches, a.rounds, a.memory_batches, a.bytes_batches, a.aug_patches = 4, 3, 10, 5, 5
    a.aug_cfg = {"hflip": 0.5, "vflip": 0.5, "dflip": 0.5, "rotate": 10.0, "scale": [0.9, 1.1]}
    shape = tuple(a.shape)
    sys.path.insert(0, str(HERE))
    results: dict[str, Any] = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                               "config": {k: v for k, v in vars(a).items() if k not in ("out",)},
                               "machine": machine()}
    print(f"[info] {results['machine']}", flush=True)
    data = Path(a.data)
    small, large = a.counts
    src_l, store_l = dataset(data, large, shape, a.workers, a.chunk_shape)
    src_s, store_s = dataset(data, small, shape, a.workers, a.chunk_shape)
    results["data"] = {"large": {"cases": large, "nifti_bytes": du(src_l), "store_bytes": du(store_l),
                                 "src": str(src_l), "store": str(store_l)},
                       "small": {"cases": small, "nifti_bytes": du(src_s), "store_bytes": du(store_s),
                                 "src": str(src_s), "store": str(store_s)}}
    warm_page_cache(src_l, store_l)

    if "aug" not in a.skip:
        results["augment"] = _child("aug_cost", str(store_l), a, a.aug_patches)
        au = results["augment"]
        print(f"[aug] window + augment_patch per {tuple(a.patch)} patch, one calling thread: "
              f"{au['default_threads_ms_median']:.1f} ms (cv2 threads {au['default_cv2_threads']:.0f}), "
              f"{au['one_thread_ms_median']:.1f} ms with cv2.setNumThreads(1) -> at most "
              f"{1e3 / au['one_thread_ms_median'] * min(a.workers, os.cpu_count() or 1):.1f} patches/s on "
              f"{min(a.workers, os.cpu_count() or 1)} cores for augmentation alone "
              f"(normalisation {au['normalize_ms']:.1f} ms)", flush=True)
    if "rate" not in a.skip:
        results["throughput"] = throughput(src_l, store_l, large, a)
        s = results["throughput"]["summary"]
        print(f"[rate] ratio over {a.rounds} rounds: min {s['ratio']['min']:.2f}x, median {s['ratio']['median']:.2f}x, "
              f"max {s['ratio']['max']:.2f}x (after the first batch: {s['ratio_after_first']['median']:.2f}x median)",
              flush=True)
    if "bytes" not in a.skip:
        results["bytes"] = bytes_per_patch(src_l, store_l, a, a.bytes_batches)
    if "memory" not in a.skip:
        results["memory"] = {}
        runs = [("small", store_s, False), ("large", store_l, False)]
        if a.gc_freeze:
            runs += [("small_gc_freeze", store_s, True), ("large_gc_freeze", store_l, True)]
        for label, st, freeze in runs:
            m = results["memory"][label] = _child("memory_child", str(st), a, a.memory_batches, freeze)
            p = m["peak_mib"]
            p, e = m["peak_mib"], m["end_mib"]
            print(f"[memory{' gc.freeze()' if freeze else ''}] {m['cases']} cases, {m['batches']} batches "
                  f"({m['epochs']} epochs, {m['patches_per_s']:.1f} patches/s), peak (end) MiB: main RSS "
                  f"{p['main_rss']:.0f} ({e['main_rss']:.0f}), USS {p['main_uss']:.0f} ({e['main_uss']:.0f}), RssAnon "
                  f"{p['main_rss_anon']:.0f} ({e['main_rss_anon']:.0f}); per worker (max of {m['workers_seen']}) RSS "
                  f"{p.get('worker_max_rss', 0):.0f} ({e.get('worker_max_rss', 0):.0f}), USS "
                  f"{p.get('worker_max_uss', 0):.0f} ({e.get('worker_max_uss', 0):.0f}), RssAnon "
                  f"{p.get('worker_max_rss_anon', 0):.0f}; workers' USS summed {p.get('workers_sum_uss', 0):.0f} "
                  f"({e.get('workers_sum_uss', 0):.0f}); PSS of main + workers {p['tree_pss']:.0f} "
                  f"({e['tree_pss']:.0f})", flush=True)
    results["machine"]["load_avg_end"] = os.getloadavg()
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(results, indent=1))
        print(f"[out] {a.out}")


if __name__ == "__main__":
    main()
