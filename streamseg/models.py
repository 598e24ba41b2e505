"""A small U-Net for demos, tests and benchmarks (imports Keras on call)."""

from __future__ import annotations

from typing import Any

__all__ = ["small_unet"]


def small_unet(input_shape: tuple[int, int, int], num_classes: int, *, base_filters: int = 8,
               depth: int = 2, mask_mode: str = "sparse") -> Any:
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

    Returns
    -------
    keras.Model
        Compiled with Adam.
    """
    import keras
    from keras import layers

    inputs = keras.Input(input_shape)
    x = inputs
    skips = []
    for level in range(depth):
        f = base_filters * 2**level
        x = layers.Conv2D(f, 3, padding="same", activation="relu")(x)
        x = layers.Conv2D(f, 3, padding="same", activation="relu")(x)
        skips.append(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(base_filters * 2**depth, 3, padding="same", activation="relu")(x)
    for level in reversed(range(depth)):
        f = base_filters * 2**level
        x = layers.Conv2DTranspose(f, 2, strides=2, padding="same")(x)
        x = layers.Concatenate()([x, skips[level]])
        x = layers.Conv2D(f, 3, padding="same", activation="relu")(x)
    if mask_mode == "binary":
        outputs = layers.Conv2D(1, 1, activation="sigmoid")(x)
        loss = "binary_crossentropy"
    else:
        outputs = layers.Conv2D(num_classes, 1, activation="softmax")(x)
        loss = "sparse_categorical_crossentropy" if mask_mode == "sparse" else "categorical_crossentropy"
    model = keras.Model(inputs, outputs, name="small_unet")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=["accuracy"])
    return model
