"""What a batch crosses to the model as: float32 normalised images, or uint8 images that the
model normalises itself (``SegmentationDataset(dtype="uint8")``).

uint8 batches are 4x smaller through shared memory, the main process's hand-over and the copy
onto the accelerator, as FFCV and DALI do; :func:`normalization_layer` is the Keras layer that
turns them into what ``dtype="float32"`` would have given (``(x - offset) * scale``, equal up
to float32 rounding).  With uint8 batches the augmented image is rounded to integers after the
photometric ops (at most half a grey level from the float32 result), and sparse masks travel
as uint8 labels too (Keras's sparse losses accept integer labels of any width).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import OptionError, truncate
from .fused import fusable, uniform_pair

__all__ = ["TRANSPORT_DTYPES", "check_transport", "normalization_layer"]

TRANSPORT_DTYPES = ("float32", "uint8")


def check_transport(dtype: Any, *, image_dtype: np.dtype, channels: int, normalize: str | None,
                    normalize_first: bool, augment: Any) -> str:
    """Validate ``dtype`` for these images and options; return ``"float32"`` or ``"uint8"``."""
    name = np.dtype(dtype).name if isinstance(dtype, (type, np.dtype)) else dtype
    if name not in TRANSPORT_DTYPES:
        raise OptionError(f"dtype must be one of {', '.join(repr(d) for d in TRANSPORT_DTYPES)}. "
                          f"Received: dtype={truncate(dtype)}")
    if name == "float32":
        return name
    if np.dtype(image_dtype) != np.uint8:
        raise OptionError(f"dtype='uint8' batches need a uint8 store (these images are {np.dtype(image_dtype)}); "
                          f"use dtype='float32'. Received: dtype={truncate(dtype)}")
    if normalize not in ("unit", "standardize", None) or normalize_first:
        raise OptionError("dtype='uint8' batches leave normalisation to the model, which only works for "
                          "normalize='unit', 'standardize' or None; use dtype='float32'. "
                          f"Received: normalize={normalize!r}")
    if not fusable(augment, image_dtype, channels):
        raise OptionError(f"dtype='uint8' batches need 1 to 4 channels and an Augment fill_value in [0, 255] "
                          f"that is an integer; use dtype='float32'. Received: {channels} channel(s), "
                          f"fill_value={getattr(augment, 'fill_value', None)!r}")
    return name


def normalization_layer(options: Any, *, name: str = "streamseg_normalize") -> Any:
    """The Keras layer that normalises this dataset's images inside the model.

    ``keras.layers.Rescaling(scale, offset=-offset * scale)`` (per-channel lists where the
    channels differ) for ``dtype="uint8"`` batches: ``x * s - o * s``, the dataset's
    ``(x - o) * s`` up to float32 rounding.  For float32 batches, which arrive normalised, a
    ``keras.layers.Identity``, so a model builder can always put it first.
    """
    import keras

    if getattr(options, "transport", "float32") == "float32":
        return keras.layers.Identity(name=name)
    uniform = uniform_pair(options.image_offset, options.image_scale)
    if uniform is not None:
        o, s = uniform
        return keras.layers.Rescaling(s, offset=-o * s, name=name)
    off = np.asarray(options.image_offset, np.float64).ravel()
    sc = np.asarray(options.image_scale, np.float64).ravel()
    return keras.layers.Rescaling([float(v) for v in sc], offset=[float(v) for v in -off * sc], name=name)
