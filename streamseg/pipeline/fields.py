"""Random fields of the 2D augmentation, drawn from their own seed: the elastic displacement
field and in-place Gaussian noise (:class:`streamseg.pipeline.augment.Augment`)."""

from __future__ import annotations

import math

import cv2
import numpy as np

__all__: list[str] = []  # private helpers of augment.py


def _elastic_field(h: int, w: int, seed: int, alpha: float, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed uniform displacement field (dx, dy), each ``(h, w)`` float32, in pixels."""
    step = max(1, int(sigma // 2))  # coarse grid; smoothing sigma / step there
    noise = np.random.default_rng(seed).random((-(-h // step) + 1, -(-w // step) + 1, 2), dtype=np.float32)
    noise = noise * np.float32(2.0) - np.float32(1.0)
    s, k = sigma / step, 2 * math.ceil(3 * sigma / step) + 1
    field = cv2.GaussianBlur(noise, (k, k), s, borderType=cv2.BORDER_REFLECT_101)
    field = cv2.resize(field, (w, h), interpolation=cv2.INTER_LINEAR) if step > 1 else field[:h, :w]
    field *= np.float32(alpha / step)  # matches the full-resolution field's amplitude
    return np.ascontiguousarray(field[..., 0]), np.ascontiguousarray(field[..., 1])


def _add_noise(img: np.ndarray, seed: int, std: float, chunk: int = 16384) -> None:
    """Add N(0, std**2) noise to contiguous float32 ``img`` in place.

    In-place Box-Muller on cache-sized chunks: ~3x faster than
    ``rng.standard_normal`` plus a full-size temporary; tails cut at ~5.8 sigma.
    """
    rng, flat = np.random.default_rng(seed), img.reshape(-1)
    for start in range(0, flat.size, 2 * chunk):
        n = min(2 * chunk, flat.size - start)
        half = (n + 1) // 2
        u = rng.random(2 * half, dtype=np.float32)
        r, t = u[:half], u[half:]
        np.negative(r, out=r)
        np.log1p(r, out=r)                       # log(1 - u), u in [0, 1): finite
        r *= np.float32(-2.0 * std * std)
        np.sqrt(r, out=r)                        # radius
        t *= np.float32(2.0 * math.pi)           # angle
        cos = np.cos(t)
        np.sin(t, out=t)
        t *= r
        r *= cos
        flat[start:start + n] += u[:n]
