"""Arguments of ``streamseg bench`` (the measurement itself lives in :mod:`streamseg.bench.measure`)."""

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
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--augment", default="standard", help="augmentation preset: none, light, standard, heavy")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", action="store_true", help="threads instead of processes")
    p.add_argument("--worker-priority", default="normal", choices=["normal", "low", "idle"],
                   help="scheduling priority of the worker processes (idle: Linux SCHED_IDLE, the "
                        "training loop never waits for a core a worker holds)")
    p.add_argument("--shuffle", default="window", choices=["window", "uniform", "none"])
    p.add_argument("--memory-cap", default=None, help="run under a memory limit, e.g. 2G (cgroup / systemd-run)")
    p.add_argument("--json", dest="json_path", default=None, metavar="FILE", help="write the results as JSON")


def run_bench_command(args: argparse.Namespace) -> int:
    """Run ``streamseg bench``; returns the exit status."""
    from .measure import run_bench_cli

    return run_bench_cli(args)
