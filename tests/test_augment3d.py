"""Tests of the 3D joint augmentation (streamseg.pipeline.augment3d)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from streamseg import Augment
from streamseg.errors import InputError, LabelError, OptionError
from streamseg.pipeline import augment3d as a3
from streamseg.pipeline.augment3d import apply_3d, augment_patch, check_3d, sample_3d
from streamseg.pipeline.batches import sample_rng


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def patch(shape=(12, 12, 10), c=2, labels=4, seed=0, mask_dtype=np.uint8):
    g = rng(seed)
    image = g.standard_normal((*shape, c), dtype=np.float32)
    mask = g.integers(0, labels, size=shape).astype(mask_dtype)
    return image, mask


def smooth(shape, c=2) -> np.ndarray:
    """A smooth float32 (X, Y, Z, C) patch: gradients below ~0.5 per voxel (interpolation weights
    of older OpenCV builds are quantised to 1/32 voxel)."""
    x, y, z = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    chans = [np.sin(x / 3.0) + np.cos(y / 4.0) * z / 8.0, 2.0 + np.sin((x + y) / 5.0) * np.cos(z / 3.0)]
    return np.stack(chans[:c], -1).astype(np.float32)


def blobs(n=40) -> np.ndarray:
    """Two balls (labels 1 and 2) and a box (label 1) in an n^3 volume."""
    x, y, z = np.ogrid[:n, :n, :n]
    mask = np.zeros((n, n, n), np.uint8)
    mask[(x - 13) ** 2 + (y - 14) ** 2 + (z - 15) ** 2 <= 8 ** 2] = 1
    mask[(x - 27) ** 2 + (y - 25) ** 2 + (z - 24) ** 2 <= 7 ** 2] = 2
    mask[6:14, 26:36, 8:30] = 1
    return mask


def oracle_exact(arr: np.ndarray, p: dict) -> np.ndarray:
    for axis, flip in enumerate(p["flip"]):
        if flip:
            arr = np.flip(arr, axis)
    if p["rot90"]:
        arr = np.rot90(arr, p["rot90"], axes={"xy": (0, 1), "xz": (0, 2), "yz": (1, 2)}[p["plane"]])
    return arr


def source_coords(matrix: np.ndarray, shape) -> list[np.ndarray]:
    """Input voxel coordinates of every output voxel, float64, from the forward matrix."""
    inv = np.linalg.inv(matrix[:, :3])
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
    src = (grid - matrix[:, 3]) @ inv.T
    return [src[..., i] for i in range(3)]


def oracle_trilinear(vol: np.ndarray, coords, fill: float) -> np.ndarray:
    """Trilinear sampling with a constant ``fill`` beyond the edges (blended within one voxel)."""
    pad = np.pad(vol.astype(np.float64), 2, constant_values=fill)
    out = np.zeros(coords[0].shape)
    idx, frac = [], []
    for c, n in zip(coords, vol.shape):
        c = np.clip(c, -1.5, n + 0.5) + 2
        i = np.floor(c).astype(int)
        idx.append(i)
        frac.append(c - i)
    for d in itertools.product((0, 1), repeat=3):
        w = np.prod([f if b else 1 - f for f, b in zip(frac, d)], axis=0)
        out += w * pad[idx[0] + d[0], idx[1] + d[1], idx[2] + d[2]]
    return out


def oracle_nearest(mask: np.ndarray, coords, fill: int) -> np.ndarray:
    idx = [np.floor(c + 0.5).astype(int) for c in coords]
    inside = np.all([(i >= 0) & (i < n) for i, n in zip(idx, mask.shape)], axis=0)
    out = np.full(mask.shape, fill, mask.dtype)
    out[inside] = mask[tuple(i[inside] for i in idx)]
    return out


GEOMETRIC = Augment(rotate=20.0, scale=(0.85, 1.15), translate=0.1, elastic=1.0,
                    elastic_alpha=400.0, elastic_sigma=6.0)
FULL = Augment(hflip=0.5, vflip=0.5, dflip=0.5, rot90=0.5, rot90_plane="any", rotate=15.0,
               scale=(0.9, 1.1), translate=0.05, elastic=0.5, elastic_alpha=300.0, brightness=0.1,
               contrast=0.2, gamma=(0.7, 1.5), noise=0.05, blur=1.0, p_photometric=0.8)


# ------------------------------------------------------------------ options
def test_new_options_validate_and_round_trip():
    aug = Augment(dflip=0.25, rot90_plane="yz")
    assert (aug.dflip, aug.rot90_plane) == (0.25, "yz")
    assert Augment(**aug.get_config()) == aug and eval(repr(aug), {"Augment": Augment}) == aug
    assert Augment().dflip == 0.0 and Augment().rot90_plane == "xy"
    assert not Augment(dflip=0.5).is_identity
    for bad in (1.5, -0.1, "0.5", True, float("nan")):
        with pytest.raises(OptionError, match="dflip"):
            Augment(dflip=bad)
    for bad in ("zz", "XY", 1, None, ("x", "y")):
        with pytest.raises(OptionError, match="rot90_plane"):
            Augment(rot90_plane=bad)


def test_check_2d_refuses_3d_only_options():
    Augment.preset("heavy").check_2d()
    Augment(rot90=0.5, rot90_plane="xy").check_2d()
    with pytest.raises(OptionError, match=r"dflip.*3D patches.*Received: dflip=0\.5"):
        Augment(dflip=0.5).check_2d()
    with pytest.raises(OptionError, match=r"rot90_plane.*Received: rot90_plane='any'"):
        Augment(rot90_plane="any").check_2d()


def test_check_3d_refuses_2d_only_options():
    check_3d(FULL)
    check_3d(Augment(crop=(1.0, 1.0)))
    for aug, name in ((Augment(shear=5.0), "shear"), (Augment(crop=(0.5, 1.0)), "crop")):
        with pytest.raises(OptionError, match=name):
            sample_3d(aug, rng(0), (8, 8, 8))
    with pytest.raises(OptionError):
        check_3d({"hflip": 0.5})


def test_sample_validates_and_identity_draws_nothing():
    with pytest.raises(OptionError):
        sample_3d(FULL, 0, (8, 8, 8))
    for shape in ((8, 8), (8, 0, 8), (8, 8, 8.0), "888"):
        with pytest.raises(OptionError):
            sample_3d(FULL, rng(0), shape)
    g = rng(3)
    p = sample_3d(Augment(), g, (4, 5, 6))
    assert p["matrix"] is None and p["elastic"] is None and p["rot90"] == 0 and p["shape"] == (4, 5, 6)
    assert g.random() == rng(3).random()  # no draw taken


def test_draws_are_stable_when_an_option_changes():
    a = sample_3d(Augment(hflip=0.5, rotate=10.0), rng(7), (16, 16, 16))
    b = sample_3d(Augment(hflip=0.5, rotate=10.0, gamma=(0.8, 1.2), elastic=0.3), rng(7), (16, 16, 16))
    assert a["flip"] == b["flip"] and a["angles"] == b["angles"]


# ------------------------------------------------------------------ geometry
def test_flips_and_rot90_equal_numpy():
    image, mask = patch((8, 8, 6), c=3)
    seen = set()
    for plane in ("xy", "xz", "yz", "any"):
        aug = Augment(hflip=0.5, vflip=0.5, dflip=0.5, rot90=0.75, rot90_plane=plane)
        for seed in range(40):
            p = sample_3d(aug, rng(seed), mask.shape)
            assert p["matrix"] is None and p["elastic"] is None
            out, m = apply_3d(aug, image, mask, p)
            assert out.dtype == np.float32 and out.flags.c_contiguous and m.dtype == mask.dtype
            assert np.array_equal(out, oracle_exact(image, p)) and np.array_equal(m, oracle_exact(mask, p))
            seen.add((p["flip"], p["plane"], p["rot90"]))
            if p["plane"] in ("xz", "yz"):  # 8 x 6: not square, only half turns
                assert p["rot90"] == 2
    assert {k for _, _, k in seen} == {0, 1, 2, 3}
    assert {pl for _, pl, _ in seen} == {None, "xy", "xz", "yz"}
    assert {f for f, _, _ in seen} == set(itertools.product((False, True), repeat=3))


def test_affine_warp_matches_trilinear_and_nearest_oracles():
    image, mask = smooth((14, 12, 10)), patch((14, 12, 10), labels=5)[1]
    aug = Augment(rotate=25.0, scale=(0.8, 1.2), translate=0.15, fill_value=-2.0, fill_label=7)
    for seed in range(3):
        p = sample_3d(aug, rng(seed), mask.shape)
        out, m = apply_3d(aug, image, mask, p)
        coords = source_coords(p["matrix"], mask.shape)
        for c in range(2):
            ref = oracle_trilinear(image[..., c], coords, aug.fill_value)
            np.testing.assert_allclose(out[..., c], ref, atol=0.01)  # ~1e-5 with OpenCV 5
        assert (m == oracle_nearest(mask, coords, aug.fill_label)).mean() > 0.999  # ties may differ
        assert 7 in m  # some voxels map outside


def test_pure_translation_by_whole_voxels_is_a_shift():
    image, mask = patch((10, 9, 8), c=1)
    aug = Augment(translate=0.2)
    p = sample_3d(aug, rng(0), mask.shape)
    shift = (2, -1, 1)
    p["translate"], p["matrix"] = shift, np.hstack([np.eye(3), np.array(shift, float)[:, None]])
    out, m = apply_3d(aug, image, mask, p)
    assert np.allclose(out[2:, :-1, 1:, 0], image[:-2, 1:, :-1, 0], atol=1e-6)
    assert np.array_equal(m[2:, :-1, 1:], mask[:-2, 1:, :-1])
    assert (m[:2] == 0).all() and (out[:2] == 0).all()


def test_tiled_layout_and_channels_agree(monkeypatch):
    mask = patch((20, 18, 16))[1]
    image = np.concatenate([smooth(mask.shape), smooth(mask.shape)[..., :1] * 2], -1)
    p = sample_3d(GEOMETRIC, rng(5), mask.shape)
    out, m = apply_3d(GEOMETRIC, image, mask, p)
    for c in range(3):  # each channel warps exactly as it would alone
        single, m1 = apply_3d(GEOMETRIC, image[..., c:c + 1], mask, p)
        assert np.array_equal(single[..., 0], out[..., c]) and np.array_equal(m1, m)
    monkeypatch.setattr(a3, "_CV_MAX", 150)  # several rows of tiles, several remap calls per block
    monkeypatch.setattr(a3, "_BLOCK", 3000)  # two blocks of 180 map rows each
    assert a3._tiles(mask.shape)[0] > 1
    out2, m2 = apply_3d(GEOMETRIC, image, mask, p)
    np.testing.assert_allclose(out2, out, atol=0.01)
    assert (m2 == m).mean() > 0.999


def test_flips_and_turns_fold_into_the_warp():
    mask = patch((12, 12, 9), labels=5)[1]
    image = smooth(mask.shape)
    aug = Augment(hflip=0.5, vflip=0.5, dflip=0.5, rot90=1.0, rot90_plane="any", rotate=20.0,
                  scale=(0.9, 1.1), translate=0.1, elastic=1.0, elastic_alpha=300.0)
    planes = set()
    for seed in range(12):
        p = sample_3d(aug, rng(seed), mask.shape)
        planes.add(p["plane"])
        out, m = apply_3d(aug, image, mask, p)
        plain = {**p, "flip": (False, False, False), "rot90": 0, "plane": None}
        ref, ref_m = apply_3d(aug, np.ascontiguousarray(oracle_exact(image, p)),
                              np.ascontiguousarray(oracle_exact(mask, p)), plain)
        np.testing.assert_allclose(out, ref, atol=1e-4)
        assert (m == ref_m).mean() > 0.999
    assert planes == {"xy", "xz", "yz"}


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.uint16, np.bool_])
def test_labels_never_change_value(dtype):
    g = rng(1)
    labels = np.array([0, 1] if dtype == np.bool_ else [0, 3, 200 if dtype != np.int32 else 70000])
    mask = labels[g.integers(0, len(labels), size=(16, 14, 12))].astype(dtype)
    image = g.random((16, 14, 12, 1), dtype=np.float32)
    fill = 1 if dtype == np.bool_ else 9
    aug = Augment(**{**GEOMETRIC.get_config(), "fill_label": fill})
    for seed in range(4):
        out, m = augment_patch(aug, image, mask, rng(seed))
        assert m.dtype == mask.dtype and m.shape == mask.shape
        assert set(np.unique(m).tolist()) <= set(labels.astype(dtype).tolist()) | {fill}


def test_warped_image_stays_aligned_with_its_mask():
    mask = blobs(40)
    image = mask.astype(np.float32)[..., None]
    aug = Augment(rotate=30.0, scale=(0.8, 1.2), translate=0.05, elastic=1.0,
                  elastic_alpha=1500.0, elastic_sigma=8.0)
    moved = 0.0
    for seed in range(3):
        p = sample_3d(aug, rng(seed), mask.shape)
        assert p["elastic"] is not None and p["matrix"] is not None
        out, m = apply_3d(aug, image, mask, p)
        rounded = np.rint(out[..., 0]).astype(np.uint8)
        assert (rounded == m).mean() >= 0.97
        fg = (m > 0) | (rounded > 0)  # background dominates the 97%: also check the foreground
        assert (rounded[fg] == m[fg]).mean() >= 0.85  # ~0.9-0.95 aligned, < 0.76 one voxel off
        moved = max(moved, (m != mask).mean())
    assert moved > 0.05  # the transform did move things


def test_elastic_field_amplitude_matches_full_resolution():
    shape, sigma, alpha = (48, 48, 48), 8.0, 1000.0
    coarse = np.stack(a3._elastic_field(shape, 3, alpha, sigma))  # (3, X, Y, z coarse)
    noise = rng(4).random(shape, dtype=np.float32) * 2 - 1
    full = a3._blur(noise, sigma) * alpha  # the Simard field at full resolution
    ratio = coarse.std() / full.std()
    assert 0.75 < ratio < 1.33


# ------------------------------------------------------------------ determinism, photometric
def test_same_generator_state_gives_identical_output():
    image, mask = patch((16, 16, 16), c=2, labels=3)
    a = augment_patch(FULL, image, mask, sample_rng(1, 2, 3))
    b = augment_patch(FULL, image, mask, sample_rng(1, 2, 3))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    differ = 0
    for index in range(4, 8):
        c = augment_patch(FULL, image, mask, sample_rng(1, 2, index))
        differ += not np.array_equal(a[0], c[0])
    assert differ == 4


def test_inputs_are_not_modified():
    image, mask = patch((10, 10, 10), c=1)
    keep_i, keep_m = image.copy(), mask.copy()
    for seed in range(6):
        out, m = augment_patch(FULL, image, mask, rng(seed))
        assert not np.shares_memory(out, image) and not np.shares_memory(m, mask)
    assert np.array_equal(image, keep_i) and np.array_equal(mask, keep_m)
    out, m = augment_patch(Augment(), image, mask, rng(0))
    assert np.array_equal(out, image) and np.array_equal(m, mask) and not np.shares_memory(m, mask)


def test_photometric_ops_change_the_image_only():
    image, mask = patch((12, 10, 8), c=2)
    image[..., 1] = image[..., 1] * 3 + 5
    geo = Augment(rotate=10.0)
    both = Augment(rotate=10.0, brightness=0.2, contrast=0.3, gamma=(0.5, 2.0), noise=0.1, blur=1.5)
    for seed in range(5):
        p = sample_3d(both, rng(seed), mask.shape)
        assert all(p[k] is not None for k in ("brightness", "contrast", "gamma", "noise", "blur"))
        _, m_geo = apply_3d(geo, image, mask, p | dict.fromkeys(a3._PHOTO))
        out, m = apply_3d(both, image, mask, p)
        assert np.array_equal(m, m_geo)
        photo_only = {**p, "matrix": None, "angles": (0.0, 0.0, 0.0)}
        assert np.array_equal(apply_3d(both, image, mask, photo_only)[1], mask)
        assert np.isfinite(out).all()


def test_photometric_values():
    image, mask = patch((12, 10, 8), c=2)
    image[..., 1] = image[..., 1] * 3 + 5
    aug = Augment(brightness=0.5, contrast=0.5, gamma=(0.5, 2.0), noise=0.5, blur=2.0)
    p = sample_3d(aug, rng(0), mask.shape)
    none = dict.fromkeys(a3._PHOTO)
    out = apply_3d(aug, image, mask, {**p, **none, "brightness": 0.25}, value_range=2.0)[0]
    np.testing.assert_allclose(out, image + 0.5, atol=1e-5)
    out = apply_3d(aug, image, mask, {**p, **none, "contrast": 1.4})[0]
    mean = image.mean(axis=(0, 1, 2))
    np.testing.assert_allclose(out, (image - mean) * 1.4 + mean, atol=2e-5)
    np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), mean, atol=1e-4)  # per channel
    out = apply_3d(aug, image, mask, {**p, **none, "gamma": 1.7})[0]
    lo, hi = image.min(axis=(0, 1, 2)), image.max(axis=(0, 1, 2))
    np.testing.assert_allclose(out, ((image - lo) / (hi - lo)) ** 1.7 * (hi - lo) + lo, atol=2e-4)
    out = apply_3d(aug, image, mask, {**p, **none, "noise": (11, 0.5)}, value_range=2.0)[0]
    assert abs((out - image).std() - 1.0) < 0.05 and abs((out - image).mean()) < 0.05
    flat = np.full((8, 8, 8, 1), 3.0, np.float32)
    out = apply_3d(aug, flat, mask[:8, :8], {**p, **none, "shape": (8, 8, 8), "blur": 1.5, "gamma": 0.5})[0]
    np.testing.assert_allclose(out, 3.0, atol=1e-5)  # a flat patch stays flat
    u8 = np.full((6, 6, 6, 1), 250, np.uint8)
    out = apply_3d(aug, u8, mask[:6, :6, :6], {**p, **none, "shape": (6, 6, 6), "brightness": 0.1})[0]
    assert out.dtype == np.float32 and out.max() == 255.0  # unsigned images are clipped to value_range


@pytest.mark.parametrize("c", [1, 2])
def test_blur_is_a_separable_gaussian(c):
    from cv2 import getGaussianKernel
    n, sigma = 15, 1.5
    image = np.zeros((n, n, n, c), np.float32)
    image[7, 7, 7] = np.arange(1, c + 1)
    mask = np.zeros((n, n, n), np.uint8)
    p = {**sample_3d(Augment(blur=2.0), rng(0), mask.shape), "blur": sigma}
    out = apply_3d(Augment(blur=2.0), image, mask, p)[0]
    g = getGaussianKernel(2 * int(np.ceil(3 * sigma)) + 1, sigma).ravel()
    g = np.pad(g, (7 - len(g) // 2,) * 2)
    ref = np.einsum("i,j,k->ijk", g, g, g)
    for ch in range(c):
        np.testing.assert_allclose(out[..., ch], ref * (ch + 1), atol=1e-6)


# ------------------------------------------------------------------ errors
def test_input_errors():
    image, mask = patch((8, 8, 8), c=1)
    p = sample_3d(GEOMETRIC, rng(0), (8, 8, 8))
    with pytest.raises(InputError, match="X, Y, Z, C"):
        apply_3d(GEOMETRIC, image[..., 0], mask, p)
    with pytest.raises(InputError, match="sizes differ"):
        apply_3d(GEOMETRIC, image, mask[:7], p)
    with pytest.raises(InputError, match="sampled for shape"):
        apply_3d(GEOMETRIC, image[:7], mask[:7], p)
    with pytest.raises(LabelError):
        apply_3d(GEOMETRIC, image, mask.astype(np.float32), p)
    with pytest.raises(InputError, match="fill_label"):
        apply_3d(Augment(rotate=10.0, fill_label=200), image, mask.astype(np.int8),
                 sample_3d(Augment(rotate=10.0), rng(0), (8, 8, 8)))
    with pytest.raises(OptionError, match="value_range"):
        apply_3d(GEOMETRIC, image, mask, p, value_range=0)
