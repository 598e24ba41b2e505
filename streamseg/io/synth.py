"""Synthetic, medical-looking image/mask pairs for demos, tests and benchmarks.

Each sample resembles a retinal fundus photograph (or, in grayscale, a CT-like
slice): a bright, softly edged disc or body ellipse on a black surround, with a
vignette and low-frequency texture, an unlabelled bright "optic disc" spot as a
distractor, lesion-like labelled blobs with soft edges and a class-specific
intensity/colour shift, and mild Gaussian noise.

Samples are a pure function of ``(seed, index, size, classes, channels, dtype)``,
fast to produce (a few milliseconds for 256x256 RGB) and compress like real
scans rather than like white noise.

Examples
--------
>>> image, mask = synth_sample(0)
>>> image.shape, image.dtype, mask.shape, mask.dtype
((256, 256, 3), dtype('uint8'), (256, 256), dtype('uint8'))
"""

from __future__ import annotations

import operator
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from ..errors import OptionError, truncate

__all__ = ["synth_sample", "synth_pairs", "write_synth_folder", "IMAGE_EXTENSIONS"]

#: Image file extensions accepted by :func:`write_synth_folder`.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")
_UINT16_EXTENSIONS = frozenset({".png", ".tif", ".tiff"})

_GOLDEN = 0.6180339887498949
# Fundus-like base colour (RGB, linear 0..1) and its grayscale counterpart.
_BASE_RGB = np.array([0.80, 0.43, 0.22], dtype=np.float32)
_BASE_GRAY = np.array([0.62], dtype=np.float32)
_NOISE_SIGMA = 1.2 / 255.0  # Gaussian noise, in units of full scale


# --------------------------------------------------------------------------- #
# argument validation
# --------------------------------------------------------------------------- #
def _as_int(value: object, name: str, *, minimum: int | None = None,
            maximum: int | None = None, expected: str | None = None) -> int:
    """Return ``value`` as an ``int`` or raise :class:`OptionError`."""
    what = expected or (
        f"an integer >= {minimum}" if maximum is None and minimum is not None
        else f"an integer in [{minimum}, {maximum}]" if minimum is not None
        else "an integer"
    )
    if isinstance(value, (bool, np.bool_)):
        raise OptionError(f"{name} must be {what}. Received: {truncate(value)}")
    try:
        result = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise OptionError(f"{name} must be {what}. Received: {truncate(value)}") from None
    if (minimum is not None and result < minimum) or (maximum is not None and result > maximum):
        raise OptionError(f"{name} must be {what}. Received: {truncate(value)}")
    return int(result)


def _check_size(size: object) -> tuple[int, int]:
    msg = f"size must be a pair of positive integers (height, width). Received: {truncate(size)}"
    if isinstance(size, (str, bytes)) or not hasattr(size, "__len__"):
        raise OptionError(msg)
    try:
        items = tuple(size)  # type: ignore[arg-type]
    except TypeError:
        raise OptionError(msg) from None
    if len(items) != 2:
        raise OptionError(msg)
    out = []
    for item in items:
        if isinstance(item, (bool, np.bool_)):
            raise OptionError(msg)
        try:
            v = operator.index(item)
        except TypeError:
            raise OptionError(msg) from None
        if v <= 0:
            raise OptionError(msg)
        out.append(int(v))
    return out[0], out[1]


def _check_dtype(dtype: object) -> np.dtype:
    msg = f"dtype must be 'uint8' or 'uint16'. Received: {truncate(dtype)}"
    try:
        dt = np.dtype(dtype)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise OptionError(msg) from None
    if dt not in (np.dtype(np.uint8), np.dtype(np.uint16)):
        raise OptionError(msg)
    return dt


def _check_common(size: object, classes: object, channels: object, seed: object,
                  dtype: object) -> tuple[tuple[int, int], int, int, int, np.dtype]:
    hw = _check_size(size)
    k = _as_int(classes, "classes", minimum=2, maximum=256)
    if isinstance(channels, (bool, np.bool_)):
        c = -1
    else:
        try:
            c = operator.index(channels)  # type: ignore[arg-type]
        except TypeError:
            c = -1
    if c not in (1, 3):
        raise OptionError(
            f"channels must be 1 (grayscale) or 3 (RGB). Received: {truncate(channels)}")
    s = _as_int(seed, "seed", minimum=0)
    dt = _check_dtype(dtype)
    return hw, k, int(c), s, dt


# --------------------------------------------------------------------------- #
# generation
# --------------------------------------------------------------------------- #
def _class_shift(k: int, channels: int) -> np.ndarray:
    """Deterministic intensity/colour shift of lesion class ``k`` (>= 1).

    Odd classes are bright (exudate-like), even classes dark (haemorrhage-like);
    the magnitude and, for RGB, the hue differ per class.
    """
    sign = 1.0 if k % 2 == 1 else -1.0
    mag = 0.20 + 0.12 * ((k * _GOLDEN) % 1.0)
    if channels == 1:
        return np.array([sign * mag], dtype=np.float32)
    theta = 2.0 * np.pi * ((k * 0.3819660112501051) % 1.0)
    phases = theta - 2.0 * np.pi * np.arange(3) / 3.0
    weights = 1.0 + 0.6 * np.cos(phases)  # mean 1 over the three channels
    return (sign * mag * weights).astype(np.float32)


def _smooth_field(rng: np.random.Generator, grid: tuple[int, int],
                  out_hw: tuple[int, int]) -> np.ndarray:
    """Low-frequency ``(H, W)`` random field: a small normal grid upsampled bicubically."""
    small = rng.standard_normal(grid, dtype=np.float32)
    h, w = out_hw
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def synth_sample(index: int, *, size: tuple[int, int] = (256, 256), classes: int = 3,
                 channels: int = 3, seed: int = 0,
                 dtype: str | np.dtype = "uint8") -> tuple[np.ndarray, np.ndarray]:
    """Generate one synthetic image/mask pair.

    Parameters
    ----------
    index : int
        Sample index (>= 0). Different indices give different samples.
    size : tuple of int, default (256, 256)
        ``(height, width)`` in pixels, both positive.
    classes : int, default 3
        Number of labels including background 0; in ``[2, 256]``. Lesions get
        labels ``1 .. classes - 1``, drawn uniformly, so every label appears over
        a modest number of samples.
    channels : {1, 3}, default 3
        1 for grayscale, 3 for RGB (channel order R, G, B).
    seed : int, default 0
        Dataset seed (>= 0). The sample uses ``np.random.default_rng([seed, index])``
        and never the global NumPy random state.
    dtype : {'uint8', 'uint16'}, default 'uint8'
        Image dtype. ``uint16`` uses the full 16-bit range with finer-grained noise.

    Returns
    -------
    image : numpy.ndarray
        ``(H, W, C)`` array of ``dtype``.
    mask : numpy.ndarray
        ``(H, W)`` ``uint8`` array with labels in ``[0, classes)``.

    Raises
    ------
    OptionError
        If an argument is out of range or of the wrong type.

    Notes
    -----
    The result is a pure function of ``(seed, index, size, classes, channels, dtype)``.
    About 10 % of samples contain no lesion; the rest contain one to five
    (possibly overlapping, later ones on top; on very small images a tiny lesion
    may cover no pixel centre).
    """
    (h, w), n_classes, c, seed_i, dt = _check_common(size, classes, channels, seed, dtype)
    idx = _as_int(index, "index", minimum=0)
    rng = np.random.default_rng([seed_i, idx])
    f32 = np.float32

    # ---- body / disc with soft edge and vignette ---------------------------
    cy = (0.5 + rng.uniform(-0.03, 0.03)) * h
    cx = (0.5 + rng.uniform(-0.03, 0.03)) * w
    ay = rng.uniform(0.40, 0.47) * h
    ax = rng.uniform(0.40, 0.47) * w
    ys = ((np.arange(h, dtype=f32) + f32(0.5) - f32(cy)) / f32(ay))[:, None]
    xs = ((np.arange(w, dtype=f32) + f32(0.5) - f32(cx)) / f32(ax))[None, :]
    r2 = ys * ys + xs * xs                                   # (H, W)
    edge_px = 1.5
    body = np.sqrt(r2)
    np.subtract(1.0, body, out=body)
    body *= f32(min(ax, ay) / edge_px)
    body += f32(0.5)
    np.clip(body, 0.0, 1.0, out=body)                        # soft body alpha

    # luminance: vignette * (1 + low-frequency texture) inside the body
    lum = _smooth_field(rng, (6, 6), (h, w))
    lum *= f32(0.07)
    lum += _smooth_field(rng, (24, 24), (h, w)) * f32(0.025)
    lum += f32(1.0)
    r2 *= f32(-0.45)
    r2 += f32(1.0)                                           # vignette
    lum *= r2
    lum *= body

    # unlabelled bright spot ("optic disc"): a distractor the model must ignore
    rs = rng.uniform(0.06, 0.10) * min(h, w)
    sy = cy + rng.uniform(-0.15, 0.15) * ay
    sx = cx + rng.choice([-1.0, 1.0]) * rng.uniform(0.35, 0.55) * ax
    _add_spot(lum, sy, sx, rs, f32(0.30))

    # work directly in output units (0..255 or 0..65535)
    scale = 255.0 if dt == np.uint8 else 65535.0
    base = _BASE_RGB if c == 3 else _BASE_GRAY
    colour = (base * rng.uniform(0.9, 1.1, size=c) * scale).astype(f32)

    # ---- lesions: geometry and mask (painted per channel below) -----------
    mask = np.zeros((h, w), dtype=np.uint8)
    lesions: list[tuple[slice, slice, np.ndarray, np.ndarray, np.ndarray]] = []
    n_lesions = 0 if rng.random() < 0.1 else int(rng.integers(1, 6))
    short = min(h, w)
    for _ in range(n_lesions):
        k = int(rng.integers(1, n_classes))
        # centre well inside the body
        rad = np.sqrt(rng.uniform(0.0, 0.55))
        phi = rng.uniform(0.0, 2.0 * np.pi)
        ly = cy + rad * ay * np.sin(phi)
        lx = cx + rad * ax * np.cos(phi)
        la = max(rng.uniform(0.025, 0.11) * short, 1.0)          # semi-axes in px
        lb = max(la * rng.uniform(0.45, 1.0), 1.0)
        ang = rng.uniform(0.0, np.pi)
        wobble = rng.uniform(0.0, 0.35)
        soft_px = rng.uniform(1.0, 3.0)
        gain = rng.uniform(0.85, 1.15)
        grid = rng.standard_normal((4, 4), dtype=f32)            # boundary wobble
        ext = la * (1.0 + wobble) + soft_px + 1.0
        y0, y1 = max(int(ly - ext), 0), min(int(ly + ext) + 2, h)
        x0, x1 = max(int(lx - ext), 0), min(int(lx + ext) + 2, w)
        if y0 >= y1 or x0 >= x1:
            continue
        dy = (np.arange(y0, y1, dtype=f32) + f32(0.5) - f32(ly))[:, None]
        dx = (np.arange(x0, x1, dtype=f32) + f32(0.5) - f32(lx))[None, :]
        ca, sa = f32(np.cos(ang)), f32(np.sin(ang))
        u = (dx * ca + dy * sa) / f32(la)
        v = (dy * ca - dx * sa) / f32(lb)
        r = np.sqrt(u * u + v * v)
        field = cv2.resize(grid, (x1 - x0, y1 - y0), interpolation=cv2.INTER_CUBIC)
        r *= f32(1.0) + f32(wobble * 0.5) * field.reshape(y1 - y0, x1 - x0)
        # signed distance to the boundary, roughly in px; alpha = soft edge
        d = (f32(1.0) - r) * f32(lb)
        alpha = np.clip(d / f32(soft_px) + f32(0.5), 0.0, 1.0)
        b = body[y0:y1, x0:x1]
        alpha *= b
        inside = (alpha > 0.5) & (r < 1.0) & (b > 0.5)
        if not inside.any():
            continue
        # class-specific shift, stronger in the core than at the rim
        profile = f32(0.75) + f32(0.25) * np.clip(d / f32(max(lb * 0.5, 1.0)), 0.0, 1.0)
        shift = _class_shift(k, c) * f32(gain * scale)
        lesions.append((slice(y0, y1), slice(x0, x1), alpha, profile, shift))
        mask[y0:y1, x0:x1][inside] = k

    # ---- paint each channel: background, lesions, noise, quantisation -----
    # Noise is Binomial(32, 1/2) - 16 (popcount of random 32-bit words): mean 0,
    # sd 2 * 2**0.5 and practically Gaussian, several times cheaper than
    # rng.standard_normal. Working one (H, W) plane at a time keeps temporaries small.
    body *= f32(_NOISE_SIGMA * scale / np.sqrt(8.0))          # no noise outside the body
    outs = []
    plane = np.empty((h, w), dtype=f32)
    noise = np.empty((h, w), dtype=f32)
    for ch in range(c):
        np.multiply(lum, colour[ch], out=plane)
        for sy_, sx_, alpha, profile, shift in lesions:
            # blend towards background + shift (not add), so that where lesions
            # overlap the image matches the mask (the later lesion is on top)
            target = lum[sy_, sx_] * colour[ch]
            target += profile * shift[ch]
            win = plane[sy_, sx_]
            target -= win
            target *= alpha
            win += target
        bits = rng.integers(0, 0xFFFFFFFF, size=(h, w), dtype=np.uint32, endpoint=True)
        np.subtract(_popcount(bits), f32(16.0), out=noise)
        noise *= body
        plane += noise
        plane += f32(0.5)
        np.clip(plane, 0.0, scale, out=plane)
        outs.append(plane.astype(dt))
    image = outs[0][:, :, None] if c == 1 else cv2.merge(outs)  # (H, W, C)
    return image, mask


_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount(bits: np.ndarray) -> np.ndarray:
    """Number of set bits of each unsigned integer (as ``uint8``), also on NumPy < 2."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(bits)
    per_byte = _POPCOUNT8[bits.view(np.uint8)].reshape(bits.shape + (bits.itemsize,))
    return per_byte.sum(axis=-1, dtype=np.uint8)


def _add_spot(lum: np.ndarray, sy: float, sx: float, radius: float, amp: np.float32) -> None:
    """Brighten a soft, flat-topped disc of ``lum`` in place (within its bbox)."""
    h, w = lum.shape
    ext = 1.6 * radius
    y0, y1 = max(int(sy - ext), 0), min(int(sy + ext) + 1, h)
    x0, x1 = max(int(sx - ext), 0), min(int(sx + ext) + 1, w)
    if y0 >= y1 or x0 >= x1:
        return
    f32 = np.float32
    dy = ((np.arange(y0, y1, dtype=f32) + f32(0.5) - f32(sy)) / f32(radius))[:, None]
    dx = ((np.arange(x0, x1, dtype=f32) + f32(0.5) - f32(sx)) / f32(radius))[None, :]
    q = dy * dy + dx * dx
    q *= q
    np.negative(q, out=q)
    np.exp(q, out=q)                                         # exp(-(r / radius)**4)
    q *= amp
    q += f32(1.0)
    # multiplicative, so the spot never shows outside the body
    lum[y0:y1, x0:x1] *= q


def synth_pairs(count: int, *, size: tuple[int, int] = (256, 256), classes: int = 3,
                channels: int = 3, seed: int = 0, dtype: str | np.dtype = "uint8",
                start: int = 0) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Lazily yield ``(name, image, mask)`` for indices ``start .. start + count - 1``.

    Parameters
    ----------
    count : int
        Number of pairs (>= 0).
    size, classes, channels, seed, dtype
        As in :func:`synth_sample`.
    start : int, default 0
        First index (>= 0).

    Yields
    ------
    name : str
        ``'case_%06d' % index`` (more digits when the index needs them).
    image : numpy.ndarray
        ``(H, W, C)`` image, see :func:`synth_sample`.
    mask : numpy.ndarray
        ``(H, W)`` ``uint8`` label mask.

    Raises
    ------
    OptionError
        If an argument is invalid (raised on the call, before iteration).

    Notes
    -----
    Only one pair is alive at a time, so memory use does not depend on ``count``.
    """
    n = _as_int(count, "count", minimum=0)
    first = _as_int(start, "start", minimum=0)
    hw, k, c, s, dt = _check_common(size, classes, channels, seed, dtype)
    return _pairs(n, first, hw, k, c, s, dt)


def _pairs(n: int, first: int, hw: tuple[int, int], k: int, c: int, s: int,
           dt: np.dtype) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    for index in range(first, first + n):
        image, mask = synth_sample(index, size=hw, classes=k, channels=c, seed=s, dtype=dt)
        yield f"case_{index:06d}", image, mask


def _stderr_is_tty() -> bool:
    try:
        return bool(sys.stderr is not None and sys.stderr.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _encode_to(path: Path, array: np.ndarray, ext: str) -> None:
    """Encode with OpenCV (same codecs as ``cv2.imwrite``) and write the bytes.

    Going through ``cv2.imencode`` keeps non-ASCII paths working on every platform.
    """
    ok, buf = cv2.imencode(ext, array)
    if not ok:
        raise OSError(f"OpenCV could not encode {path.name!r} as {ext}")
    path.write_bytes(buf.tobytes())


def write_synth_folder(dst: str | os.PathLike, count: int, *, size: tuple[int, int] = (256, 256),
                       classes: int = 3, channels: int = 3, seed: int = 0,
                       dtype: str | np.dtype = "uint8", ext: str = ".png", mask_suffix: str = "",
                       progress: bool | None = None) -> Path:
    """Write a synthetic dataset as image and mask files.

    Creates ``dst/images/<name><ext>`` and ``dst/masks/<name><mask_suffix>.png``
    for the names of :func:`synth_pairs` (``case_000000``, ...). Masks are always
    lossless single-channel 8-bit PNG. Images are encoded with OpenCV, so 3-channel
    images are stored in OpenCV's BGR order (read them back with ``cv2.imread`` and
    convert BGR->RGB to recover :func:`synth_sample`'s array); grayscale images are
    single-channel files. Existing files with the same names are overwritten.

    Parameters
    ----------
    dst : str or os.PathLike
        Destination folder (created with parents if needed).
    count : int
        Number of pairs (>= 0).
    size, classes, channels, seed, dtype
        As in :func:`synth_sample`. ``uint16`` needs ``ext`` in ``.png``, ``.tif``, ``.tiff``.
    ext : str, default '.png'
        Image extension, one of ``.png .tif .tiff .bmp .jpg .jpeg`` (case-insensitive).
        JPEG is lossy, so JPEG images only approximate :func:`synth_sample`.
    mask_suffix : str, default ''
        Appended to the name of mask files, e.g. ``'_mask'`` -> ``case_000000_mask.png``.
    progress : bool or None, default None
        Show a tqdm progress bar; ``None`` shows it only when stderr is a terminal.

    Returns
    -------
    pathlib.Path
        ``Path(dst)``.

    Raises
    ------
    OptionError
        If an argument is invalid.
    OSError
        If a file cannot be written.
    """
    from tqdm import tqdm

    n = _as_int(count, "count", minimum=0)
    hw, k, c, s, dt = _check_common(size, classes, channels, seed, dtype)
    if not isinstance(ext, str):
        raise OptionError(
            f"ext must be one of {', '.join(IMAGE_EXTENSIONS)}. Received: {truncate(ext)}")
    norm_ext = ext.lower()
    if norm_ext not in IMAGE_EXTENSIONS:
        raise OptionError(
            f"ext must be one of {', '.join(IMAGE_EXTENSIONS)}. Received: {truncate(ext)}")
    if dt == np.uint16 and norm_ext not in _UINT16_EXTENSIONS:
        raise OptionError(
            "dtype 'uint16' can only be written with ext '.png', '.tif' or '.tiff'. "
            f"Received: {truncate(ext)}")
    if not isinstance(mask_suffix, str) or any(sep in mask_suffix for sep in ("/", "\\", "\0")):
        raise OptionError(
            "mask_suffix must be a string without path separators (e.g. '_mask'). "
            f"Received: {truncate(mask_suffix)}")
    if progress is not None and not isinstance(progress, (bool, np.bool_)):
        raise OptionError(f"progress must be True, False or None. Received: {truncate(progress)}")
    show = _stderr_is_tty() if progress is None else bool(progress)

    root = Path(dst)
    img_dir = root / "images"
    mask_dir = root / "masks"
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)

    with tqdm(total=n, disable=not show, unit="pair", desc="synth") as bar:
        for name, image, mask in _pairs(n, 0, hw, k, c, s, dt):
            if c == 3:
                out = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
            else:
                out = image[:, :, 0]
            _encode_to(img_dir / f"{name}{ext}", out, norm_ext)
            _encode_to(mask_dir / f"{name}{mask_suffix}.png", mask, ".png")
            bar.update(1)
    return root
