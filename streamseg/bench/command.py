"""``streamseg bench STORE``: one store measured by :func:`~streamseg.bench.measure.measure_fit`,
in this process or in a child under a memory cap, and the plain-text report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import psutil

from ..errors import OptionError
from ..native_stderr import load_tensorflow_quietly
from .measure import NA, _check_int, _mib, _priority, measure_fit, parse_size
from .memcap import run_capped

__all__ = ["format_result", "run_bench_cli"]


# ---------------------------------------------------------------------------------- memory cap
def _child_argv(args: argparse.Namespace, json_path: str) -> list[str]:
    argv = [sys.executable, "-m", "streamseg.cli", "bench", str(args.store), "--model", args.model,
            "--step-ms", str(args.step_ms), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--batch-size", str(args.batch_size), "--augment", str(args.augment), "--workers",
            str(args.workers), "--shuffle", args.shuffle, "--worker-priority", _priority(args), "--json", json_path]
    if getattr(args, "patch_size", None) is not None:  # settled for volume stores only
        argv += ["--patch-size", *map(str, args.patch_size), "--samples-per-volume", str(args.samples_per_volume)]
    return argv + (["--threads"] if args.threads else [])


# ---------------------------------------------------------------------------------- command line
def format_result(r: dict[str, Any]) -> str:
    """Plain aligned text for a ``streamseg bench`` result."""
    s, m, o = r.get("store", {}), r["memory"], r.get("options", {})
    consumer = (f"simulated accelerator, {r['step_ms']:g} ms/step" if r["model"] == "simulated"
                else f"{r['model']} ({r['compute_source']})")
    gpu = (f"{r['gpu_util_percent']:.0f}% util, peak {_mib(r['gpu_memory_peak_bytes'])} ({r['gpu_name']})"
           if r["gpu_util_percent"] != NA else f"n/a ({r['gpu_note']})")
    rows = [
        ("store", f"{s.get('path')} ({s.get('format')}, {s.get('count')} x {tuple(s.get('image_shape') or ())[1:]}, "
                  f"{_mib(s.get('disk_bytes'))} on disk, {_mib(s.get('raw_bytes'))} raw; "
                  f"machine RAM {_mib(r.get('machine', {}).get('ram_total_bytes'))})"),
        ("consumer", consumer),
        ("pipeline", f"batch {r['batch_size']}, augment {o.get('augment')}, workers {o.get('workers')} "
                     f"({'threads' if o.get('threads') else 'processes'}"
                     + (f", priority {o['worker_priority']}" if o.get("worker_priority", "normal") != "normal" else "")
                     + f"), shuffle {o.get('shuffle')}"),
        ("measured", f"{r['steps']} steps after {r['warmup']} warm-up steps in {r['wall_s']:.2f} s"),
        ("throughput", f"{r['samples_per_s']:.1f} samples/s, {r['batches_per_s']:.2f} batches/s"),
        ("input stall", f"{r['stall_fraction']:.3f} ("
                        + (f"same loop on cached data {r['floor_s']:.2f} s of {r['wall_s']:.2f} s; "
                           if r.get("floor_s") is not None else "")
                        + f"compute {r['compute_s']:.2f} s, all overhead {r['overhead_fraction']:.3f}; "
                        f"step p50 {r['step_ms_p50']:.1f} ms, p95 {r['step_ms_p95']:.1f} ms)"),
        ("cpu", f"{r['cpu_percent']:.0f}% of {r['cpu_count']} cores"),
        ("memory peak", f"main USS {_mib(m['main_uss'])} (RssAnon {_mib(m['main_rss_anon'])}, RssFile "
                        f"{_mib(m['main_rss_file'])}); workers PSS {_mib(m['workers_pss'])} ({m['workers']}); "
                        f"main USS + workers PSS {_mib(m['private'])}; all processes' anonymous + "
                        f"shared-memory PSS {_mib(m['tree_anon_pss'])}"),
        ("gpu", gpu),
    ]
    cap = r.get("memory_cap")
    if cap:
        state = f"applied: {cap['how']}" if cap["applied"] else f"NOT applied: {cap['why_not']}"
        rows.append(("memory cap", f"{cap['requested']} {state}"))
    if s.get("layout") == "volumes":  # PatchDataset: cases, patches
        from .patches import volume_rows

        rows = volume_rows(r, rows)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _measure_store(args: argparse.Namespace, device: str | None = None) -> dict[str, Any]:
    from ..pipeline.dataset import SegmentationDataset
    from ..pipeline.intensity import default_normalize
    from ..store.inspect import store_info
    from ..store.reader import open_store

    store = open_store(args.store)
    if getattr(store, "layout", None) == "volumes":
        from .patches import measure_volume_store

        return measure_volume_store(args, store, device)
    info = store_info(args.store)
    augment = None if args.augment == "none" else args.augment
    normalize = default_normalize(store)  # "unit" for uint8/uint16; int16/float32: "ct" or "standardize"
    ds = SegmentationDataset(store, args.batch_size, augment=augment, shuffle=args.shuffle, workers=args.workers,
                             normalize=normalize, use_multiprocessing=not args.threads and args.workers > 0,
                             drop_remainder=len(store) >= args.batch_size, worker_priority=_priority(args))
    if device:  # once the options are known to be valid
        print(device, file=sys.stderr)
    try:
        result = measure_fit(ds, model=args.model, step_ms=args.step_ms, steps=args.steps, warmup=args.warmup)
    finally:
        ds.close()
    vm = psutil.virtual_memory()
    result["store"] = {k: info[k] for k in ("path", "format", "count", "image_shape", "image_dtype",
                                            "chunk_samples", "compressor", "disk_bytes", "raw_bytes")}
    result["machine"] = {"ram_total_bytes": int(vm.total), "ram_available_bytes": int(vm.available),
                         "cpu_count": psutil.cpu_count() or 1,
                         "dataset_raw_over_ram": info["raw_bytes"] / vm.total}
    result["options"] = {"augment": args.augment, "workers": args.workers, "threads": bool(args.threads),
                         "worker_priority": _priority(args),
                         "shuffle": args.shuffle, "backend": info["format"]}
    return result


def run_bench_cli(args: argparse.Namespace) -> int:
    """Run ``streamseg bench`` for parsed arguments (see :mod:`streamseg.bench.cli`)."""
    from .patches import resolve_store_options

    resolve_store_options(args)  # layout-dependent options (patches of a volume store) and defaults
    for name, low in (("steps", 1), ("warmup", 0), ("batch_size", 1), ("workers", 0)):
        _check_int("--" + name.replace("_", "-"), getattr(args, name), low)
    if not args.step_ms >= 0:
        raise OptionError(f"--step-ms must be >= 0. Received: --step-ms {args.step_ms}")
    cap = result = None
    if args.memory_cap:
        limit = parse_size(args.memory_cap)
        result, cap = run_capped(lambda out: _child_argv(args, out), str(args.memory_cap), limit)
        if result is None and cap["applied"]:
            print(f"streamseg bench: the run under the memory cap did not finish: {cap['outcome']}",
                  file=sys.stderr)
            if args.json_path:
                Path(args.json_path).write_text(json.dumps({"memory_cap": cap}, indent=1))
            return 1
    if result is None:
        result = _measure_store(args, load_tensorflow_quietly())
    if cap is not None:
        result["memory_cap"] = cap
        cap["dataset_raw_bytes"] = result["store"]["raw_bytes"]
        cap["smaller_than_dataset"] = cap["requested_bytes"] < result["store"]["raw_bytes"]
    print(format_result(result))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=1))
    return 0
