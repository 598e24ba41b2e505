"""Pure sampling logic of 3-D patch training with foreground oversampling (nnU-Net style).

Everything here is a deterministic function of its arguments (numpy only), in the house style
of :mod:`.batches`:

- the plan of an epoch (which case each sample reads, and which samples must contain
  foreground) depends on ``(seed, epoch)`` only: :func:`epoch_plan`;
- the random choices of one sample (class, foreground voxel, patch corner) come from a
  generator the caller derives from ``(seed, epoch, position)``, e.g. :func:`patch_rng`.

A *forced* sample picks a foreground class present in its case (:func:`choose_label`), a voxel
of that class (:func:`pick_foreground`) and a patch around it (:func:`patch_corner` with
``center``); any other sample takes a uniformly placed patch (``center=None``).
:func:`draw_corner` chains the three; :func:`crop_padded` cuts the patch out, padding where
it leaves the volume.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any, NamedTuple

import numpy as np

from ..errors import InputError, OptionError, truncate

__all__ = ["PatchOptions", "validate_patch_options", "forced_per_batch", "epoch_plan", "patch_rng",
           "choose_label", "pick_foreground", "patch_corner", "draw_corner", "crop_padded",
           "has_foreground"]

_PLAN_SALT = 0x5EED_0100
_PATCH_SALT = 0x5EED_0101
_EPS = 1e-9  # tolerance of forced_per_batch, so 0.3 * 10 forces 3, not 4

ClassWeights = Mapping[int, float] | Sequence[float] | None


class PatchOptions(NamedTuple):
    """Validated, normalised patch options (as returned by :func:`validate_patch_options`)."""

    patch_size: tuple[int, int, int]
    samples_per_volume: int
    foreground_fraction: float
    class_weights: dict[int, float] | None
    batch_size: int


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, (bool, np.bool_))


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if not _is_int(value) or int(value) < minimum:  # type: ignore[call-overload]
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise OptionError(f"{name} must be {what}. Received: {name}={truncate(value)}")
    return int(value)  # type: ignore[call-overload]


def _fraction(value: object) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Real) \
            or not math.isfinite(float(value)) or not 0.0 <= float(value) <= 1.0:
        raise OptionError("foreground_fraction must be a number in [0, 1] (the share of each batch "
                          f"forced to contain foreground). Received: foreground_fraction={truncate(value)}")
    return float(value)


def _triple(name: str, value: object) -> tuple[int, int, int]:
    ok = (isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, (str, bytes))
          and len(value) == 3 and all(_is_int(v) and int(v) >= 1 for v in value))
    if not ok:
        raise OptionError(f"{name} must be 3 positive integers (X, Y, Z), e.g. (128, 128, 64). "
                          f"Received: {name}={truncate(value)}")
    return tuple(int(v) for v in value)  # type: ignore[return-value]


def _weights(class_weights: object) -> dict[int, float] | None:
    """``class_weights`` as ``{label: weight}`` (label 0, the background, dropped), or None."""
    if class_weights is None:
        return None
    if isinstance(class_weights, Mapping):
        items = list(class_weights.items())
    elif isinstance(class_weights, (Sequence, np.ndarray)) and not isinstance(class_weights, (str, bytes)):
        items = list(enumerate(class_weights))
    else:
        raise OptionError("class_weights must be None, a mapping {label: weight} or a sequence of "
                          f"weights indexed by label. Received: class_weights={truncate(class_weights)}")
    out: dict[int, float] = {}
    for label, weight in items:
        if not _is_int(label) or int(label) < 0:
            raise OptionError("class_weights labels must be non-negative integers. "
                              f"Received: class_weights={truncate(class_weights)}")
        if isinstance(weight, (bool, np.bool_)) or not isinstance(weight, Real) \
                or not math.isfinite(float(weight)) or float(weight) < 0:
            raise OptionError("class_weights must be finite non-negative numbers. "
                              f"Received: class_weights={truncate(class_weights)}")
        if int(label) > 0:
            out[int(label)] = float(weight)
    return out


def validate_patch_options(patch_size: Any, samples_per_volume: Any, foreground_fraction: Any,
                           class_weights: Any, batch_size: Any) -> PatchOptions:
    """Check the patch options and return them normalised.

    Parameters
    ----------
    patch_size : sequence of 3 int
        Patch extent ``(PX, PY, PZ)``, each >= 1.
    samples_per_volume : int
        Patches drawn from each case per epoch, >= 1.
    foreground_fraction : float
        Share of each batch forced to contain foreground, in ``[0, 1]``.
    class_weights : mapping, sequence or None
        ``{label: weight}`` or weights indexed by label (``weights[0]``, the background, is
        ignored); finite and >= 0.  ``None``: uniform over the classes a case holds.
    batch_size : int
        Samples per batch, >= 1.

    Returns
    -------
    PatchOptions
        Plain ints and floats; ``class_weights`` as a ``{label: weight}`` dict without label 0.

    Raises
    ------
    OptionError
        Naming the first invalid option, ending with ``Received: ...``.
    """
    return PatchOptions(_triple("patch_size", patch_size),
                        _positive_int("samples_per_volume", samples_per_volume),
                        _fraction(foreground_fraction),
                        _weights(class_weights),
                        _positive_int("batch_size", batch_size))


def forced_per_batch(batch: int, foreground_fraction: float) -> int:
    """How many of a batch of ``batch`` samples are forced foreground: ``ceil(f * batch)``.

    The product is rounded down by ``1e-9`` first, so float noise does not force one more
    (``0.3 * 10 == 3.0000000000000004`` forces 3).  ``f == 0`` forces none; any ``f > 0``
    forces at least one per batch (all of a batch of 1).
    """
    if foreground_fraction <= 0:
        return 0
    return min(batch, math.ceil(foreground_fraction * batch - _EPS))


def epoch_plan(num_cases: int, *, samples_per_volume: int, batch_size: int, foreground_fraction: float,
               shuffle: bool, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Which case each sample of an epoch reads, and which samples must contain foreground.

    Parameters
    ----------
    num_cases : int
        Number of cases (volumes), >= 0.
    samples_per_volume : int
        Each case appears this many times per epoch.
    batch_size : int
        Consecutive samples form a batch; the last batch may be partial.
    foreground_fraction : float
        In each batch of ``b`` samples, :func:`forced_per_batch` ``(b, f)`` samples are forced:
        the *last* ones of the batch, like nnU-Net (the cases are shuffled already).
    shuffle : bool
        ``True``: the order is a permutation drawn from
        ``numpy.random.default_rng([seed, epoch, salt])``.  ``False``: case-major,
        ``0, 0, ..., 1, 1, ...`` (``seed`` and ``epoch`` unused).
    seed, epoch : int
        Non-negative integers.

    Returns
    -------
    cases : numpy.ndarray of int64, shape (num_cases * samples_per_volume,)
    forced : numpy.ndarray of bool, same shape
    """
    n = _positive_int("num_cases", num_cases, minimum=0)
    spv = _positive_int("samples_per_volume", samples_per_volume)
    b = _positive_int("batch_size", batch_size)
    f = _fraction(foreground_fraction)
    s = _positive_int("seed", seed, minimum=0)
    e = _positive_int("epoch", epoch, minimum=0)
    cases = np.repeat(np.arange(n, dtype=np.int64), spv)
    if shuffle:
        cases = cases[np.random.default_rng([s, e, _PLAN_SALT]).permutation(cases.size)]
    total = cases.size
    forced = np.zeros(total, dtype=bool)
    for start in range(0, total, b):
        size = min(b, total - start)
        k = forced_per_batch(size, f)
        if k:
            forced[start + size - k:start + size] = True
    return cases, forced


def patch_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """Generator for the patch choices of the sample at ``position`` of an epoch's plan.

    Salted, so its stream differs from :func:`.batches.sample_rng` ``(seed, epoch, index)``
    (augmentation) for the same numbers.
    """
    return np.random.default_rng([seed, epoch, int(position), _PATCH_SALT])


def choose_label(rng: np.random.Generator, labels_present: Sequence[int] | np.ndarray,
                 class_weights: ClassWeights = None) -> int:
    """A foreground class among those present in a case.

    Parameters
    ----------
    rng : numpy.random.Generator
    labels_present : sequence of int
        Labels found in the case; 0 (background), negatives and repeats are ignored.
    class_weights : mapping, sequence or None
        As in :func:`validate_patch_options`.  Only the present classes count; a present class
        without a weight weighs 0.  ``None``, or all present weights 0: uniform.

    Returns
    -------
    int
        The chosen label, or ``-1`` when the case holds no label > 0 (no draw is made then).
    """
    present = np.unique(np.asarray(labels_present, dtype=np.int64).ravel())
    present = present[present > 0]
    if present.size == 0:
        return -1
    weights = _weights(class_weights)
    if weights is not None:
        p = np.array([weights.get(int(k), 0.0) for k in present], dtype=np.float64)
        total = p.sum()
        if total > 0:
            return int(present[rng.choice(present.size, p=p / total)])
    return int(present[rng.integers(present.size)])


def pick_foreground(rng: np.random.Generator, coords: np.ndarray) -> tuple[int, int, int]:
    """A uniformly drawn row of ``coords`` (``(N, 3)`` voxel coordinates, N >= 1)."""
    c = np.asarray(coords)
    if c.ndim != 2 or c.shape[1] != 3 or c.shape[0] == 0:
        raise InputError("coords must be a non-empty (N, 3) array of voxel coordinates. "
                         f"Received: array of shape {c.shape}")
    x, y, z = (int(v) for v in c[rng.integers(c.shape[0])])
    return x, y, z


def patch_corner(rng: np.random.Generator, shape: Sequence[int], patch: Sequence[int], *,
                 center: Sequence[int] | None = None) -> np.ndarray:
    """Lower corner of a patch of extent ``patch`` in a volume of extent ``shape``.

    Per axis, with ``S = shape[a]`` and ``P = patch[a]``, the *allowed* corners are
    ``[0, S - P]`` where ``S >= P`` (the patch lies inside the volume) and ``[S - P, 0]`` where
    ``S < P`` (the patch covers the whole extent and is padded).

    ``center=None``: uniform over the allowed corners, independently per axis.

    ``center`` given (a foreground voxel): the voxel is centred, ``corner = center - P // 2``
    (nnU-Net), then clipped to the allowed corners; no draw is made.  The voxel stays inside
    the patch (clipping only moves the patch back inside the volume, which still contains the
    voxel), and near the border the patch is shifted rather than padded.

    Returns
    -------
    numpy.ndarray of int64, shape (3,)
        Negative or above ``S - P`` only on axes where ``S < P``.
    """
    s = np.asarray(_triple("shape", tuple(shape)), dtype=np.int64)
    p = np.asarray(_triple("patch", tuple(patch)), dtype=np.int64)
    low = np.minimum(0, s - p)
    high = np.maximum(0, s - p)
    if center is None:
        return rng.integers(low, high + 1).astype(np.int64)
    c = np.asarray(center, dtype=np.int64).ravel()
    if c.size != 3 or np.any(c < 0) or np.any(c >= s):
        raise InputError(f"center must be a voxel inside the volume of shape {tuple(s.tolist())}. "
                         f"Received: center={truncate(tuple(np.asarray(center).ravel().tolist()))}")
    return np.clip(c - p // 2, low, high)


def draw_corner(rng: np.random.Generator, shape: Sequence[int], patch: Sequence[int], *, forced: bool,
                class_locations: Mapping[int, np.ndarray] | None,
                class_weights: ClassWeights = None) -> tuple[np.ndarray, int]:
    """Corner of one sample's patch: around a foreground voxel when ``forced``, else uniform.

    Parameters
    ----------
    rng : numpy.random.Generator
        E.g. :func:`patch_rng` ``(seed, epoch, position)``.
    shape, patch : sequence of 3 int
    forced : bool
        From :func:`epoch_plan`.
    class_locations : mapping {label: (N, 3) array} or None
        Foreground voxels per label (or a sample of them); empty arrays count as absent.
    class_weights
        As in :func:`choose_label`.

    Returns
    -------
    corner : numpy.ndarray of int64, shape (3,)
    label : int
        The class the patch was centred on, or ``-1`` for a uniform patch (not forced, or a
        case without foreground, which falls back to a uniform patch like nnU-Net).
    """
    if forced and class_locations:
        present = [k for k, v in class_locations.items() if np.asarray(v).size]
        label = choose_label(rng, present, class_weights)
        if label > 0:
            voxel = pick_foreground(rng, class_locations[label])
            return patch_corner(rng, shape, patch, center=voxel), label
    return patch_corner(rng, shape, patch, center=None), -1


def crop_padded(volume: np.ndarray, corner: Sequence[int], patch: Sequence[int], *,
                fill: float = 0) -> np.ndarray:
    """``volume[corner : corner + patch]`` on the first three axes, ``fill`` outside the volume.

    Trailing axes (channels) are kept whole.  Returns a new C-contiguous array of
    ``volume.dtype``.
    """
    p = _triple("patch", tuple(patch))
    c = [int(v) for v in corner]
    out = np.full(p + volume.shape[3:], fill, dtype=volume.dtype)
    src, dst = [], []
    for a in range(3):
        lo, hi = max(c[a], 0), min(c[a] + p[a], volume.shape[a])
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - c[a], hi - c[a]))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def has_foreground(mask_patch: np.ndarray) -> bool:
    """Whether a mask patch holds any label > 0."""
    return bool(np.any(np.asarray(mask_patch) > 0))
