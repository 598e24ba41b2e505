"""The :class:`Volume` record and the reorientation shared by every volume reader.

Kept apart from :mod:`streamseg.io.volumes` (the dispatcher) and :mod:`streamseg.io.dicom`
so that both can build volumes without importing each other.  May import:
:mod:`streamseg.errors`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError, truncate

__all__ = ["Volume", "canonical_volume", "hu_array"]

_INT16 = np.iinfo(np.int16)


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D medical volume in RAS axis order.

    Attributes
    ----------
    array : numpy.ndarray
        ``(X, Y, Z)`` or ``(X, Y, Z, C)`` (channels last), C-contiguous, native byte order.
        Index ``i, j, k`` grows toward patient Right, Anterior, Superior (the closest
        canonical orientation, as :func:`nibabel.as_closest_canonical` makes it; an oblique
        volume keeps its obliquity in :attr:`affine`).  The stored dtype is kept
        (``uint8`` stays ``uint8``, ``int16`` stays ``int16``); scaled data (NIfTI
        ``scl_slope``, DICOM rescale) are ``int16`` when exact, else ``float32``.
    affine : numpy.ndarray
        ``(4, 4)`` ``float64`` voxel-to-world matrix, world in RAS+ millimetres
        (NIfTI / nibabel convention).
    spacing : tuple of float
        Millimetres per spatial axis, in array order (``len == 3``).
    source : str
        The path the volume was read from (several, comma-separated, for stacked cases).
    orientation : tuple of str
        Axis codes of the data as stored on disk, e.g. ``('L', 'P', 'S')`` for a typical
        DICOM axial series (:func:`nibabel.aff2axcodes` of the original affine).
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, ...]
    source: str
    orientation: tuple[str, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of :attr:`array`."""
        return tuple(self.array.shape)

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """``(X, Y, Z)``, without the channel axis."""
        x, y, z = self.array.shape[:3]
        return int(x), int(y), int(z)

    @property
    def channels(self) -> int:
        """Number of channels (1 for a 3D array)."""
        return int(self.array.shape[3]) if self.array.ndim == 4 else 1

    def __repr__(self) -> str:
        return (f"Volume(shape={self.shape}, dtype={self.array.dtype}, spacing="
                f"{tuple(round(s, 4) for s in self.spacing)}, orientation on disk="
                f"{''.join(self.orientation)}, source={self.source!r})")


def _spatial(array: np.ndarray, where: str) -> np.ndarray:
    """Return ``array`` as 3 spatial axes (+ optional channels): pads 2D, squeezes 5D."""
    if array.ndim == 2:
        return array[:, :, np.newaxis]
    if array.ndim == 5 and array.shape[3] == 1:  # NIfTI vector images: (X, Y, Z, 1, C)
        return array[:, :, :, 0, :]
    if array.ndim in (3, 4):
        return array
    raise InputError(f"{where}: expected a 2D, 3D or 4D (channels) volume, got "
                     f"{array.ndim} dimensions. Received: shape {truncate(array.shape)}")


def canonical_volume(array: np.ndarray, affine: np.ndarray, source: str) -> Volume:
    """Reorient ``array``/``affine`` (RAS world) to the closest canonical (RAS) axis order.

    Uses nibabel's own orientation code (:func:`nibabel.orientations.io_orientation`,
    ``apply_orientation``, ``inv_ornt_aff``), the same steps as
    :func:`nibabel.as_closest_canonical`.

    Parameters
    ----------
    array : numpy.ndarray
        Voxel data with 2 or 3 spatial axes first, optional channel axis last.
    affine : numpy.ndarray
        ``(4, 4)`` voxel-to-RAS-world matrix of ``array`` as given.
    source : str
        Recorded as :attr:`Volume.source`; also names the file in errors.
    """
    from nibabel import orientations as ornts

    data = _spatial(np.asarray(array), source)
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
        raise InputError(f"{source}: the voxel-to-world matrix is not a finite 4x4 matrix. "
                         f"Received: {truncate(aff.tolist())}")
    try:
        on_disk = tuple(ornts.aff2axcodes(aff))
        ornt = ornts.io_orientation(aff)
    except Exception as exc:  # nibabel raises plain ValueError/LinAlgError on degenerate input
        raise InputError(f"{source}: cannot work out the axis orientation ({exc}). "
                         f"Received: affine {truncate(aff.tolist())}") from None
    if any(code is None for code in on_disk):
        raise InputError(f"{source}: the voxel-to-world matrix is degenerate (an axis maps to "
                         f"no direction). Received: {truncate(aff.tolist())}")
    aff = aff @ ornts.inv_ornt_aff(ornt, data.shape[:3])  # shape before reorienting
    data = ornts.apply_orientation(data, ornt)
    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    data = np.ascontiguousarray(data)
    spacing = tuple(float(s) for s in np.sqrt((aff[:3, :3] ** 2).sum(axis=0)))
    return Volume(array=data, affine=aff, spacing=spacing, source=source,
                  orientation=on_disk)  # type: ignore[arg-type]


def hu_array(raw: np.ndarray, slope: object, inter: object) -> np.ndarray:
    """Apply ``raw * slope + inter``; ``int16`` when every value is an exact int16, else ``float32``.

    ``slope``/``inter`` may be scalars or arrays that broadcast against ``raw`` (per-slice
    DICOM rescale).  The scaling itself is computed in ``float64``.
    """
    slope_a = np.asarray(slope, np.float64)
    inter_a = np.asarray(inter, np.float64)
    if raw.dtype.kind in "iub" and raw.dtype.itemsize <= 2 and raw.size \
            and np.array_equal(slope_a, np.round(slope_a)) \
            and np.array_equal(inter_a, np.round(inter_a)):
        # Integer rescale of <= 16-bit data (the usual CT case): exact in int64 bounds, so
        # check the range from the extremes and compute in int32 (half float64's memory).
        lo_raw, hi_raw = int(raw.min()), int(raw.max())
        ends = [lo_raw * slope_a + inter_a, hi_raw * slope_a + inter_a]
        lo, hi = float(min(e.min() for e in ends)), float(max(e.max() for e in ends))
        if lo >= _INT16.min and hi <= _INT16.max:
            out = raw.astype(np.int32) * slope_a.astype(np.int32) + inter_a.astype(np.int32)
            return out.astype(np.int16)
    scaled = raw.astype(np.float64) * slope_a + inter_a
    if scaled.size and np.all(np.isfinite(scaled)):
        lo, hi = float(scaled.min()), float(scaled.max())
        if lo >= _INT16.min and hi <= _INT16.max and np.array_equal(scaled, np.round(scaled)):
            return scaled.astype(np.int16)
    return scaled.astype(np.float32)
