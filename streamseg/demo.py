"""``streamseg demo``: synthesise scans, convert, train a small U-Net, save a preview."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from .store.converter import convert
from .store.inspect import format_info, store_info
from .bench.memory import MemorySampler
from .io.synth import write_synth_folder
from .native_stderr import load_tensorflow_quietly

__all__ = ["run_demo", "preview_grid"]

_COLOURS = np.array([[0, 0, 0], [40, 90, 255], [40, 230, 40], [255, 40, 200], [255, 200, 0],
                     [200, 0, 255], [0, 220, 220], [255, 128, 0]], np.float32)


def preview_grid(images: np.ndarray, masks: np.ndarray, path: str | Path, *, columns: int = 4) -> Path:
    """Save augmented images with their masks overlaid (label colours at 60% opacity) as a PNG.

    Parameters
    ----------
    images : numpy.ndarray
        ``(B, H, W, C)`` float images scaled to [0, 1].
    masks : numpy.ndarray
        ``(B, H, W, 1)`` integer labels.
    path : path
        Output PNG.
    columns : int
        Pairs per row; each pair is shown as image | image with overlay.
    """
    import cv2

    tiles = []
    for img, msk in zip(images, masks):
        rgb = np.clip(img * 255.0, 0, 255).astype(np.float32)
        if rgb.shape[2] == 1:
            rgb = np.repeat(rgb, 3, axis=2)
        colour = _COLOURS[np.asarray(msk[..., 0]) % len(_COLOURS)]
        alpha = np.where(msk[..., 0:1] > 0, 0.6, 0.0)
        overlay = rgb * (1 - alpha) + colour * alpha
        pad = np.full((rgb.shape[0], 4, 3), 255, np.float32)
        tiles.append(np.concatenate([rgb, pad, overlay, pad, pad], axis=1))
    while len(tiles) % columns:
        tiles.append(np.full_like(tiles[0], 255))
    rows = [np.concatenate(tiles[r : r + columns], axis=1) for r in range(0, len(tiles), columns)]
    grid = np.concatenate([np.pad(r, ((0, 6), (0, 0), (0, 0)), constant_values=255) for r in rows], axis=0)
    out = Path(path)
    cv2.imwrite(str(out), cv2.cvtColor(grid.astype(np.uint8), cv2.COLOR_RGB2BGR))
    return out


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.0f} MiB"


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Run the end-to-end demo described in the README; returns the measured figures."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files, store_path = out / "scans", out / "scans.zarr"
    print(f"[1/4] synthesising {args.count} scans ({args.size}x{args.size}) into {files}")
    write_synth_folder(files, args.count, size=(args.size, args.size), classes=3, seed=0, progress=None)
    print(f"[2/4] converting to the zarr store {store_path}")
    convert(files, store_path, format="zarr", workers=min(2, args.workers or 1), overwrite=True)
    print(format_info(store_info(store_path)))
    if args.no_train:
        return {}
    print(f"[3/4] training a small U-Net for {args.epochs} epochs, workers={args.workers}, "
          "use_multiprocessing=True")
    print(load_tensorflow_quietly())  # before Keras loads: TensorFlow's C++ start-up lines hidden
    from .pipeline.augment import Augment
    from .pipeline.dataset import SegmentationDataset, split
    from .models import small_unet

    train_idx, val_idx = split(store_path, val_fraction=0.2, seed=0)
    augment = Augment.preset("standard")
    train = SegmentationDataset(store_path, args.batch_size, indices=train_idx, augment=augment,
                                workers=args.workers, use_multiprocessing=args.workers > 0)
    val = SegmentationDataset(store_path, args.batch_size, indices=val_idx, shuffle=False)
    model = small_unet((args.size, args.size, 3), train.num_classes)
    with train, val, MemorySampler() as sampler:
        t0 = time.perf_counter()
        history = model.fit(train, validation_data=val, epochs=args.epochs, verbose=2)
        elapsed = time.perf_counter() - t0
    mem = sampler.stop()
    samples = len(train_idx) * args.epochs
    print(f"trained on {samples} samples in {elapsed:.1f}s: {samples / elapsed:.1f} samples/s "
          f"(model compute included); final loss {history.history['loss'][-1]:.4f}")
    peak = mem["peak"]
    print(f"peak memory: main process RSS {_mib(peak['rss'])} (private USS {_mib(peak['uss'])}, "
          f"anonymous {_mib(peak['rss_anon'])}, file-backed {_mib(peak['rss_file'])}); "
          f"workers' summed PSS {_mib(peak['children_pss'])}")
    print("[4/4] saving a preview of augmented batches with masks overlaid")
    preview = SegmentationDataset(store_path, 8, augment=augment, seed=1)
    images, masks = preview[0]
    path = preview_grid(images, masks, out / "preview.png")
    print(f"preview: {path} (left: augmented image, right: the same with its augmented mask)")
    return {"samples_per_s": samples / elapsed, "elapsed_s": elapsed, "memory": peak,
            "loss": history.history["loss"][-1]}
