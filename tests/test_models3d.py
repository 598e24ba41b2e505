"""small_unet3d: shapes, one training step, option errors."""

from __future__ import annotations

import numpy as np
import pytest

from streamseg.errors import OptionError
from streamseg.models import small_unet3d

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mask_mode, classes, out_channels", [("sparse", 3, 3), ("binary", 5, 1)])
def test_builds_and_fits_one_step(mask_mode, classes, out_channels):
    rng = np.random.default_rng(0)
    model = small_unet3d((16, 16, 16, 2), classes, base_filters=2, depth=2, mask_mode=mask_mode)
    assert model.input_shape == (None, 16, 16, 16, 2)
    assert model.output_shape == (None, 16, 16, 16, out_channels)
    x = rng.normal(size=(2, 16, 16, 16, 2)).astype(np.float32)
    if mask_mode == "binary":
        y = rng.integers(0, 2, size=(2, 16, 16, 16, 1)).astype(np.float32)
    else:
        y = rng.integers(0, classes, size=(2, 16, 16, 16)).astype(np.int32)
    history = model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    pred = np.asarray(model.predict_on_batch(x))
    assert pred.shape == (2, 16, 16, 16, out_channels)
    if mask_mode == "sparse":
        np.testing.assert_allclose(pred.sum(axis=-1), 1.0, rtol=1e-5)


def test_non_cubic_patch_and_depth_one():
    model = small_unet3d((8, 12, 4, 1), 2, base_filters=2, depth=1)
    assert model.output_shape == (None, 8, 12, 4, 2)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(input_shape=(16, 16, 18, 1)), "input_shape"),       # 18 not divisible by 4
    (dict(input_shape=(16, 16, 16)), "input_shape"),          # no channel axis
    (dict(input_shape=(16, 16, 16, 0)), "input_shape"),
    (dict(input_shape=(16, 16, 16, 1), depth=-1), "depth"),
    (dict(input_shape=(16, 16, 16, 1), mask_mode="dense"), "mask_mode"),
    (dict(input_shape=(16, 16, 16, 1), num_classes=0), "num_classes"),
    (dict(input_shape=(16, 16, 16, 1), base_filters=0), "base_filters"),
])
def test_bad_options_raise(kwargs, needle):
    args = dict(num_classes=2) | kwargs
    with pytest.raises(OptionError, match=needle) as info:
        small_unet3d(**args)
    assert "Received:" in str(info.value)
