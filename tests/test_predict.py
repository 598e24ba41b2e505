"""predict_volume: sliding-window oracle (identity model on one-hot input), NIfTI output,
resampling to the model's spacing, option errors, and one real small_unet3d end to end."""

from __future__ import annotations

import numpy as np
import pytest

from streamseg.errors import InputError, OptionError
from streamseg.io._volume import Volume
from streamseg.pipeline.predict import importance_map, predict_volume, tile_starts


class IdentityModel:
    """A fake Keras model: ``predict_on_batch`` returns its input; records batch shapes."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        self.shapes.append(x.shape)
        return x.copy()


class CallableIdentity:
    """A fake model used through ``model(x, training=False)``."""

    def __init__(self) -> None:
        self.training: list[object] = []

    def __call__(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        self.training.append(training)
        return x.copy()


def one_hot(labels: np.ndarray, k: int) -> np.ndarray:
    return np.eye(k, dtype=np.float32)[labels]


def blocky_labels(shape: tuple[int, int, int], k: int, block: int, seed: int) -> np.ndarray:
    """Labels constant on ``block``^3 cubes (coarse structures that survive resampling)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, k, size=tuple(-(-s // block) for s in shape))
    full = coarse.repeat(block, 0).repeat(block, 1).repeat(block, 2)
    return full[: shape[0], : shape[1], : shape[2]].astype(np.uint8)


@pytest.mark.parametrize("shape", [(21, 18, 13), (5, 7, 3), (8, 8, 8)])  # not divisible, smaller, equal
@pytest.mark.parametrize("overlap", [0.0, 0.5])
@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_identity_model_on_one_hot_returns_the_labels(shape, overlap, blend):
    k = 4
    labels = np.random.default_rng(sum(shape)).integers(0, k, size=shape).astype(np.uint8)
    model = IdentityModel()
    out = predict_volume(model, one_hot(labels, k), (8, 8, 8), overlap=overlap, batch_size=3, blend=blend)
    assert isinstance(out, Volume)
    assert out.array.dtype == np.uint8 and out.array.shape == shape
    np.testing.assert_array_equal(out.array, labels)
    np.testing.assert_array_equal(out.affine, np.eye(4))
    assert out.spacing == (1.0, 1.0, 1.0)
    assert {s for s in model.shapes} == {(3, 8, 8, 8, k)}  # every call a full batch


def test_callable_model_and_volume_affine_kept():
    k = 3
    labels = np.random.default_rng(1).integers(0, k, size=(12, 10, 9)).astype(np.uint8)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = (-10.0, 4.0, 7.5)
    vol = Volume(array=one_hot(labels, k), affine=affine, spacing=(0.8, 0.8, 2.5), source="case.nii.gz",
                 orientation=("L", "P", "S"))
    model = CallableIdentity()
    out = predict_volume(model, vol, (6, 6, 6), overlap=0.25, batch_size=1)
    np.testing.assert_array_equal(out.array, labels)
    np.testing.assert_array_equal(out.affine, affine)
    assert out.spacing == (0.8, 0.8, 2.5) and out.source == "case.nii.gz"
    assert set(model.training) == {False}


def test_plain_function_model_and_binary_threshold():
    mask = np.random.default_rng(2).integers(0, 2, size=(10, 11, 12)).astype(np.uint8)
    image = mask.astype(np.float32)[..., None] * 0.6 + 0.2  # 0 -> 0.2, 1 -> 0.8: sigmoid-like

    out = predict_volume(lambda x: x, image, (4, 4, 4), overlap=0.5)
    assert out.array.dtype == np.uint8
    np.testing.assert_array_equal(out.array, mask)


def test_many_classes_give_uint16():
    k = 300
    labels = np.random.default_rng(3).integers(0, k, size=(4, 3, 2))
    out = predict_volume(IdentityModel(), one_hot(labels, k), (2, 2, 2), overlap=0.0, batch_size=4)
    assert out.array.dtype == np.uint16
    np.testing.assert_array_equal(out.array, labels)


def test_normalize_is_applied_before_patching():
    k = 3
    labels = np.random.default_rng(4).integers(0, k, size=(9, 9, 9)).astype(np.uint8)
    scrambled = one_hot(labels, k)[..., ::-1] * 5.0  # channels reversed, scaled
    seen = []

    def unscramble(a: np.ndarray) -> np.ndarray:
        seen.append((a.dtype, a.shape))
        return a[..., ::-1] / 5.0

    out = predict_volume(IdentityModel(), scrambled, (4, 4, 4), normalize=unscramble)
    np.testing.assert_array_equal(out.array, labels)
    assert seen == [(np.float32, (9, 9, 9, k))]


def test_written_nifti_reads_back(tmp_path):
    import nibabel as nib

    from streamseg.io.volumes import read_volume

    k = 5
    labels = np.random.default_rng(5).integers(0, k, size=(11, 9, 7)).astype(np.uint8)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    affine[:3, 3] = (-20.0, 10.0, 5.0)
    vol = Volume(array=one_hot(labels, k), affine=affine, spacing=(1.5, 1.5, 3.0), source="x",
                 orientation=("R", "A", "S"))
    dst = tmp_path / "pred" / "case.nii.gz"
    out = predict_volume(IdentityModel(), vol, (4, 4, 4), output=dst)
    img = nib.load(dst)
    np.testing.assert_allclose(img.affine, affine)
    data = np.asarray(img.dataobj)
    assert data.dtype == np.uint8
    np.testing.assert_array_equal(data, labels)
    np.testing.assert_array_equal(out.array, labels)
    assert [p.name for p in dst.parent.iterdir()] == ["case.nii.gz"]  # no temporary left
    np.testing.assert_array_equal(read_volume(dst).array, labels)


def test_path_input_is_read(tmp_path):
    from conftest import save_nifti

    k = 3
    labels = np.random.default_rng(6).integers(0, k, size=(8, 6, 5)).astype(np.uint8)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    path = save_nifti(tmp_path / "img.nii.gz", one_hot(labels, k), affine)
    out = predict_volume(IdentityModel(), path, (4, 4, 4))
    np.testing.assert_array_equal(out.array, labels)
    np.testing.assert_allclose(out.affine, affine)
    assert out.spacing == (2.0, 2.0, 2.0) and out.source == str(path)


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_spacing_predicts_on_coarse_grid_and_returns_the_original_grid(blend):
    k = 3
    shape = (40, 36, 30)
    labels = blocky_labels(shape, k, block=8, seed=7)
    model = IdentityModel()
    out = predict_volume(model, one_hot(labels, k), (8, 8, 8), spacing=(2.0, 2.0, 2.0), blend=blend,
                         batch_size=4)
    assert out.array.shape == shape and out.array.dtype == np.uint8
    assert out.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(out.affine, np.eye(4))
    assert float(np.mean(out.array == labels)) >= 0.95
    # the model saw the 2 mm grid: (20, 18, 15) voxels -> 4 * 4 * 3 patches of 8 at overlap 0.5
    assert len(model.shapes) == -(-(4 * 4 * 3) // 4)


def test_tiles_and_importance_map():
    assert tile_starts(21, 8, 4) == [0, 4, 8, 12, 13]
    assert tile_starts(16, 8, 8) == [0, 8]
    assert tile_starts(8, 8, 4) == [0]
    w = importance_map((8, 6, 5))
    assert w.shape == (8, 6, 5) and w.dtype == np.float32
    assert float(w.min()) > 0 and float(w.max()) == pytest.approx(1.0)
    np.testing.assert_allclose(w, w[::-1, ::-1, ::-1])  # symmetric about the centre
    assert w[4, 3, 2] > w[0, 0, 0]
    np.testing.assert_array_equal(importance_map((3, 4, 5), "constant"), np.ones((3, 4, 5)))


def wrong_classes(x: np.ndarray) -> np.ndarray:
    return x[..., :1].repeat(2, axis=1)


@pytest.mark.parametrize("kwargs, error, needle", [
    (dict(patch_size=(8, 8)), OptionError, "patch_size"),
    (dict(patch_size=(8, 8, 0)), OptionError, "patch_size"),
    (dict(patch_size=(8, 8, 2.5)), OptionError, "patch_size"),
    (dict(patch_size="888"), OptionError, "patch_size"),
    (dict(overlap=1.0), OptionError, "overlap"),
    (dict(overlap=-0.1), OptionError, "overlap"),
    (dict(overlap="half"), OptionError, "overlap"),
    (dict(batch_size=0), OptionError, "batch_size"),
    (dict(blend="linear"), OptionError, "blend"),
    (dict(normalize="zscore"), OptionError, "normalize"),
    (dict(spacing=(1.0, 2.0)), OptionError, "spacing"),
    (dict(output="pred.npy"), OptionError, "output"),
    (dict(stride=4), OptionError, "stride"),
    (dict(volume=np.zeros((4, 4))), InputError, "array volume"),
    (dict(volume=[1, 2, 3]), InputError, "volume must be"),
    (dict(model=wrong_classes), InputError, "model must return"),
    (dict(model=lambda x: x[:, :-1]), InputError, "model must return"),
    (dict(normalize=lambda a: a[:-1]), InputError, "normalize must return"),
    (dict(model=object()), OptionError, "predict_on_batch"),
])
def test_bad_options_raise(kwargs, error, needle):
    args = dict(model=IdentityModel(), volume=np.zeros((6, 6, 6, 2), np.float32), patch_size=(4, 4, 4))
    args |= kwargs
    with pytest.raises(error, match=needle) as info:
        predict_volume(args.pop("model"), args.pop("volume"), args.pop("patch_size"), **args)
    message = str(info.value)
    assert "Received:" in message and "\n" not in message


def test_missing_file_raises(tmp_path):
    with pytest.raises(InputError, match="No such volume"):
        predict_volume(IdentityModel(), tmp_path / "nope.nii.gz", (4, 4, 4))


@pytest.mark.slow
def test_real_small_unet3d_end_to_end(tmp_path):
    from streamseg.models import small_unet3d

    model = small_unet3d((16, 16, 16, 1), 2, base_filters=2, depth=2)
    image = np.random.default_rng(8).normal(size=(20, 16, 12)).astype(np.float32)
    out = predict_volume(model, image, (16, 16, 16), overlap=0.5, batch_size=2,
                         normalize=lambda a: (a - a.mean()) / a.std(), output=tmp_path / "seg.nii")
    assert out.array.shape == (20, 16, 12) and out.array.dtype == np.uint8
    assert set(np.unique(out.array)) <= {0, 1}
    assert (tmp_path / "seg.nii").exists()
    with pytest.raises(InputError, match="model takes inputs"):
        predict_volume(model, image, (8, 8, 8))
