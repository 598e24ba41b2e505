"""Per-case statistics and checks for :mod:`streamseg.io.volume_source`.

Intensity extremes and percentiles (overall and within the foreground), label voxel counts,
the foreground slices along an axis, and the choice of one stored image dtype for all cases.
Integer images take an exact histogram path (bounded memory: blocks of a few million
voxels), whose percentiles equal :func:`numpy.percentile`'s default (linear) ones.
May import: :mod:`streamseg.errors`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InputError, LabelError, truncate

__all__ = ["percentiles", "intensity_record", "label_counts", "labels_of", "stored_image_dtype",
           "PERCENTILES"]

#: The percentiles recorded per case (overall and within the foreground).
PERCENTILES: tuple[float, float] = (0.5, 99.5)
_BLOCK = 1 << 22  # voxels per bincount block: bounds the intp temporary to 32 MiB


def _histogram(values: np.ndarray) -> tuple[int, np.ndarray]:
    """``(lo, counts)`` with ``counts[v - lo]`` = occurrences of ``v`` (integers of <= 2 bytes).

    Signed values are mapped order-preserving onto unsigned ones (flipping the sign bit), so
    ``np.bincount`` runs on the data as they are, block by block.
    """
    if values.dtype.kind == "b":
        values = values.view(np.uint8)
    if values.dtype.kind == "i":
        unsigned = np.dtype(f"u{values.dtype.itemsize}")
        flip = unsigned.type(1 << (8 * values.dtype.itemsize - 1))
        base = -int(flip)
        size = 1 << (8 * values.dtype.itemsize)
    else:
        unsigned, flip, base = values.dtype, None, 0
        size = int(values.max()) + 1
    counts = np.zeros(size, np.int64)
    for start in range(0, values.size, _BLOCK):
        block = values[start:start + _BLOCK]
        if flip is not None:
            block = block.view(unsigned) ^ flip
        counts += np.bincount(block, minlength=size)
    return base, counts


def percentiles(values: np.ndarray, qs: tuple[float, ...] = PERCENTILES) -> list[float] | None:
    """Percentiles of ``values`` (any shape) as numpy's default linear method gives them.

    NaN and infinite values are left out; ``None`` when nothing is left.
    """
    flat = values.reshape(-1)
    if flat.dtype.kind == "f":
        flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return None
    if flat.dtype.kind in "iub" and flat.dtype.itemsize <= 2:
        lo, counts = _histogram(flat)
        cum = np.cumsum(counts)
        out = []
        for q in qs:
            pos = q / 100.0 * (flat.size - 1)
            k = int(np.floor(pos))
            a = int(np.searchsorted(cum, k, side="right")) + lo
            b = int(np.searchsorted(cum, min(k + 1, flat.size - 1), side="right")) + lo
            out.append(float(a + (pos - k) * (b - a)))
        return out
    return [float(v) for v in np.percentile(flat.astype(np.float64, copy=False), qs)]


def _channel_stats(values: np.ndarray) -> dict[str, Any]:
    pct = percentiles(values)
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    if finite.size == 0:
        return {"min": None, "max": None, "p0_5": None, "p99_5": None}
    return {"min": _num(finite.min()), "max": _num(finite.max()),
            "p0_5": pct[0] if pct else None, "p99_5": pct[1] if pct else None}


def _num(v: Any) -> float | int:
    return int(v) if np.asarray(v).dtype.kind in "iub" else float(v)


def intensity_record(image: np.ndarray, foreground: np.ndarray) -> dict[str, Any]:
    """Per-channel min, max and 0.5/99.5 percentiles, overall and within ``foreground``.

    Parameters
    ----------
    image : numpy.ndarray
        ``(X, Y, Z)`` or ``(X, Y, Z, C)``.
    foreground : numpy.ndarray
        ``(X, Y, Z)`` bool, voxels with a label above 0.

    Returns
    -------
    dict
        ``{"overall": {"min": [..], "max": [..], "p0_5": [..], "p99_5": [..]},
        "foreground": {...}}``, one list entry per channel (``None`` where no voxel counts).
    """
    chans = image[..., np.newaxis] if image.ndim == 3 else image
    out: dict[str, Any] = {}
    for key, sel in (("overall", None), ("foreground", foreground)):
        per = [_channel_stats(chans[..., c] if sel is None else chans[..., c][sel])
               for c in range(chans.shape[-1])]
        out[key] = {k: [p[k] for p in per] for k in ("min", "max", "p0_5", "p99_5")}
    return out


def labels_of(mask: np.ndarray, where: str) -> np.ndarray:
    """Return a label volume as a compact unsigned integer array, or refuse it.

    Float masks (NIfTI label files are often float32) are accepted when every value is a
    whole number; negative labels are refused.

    Raises
    ------
    LabelError
        Non-integral or non-finite float values, or negative labels (the message names ``where``).
    """
    if mask.dtype.kind == "b":
        return mask.astype(np.uint8)
    if mask.dtype.kind == "f":
        bad = ~np.isfinite(mask) | (mask != np.round(mask))
        if bad.any():
            value = mask[bad].flat[0]
            raise LabelError(f"Mask {where} holds non-integer values (e.g. {float(value):g}, {int(bad.sum())} "
                             f"voxels); label volumes must hold whole numbers: round or threshold it "
                             f"first. Received: dtype {mask.dtype}")
    elif mask.dtype.kind not in "iu":
        raise LabelError(f"Mask {where} has dtype {mask.dtype}; expected integer labels.")
    if mask.size == 0:
        return mask.astype(np.uint8)
    lo, hi = mask.min(), mask.max()
    if lo < 0:
        raise LabelError(f"Mask {where} has negative labels (min {_num(lo)}); labels must be 0, 1, 2, ... "
                         f"Received: range {_num(lo)}..{_num(hi)}")
    for dt in (np.uint8, np.uint16, np.uint32):
        if hi <= np.iinfo(dt).max:
            return mask.astype(dt, copy=False)
    raise LabelError(f"Mask {where} has labels up to {_num(hi)}; at most 2**32-1 is supported.")


def label_counts(labels: np.ndarray) -> dict[int, int]:
    """Voxel count per label value present (``labels`` unsigned, from :func:`labels_of`)."""
    flat = labels.reshape(-1)
    if flat.size == 0:
        return {}
    if flat.dtype.itemsize <= 2:
        lo, counts = _histogram(flat)
        return {int(v) + lo: int(n) for v, n in enumerate(counts) if n}
    values, counts = np.unique(flat, return_counts=True)
    return {int(v): int(n) for v, n in zip(values, counts)}


def stored_image_dtype(dtypes: list[np.dtype], lo: float, hi: float, where: str) -> np.dtype:
    """One stored dtype for the images of every case: uint8, uint16, int16 or float32.

    The common dtype of the cases when it is one of those; integers wider than 16 bits are
    narrowed to what their observed range ``lo..hi`` needs (uint8, uint16, int16), anything
    else becomes float32.
    """
    kinds = {d.kind for d in dtypes}
    if "f" in kinds:
        return np.dtype(np.float32)
    if not kinds <= set("iub"):
        raise InputError(f"Images of {where} have unsupported dtypes {sorted({str(d) for d in dtypes})}; "
                         f"expected integers or floats. Received: {truncate([str(d) for d in dtypes])}")
    common = np.result_type(*[np.uint8 if d.kind == "b" else d for d in dtypes])
    if common in (np.uint8, np.uint16, np.int16):
        return np.dtype(common)
    if lo >= 0 and hi <= 255:
        return np.dtype(np.uint8)
    if lo >= 0 and hi <= 65535:
        return np.dtype(np.uint16)
    if lo >= np.iinfo(np.int16).min and hi <= np.iinfo(np.int16).max:
        return np.dtype(np.int16)
    return np.dtype(np.float32)
