"""Resampling a RAS volume and its labels to a target voxel spacing (``convert --spacing``).

Uses :func:`scipy.ndimage.zoom` in grid mode, so the volume's outer voxel *edges* stay where
they were (the field of view is kept) and the output grid has
``round(shape * spacing / target)`` voxels per axis; the spacing actually reached is
``spacing * shape / new_shape`` (within half a voxel of the target over the whole field of
view) and is what the resampled affine and the manifest carry.  Images are interpolated
linearly (integers rounded back to their dtype, so Hounsfield units stay ``int16``), labels
by nearest neighbour (no new label value can appear).  May import: :mod:`streamseg.errors`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import OptionError, truncate

__all__ = ["check_spacing", "resampled_shape", "resampled_affine", "resample_array", "resample_pair"]


def check_spacing(spacing: Any) -> tuple[float, float, float] | None:
    """Validate a target spacing: None, or three numbers >= 0 (0 keeps that axis as it is).

    Raises
    ------
    OptionError
        Not three non-negative finite numbers, or all three 0.
    """
    if spacing is None:
        return None
    try:
        values = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        values = ()
    if isinstance(spacing, (str, bytes)) or len(values) != 3 or not all(np.isfinite(values)) \
            or min(values) < 0 or max(values) == 0:
        raise OptionError("spacing must be three millimetre values SX SY SZ (RAS order, > 0; 0 keeps that "
                          f"axis's spacing). Received: spacing={truncate(spacing)}")
    return values  # type: ignore[return-value]


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    """Voxels per axis after resampling ``shape`` (spatial) from ``spacing`` to ``target``."""
    out = []
    for n, s, t in zip(shape[:3], spacing, target):
        out.append(int(n) if t == 0 else max(1, int(round(n * float(s) / float(t)))))
    return tuple(out)


def resampled_affine(affine: np.ndarray, shape: Sequence[int], new_shape: Sequence[int]) -> np.ndarray:
    """The voxel-to-world affine of the resampled grid (same field of view, grid mode).

    New voxel ``i`` lies at old continuous index ``(i + 0.5) * n / m - 0.5`` along an axis of
    ``n`` old and ``m`` new voxels.
    """
    scale = np.array([n / m for n, m in zip(shape[:3], new_shape[:3])], np.float64)
    step = np.eye(4)
    step[:3, :3] = np.diag(scale)
    step[:3, 3] = 0.5 * scale - 0.5
    return np.asarray(affine, np.float64) @ step


def resample_array(array: np.ndarray, new_shape: Sequence[int], *, labels: bool) -> np.ndarray:
    """Resample a ``(X, Y, Z)`` or ``(X, Y, Z, C)`` array onto ``new_shape`` (spatial).

    ``labels=True``: nearest neighbour, dtype kept.  Otherwise linear; integer images are
    rounded and clipped back to their dtype, floating ones stay ``float32``.
    """
    from scipy import ndimage

    new_shape = tuple(int(v) for v in new_shape[:3])
    if tuple(array.shape[:3]) == new_shape:
        return array
    zoom = [m / n for n, m in zip(array.shape[:3], new_shape)]
    order = 0 if labels else 1
    channels = [array] if array.ndim == 3 else [array[..., c] for c in range(array.shape[3])]
    outs = []
    for chan in channels:
        work = chan if labels or chan.dtype == np.float32 else chan.astype(np.float32)
        res = ndimage.zoom(work, zoom, order=order, mode="nearest", grid_mode=True, prefilter=False)
        if res.shape != new_shape:  # pragma: no cover - zoom rounds like resampled_shape
            raise RuntimeError(f"resampling gave {res.shape}, expected {new_shape}")
        if not labels and array.dtype.kind in "iu":
            info = np.iinfo(array.dtype)
            res = np.clip(np.rint(res), info.min, info.max).astype(array.dtype)
        elif not labels:
            res = res.astype(np.float32, copy=False)
        outs.append(res)
    out = outs[0] if array.ndim == 3 else np.stack(outs, axis=-1)
    return np.ascontiguousarray(out)


def resample_pair(image: np.ndarray, labels: np.ndarray, affine: np.ndarray, spacing: Sequence[float],
                  target: Sequence[float] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, ...]]:
    """Resample an image and its label volume to ``target`` spacing.

    Parameters
    ----------
    image : numpy.ndarray
        ``(X, Y, Z)`` or ``(X, Y, Z, C)`` in RAS order.
    labels : numpy.ndarray
        ``(X, Y, Z)`` integer labels on the same grid.
    affine : numpy.ndarray
        ``(4, 4)`` voxel-to-world matrix of that grid.
    spacing : sequence of float
        Current millimetres per axis.
    target : sequence of float, optional
        Target millimetres per axis (0 keeps an axis); None returns the inputs unchanged.

    Returns
    -------
    (image, labels, affine, spacing)
        On the new grid; ``spacing`` is the one actually reached (see the module docs).
    """
    if target is None:
        return image, labels, np.asarray(affine, np.float64), tuple(float(s) for s in spacing)
    shape = tuple(image.shape[:3])
    new_shape = resampled_shape(shape, spacing, target)
    if new_shape == shape:
        return image, labels, np.asarray(affine, np.float64), tuple(float(s) for s in spacing)
    new_affine = resampled_affine(affine, shape, new_shape)
    reached = tuple(float(s) * n / m for s, n, m in zip(spacing, shape, new_shape))
    return (resample_array(image, new_shape, labels=False), resample_array(labels, new_shape, labels=True),
            new_affine, reached)
