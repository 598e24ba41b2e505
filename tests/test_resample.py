"""Resampling to a target spacing (:mod:`streamseg.io.resample`, ``convert --spacing``).

Oracles: the field of view (outer voxel edges) mapped through the affines, linear ramps
(which linear interpolation reproduces exactly inside the volume), label sets and blob
centroids in world coordinates, scipy.ndimage.zoom called directly, and nibabel's
RAS-canonical arrays and zooms of the files converted.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from streamseg import convert
from streamseg.errors import OptionError
from streamseg.io.resample import check_spacing, resample_array, resample_pair, resampled_affine, resampled_shape
from streamseg.io.synth_volumes import write_synth_volumes
from streamseg.io.volume_source import VolumeSliceSource

SHAPE = (40, 36, 20)
SPACING = (1.0, 1.0, 2.5)


def _affine(spacing, *, angle: float = 0.3, shift=(-20.0, 7.5, 3.0)) -> np.ndarray:
    """An oblique voxel-to-world affine with the given column norms (spacing)."""
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    out = np.eye(4)
    out[:3, :3] = rot @ np.diag(spacing)
    out[:3, 3] = shift
    return out


def _world(affine: np.ndarray, index) -> np.ndarray:
    return (affine @ np.append(np.asarray(index, np.float64), 1.0))[:3]


def _labels(shape, rng: np.random.Generator) -> np.ndarray:
    """Three boxes, each several voxels wide, labels 1, 4 and 9."""
    lab = np.zeros(shape, np.uint8)
    for value, frac in ((1, 0.1), (4, 0.4), (9, 0.65)):
        lo = [int(frac * n) for n in shape]
        lab[tuple(slice(a, a + max(4, n // 4)) for a, n in zip(lo, shape))] = value
    return lab


GEOMETRIES = [  # (shape, spacing, target, expected shape)
    ((40, 36, 20), (1.0, 1.0, 2.5), (2.0, 2.0, 2.0), (20, 18, 25)),
    ((30, 28, 24), (0.8, 0.8, 1.5), (2.0, 2.0, 2.0), (12, 11, 18)),
    ((17, 23, 9), (1.3, 0.7, 3.0), (0.5, 0.0, 1.0), (44, 23, 27)),  # upsampling, Y kept
    ((16, 16, 16), (1.0, 1.0, 1.0), (0.0, 0.0, 3.0), (16, 16, 5)),
    ((10, 12, 8), (2.0, 2.0, 2.0), (3.0, 3.0, 3.0), (7, 8, 5)),
]


# --------------------------------------------------------------------------- #
# geometry: shapes, spacing reached, field of view
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape,spacing,target,expected", GEOMETRIES)
def test_shape_spacing_and_field_of_view(shape, spacing, target, expected) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(-1024, 2000, shape).astype(np.int16)
    labels = _labels(shape, rng)
    affine = _affine(spacing)
    out_image, out_labels, out_affine, reached = resample_pair(image, labels, affine, spacing, target)
    want = tuple(n if t == 0 else round(n * s / t) for n, s, t in zip(shape, spacing, target))
    assert want == expected == resampled_shape(shape, spacing, target)
    assert out_image.shape == out_labels.shape == expected
    for n, m, s, t, r in zip(shape, expected, spacing, target, reached):
        if t == 0:  # axis kept as it is
            assert m == n and r == s
        else:
            assert r == pytest.approx(s * n / m) and abs(r - t) <= 0.5 * t / m + 1e-9
    np.testing.assert_allclose(np.linalg.norm(out_affine[:3, :3], axis=0), reached, rtol=1e-9)
    for a in range(3):  # every axis keeps its direction
        np.testing.assert_allclose(out_affine[:3, a] / reached[a], affine[:3, a] / spacing[a], atol=1e-9)
    # the outer voxel edges stay where they were (grid mode keeps the field of view)
    np.testing.assert_allclose(_world(out_affine, [-0.5] * 3), _world(affine, [-0.5] * 3), atol=1e-9)
    np.testing.assert_allclose(_world(out_affine, [m - 0.5 for m in expected]),
                               _world(affine, [n - 0.5 for n in shape]), atol=1e-9)
    np.testing.assert_allclose(out_affine, resampled_affine(affine, shape, expected))


def test_shapes_never_reach_zero() -> None:
    assert resampled_shape((3, 40, 2), (1.0, 1.0, 1.0), (10.0, 1.0, 100.0)) == (1, 40, 1)
    image, labels, _, reached = resample_pair(np.zeros((3, 4, 2), np.int16), np.zeros((3, 4, 2), np.uint8),
                                              np.eye(4), (1.0, 1.0, 1.0), (10.0, 0.0, 100.0))
    assert image.shape == labels.shape == (1, 4, 1) and reached == (3.0, 1.0, 2.0)


# --------------------------------------------------------------------------- #
# values: linear images, nearest labels
# --------------------------------------------------------------------------- #
def _ramp(affine: np.ndarray, shape, coef=(1.5, -2.0, 0.75), offset: float = -300.0) -> np.ndarray:
    """``coef . world(index) + offset`` on every voxel of the grid."""
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    return world @ np.asarray(coef) + offset


def _inside(affine_old: np.ndarray, affine_new: np.ndarray, old_shape, new_shape) -> np.ndarray:
    """New voxels whose position lies within the old voxel centres (no edge clamping there)."""
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in new_shape], indexing="ij"), axis=-1)
    step = np.linalg.inv(affine_old) @ affine_new
    old = idx @ step[:3, :3].T + step[:3, 3]
    return np.all((old >= -1e-9) & (old <= np.asarray(old_shape) - 1 + 1e-9), axis=-1)


@pytest.mark.parametrize("shape,spacing,target,expected", GEOMETRIES)
def test_linear_interpolation_reproduces_a_ramp_in_world_coordinates(shape, spacing, target, expected) -> None:
    affine = _affine(spacing)
    ramp = _ramp(affine, shape)
    labels = np.zeros(shape, np.uint8)
    out, _, out_affine, _ = resample_pair(ramp.astype(np.float32), labels, affine, spacing, target)
    assert out.dtype == np.float32
    want = _ramp(out_affine, expected)
    inside = _inside(affine, out_affine, shape, expected)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(out[inside], want[inside], atol=2e-3)
    lo, hi = ramp.min(), ramp.max()  # and nothing outside the input's range, edges included
    assert lo - 1e-3 <= out.min() and out.max() <= hi + 1e-3
    # integers: rounded back to int16 (negative values kept), within one unit of the ramp
    out16, _, _, _ = resample_pair(np.rint(ramp).astype(np.int16), labels, affine, spacing, target)
    assert out16.dtype == np.int16 and out16.min() < 0
    assert np.abs(out16[inside].astype(np.float64) - want[inside]).max() <= 1.0 + 1e-6


def test_integer_images_are_clipped_to_their_dtype() -> None:
    image = np.zeros((6, 6, 6), np.uint8)
    image[::2] = 255
    out = resample_array(image, (11, 6, 6), labels=False)
    assert out.dtype == np.uint8 and out.min() >= 0 and out.max() == 255
    assert set(np.unique(out).tolist()) > {0, 255}  # interpolated in between


def test_labels_are_resampled_by_nearest_neighbour() -> None:
    rng = np.random.default_rng(5)
    noise = rng.choice(np.array([0, 3, 7, 200], np.uint8), size=(25, 19, 13))
    for target in ((2.0, 2.0, 2.0), (0.6, 1.7, 3.1), (0.5, 0.5, 0.5)):
        _, out, _, _ = resample_pair(np.zeros(noise.shape, np.float32), noise, np.eye(4), (1.0, 1.0, 1.0), target)
        assert out.dtype == np.uint8 and set(np.unique(out).tolist()) <= {0, 3, 7, 200}
    wide = np.zeros((40, 36, 20), np.uint16)
    wide[5:15, 5:15, 3:9] = 1000
    wide[20:30, 10:20, 10:16] = 7
    wide[30:34, 25:30, 4:8] = 65535
    for target in ((2.0, 2.0, 2.0), (1.3, 0.0, 3.5), (0.7, 0.7, 1.1)):
        _, out, _, _ = resample_pair(np.zeros(wide.shape, np.int16), wide, np.eye(4), SPACING, target)
        assert out.dtype == np.uint16 and set(np.unique(out).tolist()) == {0, 7, 1000, 65535}, target


def test_upsampling_labels_repeats_each_voxel() -> None:
    labels = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _, out, _, _ = resample_pair(np.zeros((2, 3, 4), np.int16), labels, np.eye(4), (2.0, 2.0, 2.0), (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(out, labels.repeat(2, 0).repeat(2, 1).repeat(2, 2))


@pytest.mark.parametrize("spacing,target", [(SPACING, (2.0, 2.0, 2.0)), ((0.8, 0.8, 1.5), (1.7, 2.3, 0.9)),
                                            (SPACING, (0.0, 3.0, 1.0)), ((1.2, 0.9, 2.0), (0.5, 0.5, 4.0))])
def test_blob_centroids_stay_put_in_world_coordinates(spacing, target) -> None:
    shape = (40, 36, 20)
    affine = _affine(spacing, angle=-0.7)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    labels = np.zeros(shape, np.uint8)
    for value, centre, radii in ((1, (12.3, 20.6, 6.2), (5.5, 4.2, 3.1)), (2, (29.1, 9.4, 13.7), (4.1, 6.3, 2.6))):
        labels[(((idx - centre) / radii) ** 2).sum(-1) <= 1] = value
    _, out, out_affine, reached = resample_pair(np.zeros(shape, np.float32), labels, affine, spacing, target)
    step = np.where(np.asarray(target) > 0, target, spacing)
    for value in (1, 2):
        before = _world(affine, np.argwhere(labels == value).mean(0))
        after = _world(out_affine, np.argwhere(out == value).mean(0))
        # compare along the volume's own axes: less than one target voxel on each
        axes = affine[:3, :3] / np.asarray(spacing)
        moved = np.abs(axes.T @ (after - before))
        assert np.all(moved < step), (value, moved, step)
    assert set(np.unique(out).tolist()) == {0, 1, 2}


def test_multichannel_images_resample_channel_by_channel() -> None:
    rng = np.random.default_rng(8)
    image = rng.normal(0, 100, (12, 10, 8, 3)).astype(np.float32)
    labels = _labels((12, 10, 8), rng)
    out, out_labels, _, _ = resample_pair(image, labels, np.eye(4), (1.0, 1.0, 1.0), (1.5, 0.7, 2.0))
    assert out.shape == (8, 14, 4, 3) and out.dtype == np.float32 and out_labels.shape == (8, 14, 4)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], resample_array(image[..., c], (8, 14, 4), labels=False))


def test_identity_returns_the_input_unchanged() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(-1024, 100, SHAPE).astype(np.int16)
    labels = _labels(SHAPE, rng)
    affine = _affine(SPACING)
    for target in (None, SPACING, (0.0, 0.0, 0.0 + 2.5), (1.01, 0.0, 2.49)):  # same grid each time
        out_image, out_labels, out_affine, reached = resample_pair(image, labels, affine, SPACING, target)
        assert out_image is image and out_labels is labels
        np.testing.assert_array_equal(out_affine, affine)
        assert reached == SPACING
    assert resample_array(image, SHAPE, labels=False) is image


# --------------------------------------------------------------------------- #
# option checks
# --------------------------------------------------------------------------- #
def test_check_spacing_accepts_three_non_negative_numbers() -> None:
    assert check_spacing(None) is None
    assert check_spacing((1, 2, 3)) == (1.0, 2.0, 3.0)
    assert check_spacing([0, 0, 2.5]) == (0.0, 0.0, 2.5)
    assert check_spacing(np.array([0.7, 0.7, 1.25])) == pytest.approx((0.7, 0.7, 1.25))
    assert all(isinstance(v, float) for v in check_spacing((1, 2, 3)))


@pytest.mark.parametrize("bad", [(0, 0, 0), (-1, 1, 1), (1, 1, -0.5), (1, 1), (1, 1, 1, 1), (), "1 1 1", "abc",
                                 (float("nan"), 1, 1), (float("inf"), 1, 1), ("a", 1, 1), 3, 2.0, (None, 1, 1)])
def test_check_spacing_rejects_bad_values(bad) -> None:
    with pytest.raises(OptionError, match="spacing must be three") as info:
        check_spacing(bad)
    assert "Received:" in str(info.value)


def test_bad_spacing_is_refused_before_reading(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="spacing"):
        VolumeSliceSource(tmp_path / "nowhere", spacing=(0, 0, 0))  # the option first, not the missing folder
    with pytest.raises(OptionError, match="spacing"):
        convert(tmp_path / "nowhere", tmp_path / "dst", spacing=(1, -1, 1), progress=False)
    assert not (tmp_path / "dst").exists()


# --------------------------------------------------------------------------- #
# convert --spacing, both layouts
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rsrc")
    write_synth_volumes(root, 2, shape=SHAPE, spacing=SPACING, classes=4, orientation="LPS", seed=9)
    return root


def _canonical(path: Path) -> nib.Nifti1Image:
    return nib.as_closest_canonical(nib.load(path))


def _zoom_oracle(image: np.ndarray, labels: np.ndarray, new_shape) -> tuple[np.ndarray, np.ndarray]:
    """scipy.ndimage.zoom in grid mode (linear images rounded to int16, nearest labels)."""
    from scipy import ndimage

    zoom = [m / n for n, m in zip(image.shape, new_shape)]
    lin = ndimage.zoom(image.astype(np.float32), zoom, order=1, mode="nearest", grid_mode=True, prefilter=False)
    near = ndimage.zoom(labels, zoom, order=0, mode="nearest", grid_mode=True, prefilter=False)
    return np.clip(np.rint(lin), -32768, 32767).astype(np.int16), near


def test_convert_slices_with_spacing(src: Path, tmp_path: Path) -> None:
    store = convert(src, tmp_path / "s", spacing=(2, 2, 2), progress=False)
    new = (20, 18, 25)  # round((40, 36, 20) * (1, 1, 2.5) / 2)
    assert len(store) == 2 * new[2] and store.names[:2] == ["case_000:0", "case_000:1"]
    assert store.names[new[2]] == "case_001:0" and store.image_shape == (new[1], new[0], 1)
    records = store.meta["params"]["source"]["cases"]
    assert store.meta["params"]["source"]["spacing"] == [2.0, 2.0, 2.0]
    images, masks = store.read(np.arange(len(store)))
    for k, rec in enumerate(records):
        img = _canonical(src / "imagesTr" / f"case_{k:03d}.nii.gz")
        lab = np.asarray(_canonical(src / "labelsTr" / f"case_{k:03d}.nii.gz").dataobj)
        assert rec["source_shape"] == list(SHAPE) and rec["shape"] == list(new) and rec["slices"] == new[2]
        assert rec["source_spacing"] == pytest.approx([float(z) for z in img.header.get_zooms()[:3]])
        assert rec["spacing"] == pytest.approx([2.0, 2.0, 2.0])
        np.testing.assert_allclose(rec["source_affine"], img.affine, atol=1e-5)
        np.testing.assert_allclose(rec["affine"], resampled_affine(img.affine, SHAPE, new), atol=1e-5)
        want_img, want_lab = _zoom_oracle(np.asarray(img.dataobj), lab, new)
        for z in (0, 7, new[2] - 1):
            np.testing.assert_array_equal(images[k * new[2] + z, ..., 0], np.rot90(want_img[:, :, z]))
            np.testing.assert_array_equal(masks[k * new[2] + z, ..., 0], np.rot90(want_lab[:, :, z]))
        assert rec["labels"] == {str(v): int((want_lab == v).sum()) for v in np.unique(want_lab)}


def test_convert_slices_with_a_kept_axis(src: Path, tmp_path: Path) -> None:
    store = convert(src, tmp_path / "z", spacing=(0, 0, 5), axis="coronal", progress=False)
    rec = store.meta["params"]["source"]["cases"][0]
    assert rec["shape"] == [40, 36, 10] and rec["spacing"] == pytest.approx([1.0, 1.0, 5.0])
    assert len(store) == 2 * 36 and store.image_shape == (10, 40, 1)  # coronal: H = Z, W = X


def test_convert_volumes_with_spacing(src: Path, tmp_path: Path) -> None:
    store = convert(src, tmp_path / "v", layout="volumes", format="memmap", spacing=(1.6, 0, 2.0),
                    chunk_shape=(8, 8, 8), progress=False)
    new = (25, 36, 25)
    for k in range(2):
        img = _canonical(src / "imagesTr" / f"case_{k:03d}.nii.gz")
        lab = np.asarray(_canonical(src / "labelsTr" / f"case_{k:03d}.nii.gz").dataobj)
        assert store.shape(k) == new and store.spacing(k) == pytest.approx((1.6, 1.0, 2.0))
        np.testing.assert_allclose(store.affine(k), resampled_affine(img.affine, SHAPE, new), atol=1e-5)
        assert store.case(k)["source_shape"] == list(SHAPE)
        want_img, want_lab = _zoom_oracle(np.asarray(img.dataobj), lab, new)
        image, labels = store.read_case(k)
        np.testing.assert_array_equal(image[..., 0], want_img)
        np.testing.assert_array_equal(labels, want_lab)
        for value in store.foreground(k):  # samples drawn from the resampled labels
            assert (labels[tuple(store.foreground(k)[value].T)] == value).all()
        for value in (1, 2):  # organs stay where they were in the world
            before = _world(img.affine, np.argwhere(lab == value).mean(0))
            after = _world(store.affine(k), np.argwhere(labels == value).mean(0))
            assert np.all(np.abs(after - before) < (1.6, 1.0, 2.0)), (k, value)


def test_convert_without_resampling_records_no_source_geometry(src: Path, tmp_path: Path) -> None:
    store = convert(src, tmp_path / "same", layout="volumes", format="memmap", spacing=SPACING, progress=False)
    assert store.shape(0) == SHAPE and "source_shape" not in store.case(0)
