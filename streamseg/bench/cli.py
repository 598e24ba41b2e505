"""Arguments of ``streamseg bench`` (the measurement itself lives in :mod:`streamseg.bench.measure`,
for volume stores in :mod:`streamseg.bench.patches`)."""

from __future__ import annotations

import argparse

__all__ = ["add_bench_arguments", "run_bench_command"]


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to a parser."""
    p.add_argument("store", help="store to read (streamseg convert / synth --to zarr)")
    p.add_argument("--model", choices=["unet", "simulated"], default="simulated",
                   help="a small U-Net, or a simulated accelerator that spends --step-ms per batch")
    p.add_argument("--step-ms", type=float, default=20.0, help="simulated accelerator time per batch")
    p.add_argument("--steps", type=int, default=50, help="measured steps after the warm-up")
    p.add_argument("--warmup", type=int, default=5, help="steps before measuring")
    p.add_argument("--batch-size", type=int, default=None,
                   help="samples per batch (default 32; volume store: patches per batch, default 2)")
    p.add_argument("--augment", default="standard", help="augmentation preset: none, light, standard, heavy")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", action="store_true", help="threads instead of processes")
    p.add_argument("--worker-priority", default="normal", choices=["normal", "low", "idle"],
                   help="scheduling priority of the worker processes (idle: Linux SCHED_IDLE, the "
                        "training loop never waits for a core a worker holds)")
    p.add_argument("--shuffle", default="window", choices=["window", "uniform", "none"])
    p.add_argument("--memory-cap", default=None, help="run under a memory limit, e.g. 2G (cgroup / systemd-run)")
    p.add_argument("--json", dest="json_path", default=None, metavar="FILE", help="write the results as JSON")
    g = p.add_argument_group("volume stores (convert --layout volumes): batches of 3D patches (PatchDataset)")
    g.add_argument("--patch-size", type=int, nargs=3, default=None, metavar=("PX", "PY", "PZ"),
                   help="patch in voxels along X, Y, Z (default 64 64 64)")
    g.add_argument("--samples-per-volume", type=int, default=None, metavar="N",
                   help="patches per case per epoch (default 4)")


def run_bench_command(args: argparse.Namespace) -> int:
    """Run ``streamseg bench``; returns the exit status."""
    from .command import run_bench_cli

    return run_bench_cli(args)
