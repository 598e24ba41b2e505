"""The 3-D patch loader a user writes today, as the baseline for streamseg's ``PatchDataset``.

A ``keras.utils.PyDataset`` over ``.nii.gz`` cases, written the way tutorials and nnU-Net-like
scripts do it: every sample loads its case's image and label with nibabel (reoriented with
``as_closest_canonical``, no cache, so a case drawn twice in a batch is read twice), a forced
foreground sample runs ``np.argwhere(label > 0)`` on the whole label volume, picks a voxel and
centres the patch on it; other samples take a uniform random patch; patches are padded with 0
where they leave the volume.

Sampling semantics follow ``streamseg.pipeline.patch_sampling`` where it is cheap to (every
case ``samples_per_volume`` times per epoch, shuffled per epoch, the last ``ceil(f * b)``
samples of each batch forced), so a comparison measures the loading, not different work;
this module does not import that code, as a user's script would not.

Usage::

    python benchmarks/baseline_patches.py      # smoke run: 2 cases of 64^3, 3 batches
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import nibabel as nib  # noqa: E402

__all__ = ["NiftiPatchBaseline", "make_cases"]

AugmentFn = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def make_cases(folder: str | os.PathLike, count: int, shape: tuple[int, int, int] = (96, 96, 64),
               seed: int = 0) -> list[tuple[Path, Path]]:
    """Write ``count`` synthetic CT-like cases (``imagesTr/``, ``labelsTr/``) and return the pairs.

    Thin wrapper of :func:`streamseg.io.synth_volumes.write_synth_volumes` (3 classes,
    spacing (1, 1, 2.5) mm, RAS on disk), without a progress bar.
    """
    from streamseg.io.synth_volumes import write_synth_volumes

    return write_synth_volumes(folder, count, shape=tuple(shape), seed=seed, progress=False)


def _crop(volume: np.ndarray, corner: np.ndarray, patch: tuple[int, int, int]) -> np.ndarray:
    """``volume[corner:corner + patch]``, zero-padded where the patch leaves the volume."""
    lo = np.maximum(corner, 0)
    hi = np.minimum(corner + np.asarray(patch), volume.shape)
    piece = volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    before = lo - corner
    after = np.asarray(patch) - before - np.asarray(piece.shape)
    return np.pad(piece, [(int(b), int(a)) for b, a in zip(before, after)])


class NiftiPatchBaseline(keras.utils.PyDataset):
    """Random 3-D patches with foreground oversampling, read from NIfTI files per sample.

    Parameters
    ----------
    cases : list of (image_path, label_path)
    batch_size : int
    patch_size : (int, int, int)
    samples_per_volume : int
        Patches per case per epoch; an epoch has ``ceil(len(cases) * samples_per_volume /
        batch_size)`` batches, the last possibly partial.
    foreground_fraction : float
        The last ``ceil(foreground_fraction * b)`` samples of each batch of ``b`` are centred on
        a foreground voxel (uniform over the classes present, then over their voxels).
    augment_fn : callable or None
        ``augment_fn(image, mask, rng) -> (image, mask)`` on each ``(PX, PY, PZ)`` patch.
    seed : int
        Sample order from ``default_rng([seed, epoch])``; batch ``i``'s draws from
        ``default_rng([seed, epoch, i])``, so workers do not change the result.
    workers, use_multiprocessing
        Passed to ``keras.utils.PyDataset``.

    Returns from ``__getitem__``: float32 images and float32 label patches, both
    ``(b, PX, PY, PZ, 1)``.
    """

    def __init__(self, cases: list[tuple[str | os.PathLike, str | os.PathLike]], batch_size: int,
                 patch_size: tuple[int, int, int], *, samples_per_volume: int = 1,
                 foreground_fraction: float = 0.33, augment_fn: AugmentFn | None = None, seed: int = 0,
                 workers: int = 1, use_multiprocessing: bool = False) -> None:
        super().__init__(workers=workers, use_multiprocessing=use_multiprocessing)
        self.cases = [(str(i), str(m)) for i, m in cases]
        self.batch_size = int(batch_size)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.samples_per_volume = int(samples_per_volume)
        self.foreground_fraction = float(foreground_fraction)
        self.augment_fn = augment_fn
        self.seed = int(seed)
        self.epoch = 0
        self._order = self._shuffle()

    def _shuffle(self) -> np.ndarray:
        order = np.repeat(np.arange(len(self.cases)), self.samples_per_volume)
        return np.random.default_rng([self.seed, self.epoch]).permutation(order)

    def __len__(self) -> int:
        return math.ceil(len(self._order) / self.batch_size)

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self._order = self._shuffle()

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, label_path = self.cases[index]
        image = nib.as_closest_canonical(nib.load(image_path)).get_fdata(dtype=np.float32)
        label = np.asanyarray(nib.as_closest_canonical(nib.load(label_path)).dataobj)
        return image, label

    def _corner(self, rng: np.random.Generator, shape: tuple[int, ...], label: np.ndarray | None) -> np.ndarray:
        patch = np.asarray(self.patch_size)
        if label is not None:
            fg = np.argwhere(label > 0)
            if len(fg):
                classes = np.unique(label[tuple(fg.T)])
                cls = rng.choice(classes)
                coords = fg[label[tuple(fg.T)] == cls]
                voxel = coords[rng.integers(len(coords))]
                low, high = np.minimum(0, np.asarray(shape) - patch), np.maximum(0, np.asarray(shape) - patch)
                return np.clip(voxel - patch // 2, low, high)
        spare = np.asarray(shape) - patch  # < 0: the patch covers the whole axis, padded
        return rng.integers(np.minimum(spare, 0), np.maximum(spare, 0) + 1)

    def __getitem__(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        batch = self._order[idx * self.batch_size:(idx + 1) * self.batch_size]
        b = len(batch)
        n_forced = math.ceil(self.foreground_fraction * b - 1e-9) if self.foreground_fraction > 0 else 0
        rng = np.random.default_rng([self.seed, self.epoch, idx])
        images = np.zeros((b, *self.patch_size, 1), np.float32)
        masks = np.zeros((b, *self.patch_size, 1), np.float32)
        for j, case in enumerate(batch):
            image, label = self._load(int(case))
            forced = j >= b - n_forced
            corner = self._corner(rng, image.shape, label if forced else None)
            img = _crop(image, corner, self.patch_size)
            msk = _crop(label, corner, self.patch_size)
            if self.augment_fn is not None:
                img, msk = self.augment_fn(img, msk, rng)
            images[j, ..., 0] = img
            masks[j, ..., 0] = msk
        return images, masks


def _smoke() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cases = make_cases(tmp, 2, (64, 64, 64), seed=0)
        data = NiftiPatchBaseline(cases, 2, (48, 48, 32), samples_per_volume=3, foreground_fraction=0.5)
        t0 = time.perf_counter()
        n = 0
        for i in range(3):
            x, y = data[i]
            n += len(x)
            print(f"batch {i}: images {x.shape} {x.dtype}, masks {y.shape} {y.dtype}, "
                  f"foreground voxels per patch {(y > 0).reshape(len(y), -1).sum(1).tolist()}")
        wall = time.perf_counter() - t0
        print(f"{n} patches in {wall:.2f} s: {n / wall:.1f} patches/s")


if __name__ == "__main__":
    _smoke()
