"""One-run comparison of streamseg with the input pipelines users would otherwise write.

Makes the synthetic data once (256x256x3 uint8 images with 1-channel masks, as zarr and memmap
stores plus PNG TFRecord shards, cached under ``--data``), then runs every pipeline of
:mod:`peers` at each worker count and consumer speed, one after the other, each in a FRESH
subprocess (so memory peaks are per pipeline), all through the same harness
(:func:`streamseg.bench.measure.measure_fit`, by default the simulated accelerator).  Failures
(exceptions, time-outs, out-of-memory kills) and skips are recorded, not raised.

Usage::

    python benchmarks/compare.py --out benchmarks/results/compare.json --count 1024 \\
        --workers 1 2 --steps 40 --step-ms 0 40 --rounds 3
    python benchmarks/compare.py --count 512 --smoke   # shapes/dtypes of every pipeline, no timing

With ``--rounds R`` every pipeline runs R times, round after round, the order reversed in every
other round, so that drift (thermal, other load) falls on all pipelines alike.  Beside each
rate stands the pipeline's per-sample augmentation cost (its own augmentation + scaling alone,
one thread, on samples in RAM; measured once, in a fresh process: :func:`augment_costs`).
Each run starts on a warm page cache: the child reads the store its pipeline reads before
building it (``--page-cache warm``, :mod:`pagecache`; ``cold`` drops it instead).

Writes the JSON (every field of every run), a Markdown table (``.md``) and a plot of samples/s
against workers (``.png``) side by side, and prints the table.  Ratios are against the best
peer (pipelines 1-4 of :mod:`peers`) at the same workers and consumer speed, and against the
plain zarr ``PyDataset`` baseline, within the same round.  The summary names, per streamseg
backend row (pipeline, workers, consumer speed), the best peer (highest median over rounds) and
the best peer on the same backend, with the ratio streamseg / that peer (same round) as
min/median/max over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

__all__ = ["prepare_stores", "prepare_data", "augment_costs", "smoke", "run_one", "summarise", "summary_rows",
           "main"]

from compare_report import (augment_kind, markdown_table, plot, run_table, summarise,  # noqa: E402
                            summary_rows, summary_table, text_table)


def prepare_stores(data_dir: str | os.PathLike, count: int, size: int = 256, classes: int = 3, seed: int = 0,
                   formats: tuple[str, ...] = ("zarr", "memmap")) -> dict[str, str]:
    """Synthetic zarr and/or memmap stores under ``data_dir``, reused when already there.

    Call before importing TensorFlow: the conversion forks worker processes.
    """
    from streamseg import open_store
    from streamseg.store.converter import convert_source
    from streamseg.io.sources import SynthSource

    base = Path(data_dir) / f"synth_n{count}_{size}px_c{classes}_seed{seed}"
    paths = {"dir": str(base)}
    for fmt in formats:
        path = base / f"store.{fmt}"
        try:
            ok = len(open_store(path)) == count
        except Exception:
            ok = False
        if not ok:
            print(f"[data] writing {count} synthetic {size}x{size} pairs to {path}", flush=True)
            convert_source(SynthSource(count, size=(size, size), classes=classes, seed=seed), path, format=fmt,
                           workers=min(2, os.cpu_count() or 1), overwrite=True, progress=False)
        paths[fmt] = str(path)
    return paths


def prepare_data(data_dir: str | os.PathLike, count: int, size: int = 256, classes: int = 3, seed: int = 0,
                 shards: int = 8) -> dict[str, str]:
    """Synthetic zarr + memmap stores and TFRecord shards, reused when already there.

    Call before importing TensorFlow: the conversion forks worker processes.
    """
    paths = prepare_stores(data_dir, count, size, classes, seed)
    base = Path(paths["dir"])
    import peers  # imports TensorFlow

    tfrecord = base / "tfrecord"
    if not (tfrecord / "_complete").exists():
        print(f"[data] writing {shards} PNG TFRecord shards to {tfrecord}", flush=True)
    peers.write_tfrecords(paths["memmap"], tfrecord, shards)
    paths["tfrecord"] = str(tfrecord)
    return paths


def augment_costs(memmap_store: str | os.PathLike, samples: int = 64, seed: int = 0) -> dict[str, float]:
    """Milliseconds per sample of each augmentation code alone, one thread, samples in RAM.

    ``cv2``: :func:`peers.cv2_standard_augment` (every OpenCV peer); ``streamseg``:
    ``Augment.preset("standard")`` through :func:`streamseg.pipeline.fused.augment_into` into a
    float32 slot (what BatchProducer runs per uint8 sample); ``streamseg_uint8``: the same into a
    uint8 slot (``dtype="uint8"``); ``legacy``: the seed article's per-sample transform
    (``SeedArticleSequence.__getitem__``, from arrays in RAM); ``tf``: the TFRecord peer's
    ``_tf_augment`` in a one-thread tf.data map (tf.data's per-element cost included).  Each is
    run once before it is timed, then the fastest of 5 timed passes counts.  Sets OpenCV to one thread for good: call in a fresh process.
    """
    import cv2
    import numpy as np

    cv2.setNumThreads(1)
    import peers
    import tensorflow as tf
    from streamseg.pipeline.augment import Augment
    from streamseg.pipeline.batches import sample_rng
    from streamseg.pipeline.fused import augment_into

    base = Path(memmap_store)
    images = np.array(np.load(base / "images.npy", mmap_mode="r")[:samples])
    masks = np.array(np.load(base / "masks.npy", mmap_mode="r")[:samples])
    n = len(images)

    def per_sample(fn: Any, count: int = n, repeats: int = 5) -> float:
        fn()
        best = float("inf")
        for _ in range(repeats):  # the fastest of several passes: this machine is shared
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best / count * 1e3

    def run_cv2() -> None:
        for i in range(n):
            peers.cv2_standard_augment(images[i], masks[i], np.random.default_rng([seed, 0, i]))

    aug = Augment.preset("standard")
    dst = np.empty(images.shape[1:], np.float32)
    offset, scale = np.zeros(1, np.float32), np.full(1, 1.0 / 255.0, np.float32)

    dst8 = np.empty(images.shape[1:], np.uint8)

    def run_streamseg(out: np.ndarray = dst) -> None:
        for i in range(n):
            augment_into(aug, images[i], masks[i], sample_rng(seed, 0, i), out, offset, scale, 255.0)

    seq = peers.SeedArticleSequence(images, masks, batch_size=min(32, n), seed=seed)

    def run_legacy() -> None:
        for b in range(len(seq)):
            seq[b]

    ds = tf.data.Dataset.from_tensor_slices((images, masks, np.arange(n, dtype=np.int64)))
    ds = peers._threading(ds.map(lambda x, y, k: peers._tf_augment(x, y, tf.stack([k, tf.constant(seed, tf.int64)]))),
                          1)

    def run_tf() -> None:
        for _ in ds:
            pass

    return {"cv2": per_sample(run_cv2), "streamseg": per_sample(run_streamseg),
            "streamseg_uint8": per_sample(lambda: run_streamseg(dst8)), "tf": per_sample(run_tf),
            "legacy": per_sample(run_legacy, len(seq) * seq.batch_size)}


def smoke(data: dict[str, str], names: tuple[str, ...], batch_size: int, classes: int, workers: int = 2) -> int:
    """Build every pipeline of ``names``, read two batches in-process, check shapes, dtypes and ranges."""
    import numpy as np
    import peers

    bad = []
    for name in names:
        try:
            ds = peers.build_pipeline(name, data, workers=workers, batch_size=batch_size)
        except peers.PipelineSkipped as exc:
            print(f"[smoke] {name:26s} skipped: {exc}")
            continue
        try:
            batches = list(ds.take(2).as_numpy_iterator()) if hasattr(ds, "as_numpy_iterator") \
                else [ds[0], ds[1]]
        finally:
            if hasattr(ds, "close"):
                ds.close()
        problems = []
        u8 = name.endswith("_uint8")  # images 0..255 and labels as uint8: the model normalises
        for x, y in batches:
            if x.ndim != 4 or x.shape[0] != batch_size or x.shape[-1] != 3 or x.dtype != (np.uint8 if u8 else np.float32):
                problems.append(f"images {x.shape} {x.dtype}")
            elif not u8 and not (0.0 <= float(x.min()) and float(x.max()) <= 1.0):
                problems.append(f"images outside [0, 1]: {float(x.min())}..{float(x.max())}")
            if y.shape != x.shape[:3] + (1,) or y.dtype != (np.uint8 if u8 else np.int32):
                problems.append(f"masks {y.shape} {y.dtype}")
            elif not (0 <= int(y.min()) and int(y.max()) < classes):
                problems.append(f"labels outside [0, {classes}): {int(y.min())}..{int(y.max())}")
        x, y = batches[0]
        print(f"[smoke] {name:26s} {'ok ' if not problems else 'BAD'} images {x.shape} {x.dtype} "
              f"[{float(x.min()):.2f}, {float(x.max()):.2f}]  masks {y.shape} {y.dtype} labels "
              f"{sorted(int(v) for v in np.unique(y))}" + "".join(f"\n    {m}" for m in problems), flush=True)
        bad += [name] if problems else []
    print(f"[smoke] {len(names) - len(bad)} of {len(names)} pipelines ok" + (f"; bad: {bad}" if bad else ""))
    return 1 if bad else 0


def _page_cache(spec: dict[str, Any]) -> dict[str, Any]:
    """Warm (default) or evict the store the pipeline reads, just before it is built (:mod:`pagecache`)."""
    import pagecache
    import peers

    policy = spec.get("page_cache", "warm")
    backend = peers.BACKENDS[spec["pipeline"]]
    paths = [spec["data"]["memmap" if backend == "ram" else backend]]
    if policy == "as-is":
        return {"policy": policy}
    return {"policy": policy, **(pagecache.warm(paths) if policy == "warm" else pagecache.evict(paths))}


def _child(spec: dict[str, Any]) -> int:
    """Measure one pipeline in this (fresh) process; write the outcome to ``spec['out']``."""
    import faulthandler

    faulthandler.dump_traceback_later(max(5.0, spec["timeout"] - 10.0), exit=False)  # a hang leaves stacks
    import peers
    from streamseg.bench.measure import measure_fit

    out: dict[str, Any] = {"status": "ok"}
    ds = None
    try:
        if spec.get("kind") == "augment_costs":
            out["result"] = augment_costs(spec["data"]["memmap"], seed=spec["seed"])
            raise StopIteration
        out["page_cache"] = _page_cache(spec)
        t0 = time.perf_counter()
        ds = peers.build_pipeline(spec["pipeline"], spec["data"], workers=spec["workers"],
                                  batch_size=spec["batch_size"], seed=spec["seed"], max_ram=spec.get("max_ram"))
        out["build_s"] = time.perf_counter() - t0
        out["result"] = measure_fit(ds, model=spec["model"], step_ms=spec["step_ms"], steps=spec["steps"],
                                    warmup=spec["warmup"], batch_size=spec["batch_size"],
                                    input_shape=(spec["size"], spec["size"], 3), num_classes=spec["classes"])
    except StopIteration:
        pass
    except peers.PipelineSkipped as exc:
        out = {"status": "skipped", "reason": str(exc)}
    except BaseException as exc:  # MemoryError, worker errors, ...: recorded, not raised
        out = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
               "traceback": traceback.format_exc()[-3000:]}
    finally:
        if ds is not None and hasattr(ds, "close"):
            ds.close()
    Path(spec["out"] + ".part").write_text(json.dumps(out))
    os.replace(spec["out"] + ".part", spec["out"])
    return 0


def run_one(spec: dict[str, Any], timeout: float, exit_grace: float = 30.0, tree: str | None = None
            ) -> dict[str, Any]:
    """Run one measurement in a fresh subprocess (its own session, so killing it kills its workers).

    A child that wrote its result but does not exit within ``exit_grace`` seconds is killed and
    the hang is recorded next to the result (``exit_note``).  ``tree``: another checkout of
    streamseg whose ``benchmarks/compare.py`` and package run the measurement (a code A/B).
    """
    root = Path(tree) if tree else ROOT
    with tempfile.TemporaryDirectory(prefix="streamseg-compare-") as tmp:
        out, log = os.path.join(tmp, "out.json"), os.path.join(tmp, "log.txt")
        spec = {**spec, "out": out, "timeout": timeout}
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(root)}
        script = str(root / "benchmarks" / "compare.py")
        with open(log, "w") as fh:
            proc = subprocess.Popen([sys.executable, script, "--child", json.dumps(spec)], env=env, stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        deadline, exit_deadline, note = time.monotonic() + timeout, None, None
        while proc.poll() is None:
            now = time.monotonic()
            if exit_deadline is None and os.path.exists(out):
                exit_deadline = now + exit_grace
            if now > deadline or (exit_deadline is not None and now > exit_deadline):
                note = "killed: hung at exit after writing its result" if exit_deadline else "timed out"
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.2)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftover workers of this run only
        except ProcessLookupError:
            pass
        tail = "\n".join(ln for ln in Path(log).read_text(errors="replace").splitlines()
                         if not ln.startswith(("I0000", "W0000", "E0000", "WARNING: All log")))[-6000:]
        if os.path.exists(out):
            record = json.loads(Path(out).read_text())
            if note or proc.returncode != 0:
                record.update(exit_note=note or f"exit status {proc.returncode} after writing its result",
                              log_tail=tail)
            return record
        if note == "timed out":
            return {"status": "failed", "error": f"timed out after {timeout:.0f} s", "log_tail": tail}
        if proc.returncode in (-signal.SIGKILL, 137):
            return {"status": "failed", "error": "killed by SIGKILL (out of memory?)", "log_tail": tail}
        return {"status": "failed", "error": f"exit status {proc.returncode}", "log_tail": tail}


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("numpy", "zarr", "cv2", "tensorflow", "keras", "streamseg"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = "?"
    try:
        import cv2

        out["cv2_threads"] = str(cv2.getNumThreads())  # OpenCV's own pool, used inside the peers' workers
        out["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip()
    except OSError:
        pass
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the comparison (or, with ``--child``, one measurement)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compare.json"))
    p.add_argument("--data", default=str(ROOT / "bench_data"), help="cache folder for the synthetic data")
    p.add_argument("--count", type=int, default=1024, help="samples in the synthetic data set")
    p.add_argument("--size", type=int, default=256, help="image side")
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=60, help="measured steps (warm-up + steps = 2 epochs at 1024/32)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--page-cache", default="warm", choices=["warm", "cold", "as-is"],
                   help="read the pipeline's store into the page cache before each run (warm), drop it "
                        "(cold), or leave it (as-is; this VM evicts files untouched for ~1 min)")
    p.add_argument("--step-ms", type=float, nargs="+", default=[40.0],
                   help="simulated accelerator ms per batch; 0 measures raw pipeline capacity")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model", choices=["simulated", "unet"], default="simulated")
    p.add_argument("--pipelines", nargs="+", default=None, help="subset of the pipelines (default all)")
    p.add_argument("--max-ram", default=None, help="RAM budget of the seed article's in-RAM load, e.g. 2G")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per run before it is killed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds of every pipeline")
    p.add_argument("--smoke", action="store_true", help="only check every pipeline's first batches, no timing")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(json.loads(args.child))
    from streamseg.bench.measure import parse_size

    t_start = time.perf_counter()
    data = prepare_data(args.data, args.count, args.size, args.classes, args.seed)
    import peers
    import psutil

    names = tuple(args.pipelines or peers.PIPELINES)
    unknown = [n for n in names if n not in peers.PIPELINES]
    if unknown:
        p.error(f"unknown pipeline(s) {unknown}; choose from {', '.join(peers.PIPELINES)}")
    if args.smoke:
        return smoke(data, names, args.batch_size, args.classes, max(args.workers))
    max_ram = parse_size(args.max_ram) if args.max_ram else None
    costs = run_one({"kind": "augment_costs", "data": data, "seed": args.seed}, args.timeout)
    aug_ms = costs.get("result", {}) if costs["status"] == "ok" else {}
    print("[augment] ms per sample, one thread: " + (", ".join(f"{k} {v:.2f}" for k, v in aug_ms.items())
                                                      or f"not measured: {costs.get('error')}"), flush=True)
    runs: list[dict[str, Any]] = []
    plan = [(rnd, step_ms, name, workers) for rnd in range(args.rounds) for step_ms in args.step_ms
            for name in (names if rnd % 2 == 0 else names[::-1]) for workers in args.workers]
    for rnd, step_ms, name, workers in plan:
        spec = {"pipeline": name, "workers": workers, "step_ms": step_ms, "steps": args.steps,
                "warmup": args.warmup, "batch_size": args.batch_size, "model": args.model,
                "seed": args.seed, "size": args.size, "classes": args.classes, "data": data,
                "max_ram": max_ram, "page_cache": args.page_cache}
        load = os.getloadavg()[0]
        print(f"[run {rnd}] {name:26s} workers={workers} step_ms={step_ms:g} ...", end=" ", flush=True)
        t0 = time.perf_counter()
        outcome = run_one(spec, args.timeout)
        run = {"pipeline": name, "label": peers.LABELS[name], "round": rnd, "workers": workers,
               "step_ms": step_ms, "augment": augment_kind(name), "augment_ms_per_sample": aug_ms.get(augment_kind(name)),
               "status": outcome["status"], "seconds": time.perf_counter() - t0, "loadavg_1min": load}
        if outcome["status"] == "ok":
            run.update(outcome["result"], build_s=outcome.get("build_s"), page_cache=outcome.get("page_cache"))
            run.update({k: outcome[k] for k in ("exit_note", "log_tail") if k in outcome})
        else:
            run.update({k: v for k, v in outcome.items() if k != "status"})
        runs.append(run)
        print(f"{run['samples_per_s']:.1f} samples/s" if run["status"] == "ok"
              else f"{run['status']}: {run.get('reason') or run.get('error')}", flush=True)
    summarise(runs, peers.PEERS)
    rows = run_table(runs, aug_ms)
    summary = summary_rows(runs, peers.PEERS, peers.BACKENDS)
    srows = summary_table(summary)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    vm = psutil.virtual_memory()
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "config": vars(args),
              "data": data, "machine": {"cpu_count": os.cpu_count(), "ram_total_bytes": vm.total,
                                        "platform": platform.platform()},
              "versions": _versions(), "peers": list(peers.PEERS), "labels": peers.LABELS,
              "augment_ms_per_sample": aug_ms, "summary": summary,
              "total_s": time.perf_counter() - t_start, "runs": runs}
    out.write_text(json.dumps(report, indent=1, default=str))
    out.with_suffix(".md").write_text(markdown_table(rows) + "\n\n" + markdown_table(srows) + "\n")
    try:
        plot(runs, peers.LABELS, out.with_suffix(".png"))
    except ImportError as exc:  # matplotlib is optional
        print(f"[plot] skipped: {exc}")
    print()
    print(text_table(rows))
    print()
    print(text_table(srows))
    print(f"\nwrote {out}, {out.with_suffix('.md')} and {out.with_suffix('.png')} "
          f"({report['total_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
