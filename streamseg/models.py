"""Small U-Nets (2D and 3D) for demos, tests and benchmarks (import Keras on call).

May import: :mod:`streamseg.errors`.
"""

from __future__ import annotations

import numbers
from typing import Any

from .errors import OptionError, truncate

__all__ = ["small_unet", "small_unet3d"]

_MASK_MODES = ("sparse", "onehot", "binary")


def small_unet(input_shape: tuple[int, int, int], num_classes: int, *, base_filters: int = 8,
               depth: int = 2, mask_mode: str = "sparse", preprocess: Any = None) -> Any:
    """Build and compile a small U-Net.

    Parameters
    ----------
    input_shape : (H, W, C)
        Image shape; H and W must be divisible by ``2 ** depth``.
    num_classes : int
        Output classes (ignored for ``mask_mode="binary"``).
    base_filters : int
        Filters of the first level (doubled at each level).
    depth : int
        Down-sampling steps.
    mask_mode : {"sparse", "onehot", "binary"}
        Chooses the output activation and loss to match :class:`SegmentationDataset`.
    preprocess : keras.layers.Layer, optional
        Applied to the input first, e.g. ``ds.normalization_layer()`` for ``dtype="uint8"``
        batches (the model then takes uint8 images).

    Returns
    -------
    keras.Model
        Compiled with Adam.
    """
    return _unet(tuple(input_shape), num_classes, base_filters=base_filters, depth=depth, mask_mode=mask_mode,
                 dims=2, name="small_unet", preprocess=preprocess)


def _positive_int(value: Any) -> bool:
    """True for an integer > 0 (numpy integers included, bools not)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) > 0


def small_unet3d(input_shape: tuple[int, int, int, int], num_classes: int, *, base_filters: int = 8,
                 depth: int = 2, mask_mode: str = "sparse") -> Any:
    """Build and compile a small 3D U-Net for patches of CT/MRI volumes.

    The 3D twin of :func:`small_unet`: ``Conv3D`` / ``MaxPooling3D`` / ``Conv3DTranspose``,
    same activations, losses and optimizer.

    Parameters
    ----------
    input_shape : (PX, PY, PZ, C)
        Patch shape, channels last; PX, PY and PZ must be divisible by ``2 ** depth``.
    num_classes : int
        Output classes (ignored for ``mask_mode="binary"``, which has one sigmoid output).
    base_filters : int
        Filters of the first level (doubled at each level).
    depth : int
        Down-sampling steps (0 or more).
    mask_mode : {"sparse", "onehot", "binary"}
        Chooses the output activation and loss to match :class:`SegmentationDataset`.

    Returns
    -------
    keras.Model
        Input ``(B, PX, PY, PZ, C)``, output ``(B, PX, PY, PZ, num_classes)`` (softmax) or
        ``(B, PX, PY, PZ, 1)`` (sigmoid); compiled with Adam.

    Raises
    ------
    OptionError
        ``input_shape`` is not four positive ints or a spatial size is not divisible by
        ``2 ** depth``; bad ``num_classes``, ``base_filters``, ``depth`` or ``mask_mode``.
    """
    shape = tuple(input_shape) if isinstance(input_shape, tuple | list) else ()
    if len(shape) != 4 or not all(_positive_int(v) for v in shape):
        raise OptionError("small_unet3d: input_shape must be four positive ints (PX, PY, PZ, C), "
                          f"channels last. Received: input_shape={truncate(input_shape)}")
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise OptionError(f"small_unet3d: depth must be an int >= 0. Received: depth={truncate(depth)}")
    factor = 2**depth
    if any(int(v) % factor for v in shape[:3]):
        raise OptionError(f"small_unet3d: the spatial sizes of input_shape must be divisible by "
                          f"2**depth = {factor} (depth={depth}); use a patch size that is a multiple of "
                          f"{factor} or a smaller depth. Received: input_shape={truncate(input_shape)}")
    if not _positive_int(base_filters):
        raise OptionError(f"small_unet3d: base_filters must be a positive int. "
                          f"Received: base_filters={truncate(base_filters)}")
    if mask_mode not in _MASK_MODES:
        raise OptionError(f"small_unet3d: mask_mode must be one of {', '.join(_MASK_MODES)}. "
                          f"Received: mask_mode={truncate(mask_mode)}")
    if mask_mode != "binary" and not _positive_int(num_classes):
        raise OptionError(f"small_unet3d: num_classes must be a positive int. "
                          f"Received: num_classes={truncate(num_classes)}")

    return _unet(tuple(int(v) for v in shape), int(num_classes) if mask_mode != "binary" else 1,
                 base_filters=base_filters, depth=depth, mask_mode=mask_mode, dims=3, name="small_unet3d")


def _unet(input_shape: tuple[int, ...], num_classes: int, *, base_filters: int, depth: int, mask_mode: str,
          dims: int, name: str, preprocess: Any = None) -> Any:
    """The U-Net both builders share: ``dims``-D convolutions, compiled with Adam (imports Keras)."""
    import keras
    from keras import layers

    conv = layers.Conv2D if dims == 2 else layers.Conv3D
    pool = layers.MaxPooling2D if dims == 2 else layers.MaxPooling3D
    up = layers.Conv2DTranspose if dims == 2 else layers.Conv3DTranspose
    inputs = keras.Input(input_shape)
    x = inputs if preprocess is None else preprocess(inputs)
    skips = []
    for level in range(depth):
        f = base_filters * 2**level
        x = conv(f, 3, padding="same", activation="relu")(x)
        x = conv(f, 3, padding="same", activation="relu")(x)
        skips.append(x)
        x = pool()(x)
    x = conv(base_filters * 2**depth, 3, padding="same", activation="relu")(x)
    for level in reversed(range(depth)):
        f = base_filters * 2**level
        x = up(f, 2, strides=2, padding="same")(x)
        x = layers.Concatenate()([x, skips[level]])
        x = conv(f, 3, padding="same", activation="relu")(x)
    if mask_mode == "binary":
        outputs = conv(1, 1, activation="sigmoid")(x)
        loss = "binary_crossentropy"
    else:
        outputs = conv(num_classes, 1, activation="softmax")(x)
        loss = "sparse_categorical_crossentropy" if mask_mode == "sparse" else "categorical_crossentropy"
    model = keras.Model(inputs, outputs, name=name)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=["accuracy"])
    return model
