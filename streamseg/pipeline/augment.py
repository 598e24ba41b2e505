"""Joint image + mask augmentation.

:class:`Augment` draws ONE random transform per sample and applies it to the
image and its mask, so that both stay aligned. Geometric ops (flips, 90-degree
turns, rotation, zoom, translation, shear, random resized crop) are composed
into a single affine matrix and applied with one ``cv2.warpAffine`` per array
(one ``cv2.remap`` when an elastic deformation is drawn). Photometric ops
(brightness, contrast, gamma, blur, noise) change the image only.

All randomness comes from the ``numpy.random.Generator`` passed in, so equal
generator states give bit-identical outputs.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from ..errors import InputError, LabelError, OptionError, truncate
from .fields import _add_noise, _elastic_field

__all__ = ["Augment", "PRESETS"]

_DEFAULTS: dict[str, Any] = {
    "hflip": 0.0, "vflip": 0.0, "dflip": 0.0, "rot90": 0.0, "rot90_plane": "xy", "rotate": 0.0,
    "scale": (1.0, 1.0), "translate": 0.0, "shear": 0.0, "elastic": 0.0, "elastic_alpha": 30.0,
    "elastic_sigma": 6.0, "crop": None, "brightness": 0.0, "contrast": 0.0,
    "gamma": (1.0, 1.0), "noise": 0.0, "blur": 0.0, "p_photometric": 1.0,
    "fill_value": 0.0, "fill_label": 0,
}
_P, _U, _NN = "a probability in [0, 1]", "in [0, 1]", "a number >= 0"
_SCALARS = {  # name -> (what it must be, upper bound); all must be >= 0
    "hflip": (_P, 1.0), "vflip": (_P, 1.0), "dflip": (_P, 1.0), "rot90": (_P, 1.0), "elastic": (_P, 1.0),
    "p_photometric": (_P, 1.0), "translate": (_U, 1.0), "brightness": (_U, 1.0),
    "contrast": (_U, 1.0), "noise": (_NN, math.inf), "blur": (_NN, math.inf),
    "elastic_alpha": (_NN, math.inf), "rotate": ("in [0, 180] degrees", 180.0),
    "shear": ("in [0, 90) degrees", 90.0), "elastic_sigma": ("a number > 0 (pixels)", math.inf),
}

_STANDARD = {"hflip": 0.5, "vflip": 0.5, "rot90": 0.5, "rotate": 15.0,
             "scale": (0.9, 1.1), "translate": 0.05, "brightness": 0.1, "contrast": 0.1}
PRESETS: dict[str, dict[str, Any]] = {
    "none": {},
    "light": {"hflip": 0.5, "vflip": 0.5},
    "standard": _STANDARD,
    "heavy": {**_STANDARD, "shear": 10.0, "elastic": 0.3, "crop": (0.5, 1.0),
              "gamma": (0.8, 1.25), "noise": 0.02, "blur": 1.0, "p_photometric": 0.5},
}
"""Named configurations accepted by :meth:`Augment.preset` (name -> options)."""

_PLANES_3D = ("xy", "xz", "yz", "any")  # rot90_plane values (3D patches only)
_PHOTO = ("brightness", "contrast", "gamma", "blur", "noise")  # photometric params
_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)   # aspect-ratio jitter of the random resized crop
_N_DRAWS = 24                          # uniforms drawn per sample (fixed slots)


def _real(name: str, value: Any) -> float:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if not ok or not math.isfinite(value):
        raise OptionError(f"Augment option {name!r} must be a finite real number. Received: {truncate(value)}")
    return float(value)


def _pair(name: str, value: Any, high: float = math.inf) -> tuple[float, float]:
    what = "a (low, high) pair with 0 < low <= high" + ("" if high == math.inf else f" <= {high:g}")
    if not isinstance(value, (tuple, list, np.ndarray)) or len(value) != 2:
        raise OptionError(f"Augment option {name!r} must be {what}. Received: {truncate(value)}")
    lo, hi = (_real(name, v) for v in value)
    if not 0.0 < lo <= hi <= high:
        raise OptionError(f"Augment option {name!r} must be {what}. Received: {truncate(value)}")
    return (lo, hi)


def _validate(options: dict[str, Any]) -> dict[str, Any]:
    """Return the validated, normalised options (unknown names are rejected)."""
    unknown = sorted(k for k in options if k not in _DEFAULTS)
    if unknown:
        raise OptionError(f"Unknown Augment option(s) {unknown}; valid names are "
                          f"{sorted(_DEFAULTS)}. Received: {truncate(unknown)}")
    out = {**_DEFAULTS, **options}
    for name, (what, high) in _SCALARS.items():
        raw = out[name]
        v = out[name] = _real(name, raw)
        if v < 0 or v > high or (v == high and name == "shear") or (v == 0 and name == "elastic_sigma"):
            raise OptionError(f"Augment option {name!r} must be {what}. Received: {truncate(raw)}")
    if not isinstance(out["rot90_plane"], str) or out["rot90_plane"] not in _PLANES_3D:
        raise OptionError(f"Augment option 'rot90_plane' must be one of {list(_PLANES_3D)}. "
                          f"Received: {truncate(out['rot90_plane'])}")
    out["scale"], out["gamma"] = _pair("scale", out["scale"]), _pair("gamma", out["gamma"])
    if out["crop"] is not None:
        out["crop"] = _pair("crop", out["crop"], 1.0)
    out["fill_value"] = _real("fill_value", out["fill_value"])
    fl = out["fill_label"]
    if isinstance(fl, (bool, np.bool_)) or not isinstance(fl, (int, np.integer)) or not 0 <= fl <= 255:
        raise OptionError(f"Augment option 'fill_label' must be an int in [0, 255]. Received: {truncate(fl)}")
    out["fill_label"] = int(fl)
    return out


def _groups(fn: Any, arr: np.ndarray) -> np.ndarray:
    """Apply an OpenCV ``fn`` in groups of <= 4 channels; keep ``arr``'s shape.

    A trailing pair is split in two: OpenCV's 2-channel warp path interpolates
    slightly differently from its 1/3/4-channel paths, which agree exactly.
    """
    if arr.ndim == 2 or arr.shape[2] <= 4:
        return fn(arr).reshape(arr.shape)
    h, w, c = arr.shape
    starts = list(range(0, c, 4)) + ([c - 1] if c % 4 == 2 else [])
    bounds = zip(starts, starts[1:] + [c])
    parts = [fn(np.ascontiguousarray(arr[..., a:b])).reshape(h, w, -1) for a, b in bounds]
    return np.concatenate(parts, axis=2)


def _four_channel(op: Any, a: np.ndarray, interp: int, fill: tuple) -> np.ndarray:
    """``op(a, interp, fill)``; a 3-channel uint8 ``a`` goes through OpenCV's 4-channel path.

    OpenCV's warps vectorise 1- and 4-channel images better than 3-channel ones: padding to
    RGBA, warping and dropping the pad gives the same values (checked for warpAffine and remap,
    nearest/linear/cubic) and took 0.16 instead of 0.28 ms per 256x256x3 image of the
    'standard' augmentation on one thread here (cold images; ~15% on one image kept in cache).
    """
    if a.ndim == 3 and a.shape[2] == 3 and a.dtype == np.uint8:
        return cv2.cvtColor(op(cv2.cvtColor(a, cv2.COLOR_RGB2RGBA), interp, fill), cv2.COLOR_RGBA2RGB)
    return op(a, interp, fill)


def _mask_work_dtype(mask: np.ndarray) -> np.dtype | None:
    """Smallest dtype OpenCV can warp that holds every label exactly (None = as is)."""
    if mask.dtype == np.uint8:
        return None
    lo, hi = int(mask.min()), int(mask.max())
    fits = [dt for dt in (np.uint8, np.uint16, np.int16) if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max]
    return np.dtype(fits[0] if fits else np.float64)  # exact for every int32 label (and int64 below 2**53)


class Augment:
    """Joint image/mask augmentation: one random transform per sample.

    Parameters
    ----------
    hflip, vflip, rot90 : float
        Probabilities of a horizontal flip, a vertical flip and a 90/180/270-degree
        turn (equally likely). Non-square images only get 180-degree turns.
    dflip, rot90_plane : float, str
        3D patches only (``PatchDataset``; see ``augment3d``): probability of a flip
        along Z, and the plane of 90-degree turns: ``'xy'``, ``'xz'``, ``'yz'`` or
        ``'any'`` (one of the three per patch). 2D datasets refuse them (:meth:`check_2d`).
    rotate : float
        Maximum rotation in degrees; the angle is uniform in ``[-rotate, rotate]``.
    scale : tuple of float
        Zoom factor range ``(low, high)``, uniform; ``> 1`` zooms in.
    translate : float
        Maximum shift as a fraction of the image height / width.
    shear : float
        Maximum shear angle in degrees (x and y shears drawn independently).
    elastic, elastic_alpha, elastic_sigma : float
        Probability of an elastic deformation, its scale and smoothing in pixels:
        uniform noise in [-1, 1], Gaussian-smoothed by ``elastic_sigma``, times
        ``elastic_alpha`` (Simard et al.). The field is computed on a grid
        ``max(1, sigma // 2)`` times coarser and upsampled linearly (same
        amplitude and smoothness, ~10x cheaper).
    crop : tuple of float or None
        Random resized crop area fraction range, e.g. ``(0.5, 1.0)``; the aspect
        ratio is jittered log-uniformly in [3/4, 4/3] (within what fits) and the
        crop is resized back to the input size.
    brightness, contrast : float
        Maximum additive shift as a fraction of ``value_range``; contrast factor
        range ``[1 - contrast, 1 + contrast]`` around the mean of all pixels.
    gamma : tuple of float
        Gamma range: ``(x / value_range) ** g * value_range``.
    noise, blur : float
        Gaussian noise std as a fraction of ``value_range``; maximum Gaussian blur
        sigma in pixels (uniform in ``[0, blur]``).
    p_photometric : float
        Probability that each configured photometric op is applied.
    fill_value, fill_label : float, int
        Image value and mask label (in [0, 255]) where no input pixel maps.

    Notes
    -----
    Inputs: image ``(H, W)`` or ``(H, W, C)`` of uint8, uint16, int16 (signed,
    e.g. CT in Hounsfield units) or float; mask ``(H, W)`` or ``(H, W, 1)`` of an
    integer (or bool) dtype. Outputs: float32 image of the input's shape and
    scale, and a mask of the input's shape and dtype whose labels are a subset of
    the input labels and ``fill_label``. Photometric results are clipped to
    ``[0, value_range]`` for unsigned images; int16 and float images are not
    clipped, and their ``value_range`` defaults to 1 (pass the units a brightness
    of 1.0 means, or augment normalised values as ``SegmentationDataset`` does
    for such stores). int16 images are warped in float32 (exact interpolation).
    Pure flips / 90-degree turns reproduce ``np.flip`` / ``np.rot90`` exactly.
    Integer images are warped in their own dtype (interpolated values rounded to
    integers; less memory traffic) unless ``fill_value`` does not fit it.
    """

    def __init__(self, *, hflip: float = 0.0, vflip: float = 0.0, dflip: float = 0.0,
                 rot90: float = 0.0, rot90_plane: str = "xy",
                 rotate: float = 0.0, scale: tuple[float, float] = (1.0, 1.0),
                 translate: float = 0.0, shear: float = 0.0, elastic: float = 0.0,
                 elastic_alpha: float = 30.0, elastic_sigma: float = 6.0,
                 crop: tuple[float, float] | None = None, brightness: float = 0.0,
                 contrast: float = 0.0, gamma: tuple[float, float] = (1.0, 1.0),
                 noise: float = 0.0, blur: float = 0.0, p_photometric: float = 1.0,
                 fill_value: float = 0.0, fill_label: int = 0, **unknown: Any) -> None:
        options = {k: v for k, v in locals().items() if k in _DEFAULTS}
        opts = _validate({**options, **unknown})
        for name, value in opts.items():
            setattr(self, name, value)

    # ------------------------------------------------------------------ config
    @classmethod
    def preset(cls, name: str) -> Augment:
        """Return a named preset: ``'none'``, ``'light'``, ``'standard'`` or ``'heavy'``."""
        if not isinstance(name, str) or name not in PRESETS:
            raise OptionError(f"Unknown augmentation preset; valid names are {list(PRESETS)}. "
                              f"Received: {truncate(name)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_config(cls, config: Augment | dict | str | None) -> Augment | None:
        """Build from an ``Augment`` (returned as is), an options dict, a preset name or None."""
        if config is None or isinstance(config, Augment):
            return config
        if isinstance(config, str):
            return cls.preset(config)
        if isinstance(config, dict):
            if not all(isinstance(k, str) for k in config):
                raise OptionError(f"Augment option names must be str. Received: {truncate(config)}")
            return cls(**config)  # unknown names -> OptionError listing the valid ones
        raise OptionError("Expected an Augment, a dict of Augment options, a preset name "
                          f"{list(PRESETS)} or None. Received: {truncate(config)}")

    def get_config(self) -> dict[str, Any]:
        """Return all options as a dict; ``Augment(**cfg) == self``."""
        return {name: getattr(self, name) for name in _DEFAULTS}

    def __eq__(self, other: object) -> bool:
        return self.get_config() == other.get_config() if isinstance(other, Augment) else NotImplemented

    __hash__ = None  # type: ignore[assignment]  # attributes are plain and mutable

    def __repr__(self) -> str:
        changed = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if v != _DEFAULTS[k])
        return f"Augment({changed})"

    @property
    def _geometric(self) -> bool:
        return bool(self.hflip or self.vflip or self.dflip or self.rot90 or self.rotate or self.translate
                    or self.shear or self.elastic or self.scale != (1.0, 1.0)
                    or (self.crop is not None and self.crop != (1.0, 1.0)))

    @property
    def _photometric(self) -> bool:
        return bool(self.p_photometric and (self.brightness or self.contrast or self.noise
                                            or self.blur or self.gamma != (1.0, 1.0)))

    @property
    def is_identity(self) -> bool:
        """True when no option can change an image or a mask."""
        return not (self._geometric or self._photometric)

    def check_2d(self) -> None:
        """Raise OptionError if a 3D-only option is set (2D datasets call this once)."""
        for name, default in (("dflip", 0.0), ("rot90_plane", "xy")):
            if getattr(self, name) != default:
                raise OptionError(f"Augment option {name!r} applies to 3D patches (PatchDataset) only; 2D "
                                  f"images have no Z axis. Leave it at {default!r} for 2D datasets. "
                                  f"Received: {name}={getattr(self, name)!r}")

    # ------------------------------------------------------------------ sample
    def sample(self, rng: np.random.Generator, shape: tuple[int, int]) -> dict[str, Any]:
        """Draw every random parameter of one ``(H, W)`` sample from ``rng`` (only).

        Returns
        -------
        dict
            ``shape``; ``matrix``: forward 2x3 affine (input pixel -> output pixel,
            pixel centres at integer coordinates), None when no geometric op was
            drawn; ``elastic``: ``(seed, alpha, sigma)`` or None; the draws
            ``hflip``, ``vflip``, ``rot90`` (turns), ``angle``, ``zoom``, ``shear``
            (x, y degrees), ``translate`` (x, y pixels), ``crop`` (x, y, w, h) or
            None; ``brightness`` (shift fraction), ``contrast`` (factor), ``gamma``,
            ``blur`` (sigma), ``noise`` (seed, std fraction), None when not drawn.
        """
        if not isinstance(rng, np.random.Generator):
            raise OptionError(f"Expected rng to be a numpy.random.Generator. Received: {truncate(rng)}")
        if (not isinstance(shape, (tuple, list)) or len(shape) != 2
                or not all(isinstance(s, (int, np.integer)) and s > 0 for s in shape)):
            raise OptionError(f"Expected shape to be (H, W) with positive ints. Received: {truncate(shape)}")
        h, w = int(shape[0]), int(shape[1])
        p: dict[str, Any] = {"shape": (h, w), "matrix": None, "elastic": None, "hflip": False,
                             "vflip": False, "rot90": 0, "angle": 0.0, "zoom": 1.0, "shear": (0.0, 0.0),
                             "translate": (0.0, 0.0), "crop": None, **dict.fromkeys(_PHOTO)}
        if self.is_identity:
            return p
        u = rng.random(_N_DRAWS).tolist()
        seeds = rng.integers(0, 2**63, size=2).tolist() if (self.elastic or self.noise) else [0, 0]
        if self._geometric:
            self._sample_geometric(p, u, seeds[0], h, w)
        pp = self.p_photometric

        def uniform(lo: float, hi: float, i: int) -> float:
            return lo + (hi - lo) * u[i]
        if self.brightness and u[15] < pp:
            p["brightness"] = uniform(-self.brightness, self.brightness, 16)
        if self.contrast and u[17] < pp:
            p["contrast"] = uniform(1.0 - self.contrast, 1.0 + self.contrast, 18)
        if self.gamma != (1.0, 1.0) and u[19] < pp:
            p["gamma"] = uniform(*self.gamma, 20)
        if self.noise and u[21] < pp:
            p["noise"] = (seeds[1], self.noise)
        if self.blur and u[22] < pp:
            p["blur"] = uniform(0.0, self.blur, 23)
        return p

    def _sample_geometric(self, p: dict[str, Any], u: list[float], seed: int, h: int, w: int) -> None:
        # 2x2 linear parts as (a, b, c, d) = [[a, b], [c, d]] in plain floats: NumPy's small
        # matrices cost ~0.04 ms per sample here, a tenth of the whole augmentation
        cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
        lin = (1.0, 0.0, 0.0, 1.0)   # linear part, in coordinates centred on the pixel grid
        sx_, sy_ = cx, cy            # input point that lands on the output centre
        if self.crop is not None and self.crop != (1.0, 1.0):
            area = self.crop[0] + (self.crop[1] - self.crop[0]) * u[11]
            lo, hi = math.log(max(_CROP_RATIO[0], area)), math.log(min(_CROP_RATIO[1], 1.0 / area))
            ratio = math.exp(lo + (hi - lo) * u[12])
            cw, ch = min(w, w * math.sqrt(area * ratio)), min(h, h * math.sqrt(area / ratio))
            x0, y0 = (w - cw) * u[13], (h - ch) * u[14]
            p["crop"] = (x0, y0, cw, ch)
            lin = (w / cw, 0.0, 0.0, h / ch)
            sx_, sy_ = x0 + cw / 2.0 - 0.5, y0 + ch / 2.0 - 0.5
        p["hflip"], p["vflip"] = u[0] < self.hflip, u[1] < self.vflip
        lin = _mul((-1.0 if p["hflip"] else 1.0, 0.0, 0.0, -1.0 if p["vflip"] else 1.0), lin)
        if u[2] < self.rot90:
            k = 2 if h != w else 1 + min(int(u[3] * 3), 2)
            p["rot90"] = k
            lin = _mul(((0.0, 1.0, -1.0, 0.0), (-1.0, 0.0, 0.0, -1.0), (0.0, -1.0, 1.0, 0.0))[k - 1], lin)
        if self.shear:
            sx, sy = ((2 * u[i] - 1) * self.shear for i in (8, 9))
            p["shear"] = (sx, sy)
            tx, ty = math.tan(math.radians(sx)), math.tan(math.radians(sy))
            lin = _mul(_mul((1.0, tx, 0.0, 1.0), (1.0, 0.0, ty, 1.0)), lin)
        if self.scale != (1.0, 1.0):
            p["zoom"] = z = self.scale[0] + (self.scale[1] - self.scale[0]) * u[5]
            lin = (z * lin[0], z * lin[1], z * lin[2], z * lin[3])
        if self.rotate:
            p["angle"] = angle = (2 * u[4] - 1) * self.rotate
            c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
            lin = _mul((c, s, -s, c), lin)   # counter-clockwise on screen
        dx = dy = 0.0
        if self.translate:
            dx, dy = (2 * u[6] - 1) * self.translate * w, (2 * u[7] - 1) * self.translate * h
            p["translate"] = (dx, dy)
        if u[10] < self.elastic:
            p["elastic"] = (seed, self.elastic_alpha, self.elastic_sigma)
        a, b, c, d = lin
        row0 = (a, b, cx + dx - (a * sx_ + b * sy_))
        row1 = (c, d, cy + dy - (c * sx_ + d * sy_))
        if row0 != (1.0, 0.0, 0.0) or row1 != (0.0, 1.0, 0.0):
            p["matrix"] = np.array([row0, row1])

    # ------------------------------------------------------------------- apply
    def apply(self, image: np.ndarray, mask: np.ndarray, params: dict[str, Any], *,
              value_range: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Apply parameters from :meth:`sample` to an image and its mask.

        Returns
        -------
        (image, mask)
            float32 image with the input's shape and scale; mask with the input's
            shape and dtype. Inputs are never modified.
        """
        image, mask = np.asarray(image), np.asarray(mask)
        _check_pair(image, mask)
        if tuple(params["shape"]) != image.shape[:2]:
            raise InputError(f"params were sampled for shape {tuple(params['shape'])} but the image "
                             f"has shape {image.shape[:2]}. Received: {truncate(image.shape)}")
        vr = _value_range(image.dtype, value_range)
        if params["matrix"] is None and params["elastic"] is None:  # fast path: exact copies
            img, mask = image.astype(np.float32), mask.copy()
        else:  # integer images warp in their dtype when fill_value fits (fewer, smaller buffers)
            fv = self.fill_value
            native = image.dtype.kind == "u" and fv == int(fv) and 0 <= fv <= np.iinfo(image.dtype).max
            src = np.ascontiguousarray(image) if native else image.astype(np.float32)
            img, mask = self._warp(src, mask, params["matrix"], params["elastic"])
            img = img.astype(np.float32, copy=False)
        return self._photo(img, params, vr, image.dtype.kind == "u"), mask

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, *,
                 value_range: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Augment one pair: ``apply(image, mask, sample(rng, image.shape[:2]))``."""
        image, mask = np.asarray(image), np.asarray(mask)
        _check_pair(image, mask)
        return self.apply(image, mask, self.sample(rng, image.shape[:2]), value_range=value_range)

    def _warp(self, img: np.ndarray, mask: np.ndarray, matrix: np.ndarray | None,
              elastic: tuple[int, float, float] | None) -> tuple[np.ndarray, np.ndarray]:
        h, w = img.shape[:2]
        if mask.dtype != np.bool_ and self.fill_label > np.iinfo(mask.dtype).max:
            raise InputError(f"fill_label {self.fill_label} does not fit the mask dtype "
                             f"{mask.dtype}. Received: {truncate(mask.dtype)}")
        out_dtype = mask.dtype
        if out_dtype == np.bool_:
            mask = mask.view(np.uint8)
        work = _mask_work_dtype(mask)
        m = np.ascontiguousarray(mask) if work is None else mask.astype(work)
        inv = cv2.invertAffineTransform(matrix) if matrix is not None else np.eye(2, 3)
        if elastic is None:  # one warpAffine per array
            def op(a: np.ndarray, interp: int, fill: tuple) -> np.ndarray:
                return cv2.warpAffine(a, inv, (w, h), flags=interp | cv2.WARP_INVERSE_MAP,
                                      borderMode=cv2.BORDER_CONSTANT, borderValue=fill)
        else:  # affine as a coordinate map + smooth displacement, one remap per array
            dx, dy = _elastic_field(h, w, *elastic)
            xs, ys = np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)[:, None]
            mx = (xs * float(inv[0, 0]) + (ys * float(inv[0, 1]) + float(inv[0, 2]))) + dx
            my = (xs * float(inv[1, 0]) + (ys * float(inv[1, 1]) + float(inv[1, 2]))) + dy

            def op(a: np.ndarray, interp: int, fill: tuple) -> np.ndarray:
                return cv2.remap(a, mx, my, interp, borderMode=cv2.BORDER_CONSTANT, borderValue=fill)
        img = _groups(lambda a: _four_channel(op, a, cv2.INTER_LINEAR, (self.fill_value,) * 4), img)
        m = _groups(lambda a: op(a, cv2.INTER_NEAREST, (self.fill_label,) * 4), m)
        if out_dtype == np.bool_:
            return img, m != 0
        return img, m.astype(out_dtype, copy=False)

    @staticmethod
    def _photo(img: np.ndarray, p: dict[str, Any], vr: float, integer: bool,
               mean: float | None = None) -> np.ndarray:
        """Photometric ops in place on float32 ``img``; ``mean``: the image mean contrast
        works around (default: ``img``'s own; given when ``img`` is a lookup table)."""
        if all(p[k] is None for k in _PHOTO):
            return img
        if p["brightness"] is not None or p["contrast"] is not None:
            factor = 1.0 if p["contrast"] is None else p["contrast"]
            offset = 0.0 if p["brightness"] is None else p["brightness"] * vr
            if factor != 1.0:
                if mean is None:
                    mean = float(cv2.mean(img.reshape(img.shape[0], -1))[0])
                offset += mean * (1.0 - factor)
                img *= np.float32(factor)
            img += np.float32(offset)
        if p["gamma"] is not None:
            img *= np.float32(1.0 / vr)
            if integer:
                np.clip(img, 0.0, 1.0, out=img)
                np.power(img, np.float32(p["gamma"]), out=img)
            else:  # sign-preserving so negative float inputs do not become NaN
                img = np.copysign(np.power(np.abs(img), np.float32(p["gamma"])), img)
            img *= np.float32(vr)
        if p["blur"]:  # None or 0.0: nothing to do
            sigma, k = p["blur"], 2 * math.ceil(3 * p["blur"]) + 1
            img = _groups(lambda a: cv2.GaussianBlur(a, (k, k), sigma, borderType=cv2.BORDER_REFLECT_101), img)
        if p["noise"] is not None:
            img = np.ascontiguousarray(img)  # no-op here; _add_noise works on a flat view
            _add_noise(img, p["noise"][0], p["noise"][1] * vr)
        if integer:
            np.clip(img, 0.0, vr, out=img)
        return img


def _mul(m: tuple[float, float, float, float], n: tuple[float, float, float, float]
         ) -> tuple[float, float, float, float]:
    """The 2x2 product ``m @ n`` of ``(a, b, c, d)`` row-major tuples."""
    return (m[0] * n[0] + m[1] * n[2], m[0] * n[1] + m[1] * n[3],
            m[2] * n[0] + m[3] * n[2], m[2] * n[1] + m[3] * n[3])


def _value_range(dtype: np.dtype, value_range: float | None) -> float:
    if value_range is None:
        return {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(np.dtype(dtype), 1.0)
    ok = isinstance(value_range, (int, float, np.integer, np.floating)) and not isinstance(value_range, bool)
    if not ok or not math.isfinite(value_range) or value_range <= 0:
        raise OptionError(f"value_range must be a finite number > 0 or None. Received: {truncate(value_range)}")
    return float(value_range)


def _check_pair(image: np.ndarray, mask: np.ndarray) -> None:
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] < 1) or 0 in image.shape[:2]:
        raise InputError(f"Expected an image of shape (H, W) or (H, W, C). Received: shape {truncate(image.shape)}")
    if image.dtype not in (np.uint8, np.uint16, np.int16) and image.dtype.kind != "f":
        raise InputError(f"Expected a uint8, uint16, int16 or float image. Received: dtype {image.dtype}")
    if mask.ndim not in (2, 3) or (mask.ndim == 3 and mask.shape[2] != 1):
        raise InputError(f"Expected a mask of shape (H, W) or (H, W, 1). Received: shape {truncate(mask.shape)}")
    if mask.dtype.kind not in "uib":
        raise LabelError(f"Expected an integer (or bool) mask. Received: dtype {mask.dtype}")
    if mask.shape[:2] != image.shape[:2]:
        raise InputError(f"Image and mask sizes differ: image {image.shape[:2]}, mask "
                         f"{mask.shape[:2]}. Received: {truncate(mask.shape)}")
