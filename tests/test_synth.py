"""Tests of streamseg.io.synth: the synthetic medical-looking dataset generator."""

from __future__ import annotations

import types
from pathlib import Path

import cv2
import numcodecs
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamseg.errors import OptionError
from streamseg.io.synth import IMAGE_EXTENSIONS, synth_pairs, synth_sample, write_synth_folder


# --------------------------------------------------------------------------- #
# synth_sample
# --------------------------------------------------------------------------- #
def test_deterministic_for_same_arguments() -> None:
    a_img, a_mask = synth_sample(7, seed=3)
    b_img, b_mask = synth_sample(7, seed=3)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)


def test_different_index_or_seed_gives_different_sample() -> None:
    img0, _ = synth_sample(0)
    img1, _ = synth_sample(1)
    img0_s1, _ = synth_sample(0, seed=1)
    assert not np.array_equal(img0, img1)
    assert not np.array_equal(img0, img0_s1)


def test_does_not_touch_global_numpy_random_state() -> None:
    np.random.seed(1234)
    state = np.random.get_state()
    synth_sample(5)
    after = np.random.get_state()
    assert state[0] == after[0]
    np.testing.assert_array_equal(state[1], after[1])
    assert state[2:] == after[2:]
    # ... and does not depend on it either
    np.random.seed(99)
    img_a, _ = synth_sample(5)
    np.random.seed(100)
    img_b, _ = synth_sample(5)
    np.testing.assert_array_equal(img_a, img_b)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", np.uint8, np.dtype("uint16")])
def test_shapes_and_dtypes(channels: int, dtype: object) -> None:
    image, mask = synth_sample(2, size=(48, 80), channels=channels, dtype=dtype)
    assert image.shape == (48, 80, channels)
    assert image.dtype == np.dtype(dtype)
    assert mask.shape == (48, 80)
    assert mask.dtype == np.uint8
    assert image.flags.c_contiguous and mask.flags.c_contiguous


def test_uint16_uses_full_range_and_matches_uint8() -> None:
    img16, mask16 = synth_sample(4, dtype="uint16")
    img8, mask8 = synth_sample(4, dtype="uint8")
    np.testing.assert_array_equal(mask16, mask8)
    assert img16.max() > 255 * 100  # not just uint8 values in a uint16 array
    assert np.unique(img16 & 0xFF).size > 200  # low byte is used too
    # same picture, up to noise and quantisation
    diff = np.abs(img16.astype(np.float64) / 257.0 - img8.astype(np.float64))
    assert diff.mean() < 2.0


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("classes", [2, 3, 5])
def test_labels_in_range_and_all_appear(classes: int, channels: int) -> None:
    seen: set[int] = set()
    with_lesion = 0
    for index in range(20):
        _, mask = synth_sample(index, size=(96, 96), classes=classes, channels=channels)
        labels = np.unique(mask)
        assert labels.min() >= 0 and labels.max() < classes
        seen.update(labels.tolist())
        with_lesion += bool(labels.max() > 0)
    assert seen == set(range(classes))
    assert with_lesion >= 14  # most samples contain at least one lesion


def test_many_classes_stay_in_range() -> None:
    for index in range(10):
        _, mask = synth_sample(index, size=(32, 32), classes=256)
        assert mask.dtype == np.uint8  # 255 is the largest label
    labels = set()
    for index in range(10):
        labels.update(np.unique(synth_sample(index, size=(32, 32), classes=7)[1]).tolist())
    assert labels <= set(range(7))


@pytest.mark.parametrize("channels", [1, 3])
def test_lesion_intensity_differs_from_surroundings(channels: int) -> None:
    """Each class has its own local contrast, so a model can learn the masks."""
    classes = 4
    diffs: dict[int, list[float]] = {k: [] for k in range(1, classes)}
    for index in range(20):
        image, mask = synth_sample(index, size=(128, 128), classes=classes, channels=channels)
        gray = image.astype(np.float64).mean(axis=-1)
        for k in range(1, classes):
            inside = mask == k
            if not inside.any():
                continue
            grown = cv2.dilate(inside.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
            ring = grown & (mask == 0)
            if not ring.any():
                continue
            diffs[k].append(gray[inside].mean() - gray[ring].mean())
    means = {k: float(np.mean(v)) for k, v in diffs.items()}
    assert all(len(v) >= 3 for v in diffs.values()), diffs
    for k, d in means.items():
        assert abs(d) > 15.0, (k, d)
    # bright and dark lesion classes both exist
    assert min(means.values()) < -15.0 < 15.0 < max(means.values())


def test_background_outside_body_is_dark_and_inside_bright() -> None:
    image, _ = synth_sample(0, size=(128, 128))
    assert image[0, 0].max() == 0 and image[-1, -1].max() == 0  # corners
    assert image[64, 64].mean() > 60  # centre of the disc


def test_compressible_like_real_scans() -> None:
    codec = numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.SHUFFLE)
    for index in range(5):
        image, _ = synth_sample(index, size=(256, 256), channels=3, dtype="uint8")
        ratio = image.nbytes / len(codec.encode(np.ascontiguousarray(image)))
        assert ratio >= 1.5, (index, ratio)
    # and not trivially compressible either (it has noise and texture)
    assert ratio < 20


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(1, 70),
    w=st.integers(1, 70),
    index=st.integers(0, 2**40),
    seed=st.integers(0, 2**32),
    classes=st.integers(2, 256),
    channels=st.sampled_from([1, 3]),
    dtype=st.sampled_from(["uint8", "uint16"]),
)
def test_any_valid_arguments(h: int, w: int, index: int, seed: int, classes: int,
                             channels: int, dtype: str) -> None:
    image, mask = synth_sample(index, size=(h, w), classes=classes, channels=channels,
                               seed=seed, dtype=dtype)
    assert image.shape == (h, w, channels) and image.dtype == np.dtype(dtype)
    assert mask.shape == (h, w) and mask.dtype == np.uint8
    assert int(mask.max()) < classes


# --------------------------------------------------------------------------- #
# synth_pairs
# --------------------------------------------------------------------------- #
def test_synth_pairs_names_and_content() -> None:
    pairs = list(synth_pairs(3, size=(32, 40), classes=4, channels=1, seed=2, start=41))
    assert [name for name, _, _ in pairs] == ["case_000041", "case_000042", "case_000043"]
    for (name, image, mask), index in zip(pairs, range(41, 44)):
        ref_image, ref_mask = synth_sample(index, size=(32, 40), classes=4, channels=1, seed=2)
        np.testing.assert_array_equal(image, ref_image)
        np.testing.assert_array_equal(mask, ref_mask)


def test_synth_pairs_is_lazy_and_pads_large_indices() -> None:
    gen = synth_pairs(10**12, size=(8, 8), start=999_999)
    assert isinstance(gen, types.GeneratorType)
    assert next(gen)[0] == "case_999999"
    assert next(gen)[0] == "case_1000000"
    assert list(synth_pairs(0)) == []


def test_synth_pairs_validates_eagerly() -> None:
    with pytest.raises(OptionError, match="Received:"):
        synth_pairs(-1)
    with pytest.raises(OptionError, match="Received:"):
        synth_pairs(3, start=-2)
    with pytest.raises(OptionError, match="Received:"):
        synth_pairs(3, classes=1)


# --------------------------------------------------------------------------- #
# write_synth_folder
# --------------------------------------------------------------------------- #
def _read_rgb(path: Path) -> np.ndarray:
    data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert data is not None, path
    if data.ndim == 3:
        return cv2.cvtColor(data, cv2.COLOR_BGR2RGB)
    return data[:, :, None]


@pytest.mark.parametrize(
    ("channels", "dtype", "ext"),
    [(3, "uint8", ".png"), (1, "uint8", ".png"), (3, "uint16", ".png"), (1, "uint16", ".tif"),
     (3, "uint8", ".tiff"), (3, "uint8", ".bmp")],
)
def test_write_folder_round_trip(tmp_path: Path, channels: int, dtype: str, ext: str) -> None:
    out = write_synth_folder(tmp_path / "ds", 3, size=(40, 56), classes=3, channels=channels,
                             seed=5, dtype=dtype, ext=ext, progress=False)
    assert out == tmp_path / "ds" and isinstance(out, Path)
    images = sorted(p.name for p in (out / "images").iterdir())
    masks = sorted(p.name for p in (out / "masks").iterdir())
    assert images == [f"case_00000{i}{ext}" for i in range(3)]
    assert masks == [f"case_00000{i}.png" for i in range(3)]
    for index in range(3):
        ref_image, ref_mask = synth_sample(index, size=(40, 56), classes=3, channels=channels,
                                           seed=5, dtype=dtype)
        image = _read_rgb(out / "images" / f"case_00000{index}{ext}")
        assert image.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(image, ref_image)
        mask = cv2.imread(str(out / "masks" / f"case_00000{index}.png"), cv2.IMREAD_UNCHANGED)
        assert mask.dtype == np.uint8 and mask.ndim == 2
        np.testing.assert_array_equal(mask, ref_mask)


def test_write_folder_jpeg_is_close(tmp_path: Path) -> None:
    out = write_synth_folder(tmp_path, 2, size=(64, 64), ext=".jpg", progress=False)
    ref, _ = synth_sample(1, size=(64, 64))
    image = _read_rgb(out / "images" / "case_000001.jpg")
    assert image.shape == ref.shape
    assert np.abs(image.astype(np.int32) - ref).mean() < 6  # lossy, but RGB order right


def test_write_folder_mask_suffix(tmp_path: Path) -> None:
    out = write_synth_folder(tmp_path / "a" / "b", 2, size=(16, 16), mask_suffix="_mask",
                             progress=False)
    assert sorted(p.name for p in (out / "masks").iterdir()) == [
        "case_000000_mask.png", "case_000001_mask.png"]
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        "case_000000.png", "case_000001.png"]


def test_write_folder_zero_count_creates_folders(tmp_path: Path) -> None:
    out = write_synth_folder(str(tmp_path / "empty"), 0, progress=False)
    assert (out / "images").is_dir() and (out / "masks").is_dir()
    assert not any((out / "images").iterdir())


def test_write_folder_progress_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_synth_folder(tmp_path / "quiet", 2, size=(8, 8), progress=False)
    assert capsys.readouterr().err == ""
    write_synth_folder(tmp_path / "loud", 2, size=(8, 8), progress=True)
    assert "2/2" in capsys.readouterr().err


# --------------------------------------------------------------------------- #
# option validation
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "kwargs",
    [
        {"index": -1},
        {"index": 1.5},
        {"index": True},
        {"seed": -1},
        {"size": (0, 8)},
        {"size": (8,)},
        {"size": (8, 8, 3)},
        {"size": "ab"},
        {"size": 64},
        {"size": (8.0, 8)},
        {"classes": 1},
        {"classes": 257},
        {"classes": 2.5},
        {"channels": 2},
        {"channels": 4},
        {"dtype": "float32"},
        {"dtype": "int16"},
        {"dtype": "not-a-dtype"},
    ],
)
def test_synth_sample_bad_options(kwargs: dict) -> None:
    args = {"index": 0, **kwargs}
    index = args.pop("index")
    with pytest.raises(OptionError, match="Received:") as info:
        synth_sample(index, **args)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"count": -1}, "count"),
        ({"ext": ".gif"}, ".png"),
        ({"ext": "png"}, ".jpeg"),
        ({"ext": 3}, ".tif"),
        ({"ext": ".jpg", "dtype": "uint16"}, "uint16"),
        ({"ext": ".bmp", "dtype": "uint16"}, "uint16"),
        ({"mask_suffix": "a/b"}, "mask_suffix"),
        ({"channels": 2}, "channels"),
        ({"size": (4, -4)}, "size"),
    ],
)
def test_write_folder_bad_options(tmp_path: Path, kwargs: dict, needle: str) -> None:
    args = {"count": 1, **kwargs}
    count = args.pop("count")
    with pytest.raises(OptionError, match="Received:") as info:
        write_synth_folder(tmp_path / "x", count, **args)
    message = str(info.value)
    assert needle in message
    assert message.rstrip().rsplit("Received:", 1)[1].strip()  # something after it
    assert not (tmp_path / "x").exists()  # nothing written before validation


def test_bad_ext_message_lists_valid_extensions(tmp_path: Path) -> None:
    with pytest.raises(OptionError) as info:
        write_synth_folder(tmp_path, 1, ext=".gif")
    message = str(info.value)
    for ext in IMAGE_EXTENSIONS:
        assert ext in message
    assert message.endswith("Received: '.gif'")
