"""Synthetic CT-like 3D volumes with organ and lesion labels, written as NIfTI.

Each volume is a body ellipse in Hounsfield units (air -1000 outside, a fat rim near -100,
soft tissue near 40), an unlabelled spine (bone, ~700 HU) and lungs (~-850 HU), a few organs
(ellipsoids with distinct HU, labels ``1 .. classes - 2``), small lesions inside the first
organ (label ``classes - 1``, well under 1% of the voxels) and Gaussian noise.  A volume is a
pure function of ``(seed, index, shape, spacing, classes)`` and takes a few tens of
milliseconds for the default ``96 x 96 x 64``.

:func:`write_synth_volumes` writes a Medical Segmentation Decathlon layout
(``imagesTr/``, ``labelsTr/``, ``dataset.json``), optionally stored in a non-RAS orientation
so that readers' reorientation is exercised.  May import: :mod:`streamseg.errors`.

Examples
--------
>>> image, labels, affine = synth_volume(0)
>>> image.shape, image.dtype, labels.dtype
((96, 96, 64), dtype('int16'), dtype('uint8'))
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import OptionError, truncate
from .synth import _as_int, _stderr_is_tty

__all__ = ["synth_volume", "write_synth_volumes", "ORGAN_HU"]

#: Mean HU of organ labels 1, 2, ... (cycled): liver-, spleen-, kidney-, pancreas-like, ...
ORGAN_HU: tuple[int, ...] = (62, 48, 28, 52, 34, 70, 22, 56)
_AIR, _FAT, _SOFT, _BONE, _LUNG = -1000, -100, 40, 700, -850
_NOISE_HU = 12.0
_HU_RANGE = (-1024, 3071)


def _check_shape(shape: object) -> tuple[int, int, int]:
    msg = f"shape must be three integers >= 8 (X, Y, Z). Received: {truncate(shape)}"
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__len__") or len(shape) != 3:  # type: ignore[arg-type]
        raise OptionError(msg)
    try:
        out = tuple(_as_int(v, "shape", minimum=8) for v in shape)  # type: ignore[union-attr]
    except OptionError:
        raise OptionError(msg) from None
    return out  # type: ignore[return-value]


def _check_spacing(spacing: object) -> tuple[float, float, float]:
    msg = f"spacing must be three positive numbers (mm). Received: {truncate(spacing)}"
    if isinstance(spacing, (str, bytes)) or not hasattr(spacing, "__len__") or len(spacing) != 3:  # type: ignore[arg-type]
        raise OptionError(msg)
    try:
        out = tuple(float(v) for v in spacing)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise OptionError(msg) from None
    if not all(np.isfinite(v) and v > 0 for v in out):
        raise OptionError(msg)
    return out  # type: ignore[return-value]


def _ellipsoid(coords: tuple[np.ndarray, np.ndarray, np.ndarray], centre: np.ndarray,
               radii: np.ndarray) -> np.ndarray:
    """Boolean mask of an axis-aligned ellipsoid on open-grid mm coordinates."""
    x, y, z = coords
    return (((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
            + ((z - centre[2]) / radii[2]) ** 2) <= 1.0


def synth_volume(seed: int = 0, shape: tuple[int, int, int] = (96, 96, 64),
                 spacing: tuple[float, float, float] = (1.0, 1.0, 2.5), *, classes: int = 3,
                 index: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return one synthetic CT-like volume, its labels and its affine (all in RAS order).

    Parameters
    ----------
    seed : int, default 0
        Seed of the data set; with ``index`` it determines the volume completely.
    shape : tuple of int, default (96, 96, 64)
        ``(X, Y, Z)``, each >= 8.
    spacing : tuple of float, default (1.0, 1.0, 2.5)
        Millimetres per voxel along X, Y, Z.
    classes : int, default 3
        Number of label values including background (2..16): organs get labels
        ``1 .. classes - 2``, lesions ``classes - 1`` (with ``classes=2`` the organ is drawn
        but only lesions are labelled).
    index : int, default 0
        Which volume of the data set (``write_synth_volumes`` passes 0, 1, ...).

    Returns
    -------
    image : numpy.ndarray
        ``(X, Y, Z)`` ``int16`` HU in ``[-1024, 3071]``.
    labels : numpy.ndarray
        ``(X, Y, Z)`` ``uint8`` in ``[0, classes)``.
    affine : numpy.ndarray
        ``(4, 4)`` ``float64`` RAS affine, ``diag(spacing)`` centred on the origin.
    """
    s = _as_int(seed, "seed", minimum=0)
    i = _as_int(index, "index", minimum=0)
    k = _as_int(classes, "classes", minimum=2, maximum=16)
    dims = _check_shape(shape)
    sp = _check_spacing(spacing)
    rng = np.random.default_rng([s, i, 0x3D])

    extent = np.array(dims, np.float64) * sp
    axes = [((np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * d) for n, d in zip(dims, sp)]
    x, y, z = np.ix_(*axes)
    coords = (x, y, z)
    image = np.full(dims, _AIR, np.float32)
    labels = np.zeros(dims, np.uint8)

    # Body: an elliptic cylinder that narrows a little toward both ends of Z.
    a = 0.45 * extent[0] * rng.uniform(0.9, 1.0)
    b = 0.34 * extent[1] * rng.uniform(0.9, 1.0)
    taper = 1.0 - 0.12 * (z / (0.5 * extent[2])) ** 2
    r2 = (x / a) ** 2 + (y / b) ** 2
    body = r2 <= taper**2
    image[body] = _SOFT
    image[body & (r2 >= (0.9 * taper) ** 2)] = _FAT
    inner = body & (r2 < (0.85 * taper) ** 2)

    # Unlabelled anatomy: lungs in the upper third, a spine at the back (posterior = -Y).
    lung_z = 0.3 * extent[2]
    for side in (-1.0, 1.0):
        lung = _ellipsoid(coords, np.array([side * 0.45 * a, 0.05 * b, lung_z]),
                          np.array([0.33 * a, 0.55 * b, 0.3 * extent[2]]))
        image[lung & inner] = _LUNG
    spine = ((x / (0.13 * b)) ** 2 + ((y + 0.68 * b) / (0.13 * b)) ** 2) <= 1.0
    image[np.broadcast_to(spine, dims) & body] = _BONE

    # Organs: ellipsoids in the lower (abdominal) part; organ 0 is liver-like, on the right.
    n_organs = max(1, k - 2)
    organ_masks = []
    for o in range(n_organs):
        if o == 0:
            centre = np.array([0.4 * a, 0.1 * b, -0.1 * extent[2]])
            radii = np.array([0.35 * a, 0.45 * b, 0.25 * extent[2]])
        else:
            centre = np.array([rng.uniform(-0.5, 0.5) * a, rng.uniform(-0.4, 0.3) * b,
                               rng.uniform(-0.35, 0.05) * extent[2]])
            radii = np.array([rng.uniform(0.1, 0.2) * a, rng.uniform(0.1, 0.2) * b,
                              rng.uniform(0.08, 0.15) * extent[2]])
        centre *= rng.uniform(0.9, 1.1, 3)
        mask = _ellipsoid(coords, centre, radii) & inner & ~np.broadcast_to(spine, dims)
        image[mask] = ORGAN_HU[o % len(ORGAN_HU)] + rng.uniform(-4.0, 4.0)
        if k > 2:
            labels[mask] = o + 1
        organ_masks.append(mask)

    # Lesions: 1-3 small blobs inside organ 0, hypo- or hyperdense.
    host = organ_masks[0]
    where = np.argwhere(host)
    if len(where):
        small = float(min(extent))
        for _ in range(int(rng.integers(1, 4))):
            cx, cy, cz = where[int(rng.integers(len(where)))]
            centre = np.array([axes[0][cx], axes[1][cy], axes[2][cz]], np.float64)
            radii = small * rng.uniform(0.03, 0.06) * rng.uniform(0.8, 1.2, 3)
            blob = _ellipsoid(coords, centre, radii) & host
            image[blob] = ORGAN_HU[0] + (rng.uniform(-45, -25) if rng.random() < 0.7
                                         else rng.uniform(30, 60))
            labels[blob] = k - 1

    image += rng.standard_normal(dims, dtype=np.float32) * np.float32(_NOISE_HU)
    image = np.clip(np.rint(image), *_HU_RANGE).astype(np.int16)
    affine = np.diag([*sp, 1.0])
    affine[:3, 3] = -(np.array(dims) - 1) / 2.0 * np.array(sp)
    return image, labels, affine


def _check_orientation(orientation: object) -> str:
    msg = ("orientation must be three axis codes, one of L/R, one of P/A and one of I/S, "
           f"e.g. 'RAS', 'LPS', 'LSA'. Received: {truncate(orientation)}")
    if not isinstance(orientation, str) or len(orientation) != 3:
        raise OptionError(msg)
    codes = orientation.upper()
    if sum(c in "LR" for c in codes) != 1 \
            or sum(c in "AP" for c in codes) != 1 or sum(c in "SI" for c in codes) != 1:
        raise OptionError(msg)
    return codes


def write_synth_volumes(dst: str | os.PathLike, count: int, *,
                        shape: tuple[int, int, int] = (96, 96, 64),
                        spacing: tuple[float, float, float] = (1.0, 1.0, 2.5),
                        classes: int = 3, seed: int = 0, orientation: str = "RAS",
                        progress: bool | None = None) -> list[tuple[Path, Path]]:
    """Write ``count`` synthetic CT volumes and labels as a Decathlon-style NIfTI data set.

    Creates ``dst/imagesTr/case_000.nii.gz``, ``dst/labelsTr/case_000.nii.gz``, ... and
    ``dst/dataset.json`` (labels, modality, training list).  Volume ``i`` is
    ``synth_volume(seed, shape, spacing, classes=classes, index=i)``; existing files with
    the same names are overwritten.

    Parameters
    ----------
    dst : str or os.PathLike
        Destination folder (created with parents if needed).
    count : int
        Number of cases (>= 0).
    shape, spacing, classes, seed
        As in :func:`synth_volume`.
    orientation : str, default 'RAS'
        Axis codes of the data as stored on disk, e.g. ``'LPS'`` (DICOM-like) or ``'LSA'``;
        the affine is written to match, so a reader that reorients to RAS gets
        :func:`synth_volume`'s arrays back.
    progress : bool or None, default None
        Show a tqdm progress bar; ``None`` shows it only when stderr is a terminal.

    Returns
    -------
    list of (pathlib.Path, pathlib.Path)
        ``(image, label)`` file pairs in case order.
    """
    import nibabel as nib
    from nibabel import orientations as ornts
    from tqdm import tqdm

    n = _as_int(count, "count", minimum=0)
    codes = _check_orientation(orientation)
    dims = _check_shape(shape)
    sp = _check_spacing(spacing)
    k = _as_int(classes, "classes", minimum=2, maximum=16)
    s = _as_int(seed, "seed", minimum=0)
    if progress is not None and not isinstance(progress, (bool, np.bool_)):
        raise OptionError(f"progress must be True, False or None. Received: {truncate(progress)}")
    show = _stderr_is_tty() if progress is None else bool(progress)

    root = Path(dst)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    transform = ornts.ornt_transform(ornts.axcodes2ornt("RAS"), ornts.axcodes2ornt(tuple(codes)))
    pairs: list[tuple[Path, Path]] = []
    with tqdm(total=n, disable=not show, unit="case", desc="synth volumes") as bar:
        for i in range(n):
            image, labels, affine = synth_volume(s, dims, sp, classes=k, index=i)
            disk_affine = affine @ ornts.inv_ornt_aff(transform, image.shape)
            name = f"case_{i:03d}.nii.gz"
            out = (root / "imagesTr" / name, root / "labelsTr" / name)
            for arr, path in zip((image, labels), out):
                img = nib.Nifti1Image(np.ascontiguousarray(ornts.apply_orientation(arr, transform)),
                                      disk_affine)
                img.set_data_dtype(arr.dtype)
                img.header.set_xyzt_units("mm")
                img.set_qform(disk_affine, code=1)
                img.set_sform(disk_affine, code=1)
                nib.save(img, path)
            pairs.append(out)
            bar.update(1)
    names = ["background"] + [f"organ_{o}" for o in range(1, k - 1)] + ["lesion"]
    meta = {
        "name": "streamseg-synth-ct",
        "description": "Synthetic CT-like volumes (streamseg.io.synth_volumes)",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(v): label for v, label in enumerate(names)},
        "numTraining": n,
        "numTest": 0,
        "training": [{"image": f"./imagesTr/{a.name}", "label": f"./labelsTr/{b.name}"}
                     for a, b in pairs],
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return pairs
