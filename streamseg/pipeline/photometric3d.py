"""Photometric transforms of 3D patches, on float32 arrays in place: pure functions that
:mod:`.augment3d` applies after the geometry (the image only; masks never pass here).

``_photo`` runs brightness, contrast, gamma, blur and noise as drawn by
:func:`~streamseg.pipeline.augment3d.sample_3d`; ``_blur`` (a separable Gaussian) also smooths
the elastic field of the geometric step.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

__all__: list[str] = []  # internal to the 3D augmentation (see .augment3d)

_PHOTO = ("brightness", "contrast", "gamma", "blur", "noise")  # photometric params
_BORDER = cv2.BORDER_REFLECT_101


def _into(fn: Any, dst: np.ndarray, *args: Any, **kw: Any) -> np.ndarray:
    """Call the OpenCV ``fn(*args, dst=dst)``; copy its result over if it did not write ``dst``."""
    out = fn(*args, dst=dst, **kw)
    if out is not dst:
        dst[...] = out.reshape(dst.shape)
    return dst


def _blur(vol: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur along all axes (reflected border), in place on a C-contiguous
    float32 ``(X, Y, Z)`` array; returns it."""
    X, Y, Z = vol.shape
    g = cv2.getGaussianKernel(2 * math.ceil(3 * sigma) + 1, sigma, cv2.CV_32F)
    one = np.ones((1, 1), np.float32)
    tmp = cv2.sepFilter2D(vol.reshape(X * Y, Z), -1, g, one, borderType=_BORDER)            # along Z
    _into(cv2.sepFilter2D, vol.reshape(X, Y * Z), tmp.reshape(X, Y * Z), -1, one, g, borderType=_BORDER)  # X
    for x in range(X):                                                                      # along Y
        vol[x] = cv2.sepFilter2D(vol[x], -1, one, g, borderType=_BORDER)
    return vol


def _photo(img: np.ndarray, p: dict[str, Any], vr: float, integer: bool) -> np.ndarray:
    """Photometric ops in place on the float32 C-contiguous (X, Y, Z, C) ``img``."""
    if all(p[k] is None for k in _PHOTO):
        return img
    X, Y, Z, C = img.shape
    rows = img.reshape(-1, Z * C)   # per-channel ops broadcast over Z * C: long, fast inner loops

    def per_channel(values: np.ndarray) -> np.ndarray:
        return np.tile(np.asarray(values, np.float32), Z)
    if p["brightness"] is not None or p["contrast"] is not None:
        factor = 1.0 if p["contrast"] is None else p["contrast"]
        shift = np.full(C, 0.0 if p["brightness"] is None else p["brightness"] * vr)
        if factor != 1.0:
            mean = rows.sum(axis=0, dtype=np.float64).reshape(Z, C).sum(axis=0) / (X * Y * Z)
            shift += mean * (1.0 - factor)
            img *= np.float32(factor)
        rows += per_channel(shift)
    if p["gamma"] is not None:
        lo = rows.min(axis=0).reshape(Z, C).min(axis=0)
        span = rows.max(axis=0).reshape(Z, C).max(axis=0) - lo
        rows -= per_channel(lo)
        rows *= per_channel(np.divide(1.0, span, out=np.zeros_like(span), where=span > 0))  # flat: unchanged
        with np.errstate(divide="ignore"):
            np.log(img, out=img)                        # x ** g as exp(g log x): faster; 0 -> 0
        img *= np.float32(p["gamma"])
        np.exp(img, out=img)
        rows *= per_channel(span)
        rows += per_channel(lo)
    if p["blur"]:  # None or 0.0: nothing to do
        for c in range(C):
            if C == 1:
                _blur(img[..., 0], p["blur"])           # a contiguous view: in place
            else:
                img[..., c] = _blur(np.ascontiguousarray(img[..., c]), p["blur"])
    if p["noise"] is not None:
        _add_noise(img, p["noise"][0], p["noise"][1] * vr)
    if integer:
        np.clip(img, 0.0, vr, out=img)
    return img


def _add_noise(img: np.ndarray, seed: int, std: float, chunk: int = 1 << 15) -> None:
    """Add Gaussian noise N(0, std**2) to the contiguous float32 ``img`` in place.

    Each value is a quantile of the normal distribution at one of 2**16 equally
    likely levels (uniform 16-bit draws through :data:`_NORMAL_LEVELS`): ~4x
    faster than drawing normals, tails cut at 4.3 sigma.
    """
    rng, flat = np.random.default_rng(seed), img.reshape(-1)
    levels = _NORMAL_LEVELS * np.float32(std)
    buf = np.empty(min(chunk, flat.size), np.float32)
    for start in range(0, flat.size, chunk):
        part = flat[start:start + chunk]
        part += np.take(levels, rng.integers(0, 1 << 16, size=part.size, dtype=np.uint16), out=buf[:part.size])


def _normal_levels(n: int) -> np.ndarray:
    """Standard normal quantiles at ``(i + 0.5) / n`` (Acklam's approximation, relative error < 1.2e-9)."""
    a = (-39.69683028665376, 220.9460984245205, -275.9285104469687, 138.3577518672690, -30.66479806614716,
         2.506628277459239)
    b = (-54.47609879822406, 161.5858368580409, -155.6989798598866, 66.80131188771972, -13.28068155288572, 1.0)
    c = (-7.784894002430293e-03, -0.3223964580411365, -2.400758277161838, -2.549732539343734, 4.374664141464968,
         2.938163982698783)
    d = (7.784695709041462e-03, 0.3224671290700398, 2.445134137142996, 3.754408661907416, 1.0)
    p = (np.arange(n // 2, dtype=np.float64) + 0.5) / n     # lower half; the upper half mirrors it
    q = np.sqrt(-2.0 * np.log(p))
    x = np.polyval(c, q) / np.polyval(d, q)                  # tail formula
    mid = p > 0.02425
    r = (p[mid] - 0.5) ** 2
    x[mid] = np.polyval(a, r) * (p[mid] - 0.5) / np.polyval(b, r)
    out = np.concatenate([x, -x[::-1]]).astype(np.float32)
    out.flags.writeable = False
    return out


_NORMAL_LEVELS = _normal_levels(1 << 16)  # read-only constant
