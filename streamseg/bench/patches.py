"""``streamseg bench`` on a ``--layout volumes`` store: :class:`~streamseg.pipeline.patches.PatchDataset`.

The same harness as for 2D stores (:func:`streamseg.bench.measure.measure_fit`: warm-up,
throughput, input stall against the same loop on cached data, memory peaks of the main
process and the workers, CPU, GPU), fed with batches of 3D patches.  ``samples_per_s`` counts
patches (also given as ``patches_per_s``).  ``--patch-size`` and ``--samples-per-volume``
apply to volume stores only and are refused for 2D stores; ``--batch-size`` defaults to
:data:`VOLUME_BATCH_SIZE` patches (nnU-Net's 3D default) instead of
:data:`SLICE_BATCH_SIZE` samples.  ``--model unet`` is :func:`streamseg.models.small_unet3d`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import psutil

from ..errors import OptionError, truncate
from .measure import _priority, measure_fit

__all__ = ["resolve_store_options", "measure_volume_store", "volume_rows", "DEFAULT_PATCH_SIZE",
           "DEFAULT_SAMPLES_PER_VOLUME", "VOLUME_BATCH_SIZE", "SLICE_BATCH_SIZE"]

#: Defaults for a volume store: patch in voxels, patches per case per epoch, patches per batch.
DEFAULT_PATCH_SIZE: tuple[int, int, int] = (64, 64, 64)
DEFAULT_SAMPLES_PER_VOLUME = 4
VOLUME_BATCH_SIZE = 2
#: ``--batch-size`` default for a 2D store (samples per batch), as before volume stores.
SLICE_BATCH_SIZE = 32

_VOLUME_ONLY = (("patch_size", "--patch-size"), ("samples_per_volume", "--samples-per-volume"))


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def resolve_store_options(args: argparse.Namespace) -> bool:
    """Open ``args.store`` and settle the options that depend on its layout (in place).

    A 2D store refuses ``--patch-size`` / ``--samples-per-volume``; a volume store gets their
    defaults and a check, and ``--augment`` must suit 3D patches.  ``--batch-size`` not given becomes :data:`SLICE_BATCH_SIZE` or
    :data:`VOLUME_BATCH_SIZE`.  Cheap (reads the manifest only), so it runs before a memory
    cap's child process or TensorFlow are started.

    Returns
    -------
    bool
        Whether the store is a volume store.

    Raises
    ------
    OptionError
        A volume-only option given for a 2D store, or a bad patch size / samples per volume.
    """
    from ..store.reader import open_store

    store = open_store(args.store)
    volumes = getattr(store, "layout", None) == "volumes"
    if not volumes:
        for dest, flag in _VOLUME_ONLY:
            value = getattr(args, dest, None)
            if value is not None:
                raise OptionError(f"{flag} applies to volume stores (streamseg convert --layout volumes) only; "
                                  f"{args.store} holds 2D samples: leave {flag} out. "
                                  f"Received: {flag} {_shown(value)}")
        if getattr(args, "batch_size", None) is None:
            args.batch_size = SLICE_BATCH_SIZE
        return False
    if getattr(args, "batch_size", None) is None:
        args.batch_size = VOLUME_BATCH_SIZE
    patch = list(DEFAULT_PATCH_SIZE) if getattr(args, "patch_size", None) is None else list(args.patch_size)
    if len(patch) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in patch):
        raise OptionError(f"--patch-size must be three integers >= 1 (voxels along X, Y, Z). "
                          f"Received: --patch-size {_shown(patch)}")
    spv = DEFAULT_SAMPLES_PER_VOLUME if getattr(args, "samples_per_volume", None) is None \
        else args.samples_per_volume
    if isinstance(spv, bool) or not isinstance(spv, int) or spv < 1:
        raise OptionError(f"--samples-per-volume must be an integer >= 1 (patches per case per epoch). "
                          f"Received: --samples-per-volume {truncate(spv)}")
    if getattr(args, "model", None) == "unet" and any(v % 4 for v in patch):  # small_unet3d halves twice
        raise OptionError(f"--model unet (small_unet3d) needs a patch size divisible by 4 along every axis. "
                          f"Received: --patch-size {_shown(patch)}")
    _augment(args)
    args.patch_size, args.samples_per_volume = patch, spv
    return True


def _augment(args: argparse.Namespace) -> Any:
    """``--augment`` as an Augment for 3D patches (None for "none"); shear / crop refused."""
    from ..pipeline.augment import Augment
    from ..pipeline.augment3d import check_3d

    augment = None if args.augment == "none" else Augment.from_config(args.augment)
    if augment is not None:
        try:
            check_3d(augment)
        except OptionError as exc:
            raise OptionError(f"--augment {args.augment} does not fit 3D patches: {exc}") from None
    return augment


def _dataset(args: argparse.Namespace, store: Any) -> Any:
    from ..pipeline.intensity import default_normalize
    from ..pipeline.patches import PatchDataset

    augment = _augment(args)
    normalize = default_normalize(store)  # "ct" with the foreground statistics, else below
    if normalize == "standardize":  # a 2D-store mode: per-case z-score for volumes
        normalize = "zscore"
    patches = len(store) * args.samples_per_volume
    return PatchDataset(store, args.batch_size, tuple(args.patch_size), samples_per_volume=args.samples_per_volume,
                        augment=augment, shuffle=args.shuffle != "none", normalize=normalize,
                        workers=args.workers, use_multiprocessing=not args.threads and args.workers > 0,
                        drop_remainder=patches >= args.batch_size, worker_priority=_priority(args))


def measure_volume_store(args: argparse.Namespace, store: Any, device: str | None = None) -> dict[str, Any]:
    """``streamseg bench`` on a volume store: :func:`measure_fit` on a PatchDataset.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed ``bench`` options, settled by :func:`resolve_store_options`.
    store : VolumeStore
        The opened store.
    device : str, optional
        Line naming the device, printed to stderr once the options are known to be valid.

    Returns
    -------
    dict
        :func:`measure_fit`'s fields plus ``patches_per_s``, ``store``, ``machine`` and
        ``options`` (with ``patch_size``, ``samples_per_volume``, ``normalize``).
    """
    from ..store.inspect import store_info

    info = store_info(args.store)
    ds = _dataset(args, store)
    model: Any = args.model
    if args.model == "unet":
        from ..models import small_unet3d

        model = small_unet3d((*ds.patch_size, store.channels), ds.num_classes)
    if device:
        print(device, file=sys.stderr)
    try:
        result = measure_fit(ds, model=model, step_ms=args.step_ms, steps=args.steps, warmup=args.warmup,
                             batch_size=args.batch_size)
    finally:
        ds.close()
    if args.model == "unet":
        result["model"] = "unet3d"
    result["patches_per_s"] = result["samples_per_s"]
    shapes = sorted({tuple(store.shape(i)) for i in range(len(store))})
    vm = psutil.virtual_memory()
    result["store"] = {k: info[k] for k in ("path", "layout", "format", "count", "channels", "image_dtype",
                                            "chunk_shape", "compressor", "disk_bytes", "raw_bytes")}
    result["store"]["case_shapes"] = [list(s) for s in (shapes if len(shapes) <= 2 else (shapes[0], shapes[-1]))]
    result["machine"] = {"ram_total_bytes": int(vm.total), "ram_available_bytes": int(vm.available),
                         "cpu_count": psutil.cpu_count() or 1,
                         "dataset_raw_over_ram": info["raw_bytes"] / vm.total}
    result["options"] = {"augment": args.augment, "workers": args.workers, "threads": bool(args.threads),
                         "worker_priority": _priority(args), "shuffle": "uniform" if args.shuffle != "none" else "none",
                         "backend": info["format"], "patch_size": list(ds.patch_size),
                         "samples_per_volume": ds.samples_per_volume, "foreground_fraction": ds.foreground_fraction,
                         "normalize": ds.options.normalize, "patches_per_epoch": len(store) * ds.samples_per_volume}
    return result


def volume_rows(r: dict[str, Any], rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """:func:`~streamseg.bench.command.format_result`'s rows with store, pipeline and throughput
    described in cases and patches."""
    from .measure import _mib

    s, o = r["store"], r["options"]
    shapes = " .. ".join("x".join(map(str, v)) for v in s.get("case_shapes") or [])
    mine = {
        "store": f"{s['path']} ({s['format']}, volumes: {s['count']} cases of {shapes} voxels x {s['channels']} "
                 f"channel(s) {s['image_dtype']}, chunks {'x'.join(map(str, s['chunk_shape']))}, "
                 f"{_mib(s['disk_bytes'])} on disk, {_mib(s['raw_bytes'])} raw; "
                 f"machine RAM {_mib(r.get('machine', {}).get('ram_total_bytes'))})",
        "pipeline": f"PatchDataset: batch {r['batch_size']} patches of {'x'.join(map(str, o['patch_size']))}, "
                    f"{o['samples_per_volume']} per case per epoch, foreground {o['foreground_fraction']:g}, "
                    f"normalize {o['normalize']}, augment {o['augment']}, workers {o['workers']} "
                    f"({'threads' if o['threads'] else 'processes'}"
                    + (f", priority {o['worker_priority']}" if o["worker_priority"] != "normal" else "")
                    + f"), shuffle {o['shuffle']}",
        "throughput": f"{r['patches_per_s']:.1f} patches/s, {r['batches_per_s']:.2f} batches/s",
    }
    return [(k, mine.get(k, v)) for k, v in rows]
