"""Joint image + mask augmentation of 3D patches (CT / MRI volumes).

Pure functions driven by the same :class:`~streamseg.Augment` object as the 2D
pipeline: :func:`sample_3d` draws ONE transform per patch from a generator
(e.g. ``sample_rng(seed, epoch, index)``), :func:`apply_3d` applies it to an image
``(X, Y, Z, C)`` and its mask ``(X, Y, Z)``, :func:`augment_patch` does both.
The options, for 3D patches:

- ``hflip`` / ``vflip`` / ``dflip`` flip axis 0 (X) / 1 (Y) / 2 (Z), then ``rot90``
  turns by 90, 180 or 270 degrees in ``rot90_plane`` (180 only if that plane is
  not square): exact ``np.flip`` / ``np.rot90``, no interpolation (when a warp
  is drawn too, they become part of its coordinate map: same result, faster).
- ``rotate``: an angle uniform in ``[-rotate, rotate]`` about each axis (X, then
  Y, then Z); ``scale``: one isotropic zoom (``> 1`` zooms in); ``translate``: a
  shift up to that fraction of each extent. One affine map about the patch
  centre, in voxel units (voxel spacing is not taken into account).
- ``elastic`` (probability), ``elastic_alpha``, ``elastic_sigma`` (voxels): the
  Simard field as in batchgenerators / nnU-Net (uniform noise in [-1, 1],
  Gaussian-smoothed, times alpha: rms ~0.2 voxel per 30 of alpha at sigma 6, so
  3D wants a larger alpha than 2D), computed on a ``max(1, sigma // 2)`` times
  coarser grid and upsampled linearly.
- The affine map and the elastic field form one coordinate map, sampled ONCE
  (trilinear image, nearest mask; ``fill_value`` / ``fill_label`` outside, the
  image blending towards it within one voxel). Without either, no resampling.
- Photometric ops, on the image only, after the geometry, each with probability
  ``p_photometric``: ``brightness`` (shift, a fraction of ``value_range``),
  ``contrast`` (factor about each channel's mean), ``gamma`` (nnU-Net style, per
  channel: rescale to [0, 1] by the patch min / max, power, rescale back),
  ``blur`` (Gaussian, sigma uniform in ``[0, blur]`` voxels) and ``noise``
  (Gaussian, std a fraction of ``value_range``).
- ``shear`` and ``crop`` are 2D-only and refused (:func:`check_3d`).

Mask labels never change value; equal generator states give bit-identical
outputs. Trilinear sampling is two ``cv2.remap`` bilinear passes (the two Y
neighbours) over a padded 2D layout of ``(X, Z)`` tiles, one per Y slice, blended
linearly in Y: ~10x faster than a NumPy gather.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from ..errors import InputError, LabelError, OptionError, truncate
from .augment import Augment, _mask_work_dtype, _value_range
from .photometric3d import _PHOTO, _blur, _into, _photo

__all__ = ["apply_3d", "augment_patch", "check_3d", "sample_3d"]

_PLANES: dict[str, tuple[int, int]] = {"xy": (0, 1), "xz": (0, 2), "yz": (1, 2)}
_N_DRAWS = 24       # uniforms drawn per patch (fixed slots)
_CV_MAX = 32000     # cv2.remap: every side of its source and its maps must stay below 32767
_BLOCK = 1 << 15    # output voxels per block of the warp (its temporaries stay in cache)


def check_3d(aug: Augment) -> None:
    """Raise OptionError for options 3D patches do not support (``shear``, ``crop``).

    :func:`sample_3d` calls it; a 3D dataset can call it once at construction.
    """
    if not isinstance(aug, Augment):
        raise OptionError(f"Expected an Augment. Received: {truncate(aug)}")
    for name, off in (("shear", (0.0,)), ("crop", (None, (1.0, 1.0)))):
        if getattr(aug, name) not in off:
            raise OptionError(f"Augment option {name!r} applies to 2D images only; 3D patches support "
                              "flips, rot90, rotate, scale, translate, elastic and the photometric ops. "
                              f"Leave it at {off[0]!r} for 3D patches. Received: {name}={getattr(aug, name)!r}")


# ---------------------------------------------------------------------- sample
def sample_3d(aug: Augment, rng: np.random.Generator, shape: tuple[int, int, int]) -> dict[str, Any]:
    """Draw every random parameter of one ``(X, Y, Z)`` patch from ``rng`` (only).

    A fixed number of draws is taken whatever the options (none at all when
    ``aug.is_identity``), so changing one option leaves the other draws alone.

    Returns
    -------
    dict
        ``shape``; ``flip``: (X, Y, Z) bools; ``rot90``: turns (0-3) in ``plane``
        (``'xy'``, ``'xz'``, ``'yz'``; None without a turn); ``angles``: degrees
        about X, Y, Z; ``zoom``; ``translate``: voxels along X, Y, Z; ``matrix``:
        forward 3x4 affine (voxel of the flipped / turned patch -> output voxel),
        None when no affine op was drawn; ``elastic``: ``(seed, alpha, sigma)`` or
        None; ``brightness`` (shift fraction), ``contrast`` (factor), ``gamma``,
        ``blur`` (sigma), ``noise`` (seed, std fraction), None when not drawn.
    """
    check_3d(aug)
    if not isinstance(rng, np.random.Generator):
        raise OptionError(f"Expected rng to be a numpy.random.Generator. Received: {truncate(rng)}")
    if (not isinstance(shape, (tuple, list)) or len(shape) != 3
            or not all(isinstance(s, (int, np.integer)) and s > 0 for s in shape)):
        raise OptionError(f"Expected shape to be (X, Y, Z) with positive ints. Received: {truncate(shape)}")
    dims = tuple(int(s) for s in shape)
    p: dict[str, Any] = {"shape": dims, "flip": (False, False, False), "rot90": 0, "plane": None,
                         "angles": (0.0, 0.0, 0.0), "zoom": 1.0, "translate": (0.0, 0.0, 0.0),
                         "matrix": None, "elastic": None, **dict.fromkeys(_PHOTO)}
    if aug.is_identity:
        return p
    u = rng.random(_N_DRAWS).tolist()
    seeds = rng.integers(0, 2**63, size=2).tolist()

    def uniform(lo: float, hi: float, i: int) -> float:
        return lo + (hi - lo) * u[i]
    p["flip"] = (u[0] < aug.hflip, u[1] < aug.vflip, u[2] < aug.dflip)
    if u[3] < aug.rot90:
        plane = aug.rot90_plane if aug.rot90_plane != "any" else ("xy", "xz", "yz")[min(int(u[5] * 3), 2)]
        a, b = _PLANES[plane]
        p["plane"], p["rot90"] = plane, (1 + min(int(u[4] * 3), 2)) if dims[a] == dims[b] else 2
    if aug.rotate:
        p["angles"] = tuple(uniform(-aug.rotate, aug.rotate, 6 + i) for i in range(3))
    if aug.scale != (1.0, 1.0):
        p["zoom"] = uniform(*aug.scale, 9)
    if aug.translate:
        p["translate"] = tuple(uniform(-aug.translate, aug.translate, 10 + i) * n for i, n in enumerate(dims))
    lin = p["zoom"] * _rotation(p["angles"])
    centre = (np.array(dims, dtype=np.float64) - 1.0) / 2.0
    matrix = np.hstack([lin, (centre + np.array(p["translate"]) - lin @ centre)[:, None]])
    if not np.array_equal(matrix, np.eye(3, 4)):
        p["matrix"] = matrix
    if u[13] < aug.elastic:
        p["elastic"] = (seeds[0], aug.elastic_alpha, aug.elastic_sigma)
    pp = aug.p_photometric
    if aug.brightness and u[14] < pp:
        p["brightness"] = uniform(-aug.brightness, aug.brightness, 15)
    if aug.contrast and u[16] < pp:
        p["contrast"] = uniform(1.0 - aug.contrast, 1.0 + aug.contrast, 17)
    if aug.gamma != (1.0, 1.0) and u[18] < pp:
        p["gamma"] = uniform(*aug.gamma, 19)
    if aug.noise and u[20] < pp:
        p["noise"] = (seeds[1], aug.noise)
    if aug.blur and u[21] < pp:
        p["blur"] = uniform(0.0, aug.blur, 22)
    return p


def _rotation(angles: tuple[float, float, float]) -> np.ndarray:
    """Rotation about X, then Y, then Z (degrees), as a 3x3 matrix on voxel coordinates."""
    r = np.eye(3)
    for axis, deg in enumerate(angles):
        if deg:
            i, j = (k for k in range(3) if k != axis)
            c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
            m = np.eye(3)
            m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
            r = m @ r
    return r


# ----------------------------------------------------------------------- apply
def apply_3d(aug: Augment, image: np.ndarray, mask: np.ndarray, params: dict[str, Any], *,
             value_range: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Apply parameters from :func:`sample_3d` to a patch and its mask.

    Parameters
    ----------
    aug : Augment
        The options ``params`` were drawn with (``fill_value``, ``fill_label``).
    image : numpy.ndarray
        ``(X, Y, Z, C)``, float (normalised) or integer.
    mask : numpy.ndarray
        ``(X, Y, Z)`` of an integer (or bool) dtype.
    params : dict
        From :func:`sample_3d` for ``image.shape[:3]``.
    value_range : float, optional
        What a brightness / noise of 1.0 means: default 1.0 for float images,
        255 / 65535 for uint8 / uint16 (whose results are clipped to it).

    Returns
    -------
    (image, mask)
        float32 C-contiguous ``(X, Y, Z, C)`` image and a mask of the input's shape
        and dtype. Inputs are never modified.
    """
    image, mask = np.asarray(image), np.asarray(mask)
    _check_pair(image, mask)
    if tuple(params["shape"]) != image.shape[:3]:
        raise InputError(f"params were sampled for shape {tuple(params['shape'])} but the patch "
                         f"has shape {image.shape[:3]}. Received: {truncate(image.shape)}")
    vr = _value_range(image.dtype, value_range)
    if params["matrix"] is None and params["elastic"] is None:  # flips / turns only: exact copies
        img = np.array(_exact(image, params), dtype=np.float32, order="C")
        out_mask = np.array(_exact(mask, params), order="C")
    else:  # flips / turns join the coordinate map (reading a turned view would be slow)
        img, out_mask = _warp(aug, image, mask, params)
    return _photo(img, params, vr, image.dtype.kind == "u"), out_mask


def augment_patch(aug: Augment, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, *,
                  value_range: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Augment one patch: ``apply_3d(aug, image, mask, sample_3d(aug, rng, image.shape[:3]))``."""
    image, mask = np.asarray(image), np.asarray(mask)
    _check_pair(image, mask)
    return apply_3d(aug, image, mask, sample_3d(aug, rng, image.shape[:3]), value_range=value_range)


def _exact(arr: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    for axis, flip in enumerate(p["flip"]):
        if flip:
            arr = np.flip(arr, axis)
    return np.rot90(arr, p["rot90"], axes=_PLANES[p["plane"]]) if p["rot90"] else arr


def _exact_matrix(shape: tuple[int, int, int], p: dict[str, Any]) -> np.ndarray:
    """4x4 map from voxel coordinates of ``_exact(arr, p)`` to those of ``arr`` (a signed permutation)."""
    m = np.eye(4)
    for axis, flip in enumerate(p["flip"]):
        if flip:
            m[axis, axis], m[axis, 3] = -1.0, shape[axis] - 1.0
    if p["rot90"]:  # one turn of m: r[.., u (axis a), .., v (axis b)] = m[.., v, .., n_b - 1 - u]
        a, b = _PLANES[p["plane"]]
        n = list(shape)
        for _ in range(p["rot90"]):
            turn = np.eye(4)
            turn[a, a], turn[a, b], turn[b, b], turn[b, a], turn[b, 3] = 0.0, 1.0, 0.0, -1.0, n[b] - 1.0
            m = m @ turn
            n[a], n[b] = n[b], n[a]
    return m


def _check_pair(image: np.ndarray, mask: np.ndarray) -> None:
    if image.ndim != 4 or 0 in image.shape:
        raise InputError(f"Expected a patch of shape (X, Y, Z, C). Received: shape {truncate(image.shape)}")
    if image.dtype.kind not in "uif":
        raise InputError(f"Expected a float or integer patch. Received: dtype {image.dtype}")
    if mask.ndim != 3:
        raise InputError(f"Expected a mask of shape (X, Y, Z). Received: shape {truncate(mask.shape)}")
    if mask.dtype.kind not in "uib":
        raise LabelError(f"Expected an integer (or bool) mask. Received: dtype {mask.dtype}")
    if mask.shape != image.shape[:3]:
        raise InputError(f"Patch and mask sizes differ: image {image.shape[:3]}, mask "
                         f"{mask.shape}. Received: {truncate(mask.shape)}")


# ------------------------------------------------------------------ resampling
def _warp(aug: Augment, img: np.ndarray, mask: np.ndarray,
          p: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """One resampling of ``img`` (trilinear) and ``mask`` (nearest) through the composed map
    (flips and turns, then the affine map and the elastic field of ``p``).

    The output is produced in blocks of X slices so that the coordinate maps and
    other temporaries stay small (cache-resident, no fresh full-size buffers).
    """
    X, Y, Z = shape = mask.shape
    if mask.dtype != np.bool_ and aug.fill_label > np.iinfo(mask.dtype).max:
        raise InputError(f"fill_label {aug.fill_label} does not fit the mask dtype "
                         f"{mask.dtype}. Received: {truncate(mask.dtype)}")
    rows, per_row = _tiles(shape)
    xp, zp = X + 2, Z + 2
    out_dtype = mask.dtype
    m = mask.view(np.uint8) if out_dtype == np.bool_ else mask
    work = _mask_work_dtype(m)
    m_layout = _layout(m, rows, per_row, aug.fill_label, m.dtype if work is None else work)
    layouts = [_layout(img[..., c], rows, per_row, aug.fill_value, np.float32) for c in range(img.shape[3])]
    out, m_out = np.empty(shape + (len(layouts),), np.float32), np.empty(shape, m_layout.dtype)
    xy, z, field = _coord_terms(shape, p["matrix"], p["elastic"], _exact_matrix(shape, p))
    bx = max(1, min(X, _BLOCK // (Y * Z)))
    channels = len(layouts)
    bufs = [np.empty((bx * Y, Z), np.float32) for _ in range(5 + channels + (4 if rows > 1 else 0))]
    for x0 in range(0, X, bx):
        x1 = min(X, x0 + bx)
        sx, sy, sz, t, lo, *more = (b[:(x1 - x0) * Y] for b in bufs)
        res, more = more[:channels], more[channels:]
        for i, (s, n) in enumerate(zip((sx, sy, sz), shape)):
            np.add(xy[i][x0:x1, :, None], z[i], out=s.reshape(x1 - x0, Y, Z))
            if field is not None:  # finish the elastic field along Z (lo is scratch here)
                part = field[i][x0:x1].reshape((x1 - x0) * Y, -1)
                s += part if part.shape[1] == Z else _into(cv2.resize, lo, part, (Z, len(s)),
                                                           interpolation=cv2.INTER_LINEAR)
            np.clip(s, -1.0, float(n), out=s)           # one voxel outside and beyond: all fill
        # mask: tile of the nearest Y slice, then cv2's nearest neighbour in X and Z
        np.add(sy, 1.5, out=t)
        np.floor(t, out=t)                              # tile index round(y) + 1 (tile 0: padding)
        if rows == 1:
            sx += 1.0                                   # row of every map below
            t *= float(zp)
            t += sz
            t += 1.0
            _remap(m_layout, t, sx, cv2.INTER_NEAREST, aug.fill_label, m_out[x0:x1])
        else:
            _tile_maps(t, sx, sz, rows, per_row, xp, zp, more[0], more[1])
            _remap(m_layout, more[0], more[1], cv2.INTER_NEAREST, aug.fill_label, m_out[x0:x1])
        # image: bilinear in (X, Z) on the tiles of floor(y) and floor(y) + 1, then linear in Y
        np.floor(sy, out=t)
        sy -= t                                         # weight of the upper Y neighbour
        t += 1.0
        if rows == 1:
            t *= float(zp)
            t += sz
            t += 1.0
            np.add(t, float(zp), out=sz)                # the upper tile is the next one on the row
            maps = (t, sx, sz, sx)
        else:
            _tile_maps(t, sx, sz, rows, per_row, xp, zp, more[0], more[1])
            t += 1.0
            _tile_maps(t, sx, sz, rows, per_row, xp, zp, more[2], more[3])
            maps = tuple(more)
        block = out[x0:x1].reshape(len(lo), Z, channels)
        for layout, hi in zip(layouts, res):
            _remap(layout, maps[0], maps[1], cv2.INTER_LINEAR, aug.fill_value, lo)
            _remap(layout, maps[2], maps[3], cv2.INTER_LINEAR, aug.fill_value, hi)
            hi -= lo
            hi *= sy
            np.add(hi, lo, out=block[..., 0] if channels == 1 else hi)
        if channels > 1:  # interleave the channels (cv2.merge: much faster than strided numpy writes)
            _into(cv2.merge, block, res)
    m_out = (m_out != 0) if out_dtype == np.bool_ else m_out.astype(out_dtype, copy=False)
    return out, m_out


def _tiles(shape: tuple[int, int, int]) -> tuple[int, int]:
    """(rows, tiles per row) of the 2D layout: Y + 3 tiles of (X + 2, Z + 2) voxels."""
    X, Y, Z = shape
    per_row = min(Y + 3, _CV_MAX // (Z + 2))
    rows = -(-(Y + 3) // per_row) if per_row else 0
    if per_row < 1 or rows * (X + 2) > _CV_MAX:
        raise InputError(f"Patch too large for the 3D warp: needs (X + 2) * (Y + 3) * (Z + 2) below about "
                         f"{_CV_MAX}**2 voxels and Z below {_CV_MAX - 2}; use smaller patches. "
                         f"Received: shape {shape}")
    return rows, per_row


def _layout(vol: np.ndarray, rows: int, per_row: int, fill: float, dtype: np.dtype) -> np.ndarray:
    """2D layout of ``vol`` (X, Y, Z) for cv2: tile ``t`` holds slice ``y = t - 1`` padded by one
    voxel of ``fill`` in X and Z; tiles 0, Y + 1, Y + 2 (and the unused tail) are all fill.
    """
    X, Y, Z = vol.shape
    layout = np.full((rows * (X + 2), per_row * (Z + 2)), fill, dtype)
    grid = layout.reshape(rows, X + 2, per_row, Z + 2)
    for r in range(rows):
        lo, hi = max(1, r * per_row), min(Y + 1, (r + 1) * per_row)
        if lo < hi:
            grid[r, 1:X + 1, lo - r * per_row:hi - r * per_row, 1:Z + 1] = vol[:, lo - 1:hi - 1, :]
    return layout


def _tile_maps(t: np.ndarray, sx: np.ndarray, sz: np.ndarray, rows: int, per_row: int, xp: int, zp: int,
               mx: np.ndarray, my: np.ndarray) -> None:
    """Layout column (``mx``) and row (``my``) of the points (sx, tile t, sz), several rows of tiles."""
    np.add(t, 0.5, out=my)
    my *= 1.0 / per_row
    np.floor(my, out=my)                                # row of tiles (t + 0.5 is never a multiple)
    np.multiply(my, -float(per_row), out=mx)
    mx += t                                             # tile on that row
    mx *= float(zp)
    mx += sz
    mx += 1.0
    my *= float(xp)
    my += sx
    my += 1.0


def _remap(src: np.ndarray, mx: np.ndarray, my: np.ndarray, interp: int, fill: float, dst: np.ndarray) -> None:
    """``cv2.remap`` of the 2D ``src`` at the points (mx, my), each (N, Z), into ``dst``."""
    mx2, my2, dst2 = mx.reshape(-1, mx.shape[-1]), my.reshape(-1, mx.shape[-1]), dst.reshape(-1, mx.shape[-1])
    kw = {"borderMode": cv2.BORDER_CONSTANT, "borderValue": (fill,) * 4}
    for a in range(0, len(mx2), _CV_MAX):  # every side of the maps below SHRT_MAX as well
        _into(cv2.remap, dst2[a:a + _CV_MAX], src, mx2[a:a + _CV_MAX], my2[a:a + _CV_MAX], interp, **kw)


def _coord_terms(shape: tuple[int, int, int], matrix: np.ndarray | None,
                 elastic: tuple[int, float, float] | None,
                 exact: np.ndarray | None = None) -> tuple[list, list, list | None]:
    """Separable parts of the input coordinates of every output voxel: ``xy[i]`` (X, Y) plus
    ``z[i]`` (Z,) plus the elastic field ``field[i]`` (X, Y, z-coarse, or None) give coordinate i.
    ``exact`` (from :func:`_exact_matrix`) maps the result back through flips and turns.
    """
    inv, off = np.eye(3), np.zeros(3)
    if matrix is not None:
        inv = np.linalg.inv(matrix[:, :3])
        off = -inv @ matrix[:, 3]
    perm = np.eye(3) if exact is None else exact[:3, :3]
    inv, off = perm @ inv, perm @ off + (0.0 if exact is None else exact[:3, 3])
    g = [np.arange(n, dtype=np.float64) for n in shape]
    xy = [(g[0][:, None] * inv[i, 0] + g[1][None, :] * inv[i, 1] + off[i]).astype(np.float32) for i in range(3)]
    z = [(g[2] * inv[i, 2]).astype(np.float32) for i in range(3)]
    field = _elastic_field(shape, *elastic) if elastic is not None else None
    if field is not None and not np.array_equal(perm, np.eye(3)):  # signed permutation of components
        field = [field[j] * np.float32(perm[i, j]) for i in range(3) for j in range(3) if perm[i, j]]
    return xy, z, field


def _elastic_field(shape: tuple[int, int, int], seed: int, alpha: float, sigma: float) -> list[np.ndarray]:
    """Smoothed uniform displacements (dx, dy, dz) in voxels, upsampled in X and Y only.

    Each is float32 ``(X, Y, cz)``: :func:`_warp` finishes the linear upsampling
    along Z block by block (``cz == Z`` when no coarse grid is used).
    """
    step = max(1, int(sigma // 2))
    coarse = tuple(n if step == 1 else -(-n // step) + 1 for n in shape)
    noise = np.random.default_rng(seed).random((3, *coarse), dtype=np.float32)
    noise *= np.float32(2.0)
    noise -= np.float32(1.0)
    out = []
    for comp in noise:
        field = _resize_xy(_blur(comp, sigma / step), shape[0], shape[1])
        field *= np.float32(alpha / step**1.5)  # matches the full-resolution field's amplitude
        out.append(field)
    return out


def _resize_xy(vol: np.ndarray, X: int, Y: int) -> np.ndarray:
    """Linear resize of a float32 (x, y, z) array to (X, Y, z), pixel-centre aligned like cv2.resize."""
    x, y, z = vol.shape
    if x != X:
        vol = cv2.resize(vol.reshape(x, y * z), (y * z, X), interpolation=cv2.INTER_LINEAR).reshape(X, y, z)
    if y != Y:
        vol = np.stack([cv2.resize(s, (z, Y), interpolation=cv2.INTER_LINEAR) for s in vol])
    return np.ascontiguousarray(vol)
