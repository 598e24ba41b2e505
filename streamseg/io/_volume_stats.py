"""Per-case statistics and checks for :mod:`streamseg.io.volume_source`.

Intensity extremes, percentiles, mean and std (overall and within the foreground), label
voxel counts, the foreground slices along an axis, the choice of one stored image dtype for
all cases, and the data set's pooled foreground intensity statistics (nnU-Net's CT scheme).
Integer images take an exact histogram path (bounded memory: blocks of a few million
voxels), whose percentiles equal :func:`numpy.percentile`'s default (linear) ones; means and
standard deviations are accumulated block by block too (exactly for integers).
May import: :mod:`streamseg.errors`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InputError, LabelError, truncate

__all__ = ["percentiles", "intensity_record", "label_counts", "labels_of", "stored_image_dtype",
           "PERCENTILES", "mean_std", "ForegroundPool", "FOREGROUND_SAMPLES"]

#: The percentiles recorded per case (overall and within the foreground).
PERCENTILES: tuple[float, float] = (0.5, 99.5)
_BLOCK = 1 << 22  # voxels per bincount block: bounds the intp temporary to 32 MiB
#: Foreground voxels drawn per case (with replacement) for the pooled statistics.
FOREGROUND_SAMPLES = 10_000


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


def mean_std(values: np.ndarray) -> tuple[float, float] | None:
    """Mean and (population) standard deviation of ``values``, as ``np.mean`` / ``np.std`` give.

    Block by block (bounded temporaries): integers of <= 2 bytes exactly (Python integers),
    anything else in float64 with two passes; NaN and infinite values are left out; ``None``
    when nothing is left.
    """
    flat = values.reshape(-1)
    if flat.dtype.kind in "iub" and flat.dtype.itemsize <= 2:
        n, s, sq = flat.size, 0, 0
        for start in range(0, flat.size, _BLOCK):
            block = flat[start:start + _BLOCK].astype(np.int64)
            s += int(block.sum())
            sq += int(np.dot(block, block))  # < 2**63 per block for values of <= 2 bytes
        if n == 0:
            return None
        return s / n, max(n * sq - s * s, 0) ** 0.5 / n
    n, total = 0, 0.0
    for start in range(0, flat.size, _BLOCK):
        block = flat[start:start + _BLOCK].astype(np.float64)
        block = block[np.isfinite(block)]
        n += block.size
        total += float(block.sum())
    if n == 0:
        return None
    mean, dev = total / n, 0.0
    for start in range(0, flat.size, _BLOCK):
        block = flat[start:start + _BLOCK].astype(np.float64)
        block = block[np.isfinite(block)] - mean
        dev += float(np.dot(block, block))
    return mean, (dev / n) ** 0.5


def _channel_stats(values: np.ndarray) -> dict[str, Any]:
    pct = percentiles(values)
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    if finite.size == 0:
        return {"min": None, "max": None, "p0_5": None, "p99_5": None, "mean": None, "std": None}
    ms = mean_std(values)
    return {"min": _num(finite.min()), "max": _num(finite.max()),
            "p0_5": pct[0] if pct else None, "p99_5": pct[1] if pct else None,
            "mean": ms[0] if ms else None, "std": ms[1] if ms else None}


def _num(v: Any) -> float | int:
    return int(v) if np.asarray(v).dtype.kind in "iub" else float(v)


def intensity_record(image: np.ndarray, foreground: np.ndarray,
                     pool: "ForegroundPool | None" = None) -> dict[str, Any]:
    """Per-channel min, max, 0.5/99.5 percentiles, mean and std, overall and within ``foreground``.

    Parameters
    ----------
    image : numpy.ndarray
        ``(X, Y, Z)`` or ``(X, Y, Z, C)``.
    foreground : numpy.ndarray
        ``(X, Y, Z)`` bool, voxels with a label above 0.
    pool : ForegroundPool, optional
        Receives this case's draw of foreground voxels (:meth:`ForegroundPool.add`).

    Returns
    -------
    dict
        ``{"overall": {"min": [..], "max": [..], "p0_5": [..], "p99_5": [..], "mean": [..],
        "std": [..]}, "foreground": {...}}``, one list entry per channel (``None`` where no
        voxel counts).  ``std`` is the population standard deviation (``np.std``).
    """
    chans = image[..., np.newaxis] if image.ndim == 3 else image
    out: dict[str, Any] = {}
    for key, sel in (("overall", None), ("foreground", foreground)):
        per = []
        fg_values = []
        for c in range(chans.shape[-1]):
            values = chans[..., c] if sel is None else chans[..., c][sel]
            per.append(_channel_stats(values))
            if sel is not None:
                fg_values.append(values)
        out[key] = {k: [p[k] for p in per] for k in ("min", "max", "p0_5", "p99_5", "mean", "std")}
        if sel is not None and pool is not None:
            pool.add(fg_values)
        del fg_values
    return out


class ForegroundPool:
    """A bounded, seeded sample of foreground voxels pooled over cases (nnU-Net's fingerprint).

    Each case contributes ``per_case`` voxels drawn uniformly *with replacement* from its
    foreground (the same voxels for every channel), with
    ``numpy.random.default_rng([seed, case_index, 0xF06])``; a case without foreground adds
    nothing.  Memory: ``per_case * cases * channels`` float64 values.

    Parameters
    ----------
    seed : int
        Seed of the draws.
    per_case : int
        Voxels drawn per case (default :data:`FOREGROUND_SAMPLES`).
    """

    def __init__(self, seed: int, per_case: int = FOREGROUND_SAMPLES) -> None:
        self.seed, self.per_case = int(seed), int(per_case)
        self._parts: list[np.ndarray] = []
        self._cases = 0

    def add(self, values: list[np.ndarray]) -> None:
        """Draw from one case's foreground values, one 1-D array per channel (equal sizes)."""
        rng = np.random.default_rng([self.seed, self._cases, 0xF06])
        self._cases += 1
        n = int(values[0].size) if values else 0
        if n == 0 or self.per_case == 0:
            return
        pick = rng.integers(0, n, size=self.per_case)
        self._parts.append(np.stack([v.reshape(-1)[pick].astype(np.float64) for v in values], axis=1))

    def statistics(self) -> dict[str, Any]:
        """``{"p0_5", "p99_5", "mean", "std"}`` (lists, one per channel) of the pooled sample.

        Percentiles are numpy's default (linear) ones; ``std`` is ``np.std`` (population), as
        nnU-Net computes them.  Non-finite values are left out; ``None`` entries when no
        foreground voxel was drawn.  Also ``voxels_sampled``, ``per_case``, ``seed`` and
        ``cases_with_foreground``.
        """
        out: dict[str, Any] = {"p0_5": None, "p99_5": None, "mean": None, "std": None}
        pooled = np.concatenate(self._parts) if self._parts else None
        if pooled is not None:
            cols = [pooled[:, c][np.isfinite(pooled[:, c])] for c in range(pooled.shape[1])]
            if all(col.size for col in cols):
                pct = [np.percentile(col, PERCENTILES) for col in cols]
                out = {"p0_5": [float(p[0]) for p in pct], "p99_5": [float(p[1]) for p in pct],
                       "mean": [float(col.mean()) for col in cols], "std": [float(col.std()) for col in cols]}
        out.update({"voxels_sampled": 0 if pooled is None else int(pooled.shape[0]),
                    "per_case": self.per_case, "seed": self.seed,
                    "cases_with_foreground": len(self._parts)})
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
