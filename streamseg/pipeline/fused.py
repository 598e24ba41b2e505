"""Per-pixel passes of batch assembly, fused: normalisation, clipping, and for uint8 images one
lookup-table pass that does the photometric ops and the normalisation together.

A uint8 image has 256 possible values per channel, so everything between the warp and the batch
slot (contrast around the image mean, brightness, gamma, the clip to ``[0, 255]``, then
``(x - offset) * scale``) is a function of the value and the channel: :func:`lookup_table`
computes it on the 256 values with exactly the float32 arithmetic of the per-pixel path
(:meth:`Augment._photo` then :func:`normalize_into`), and :func:`augment_into` applies it with
one ``cv2.LUT`` from the warped uint8 image straight into the float32 (or uint8) slot,
bit-identical results (used when gamma is drawn: a per-pixel power costs ~1 ms).  Without gamma
the chain is affine, and one ``cv2.addWeighted`` (uint8 in, float32 out) plus one clip does it
(:func:`_affine_into`): two passes instead of six, equal up to float32 rounding (~1e-7), and
faster than ``cv2.LUT`` into float32 (0.03-0.06 vs 0.10-0.15 ms for 256x256x3 here).  Blur and
noise depend on neighbours and on draws, not on the value alone: a sample that draws them takes
the per-pixel path.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

__all__ = ["normalize_into", "clip_into", "fusable", "uniform_pair", "lookup_table", "augment_into"]

_MAX_LUT_CHANNELS = 4  # cv2.LUT with a per-channel table, checked here for 1, 3 and 4 channels


def normalize_into(src: np.ndarray, dst: np.ndarray, offset: np.ndarray, scale: np.ndarray) -> None:
    """``dst[...] = (src - offset) * scale`` per channel, in float32, without slow broadcasts.

    ``dst`` is C-contiguous with channels last.  Uniform offsets/scales use scalars; per-channel
    ones are tiled along a whole image row, so NumPy's inner loops stay long (a length-3 inner
    loop is ~10x slower on a 32x256x256x3 batch).
    """
    np.copyto(dst, src, casting="unsafe")
    c = dst.shape[-1]
    rows = dst.reshape(-1, dst.shape[-2] * c) if dst.ndim >= 2 else dst.reshape(1, -1)
    for vec, op in ((offset, np.subtract), (scale, np.multiply)):
        if np.all(vec == vec.flat[0]):
            value = np.float32(vec.flat[0])
            if value != (0.0 if op is np.subtract else 1.0):
                op(rows, value, out=rows)
        else:
            op(rows, np.tile(vec.astype(np.float32), rows.shape[1] // c), out=rows)


def clip_into(dst: np.ndarray, low: np.ndarray, high: np.ndarray) -> None:
    """Clip C-contiguous channels-last float32 ``dst`` in place to per-channel ``[low, high]``.

    Like :func:`normalize_into`: scalars when every channel agrees, else bounds tiled along a
    whole image row.
    """
    c = dst.shape[-1]
    rows = dst.reshape(-1, dst.shape[-2] * c) if dst.ndim >= 2 else dst.reshape(1, -1)
    low, high = np.asarray(low, np.float32).reshape(-1), np.asarray(high, np.float32).reshape(-1)
    if np.all(low == low[0]) and np.all(high == high[0]):
        np.clip(rows, low[0], high[0], out=rows)
    else:
        reps = rows.shape[1] // c
        np.clip(rows, np.tile(low, reps), np.tile(high, reps), out=rows)


def fusable(augment: Any, image_dtype: np.dtype, channels: int) -> bool:
    """Whether :func:`augment_into` may take the lookup-table path for these images.

    uint8 images of 1 to 4 channels whose ``fill_value`` is a uint8 value (the warp then runs on
    uint8, as :meth:`Augment.apply` does); ``augment`` None counts as fusable.
    """
    if np.dtype(image_dtype) != np.uint8 or not 1 <= channels <= _MAX_LUT_CHANNELS:
        return False
    if augment is None:
        return True
    fv = float(augment.fill_value)
    return fv == int(fv) and 0 <= fv <= 255


def lookup_table(params: dict[str, Any] | None, value_range: float, mean: float | None,
                 offset: np.ndarray, scale: np.ndarray, channels: int, dtype: np.dtype) -> np.ndarray:
    """``(256, 1, C)`` table: uint8 value -> photometric ops, clip, then normalisation.

    ``params`` from :meth:`Augment.sample` (None: normalisation only); ``mean``: the warped
    image's mean for contrast.  ``dtype`` float32: normalised values; uint8: the photometric
    result rounded to the nearest integer, not normalised (the model normalises).
    """
    from .augment import Augment

    v = np.arange(256, dtype=np.float32)
    if params is not None:
        v = Augment._photo(v, params, value_range, True, mean=mean)
    if np.dtype(dtype) == np.uint8:
        return np.ascontiguousarray(np.repeat(np.rint(v).astype(np.uint8)[:, None], channels, axis=1)
                                    ).reshape(256, 1, channels)
    table = np.repeat(v[:, None], channels, axis=1)
    normalize_into(table, table, np.asarray(offset, np.float32), np.asarray(scale, np.float32))
    return table.reshape(256, 1, channels)


def _apply_table(src: np.ndarray, table: np.ndarray, dst: np.ndarray) -> None:
    h = src.shape[0] if src.ndim >= 2 else 1
    flat_src = src.reshape(h, -1, table.shape[2]) if table.shape[2] > 1 else src.reshape(h, -1)
    flat_dst = dst.reshape(flat_src.shape[:2] + ((table.shape[2],) if table.shape[2] > 1 else ()))
    got = cv2.LUT(flat_src, table, dst=flat_dst)
    if got is not flat_dst and not np.shares_memory(got, flat_dst):  # never expected; stay correct
        np.copyto(flat_dst, got.reshape(flat_dst.shape))


def uniform_pair(offset: np.ndarray, scale: np.ndarray) -> tuple[float, float] | None:
    """``(o, s)`` when every channel has the same offset and scale, else None."""
    off, sc = np.asarray(offset, np.float64).ravel(), np.asarray(scale, np.float64).ravel()
    if np.all(off == off[0]) and np.all(sc == sc[0]):
        return float(off[0]), float(sc[0])
    return None


def augment_into(augment: Any, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                 dst: np.ndarray, offset: np.ndarray, scale: np.ndarray, value_range: float, *,
                 uniform: tuple[float, float] | None | bool = False) -> np.ndarray:
    """Augment one uint8 ``image`` (``fusable``) into ``dst``; return the augmented mask.

    ``dst`` float32: equal to ``normalize_into(augment(image, mask, rng)[0], dst, offset, scale)``
    (bit for bit when gamma is drawn or nothing photometric is, else to float32 rounding,
    ~3e-7 relative); uint8: the augmented image rounded to integers.  Samples that draw blur or
    noise take the per-pixel path.  ``uniform``: :func:`uniform_pair` of ``offset, scale``, when
    the caller has it (once per batch); by default computed here.
    """
    if uniform is False:
        uniform = uniform_pair(offset, scale)
    h, w = image.shape[:2]
    p = augment.sample(rng, (h, w))
    if p["blur"] or p["noise"] is not None:
        img, msk = augment.apply(image, mask, p, value_range=value_range)
        if dst.dtype == np.uint8:
            np.rint(img, out=img)
            np.copyto(dst, img.reshape(dst.shape), casting="unsafe")  # clipped to [0, 255] by apply
        else:
            normalize_into(img.reshape(dst.shape), dst, offset, scale)
        return msk
    if p["matrix"] is None and p["elastic"] is None:
        warped, msk = image, np.array(mask)
    else:
        warped, msk = augment._warp(np.ascontiguousarray(image), np.asarray(mask), p["matrix"], p["elastic"])
    mean = None
    if p["contrast"] is not None and p["contrast"] != 1.0:
        mean = float(cv2.mean(warped.reshape(h, -1))[0])
    if p["gamma"] is None and _affine_into(warped, dst, p, value_range, mean, uniform):
        return msk
    channels = dst.shape[-1] if dst.ndim == 3 else 1
    _apply_table(warped, lookup_table(p, value_range, mean, offset, scale, channels, dst.dtype), dst)
    return msk


def _affine_into(warped: np.ndarray, dst: np.ndarray, p: dict[str, Any], vr: float, mean: float | None,
                 uniform: tuple[float, float] | None) -> bool:
    """Contrast, brightness, clip and normalisation as one ``cv2.addWeighted`` (+ one clip).

    ``clip(x * f + b, 0, vr)`` then ``(y - o) * s`` is ``clip(x * f * s + (b - o) * s, -o * s,
    (vr - o) * s)`` for ``s > 0``: the same values up to float32 rounding (~1e-7 relative), two
    passes instead of six.  False (nothing written) for per-channel offsets/scales or ``s <= 0``.
    """
    if dst.dtype == np.uint8:
        o, s = 0.0, 1.0  # not normalised: the model does it
    elif uniform is not None and uniform[1] > 0:
        o, s = uniform
    else:
        return False
    photometric = p["brightness"] is not None or p["contrast"] is not None
    f = 1.0 if p["contrast"] is None else float(p["contrast"])
    b = (0.0 if p["brightness"] is None else p["brightness"] * vr) + (mean * (1.0 - f) if mean is not None else 0.0)
    flat_src = warped.reshape(warped.shape[0], -1)
    flat_dst = dst.reshape(flat_src.shape)
    depth = cv2.CV_8U if dst.dtype == np.uint8 else cv2.CV_32F
    got = cv2.addWeighted(flat_src, f * s, flat_src, 0.0, (b - o) * s, dst=flat_dst, dtype=depth)
    if not np.shares_memory(got, flat_dst):  # never expected; stay correct
        np.copyto(flat_dst, got)
    if photometric and depth == cv2.CV_32F:  # uint8 output saturates to [0, 255] by itself
        np.clip(flat_dst, np.float32(-o * s), np.float32((vr - o) * s), out=flat_dst)
    return True
