"""What ``SegmentationDataset(normalize=...)`` does to stored intensities, precomputed once.

Every mode is ``y = clip_out((clip_in(x) - offset) * scale)`` per channel, with
``offset``/``scale`` per data set or per case; :func:`intensity_options` turns a mode and a
store's manifest into those arrays (fields of :class:`~.batches.BatchOptions`, picklable), so
the workers only index and multiply.

=============  ==========================================================================
mode           meaning
=============  ==========================================================================
"unit"         ``x / 255`` (uint8) or ``x / 65535`` (uint16); refused for int16 / float32
               images, which have no fixed range (e.g. CT in Hounsfield units)
"standardize"  the store's per-channel mean/std over all stored pixels (manifest
               ``image_mean`` / ``image_std``)
"window"       ``clip((x - lo) / (hi - lo), 0, 1)`` for ``window=(lo, hi)``, e.g. CT
               soft tissue ``(-175, 250)`` HU
"zscore"       per case: ``(x - mean) / std`` with the case's own mean/std over all its
               voxels (nnU-Net's ZScoreNormalization); needs a store converted from volumes
"ct"           nnU-Net's CTNormalization: clip to the data set's foreground 0.5 / 99.5
               percentiles, then ``(x - mean) / std`` with the foreground mean/std, all
               from the pooled foreground sample recorded at conversion
None           stored values as float32
=============  ==========================================================================

Order with augmentation: uint8 / uint16 stores under "unit", "standardize" or None are
augmented in their stored scale and normalised afterwards (photometric ops relative to the
dtype's range, as before).  Every other combination (int16 / float32 images, or the modes
"window", "zscore", "ct") is normalised first and augmented on the normalised float32
values, as nnU-Net does: photometric ops act in normalised units (``value_range`` 1:
brightness 0.1 shifts by a tenth of the window, or by 0.1 std), ``fill_value`` is a
normalised value (0: the window's ``lo``, or the mean), and "window" output is clipped to
[0, 1] again after augmentation.  With None on such a store the "normalised" values are the
stored ones: photometric ops then act in stored units with ``value_range`` 1 (as for float
images before), which suits data already in [0, 1], not Hounsfield units (gamma of raw HU
is meaningless): pick a normalising mode for those.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import OptionError, truncate
from ..store.reader import Store
from .batches import NORMALIZE_MODES, validate_choice

__all__ = ["intensity_options", "default_normalize", "NORMALIZE_FIRST_MODES", "STD_EPSILON"]

#: Modes that normalise before augmentation on any store.
NORMALIZE_FIRST_MODES = ("window", "zscore", "ct")
#: Floor of a standard deviation (nnU-Net's), so a constant image does not divide by zero.
STD_EPSILON = 1e-8
_HOW = ("convert the volumes with streamseg.io.volume_source.VolumeSliceSource and "
        "streamseg.store.converter.convert_source")


def _unsigned(dtype: np.dtype) -> bool:
    return np.dtype(dtype) in (np.uint8, np.uint16)


def default_normalize(store: Store) -> str | None:
    """A normalisation that works for ``store``: "unit" for uint8/uint16 images, else "ct"
    when the manifest has the foreground statistics, else "standardize" when it has the
    store's mean/std, else None."""
    if _unsigned(store.image_dtype):
        return "unit"
    fg = ((store.meta.get("params") or {}).get("source") or {}).get("foreground_intensity") or {}
    if fg.get("mean") is not None and fg.get("std") is not None and fg.get("p0_5") is not None:
        return "ct"
    return "standardize" if "image_mean" in store.meta else None


def _window(window: Any) -> tuple[float, float]:
    msg = f"window must be (lo, hi) with finite numbers lo < hi, e.g. (-175, 250). Received: window={truncate(window)}"
    if isinstance(window, (str, bytes)) or not hasattr(window, "__len__") or len(window) != 2:
        raise OptionError(msg)
    try:
        ok = all(not isinstance(v, (bool, np.bool_)) for v in window)
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError):
        raise OptionError(msg) from None
    if not ok or not (math.isfinite(lo) and math.isfinite(hi)) or not lo < hi:
        raise OptionError(msg)
    with np.errstate(over="ignore"):
        scale = np.float32(1.0 / (hi - lo))
        if not (np.isfinite(np.float32(lo)) and np.isfinite(np.float32(hi)) and np.isfinite(scale) and scale > 0):
            raise OptionError(f"window (lo, hi) must be within float32's range. Received: window={truncate(window)}")
    return lo, hi


def _source(store: Store, mode: str) -> dict[str, Any]:
    """``params.source`` of a volume store whose statistics are in the stored units."""
    source = (store.meta.get("params") or {}).get("source") or {}
    if source.get("kind") != "volumes":
        where = "wrapped arrays" if store.path is None else "a store converted from 2D images"
        raise OptionError(f"normalize={mode!r} needs per-volume intensity statistics, which only a store "
                          f"converted from volumes records ({_HOW}); this is {where}. Use "
                          f"normalize='standardize' (the store's own mean/std) or 'window'. "
                          f"Received: normalize={mode!r}")
    stored, recorded = str(store.image_dtype), source.get("image_dtype")
    if recorded is not None and recorded != stored:
        raise OptionError(f"normalize={mode!r}: the manifest's statistics are in the volumes' {recorded} units "
                          f"but the store holds {stored} images (converted with image_dtype={stored!r}); "
                          f"convert again without it, or use normalize='standardize'. "
                          f"Received: normalize={mode!r}")
    return source


def _per_store_channel(values: Any, c: int, what: str, mode: str) -> np.ndarray:
    """Per-modality values -> one per stored channel (2.5D context: channel k is modality k % C)."""
    vec = np.asarray(values, np.float64).reshape(-1)
    if vec.size == 0 or c % vec.size:
        raise OptionError(f"normalize={mode!r}: {what} has {vec.size} channel(s) but the store's images have "
                          f"{c}; the store does not match its manifest. Received: {truncate(values)}")
    return vec[np.arange(c) % vec.size]


def _missing(stats: dict[str, Any], keys: tuple[str, ...]) -> bool:
    return any(stats.get(k) is None or any(v is None for v in np.ravel(np.asarray(stats[k], object)))
               for k in keys)


def _zscore(store: Store, c: int) -> dict[str, Any]:
    source = _source(store, "zscore")
    cases = source.get("cases") or []
    stats = [((case.get("intensity") or {}).get("overall") or {}) for case in cases]
    if not cases or any("mean" not in s or "std" not in s for s in stats):
        raise OptionError("normalize='zscore' needs each case's mean/std (params.source.cases[*].intensity."
                          "overall in the manifest); this store was converted before they were recorded: "
                          f"{_HOW} again. Received: normalize='zscore'")
    counts = [int(case.get("selected", -1)) for case in cases]
    if min(counts) < 0 or sum(counts) != len(store):
        raise OptionError(f"normalize='zscore': the manifest's {len(cases)} case records select "
                          f"{sum(counts)} samples but the store holds {len(store)}; the manifest does "
                          "not describe this store. Received: normalize='zscore'")
    names = store.names
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    for case, a, b in zip(cases, offsets[:-1], offsets[1:]):
        for i in {int(a), int(b) - 1} if b > a else ():
            if names[i].rsplit(":", 1)[0] != case.get("name"):
                raise OptionError(f"normalize='zscore': sample {i} is {names[i]!r} but the manifest's case "
                                  f"records place case {case.get('name')!r} there; the store's sources do "
                                  "not match its manifest. Received: normalize='zscore'")
    offset = np.empty((len(cases), c), np.float32)
    scale = np.empty((len(cases), c), np.float32)
    for g, (case, s) in enumerate(zip(cases, stats)):
        if _missing(s, ("mean", "std")):
            raise OptionError(f"normalize='zscore': case {case.get('name')!r} has no finite voxel, so no "
                              f"mean/std. Received: {truncate(s)}")
        offset[g] = _per_store_channel(s["mean"], c, f"case {case.get('name')!r}", "zscore")
        scale[g] = 1.0 / np.maximum(_per_store_channel(s["std"], c, "its std", "zscore"), STD_EPSILON)
    group = np.repeat(np.arange(len(cases), dtype=np.int32), counts)
    return {"sample_group": group, "group_offset": offset, "group_scale": scale}


def _ct(store: Store, c: int) -> dict[str, Any]:
    source = _source(store, "ct")
    fg = source.get("foreground_intensity")
    keys = ("p0_5", "p99_5", "mean", "std")
    if not isinstance(fg, dict) or any(k not in fg for k in keys):
        raise OptionError("normalize='ct' needs the data set's pooled foreground statistics "
                          "(params.source.foreground_intensity in the manifest); this store was converted "
                          f"before they were recorded: {_HOW} again. Received: normalize='ct'")
    if _missing(fg, keys):
        raise OptionError("normalize='ct': no case has foreground voxels (every mask is empty), so there are "
                          "no foreground statistics; use normalize='zscore' or 'window'. "
                          f"Received: normalize='ct', foreground_intensity {truncate(fg)}")
    lo, hi, mean, std = (_per_store_channel(fg[k], c, "foreground_intensity", "ct") for k in keys)
    return {"clip_in": np.stack([lo, hi]).astype(np.float32), "image_offset": mean.astype(np.float32),
            "image_scale": (1.0 / np.maximum(std, STD_EPSILON)).astype(np.float32)}


def intensity_options(store: Store, normalize: str | None, window: Any = None) -> dict[str, Any]:
    """The :class:`~.batches.BatchOptions` fields that implement ``normalize`` on ``store``.

    Returns
    -------
    dict
        ``normalize``, ``image_offset``, ``image_scale`` (per channel), ``value_range``
        (what photometric augmentation is relative to), ``clip_in`` (``(2, C)`` or None),
        ``clip_out`` (``(lo, hi)`` or None), ``sample_group`` (store index -> row of
        ``group_offset`` / ``group_scale``, or None) and ``normalize_first``.

    Raises
    ------
    OptionError
        An unknown mode; ``window`` missing, malformed or given without "window"; "unit" on
        int16 / float32 images; "standardize" without the store's statistics; "zscore" / "ct"
        on a store without the volume statistics (the message names what is missing and how
        to get it).
    """
    validate_choice("normalize", normalize, NORMALIZE_MODES)
    if normalize == "window":
        if window is None:
            raise OptionError("normalize='window' needs window=(lo, hi), the stored values mapped to 0 and 1 "
                              "(e.g. (-175, 250) HU for CT soft tissue). Received: window=None")
        lo, hi = _window(window)
    elif window is not None:
        raise OptionError(f"window applies only with normalize='window'. Received: window={truncate(window)}, "
                          f"normalize={normalize!r}")
    dtype, meta = store.image_dtype, store.meta
    c = int(store.image_shape[2])
    first = not _unsigned(dtype) or normalize in NORMALIZE_FIRST_MODES
    value_range = 1.0 if first else (65535.0 if dtype == np.uint16 else 255.0)
    out: dict[str, Any] = {"normalize": normalize, "image_offset": np.zeros(c, np.float32),
                           "image_scale": np.ones(c, np.float32), "value_range": value_range, "clip_in": None,
                           "clip_out": None, "sample_group": None, "group_offset": None, "group_scale": None,
                           "normalize_first": first}
    if normalize == "unit":
        if not _unsigned(dtype):
            raise OptionError(f"normalize='unit' (the default) divides by the dtype's range, 255 or 65535; {dtype} "
                              "images have no such range (e.g. CT in Hounsfield units). Use normalize='window' "
                              "with window=(lo, hi), 'zscore', 'ct', 'standardize' or None. "
                              f"Received: normalize='unit' for {dtype} images")
        out["image_scale"][:] = 1.0 / value_range
    elif normalize == "standardize":
        if "image_mean" not in meta:
            alt = "'unit'" if _unsigned(dtype) else "'window' or None"
            raise OptionError("normalize='standardize' needs the store's statistics, which wrapped arrays "
                              f"lack; convert the data or use normalize={alt}. Received: normalize='standardize'")
        out["image_offset"][:] = meta["image_mean"]
        out["image_scale"][:] = 1.0 / np.maximum(np.asarray(meta["image_std"], np.float32), 1e-6)
    elif normalize == "window":
        scale = np.float32(1.0 / (hi - lo))
        if (np.float32(hi) - np.float32(lo)) * scale < 1:  # x = hi must give exactly 1 after the clip
            scale = np.nextafter(scale, np.float32(np.inf))
        out["image_offset"][:] = lo
        out["image_scale"][:] = scale
        out["clip_out"] = (0.0, 1.0)
    elif normalize == "zscore":
        out.update(_zscore(store, c))
    elif normalize == "ct":
        out.update(_ct(store, c))
    return out
