"""``streamseg demo``: synthesise scans, convert, train a small U-Net, save a preview.

``streamseg demo --volumes`` does the same with CT-like NIfTI volumes: converted to axial
slices with one neighbouring slice on each side (2.5D), split by case, normalised with
nnU-Net's CT scheme (``normalize="ct"``), and previewed as ground truth next to prediction.
The same volumes are also converted whole (``layout="volumes"``, 3D chunks), a small 3D U-Net
trains for a few steps on foreground-oversampled patches (:class:`~streamseg.pipeline.patches.PatchDataset`),
and a held-out case is segmented by sliding-window inference
(:func:`~streamseg.pipeline.predict.predict_volume`), written as NIfTI and scored (Dice).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from .store.converter import convert
from .store.inspect import format_info, store_info
from .store.volume_info import volume_lines, volume_summary
from .bench.memory import MemorySampler
from .io.synth import write_synth_folder
from .io.synth_volumes import write_synth_volumes
from .native_stderr import load_tensorflow_quietly

__all__ = ["run_demo", "run_volume_demo", "run_patch_demo", "preview_grid", "dice_scores"]

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
    if getattr(args, "volumes", False):
        return run_volume_demo(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files, store_path = out / "scans", out / "scans.zarr"
    count = 300 if args.count is None else args.count
    side = 128 if args.size is None else args.size
    print(f"[1/4] synthesising {count} scans ({side}x{side}) into {files}")
    write_synth_folder(files, count, size=(side, side), classes=3, seed=0, progress=None)
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
    model = small_unet((side, side, 3), train.num_classes)
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


#: Volume demo: voxels per synthetic volume (X, Y; Z below), its voxel size, 2.5D context.
_VOLUME_SIDE, _VOLUME_SLICES, _VOLUME_SPACING, _CONTEXT = 96, 48, (1.0, 1.0, 2.5), 1
_HU_WINDOW = (-160.0, 240.0)  # abdominal soft-tissue window, for the preview only
#: 3D part: patch (X, Y, Z; smaller for --size below 32), patches per batch and per case per
#: epoch, foreground share, learning rate (10x small_unet3d's: a few steps must show something),
#: overlap and batch of the sliding window.
_PATCH, _PATCH_BATCH, _PATCH_SAMPLES, _PATCH_FOREGROUND, _PATCH_LR = (32, 32, 16), 2, 4, 0.5, 1e-2
_PREDICT_OVERLAP, _PREDICT_BATCH = 0.25, 8


def _case_split(store: Any, val_fraction: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train / validation slice indices with whole cases on one side (slices of a case look alike)."""
    counts = [int(c["selected"]) for c in store.meta["params"]["source"]["cases"]]
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    order = np.random.default_rng([seed, 0xCA5E]).permutation(len(counts))
    n_val = min(len(counts) - 1, max(1, round(len(counts) * val_fraction)))
    pick = [np.arange(starts[c], starts[c + 1]) for c in order[:n_val]]
    val = np.sort(np.concatenate(pick)) if pick else np.zeros(0, np.int64)
    train = np.setdiff1d(np.arange(len(store)), val)
    return train, val


def run_volume_demo(args: argparse.Namespace) -> dict[str, Any]:
    """``streamseg demo --volumes``: CT-like volumes -> axial 2.5D slices -> U-Net -> preview, then
    the volumes whole -> 3D patches -> small 3D U-Net -> sliding-window prediction (:func:`run_patch_demo`)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files, store_path, volume_path = out / "volumes", out / "volumes.zarr", out / "volumes-3d.zarr"
    count = 8 if args.count is None else args.count
    side = _VOLUME_SIDE if args.size is None else args.size
    shape = (side, side, _VOLUME_SLICES)
    print(f"[1/7] synthesising {count} CT-like volumes ({'x'.join(map(str, shape))} voxels of "
          f"{'x'.join(f'{v:g}' for v in _VOLUME_SPACING)} mm, HU) into {files}")
    write_synth_volumes(files, count, shape=shape, spacing=_VOLUME_SPACING, classes=3, seed=0, progress=None)
    print(f"[2/7] converting axial slices (context {_CONTEXT}: {2 * _CONTEXT + 1} slices per sample) "
          f"to the zarr store {store_path}")
    size = None if side % 4 == 0 else (side // 4 * 4,) * 2  # the U-Net halves the side twice
    store = convert(files, store_path, format="zarr", axis="axial", context=_CONTEXT, size=size,
                    workers=min(2, args.workers or 1), overwrite=True)
    print(format_info(store_info(store_path)))
    print("\n".join(volume_lines(volume_summary(store.meta) or {})))
    print(f"[3/7] converting the volumes whole (layout 'volumes', 3D chunks) to the zarr store {volume_path}")
    volume_store = convert(files, volume_path, format="zarr", layout="volumes", workers=min(2, args.workers or 1),
                           overwrite=True, progress=False)
    vinfo = store_info(volume_path)
    print(f"volume store: {len(volume_store)} cases, chunks {' x '.join(map(str, volume_store.chunk_shape))} "
          f"voxels, {_mib(vinfo['disk_bytes'])} on disk ({_mib(vinfo['raw_bytes'])} raw)")
    if args.no_train:
        return {}
    print(f"[4/7] training a small U-Net on the slices for {args.epochs} epochs, workers={args.workers}, "
          "normalize='ct', cases split between training and validation")
    print(load_tensorflow_quietly())  # before Keras loads: TensorFlow's C++ start-up lines hidden
    from .pipeline.augment import Augment
    from .pipeline.dataset import SegmentationDataset
    from .models import small_unet

    train_idx, val_idx = _case_split(store)
    augment = Augment.preset("standard")  # after normalisation: brightness 0.1 = 0.1 foreground std
    train = SegmentationDataset(store_path, args.batch_size, indices=train_idx, augment=augment,
                                normalize="ct", workers=args.workers, use_multiprocessing=args.workers > 0)
    val = SegmentationDataset(store_path, args.batch_size, indices=val_idx, shuffle=False, normalize="ct")
    h, w, c = store.image_shape
    model = small_unet((h, w, c), train.num_classes)
    with train, val:
        t0 = time.perf_counter()
        history = model.fit(train, validation_data=val, epochs=args.epochs, verbose=2)
        elapsed = time.perf_counter() - t0
    samples = len(train_idx) * args.epochs
    print(f"trained on {samples} slices in {elapsed:.1f}s: {samples / elapsed:.1f} slices/s "
          f"(model compute included); final loss {history.history['loss'][-1]:.4f}")
    print("[5/7] saving a preview of validation slices: ground truth (left) and prediction (right)")
    path = _volume_preview(store, val_idx, model, out / "preview.png")
    print(f"preview: {path} (CT window {_HU_WINDOW[0]:g}..{_HU_WINDOW[1]:g} HU)")
    result = {"slices_per_s": samples / elapsed, "elapsed_s": elapsed, "loss": history.history["loss"][-1]}
    result.update(run_patch_demo(volume_store, out, epochs=args.epochs, workers=args.workers, steps=(6, 7)))
    return result


def dice_scores(prediction: np.ndarray, truth: np.ndarray) -> dict[int, float]:
    """Dice ``2 |P & T| / (|P| + |T|)`` of every foreground label in either volume."""
    labels = np.union1d(np.unique(prediction), np.unique(truth))
    out = {}
    for k in (int(v) for v in labels if v != 0):
        p, t = prediction == k, truth == k
        out[k] = float(2.0 * np.count_nonzero(p & t) / (np.count_nonzero(p) + np.count_nonzero(t)))
    return out


def _ct_function(options: Any) -> Any:
    """The PatchDataset's ``normalize="ct"`` as a function for :func:`predict_volume`."""
    lo, hi = (np.asarray(v, np.float32) for v in options.clip_in)
    offset, scale = np.asarray(options.image_offset, np.float32), np.asarray(options.image_scale, np.float32)

    def normalize(image: np.ndarray) -> np.ndarray:
        return (np.clip(image, lo, hi) - offset) * scale

    return normalize


def run_patch_demo(store: Any, out: Path, *, epochs: int = 2, workers: int = 2,
                   steps: tuple[int, int] = (1, 2)) -> dict[str, Any]:
    """Train ``small_unet3d`` briefly on patches of a volume store, then segment a held-out case.

    Parameters
    ----------
    store : VolumeStore
        A ``layout="volumes"`` store of CT volumes (converted from files it can still read).
    out : path
        Folder of the prediction ``<case>_prediction.nii.gz``.
    epochs, workers : int
        Training epochs (of ``cases * 4`` patches) and PatchDataset worker processes.
    steps : (int, int)
        Step numbers printed for training and prediction, out of ``steps[1]``.

    Returns
    -------
    dict
        ``patches_per_s`` (model compute included), ``patch_loss``, ``prediction`` (path) and
        ``dice`` (label -> Dice of the held-out case).
    """
    from .io.volumes import read_volume
    from .models import small_unet3d
    from .pipeline.patches import PatchDataset
    from .pipeline.predict import predict_volume

    n = len(store)
    held_out = n - 1
    train_cases = np.arange(n - 1 if n > 1 else n)
    side = min(min(store.shape(i)[:2]) for i in range(n))
    patch = tuple(min(p, max(4, side // 4 * 4)) for p in _PATCH[:2]) + (_PATCH[2],)
    size = "x".join(map(str, patch))
    print(f"[{steps[0]}/{steps[1]}] training a small 3D U-Net (small_unet3d) on {size} patches of {len(train_cases)} "
          f"case(s) for {epochs} epochs: batch {_PATCH_BATCH}, {_PATCH_SAMPLES} patches per case per epoch, "
          f"{_PATCH_FOREGROUND:.0%} centred on foreground, normalize='ct', workers={workers}")
    train = PatchDataset(store, _PATCH_BATCH, patch, samples_per_volume=_PATCH_SAMPLES,
                         foreground_fraction=_PATCH_FOREGROUND, cases=train_cases, normalize="ct",
                         workers=workers, use_multiprocessing=workers > 0)
    model = small_unet3d((*patch, store.channels), train.num_classes)
    model.optimizer.learning_rate = _PATCH_LR
    with train:
        t0 = time.perf_counter()
        history = model.fit(train, epochs=epochs, verbose=2)
        elapsed = time.perf_counter() - t0
    patches = len(train_cases) * _PATCH_SAMPLES * epochs
    loss = float(history.history["loss"][-1])
    print(f"trained on {patches} patches in {elapsed:.1f}s: {patches / elapsed:.1f} patches/s "
          f"(model compute included); final loss {loss:.4f}")
    case = store.case(held_out)
    which = "held out of training" if n > 1 else "the training case: only one"
    print(f"[{steps[1]}/{steps[1]}] sliding-window prediction of {case['name']} ({which}), {size} patches, "
          f"overlap {_PREDICT_OVERLAP:g}, Gaussian blending")
    path = Path(out) / f"{case['name']}_prediction.nii.gz"
    t0 = time.perf_counter()
    seg = predict_volume(model, case["image"], patch, overlap=_PREDICT_OVERLAP, batch_size=_PREDICT_BATCH,
                         normalize=_ct_function(train.options), output=path)
    took = time.perf_counter() - t0
    dice = dice_scores(seg.array, read_volume(case["mask"]).array)
    shown = ", ".join(f"label {k} {v:.2f}" for k, v in dice.items()) or "no foreground"
    print(f"prediction: {path} ({'x'.join(map(str, seg.array.shape))} labels, the case's affine) in {took:.1f}s; "
          f"Dice vs its label: {shown} (after {len(train) * epochs} training steps)")
    return {"patches_per_s": patches / elapsed, "patch_loss": loss, "prediction": str(path), "dice": dice}


def _volume_preview(store: Any, val_idx: np.ndarray, model: Any, path: Path, *, rows: int = 4) -> Path:
    """Windowed centre slices of validation samples with foreground: truth | prediction overlays."""
    from .pipeline.dataset import SegmentationDataset

    _, masks = store.read(val_idx)
    has_fg = masks.reshape(len(val_idx), -1).max(axis=1) > 0
    candidates = val_idx[has_fg] if has_fg.any() else val_idx
    pick = candidates[np.linspace(0, len(candidates) - 1, min(rows, len(candidates))).astype(np.int64)]
    pick = np.unique(pick)
    ds = SegmentationDataset(store, len(pick), indices=pick, shuffle=False, normalize="ct")
    x, truth = ds[0]
    pred = np.argmax(model.predict(x, verbose=0), axis=-1)[..., None]
    raw, _ = store.read(pick)
    centre = raw.shape[-1] // 2  # channels are slices s-K .. s+K: the middle one is slice s
    lo, hi = _HU_WINDOW
    shown = np.clip((raw[..., centre:centre + 1].astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)
    images = np.repeat(shown, 2, axis=0)
    labels = np.stack([m for pair in zip(truth.astype(np.int32), pred.astype(np.int32)) for m in pair])
    return preview_grid(images, labels, path, columns=2)
