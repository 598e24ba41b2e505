"""Sliding-window inference of a 3D segmentation model over a whole CT/MRI volume.

:func:`predict_volume` cuts a volume into overlapping patches of the size the model was trained
on, runs them through the model a few at a time, blends the class probabilities of overlapping
patches with a Gaussian importance map (nnU-Net style: patch centres count more than patch
borders) and returns the arg-max label volume on the volume's own grid.

Order of operations (the same as ``streamseg convert --spacing`` followed by training):

1. read the volume (:func:`streamseg.io.volumes.read_volume`) in RAS order;
2. with ``spacing``: resample the *raw* image linearly to that spacing
   (:func:`streamseg.io.resample.resample_array`, exactly as the converter does);
3. ``normalize(array)``: the user's intensity normalisation, which must be the one used in
   training (e.g. the CT window or z-score of the dataset's ``normalize`` option);
4. sliding window on the (resampled) grid, blend, divide by the blend weights;
5. with ``spacing``: resample the class probabilities back to the original grid (linear);
6. arg-max (or threshold 0.5 for a single sigmoid output) and, with ``output``, write NIfTI.

May import: :mod:`streamseg.io`, :mod:`streamseg.errors`.

Examples
--------
>>> from streamseg.pipeline.predict import predict_volume              # doctest: +SKIP
>>> def ct_window(a):                                                   # doctest: +SKIP
...     return (np.clip(a, -1000, 1000) + 1000) / 2000
>>> seg = predict_volume(model, "ct/case_001.nii.gz", (96, 96, 96), normalize=ct_window,
...                      spacing=(1.5, 1.5, 1.5), output="pred/case_001.nii.gz")  # doctest: +SKIP
>>> seg.array.shape, seg.array.dtype                                    # doctest: +SKIP
((512, 512, 200), dtype('uint8'))
"""

from __future__ import annotations

import inspect
import itertools
import numbers
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DestinationError, InputError, OptionError, reject_unknown_keywords, truncate
from ..io._volume import Volume
from ..io.resample import check_spacing, resample_array, resampled_shape
from ..io.volumes import read_volume

__all__ = ["predict_volume", "importance_map", "tile_starts"]

_BLENDS = ("gaussian", "constant")
#: nnU-Net's Gaussian importance map: sigma = patch size * this, per axis.
SIGMA_SCALE = 1.0 / 8.0


def _check_patch(patch_size: Any) -> tuple[int, int, int]:
    try:
        values = tuple(patch_size) if not isinstance(patch_size, str | bytes) else ()
    except TypeError:
        values = ()
    if len(values) != 3 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                   and int(v) > 0 for v in values):
        raise OptionError("patch_size must be three positive ints (PX, PY, PZ), the model's patch size "
                          f"in voxels of the (resampled) grid. Received: patch_size={truncate(patch_size)}")
    return int(values[0]), int(values[1]), int(values[2])


def _check_options(overlap: Any, batch_size: Any, normalize: Any, blend: Any) -> float:
    try:
        ov = float(overlap)
    except (TypeError, ValueError):
        ov = float("nan")
    if isinstance(overlap, bool) or not 0.0 <= ov < 1.0:
        raise OptionError("overlap must be a number in [0, 1): the fraction of a patch that neighbouring "
                          f"patches share (0.5 is usual). Received: overlap={truncate(overlap)}")
    if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or batch_size < 1:
        raise OptionError(f"batch_size must be a positive int (patches per model call). "
                          f"Received: batch_size={truncate(batch_size)}")
    if normalize is not None and not callable(normalize):
        raise OptionError("normalize must be None or a function array -> array (the training "
                          f"normalisation). Received: normalize={truncate(normalize)}")
    if blend not in _BLENDS:
        raise OptionError(f"blend must be one of {', '.join(_BLENDS)}. Received: blend={truncate(blend)}")
    return ov


def _check_output(output: Any) -> Path | None:
    if output is None:
        return None
    if not isinstance(output, str | os.PathLike):
        raise OptionError(f"output must be a path ending in .nii or .nii.gz. Received: output={truncate(output)}")
    path = Path(output)
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        raise OptionError(f"output must end in .nii or .nii.gz (labels are written as NIfTI). "
                          f"Received: output={truncate(str(output))}")
    return path


def _as_volume(volume: Any) -> Volume:
    """A :class:`Volume` from a Volume, a path, or an ``(X, Y, Z[, C])`` array (identity affine)."""
    if isinstance(volume, Volume):
        return volume
    if isinstance(volume, str | os.PathLike):
        return read_volume(volume)
    if isinstance(volume, np.ndarray):
        if volume.ndim not in (3, 4) or 0 in volume.shape:
            raise InputError("predict_volume: an array volume must be (X, Y, Z) or (X, Y, Z, C), not empty. "
                             f"Received: shape {truncate(volume.shape)}")
        return Volume(array=volume, affine=np.eye(4), spacing=(1.0, 1.0, 1.0), source="<array>",
                      orientation=("R", "A", "S"))
    raise InputError("predict_volume: volume must be a Volume, a path to a volume file or a NumPy array. "
                     f"Received: {truncate(type(volume).__name__)}")


def tile_starts(size: int, patch: int, step: int) -> list[int]:
    """Start indices of patches along an axis of ``size >= patch`` voxels.

    Every ``step`` voxels from 0, plus a last patch flush with the end; together the patches
    cover the whole axis.
    """
    starts = list(range(0, size - patch + 1, step))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def importance_map(patch_size: Sequence[int], blend: str = "gaussian") -> np.ndarray:
    """The per-voxel weight of a patch's predictions, ``float32`` of shape ``patch_size``.

    ``"gaussian"``: ``exp(-d^2 / (2 sigma^2))`` around the patch centre with
    ``sigma = patch / 8`` per axis (nnU-Net), scaled to a maximum of 1; strictly positive.
    ``"constant"``: all ones.
    """
    if blend == "constant":
        return np.ones(tuple(patch_size), np.float32)
    axes = []
    for p in patch_size:
        coords = np.arange(p, dtype=np.float64) - (p - 1) / 2.0
        sigma = p * SIGMA_SCALE
        axes.append(np.exp(-(coords**2) / (2.0 * sigma**2)))
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weights /= weights.max()
    return np.maximum(weights, 1e-12).astype(np.float32)


def _caller(model: Any) -> Callable[[np.ndarray], Any]:
    """``model.predict_on_batch`` when there is one, else ``model(x, training=False)``.

    Plain functions that take no ``training`` keyword are called as ``model(x)``.
    """
    if hasattr(model, "predict_on_batch"):
        return model.predict_on_batch
    if not callable(model):
        raise OptionError("model must have a predict_on_batch method (a Keras model) or be callable on a "
                          f"batch of patches. Received: {truncate(type(model).__name__)}")
    try:
        params = inspect.signature(model).parameters.values()
        takes_training = any(p.name == "training" or p.kind is p.VAR_KEYWORD for p in params)
    except (TypeError, ValueError):
        takes_training = True
    if takes_training:
        return lambda x: model(x, training=False)
    return model


def _model_input_check(model: Any, patch: tuple[int, int, int], channels: int) -> None:
    """Compare patch size and channels with a Keras model's fixed input shape, when it has one."""
    try:
        shape = tuple(model.input_shape)
    except Exception:  # no attribute, several inputs, not built: nothing to check
        return
    if len(shape) != 5:
        return
    expected = (*patch, channels)
    if any(s is not None and int(s) != e for s, e in zip(shape[1:], expected)):
        raise InputError(f"The model takes inputs of shape {shape[1:]} (PX, PY, PZ, C), but predict_volume "
                         f"would feed patches of {expected}; pass the model's patch_size and an image with "
                         f"its number of channels. Received: patch_size={patch}, channels={channels}")


def _to_numpy(out: Any) -> np.ndarray:
    if isinstance(out, dict | list | tuple):
        raise InputError("predict_volume needs a model with one output tensor. "
                         f"Received: {truncate(type(out).__name__)} of outputs")
    if hasattr(out, "numpy") and not isinstance(out, np.ndarray):
        out = out.numpy()
    return np.asarray(out)


def _sliding_window(call: Callable[[np.ndarray], Any], image: np.ndarray, patch: tuple[int, int, int],
                    overlap: float, batch_size: int, weights: np.ndarray) -> np.ndarray:
    """Blended model outputs ``(X, Y, Z, K)`` float32 on the grid of ``image`` ``(X, Y, Z, C)``."""
    shape = image.shape[:3]
    pad = [max(0, p - s) for p, s in zip(patch, shape)]
    before = [d // 2 for d in pad]
    if any(pad):
        image = np.pad(image, [(b, d - b) for b, d in zip(before, pad)] + [(0, 0)], mode="constant")
    padded = image.shape[:3]
    steps = [max(1, int(p * (1.0 - overlap))) for p in patch]
    starts = list(itertools.product(*(tile_starts(n, p, s) for n, p, s in zip(padded, patch, steps))))
    accum: np.ndarray | None = None
    wsum = np.zeros(padded, np.float32)
    batch = np.zeros((batch_size, *patch, image.shape[3]), np.float32)
    for first in range(0, len(starts), batch_size):
        group = starts[first:first + batch_size]
        for i, (x, y, z) in enumerate(group):
            batch[i] = image[x:x + patch[0], y:y + patch[1], z:z + patch[2]]
        batch[len(group):] = 0  # a full batch every call: one shape, one trace
        out = _to_numpy(call(batch))
        if out.ndim != 5 or out.shape[0] != batch_size or tuple(out.shape[1:4]) != patch or out.shape[4] < 1:
            raise InputError(f"The model must return (batch, PX, PY, PZ, classes) = ({batch_size}, "
                             f"{patch[0]}, {patch[1]}, {patch[2]}, K) for a batch of patches {batch.shape}. "
                             f"Received: output shape {truncate(tuple(out.shape))}")
        if accum is None:
            accum = np.zeros((*padded, out.shape[4]), np.float32)
        elif out.shape[4] != accum.shape[3]:
            raise InputError(f"The model returned {out.shape[4]} classes for one batch and {accum.shape[3]} "
                             f"for an earlier one. Received: output shape {truncate(tuple(out.shape))}")
        for i, (x, y, z) in enumerate(group):
            region = (slice(x, x + patch[0]), slice(y, y + patch[1]), slice(z, z + patch[2]))
            accum[region] += out[i].astype(np.float32, copy=False) * weights[..., None]
            wsum[region] += weights
    if accum is None:  # pragma: no cover - there is always at least one patch
        raise RuntimeError("no patches were predicted")
    accum /= wsum[..., None]
    crop = tuple(slice(b, b + s) for b, s in zip(before, shape))
    return np.ascontiguousarray(accum[crop])


def _labels(probs: np.ndarray) -> np.ndarray:
    """Arg-max (or ``> 0.5`` for one channel) as the smallest fitting unsigned dtype."""
    k = probs.shape[3]
    if k == 1:
        return (probs[..., 0] > 0.5).astype(np.uint8)  # as Keras' binary accuracy
    dtype = np.uint8 if k <= 256 else np.uint16 if k <= 65536 else np.uint32
    return np.argmax(probs, axis=3).astype(dtype)


def _write_nifti(labels: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write ``labels`` with ``affine`` (RAS data + RAS affine) atomically (temporary file, rename)."""
    import nibabel as nib

    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"
    img = nib.Nifti1Image(labels, affine)
    img.set_data_dtype(labels.dtype)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(fd)
        nib.save(img, tmp)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise DestinationError(f"Cannot write the label volume to {path} ({exc.strerror or exc}). "
                               f"Received: output={truncate(str(path))}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


@reject_unknown_keywords
def predict_volume(model: Any, volume: Volume | str | os.PathLike | np.ndarray,
                   patch_size: Sequence[int], *, overlap: float = 0.5, batch_size: int = 2,
                   normalize: Callable[[np.ndarray], np.ndarray] | None = None,
                   spacing: Sequence[float] | None = None, output: str | os.PathLike | None = None,
                   blend: str = "gaussian") -> Volume:
    """Segment a whole volume with a patch model by blended sliding-window inference.

    Parameters
    ----------
    model : keras.Model or callable
        Anything with ``predict_on_batch(x)``, or callable as ``model(x, training=False)`` (or
        ``model(x)``), mapping a ``float32`` batch ``(B, PX, PY, PZ, C)`` to per-class
        probabilities ``(B, PX, PY, PZ, K)`` (softmax; a single sigmoid channel for binary
        models).  Outputs are blended as given (logits blend too, but then the binary 0.5
        threshold does not apply).
    volume : Volume, path or numpy.ndarray
        A :class:`~streamseg.io._volume.Volume`, a volume file/DICOM folder read with
        :func:`~streamseg.io.volumes.read_volume`, or an ``(X, Y, Z)`` / ``(X, Y, Z, C)`` array
        in RAS order (identity affine, 1 mm spacing).
    patch_size : (PX, PY, PZ)
        The model's patch in voxels of the grid it was trained on (after ``spacing``).
    overlap : float
        Fraction of a patch shared by neighbours, in ``[0, 1)``: patches start every
        ``int(patch * (1 - overlap))`` voxels (at least 1), the last one flush with the end.
    batch_size : int
        Patches per model call (the last call is padded with zero patches to the same size).
    normalize : callable, optional
        ``f(array) -> array`` on the ``float32`` ``(X, Y, Z, C)`` image, after resampling and
        before patching.  Pass **the normalisation used in training** (CT window, z-score with
        the training statistics, ...); None feeds the raw intensities.  It may return
        ``(X, Y, Z)`` (one channel) or ``(X, Y, Z, C')``.
    spacing : (SX, SY, SZ), optional
        The spacing in mm the model was trained at (the store's ``convert --spacing``; 0 keeps
        an axis).  The image is resampled to it linearly, predicted, and the probabilities are
        resampled back (linear) so that the labels lie on the original grid.
    output : path, optional
        ``.nii`` / ``.nii.gz`` file to write the labels to (RAS array with the volume's RAS
        affine; parent folders are created; written atomically).
    blend : {"gaussian", "constant"}
        Weights of each patch's voxels: Gaussian importance map (sigma = patch / 8) or uniform.

    Returns
    -------
    Volume
        ``array``: labels ``(X, Y, Z)`` on the input's grid, ``uint8`` (``uint16`` for more than
        256 classes); ``affine``, ``spacing`` and ``source`` of the input.

    Raises
    ------
    OptionError
        Bad ``patch_size``, ``overlap``, ``batch_size``, ``normalize``, ``spacing``,
        ``output`` or ``blend``; unknown keyword.
    InputError
        Unreadable volume or wrong array shape; a model whose input or output shape does not
        fit the patches; ``normalize`` changing the spatial shape.
    DestinationError
        ``output`` cannot be written.

    Notes
    -----
    Memory: the blended probabilities take ``4 * X * Y * Z * K`` bytes on the (resampled)
    grid, plus as much again on the original grid when ``spacing`` resamples.
    """
    patch = _check_patch(patch_size)
    ov = _check_options(overlap, batch_size, normalize, blend)
    target = check_spacing(spacing)
    out_path = _check_output(output)
    vol = _as_volume(volume)
    call = _caller(model)

    raw = vol.array if vol.array.ndim == 4 else vol.array[..., np.newaxis]
    shape = vol.spatial_shape
    work_shape = shape if target is None else resampled_shape(shape, vol.spacing, target)
    raw = resample_array(raw, work_shape, labels=False)  # no-op on the same shape
    image = np.ascontiguousarray(raw, dtype=np.float32)
    if normalize is not None:
        normed = np.asarray(normalize(image))
        if normed.ndim == 3:
            normed = normed[..., np.newaxis]
        if normed.ndim != 4 or normed.shape[:3] != image.shape[:3] or normed.shape[3] < 1:
            raise InputError(f"normalize must return an array of the image's spatial shape {image.shape[:3]} "
                             f"(with or without channels). Received: shape {truncate(normed.shape)}")
        image = np.ascontiguousarray(normed, dtype=np.float32)
    _model_input_check(model, patch, image.shape[3])

    probs = _sliding_window(call, image, patch, ov, int(batch_size), importance_map(patch, blend))
    probs = resample_array(probs, shape, labels=False)  # back to the original grid (no-op without spacing)
    labels = _labels(probs)
    del probs

    affine = np.array(vol.affine, np.float64)
    if out_path is not None:
        _write_nifti(labels, affine, out_path)
    from nibabel.orientations import aff2axcodes

    return Volume(array=labels, affine=affine, spacing=tuple(float(s) for s in vol.spacing),
                  source=vol.source, orientation=tuple(str(c) for c in aff2axcodes(affine)))
