"""One-run comparison of streamseg with the input pipelines users would otherwise write.

Makes the synthetic data once (256x256x3 uint8 images with 1-channel masks, as zarr and memmap
stores plus PNG TFRecord shards, cached under ``--data``), then runs every pipeline of
:mod:`peers` at each worker count and consumer speed, one after the other, each in a FRESH
subprocess (so memory peaks are per pipeline), all through the same harness
(:func:`streamseg.bench.measure.measure_fit`, by default the simulated accelerator).  Failures
(exceptions, time-outs, out-of-memory kills) and skips are recorded, not raised.

Usage::

    python benchmarks/compare.py --out benchmarks/results/compare.json --count 1024 \\
        --workers 1 2 --steps 40 --step-ms 0 40

Writes the JSON (every field of every run), a Markdown table (``.md``) and a plot of samples/s
against workers (``.png``) side by side, and prints the table.  Ratios are against the best
peer (pipelines 1-4 of :mod:`peers`) at the same workers and consumer speed, and against the
plain zarr ``PyDataset`` baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
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

__all__ = ["prepare_data", "run_one", "summarise", "main"]


def prepare_data(data_dir: str | os.PathLike, count: int, size: int = 256, classes: int = 3, seed: int = 0,
                 shards: int = 8) -> dict[str, str]:
    """Synthetic zarr + memmap stores and TFRecord shards, reused when already there.

    Call before importing TensorFlow: the conversion forks worker processes.
    """
    from streamseg import open_store
    from streamseg.store.converter import convert_source
    from streamseg.io.sources import SynthSource

    base = Path(data_dir) / f"synth_n{count}_{size}px_c{classes}_seed{seed}"
    paths = {"dir": str(base)}
    for fmt in ("zarr", "memmap"):
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
    import peers  # imports TensorFlow

    tfrecord = base / "tfrecord"
    if not (tfrecord / "_complete").exists():
        print(f"[data] writing {shards} PNG TFRecord shards to {tfrecord}", flush=True)
    peers.write_tfrecords(paths["memmap"], tfrecord, shards)
    paths["tfrecord"] = str(tfrecord)
    return paths


def _child(spec: dict[str, Any]) -> int:
    """Measure one pipeline in this (fresh) process; write the outcome to ``spec['out']``."""
    import faulthandler

    faulthandler.dump_traceback_later(max(5.0, spec["timeout"] - 10.0), exit=False)  # a hang leaves stacks
    import peers
    from streamseg.bench.measure import measure_fit

    out: dict[str, Any] = {"status": "ok"}
    ds = None
    try:
        t0 = time.perf_counter()
        ds = peers.build_pipeline(spec["pipeline"], spec["data"], workers=spec["workers"],
                                  batch_size=spec["batch_size"], seed=spec["seed"], max_ram=spec.get("max_ram"))
        out["build_s"] = time.perf_counter() - t0
        out["result"] = measure_fit(ds, model=spec["model"], step_ms=spec["step_ms"], steps=spec["steps"],
                                    warmup=spec["warmup"], batch_size=spec["batch_size"],
                                    input_shape=(spec["size"], spec["size"], 3), num_classes=spec["classes"])
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


def run_one(spec: dict[str, Any], timeout: float, exit_grace: float = 30.0) -> dict[str, Any]:
    """Run one measurement in a fresh subprocess (its own session, so killing it kills its workers).

    A child that wrote its result but does not exit within ``exit_grace`` seconds is killed and
    the hang is recorded next to the result (``exit_note``).
    """
    with tempfile.TemporaryDirectory(prefix="streamseg-compare-") as tmp:
        out, log = os.path.join(tmp, "out.json"), os.path.join(tmp, "log.txt")
        spec = {**spec, "out": out, "timeout": timeout}
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
        with open(log, "w") as fh:
            proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], env=env, stdout=fh,
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


def summarise(runs: list[dict[str, Any]], peers_names: tuple[str, ...]) -> None:
    """Add ``vs_best_peer`` and ``vs_zarr_baseline`` (samples/s ratios) to every successful run."""
    for run in runs:
        if run["status"] != "ok":
            continue
        same = [r for r in runs if r["status"] == "ok" and r["step_ms"] == run["step_ms"]
                and r["workers"] == run["workers"]]
        best = max((r for r in same if r["pipeline"] in peers_names), key=lambda r: r["samples_per_s"], default=None)
        base = next((r for r in same if r["pipeline"] == "zarr_per_sample"), None)
        run["best_peer"] = best["pipeline"] if best else None
        run["vs_best_peer"] = run["samples_per_s"] / best["samples_per_s"] if best else None
        run["vs_zarr_baseline"] = run["samples_per_s"] / base["samples_per_s"] if base else None


def _table(runs: list[dict[str, Any]]) -> list[list[str]]:
    def num(v: Any, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    rows = [["pipeline", "workers", "step ms", "samples/s", "stall", "USS+PSS MiB", "anon PSS MiB",
             "vs best peer", "vs zarr baseline", "status"]]
    for r in runs:
        ok = r["status"] == "ok"
        mem = r.get("memory", {})
        rows.append([r["pipeline"], str(r["workers"]), f"{r['step_ms']:g}",
                     num(r.get("samples_per_s"), ".1f") if ok else "-",
                     num(r.get("stall_fraction"), ".2f") if ok and r["step_ms"] > 0 else "-",
                     num(mem.get("private", 0) / 2**20, ".0f") if ok else "-",
                     num(mem.get("tree_anon_pss", 0) / 2**20, ".0f") if ok else "-",
                     num(r.get("vs_best_peer"), ".2f") + ("x" if r.get("vs_best_peer") else ""),
                     num(r.get("vs_zarr_baseline"), ".2f") + ("x" if r.get("vs_zarr_baseline") else ""),
                     ("ok" + (f" ({r['exit_note']})" if r.get("exit_note") else "")) if ok
                     else (r.get("reason") or r.get("error") or r["status"])[:90]])
    return rows


def _print_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def _markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows[1:]])


def _plot(runs: list[dict[str, Any]], labels: dict[str, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speeds = sorted({r["step_ms"] for r in runs})
    fig, axes = plt.subplots(1, len(speeds), figsize=(6.5 * len(speeds), 4.5), squeeze=False)
    for ax, speed in zip(axes[0], speeds):
        for name in dict.fromkeys(r["pipeline"] for r in runs):
            pts = sorted((r["workers"], r["samples_per_s"]) for r in runs
                         if r["pipeline"] == name and r["step_ms"] == speed and r["status"] == "ok")
            failed = [r for r in runs if r["pipeline"] == name and r["step_ms"] == speed and r["status"] != "ok"]
            label = labels.get(name, name) + (f" ({failed[0]['status']})" if failed else "")
            style = "-o" if name.startswith("streamseg") else "--s"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        ax.set_title(f"consumer: simulated accelerator, {speed:g} ms/batch" if speed else "raw pipeline capacity "
                     "(step 0 ms)")
        ax.set_xlabel("workers")
        ax.set_ylabel("samples/s")
        ax.set_xticks(sorted({r["workers"] for r in runs}))
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    p.add_argument("--step-ms", type=float, nargs="+", default=[40.0],
                   help="simulated accelerator ms per batch; 0 measures raw pipeline capacity")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model", choices=["simulated", "unet"], default="simulated")
    p.add_argument("--pipelines", nargs="+", default=None, help="subset of the pipelines (default all)")
    p.add_argument("--max-ram", default=None, help="RAM budget of the seed article's in-RAM load, e.g. 2G")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per run before it is killed")
    p.add_argument("--seed", type=int, default=0)
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
    max_ram = parse_size(args.max_ram) if args.max_ram else None
    runs: list[dict[str, Any]] = []
    for step_ms in args.step_ms:
        for name in names:
            for workers in args.workers:
                spec = {"pipeline": name, "workers": workers, "step_ms": step_ms, "steps": args.steps,
                        "warmup": args.warmup, "batch_size": args.batch_size, "model": args.model,
                        "seed": args.seed, "size": args.size, "classes": args.classes, "data": data,
                        "max_ram": max_ram}
                load = os.getloadavg()[0]
                print(f"[run] {name:17s} workers={workers} step_ms={step_ms:g} ...", end=" ", flush=True)
                t0 = time.perf_counter()
                outcome = run_one(spec, args.timeout)
                run = {"pipeline": name, "label": peers.LABELS[name], "workers": workers, "step_ms": step_ms,
                       "status": outcome["status"], "seconds": time.perf_counter() - t0, "loadavg_1min": load}
                if outcome["status"] == "ok":
                    run.update(outcome["result"], build_s=outcome.get("build_s"))
                    run.update({k: outcome[k] for k in ("exit_note", "log_tail") if k in outcome})
                else:
                    run.update({k: v for k, v in outcome.items() if k != "status"})
                runs.append(run)
                print(f"{run['samples_per_s']:.1f} samples/s" if run["status"] == "ok"
                      else f"{run['status']}: {run.get('reason') or run.get('error')}", flush=True)
    summarise(runs, peers.PEERS)
    rows = _table(runs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    vm = psutil.virtual_memory()
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "config": vars(args),
              "data": data, "machine": {"cpu_count": os.cpu_count(), "ram_total_bytes": vm.total,
                                        "platform": platform.platform()},
              "versions": _versions(), "peers": list(peers.PEERS), "labels": peers.LABELS,
              "total_s": time.perf_counter() - t_start, "runs": runs}
    out.write_text(json.dumps(report, indent=1, default=str))
    out.with_suffix(".md").write_text(_markdown(rows) + "\n")
    _plot(runs, peers.LABELS, out.with_suffix(".png"))
    print()
    print(_print_table(rows))
    print(f"\nwrote {out}, {out.with_suffix('.md')} and {out.with_suffix('.png')} "
          f"({report['total_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
