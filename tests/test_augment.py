"""Tests of streamseg.pipeline.augment.Augment (joint image + mask augmentation)."""

from __future__ import annotations

import json
import pickle
import random

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamseg.pipeline.augment import PRESETS, Augment
from streamseg.errors import InputError, LabelError, OptionError

PHOTOMETRIC = ("brightness", "contrast", "gamma", "noise", "blur")


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def pair(h=32, w=32, c: int | None = 3, dtype=np.uint8, labels=4, seed=0):
    g = rng(seed)
    shape = (h, w) if c is None else (h, w, c)
    if np.dtype(dtype).kind == "f":
        image = g.random(shape, dtype=np.float32).astype(dtype)
    else:
        image = g.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True, dtype=dtype)
    mask = g.integers(0, labels, size=(h, w), dtype=np.uint8)
    return image, mask


def geometric_heavy(**over) -> Augment:
    cfg = Augment.preset("heavy").get_config()
    cfg.update(brightness=0.0, contrast=0.0, gamma=(1.0, 1.0), noise=0.0, blur=0.0)
    cfg.update(over)
    return Augment(**cfg)


def find_params(aug: Augment, shape, **want):
    """Params from the first seed whose draws match ``want`` (e.g. rot90=3)."""
    for seed in range(500):
        p = aug.sample(rng(seed), shape)
        if all(p[k] == v for k, v in want.items()):
            return p
    raise AssertionError(f"no seed draws {want}")


def shapes_mask(h=112, w=144, seed=0) -> np.ndarray:
    """Mask with a few labelled rectangles and ellipses (labels 1..3 on 0)."""
    g = rng(seed)
    mask = np.zeros((h, w), np.uint8)
    for i in range(6):
        label = 1 + i % 3
        x, y = int(g.integers(0, w - 30)), int(g.integers(0, h - 30))
        a, b = int(g.integers(15, 45)), int(g.integers(15, 45))
        if i % 2:
            cv2.rectangle(mask, (x, y), (x + a, y + b), label, thickness=-1)
        else:
            cv2.ellipse(mask, (x + 10, y + 10), (a // 2 + 4, b // 2 + 4), 30.0 * i, 0, 360, label, -1)
    return mask


def label_image(mask: np.ndarray, seed=0) -> np.ndarray:
    noise = rng(seed + 1000).integers(-5, 6, size=mask.shape + (3,))
    return np.clip(mask[..., None].astype(int) * 60 + noise, 0, 255).astype(np.uint8)


def agreement(image: np.ndarray, mask: np.ndarray) -> float:
    return float(np.mean(np.round(image[..., 0] / 60.0) == mask))


# ---------------------------------------------------------------- determinism
@pytest.mark.parametrize("name", ["light", "standard", "heavy"])
def test_same_seed_bit_identical_and_seeds_differ(name):
    aug = Augment.preset(name)
    image, mask = pair(48, 40, 3)
    a = aug(image, mask, rng(7))
    b = aug(image, mask, rng(7))
    assert a[0].tobytes() == b[0].tobytes() and np.array_equal(a[1], b[1])
    outs = {aug(image, mask, rng(s))[0].tobytes() for s in range(8)}
    assert len(outs) >= 3


def test_no_global_random_state_used():
    np.random.seed(123)
    random.seed(123)
    np_state, py_state = np.random.get_state()[1].copy(), random.getstate()
    image, mask = pair(32, 32, 3)
    for s in range(5):
        Augment.preset("heavy").__call__(image, mask, rng(s))
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert random.getstate() == py_state


def test_inputs_not_modified():
    image, mask = pair(32, 32, 3)
    i0, m0 = image.copy(), mask.copy()
    Augment.preset("heavy")(image, mask, rng(1))
    assert np.array_equal(image, i0) and np.array_equal(mask, m0)


# ------------------------------------------------------------------ identity
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_identity_preset_returns_input_as_float32(dtype):
    image, mask = pair(20, 30, 3, dtype)
    aug = Augment.preset("none")
    assert aug.is_identity
    out, omask = aug(image, mask, rng(0))
    assert out.dtype == np.float32 and np.array_equal(out, image.astype(np.float32))
    assert omask.dtype == mask.dtype and np.array_equal(omask, mask)
    assert omask is not mask


def test_is_identity():
    assert Augment().is_identity
    assert Augment(p_photometric=0.0, brightness=0.5, fill_value=3.0).is_identity
    assert Augment(crop=(1.0, 1.0)).is_identity
    assert not Augment(rotate=1.0).is_identity
    assert not Augment(brightness=0.1).is_identity


# ------------------------------------------------------------------ exactness
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("mask_shape", ["2d", "3d"])
def test_flips_and_rot90_are_exact(dtype, mask_shape):
    image, mask = pair(17, 17, 3, dtype, labels=200)
    if mask_shape == "3d":
        mask = mask[..., None]
    for aug, want, np_fn in [
        (Augment(hflip=1.0), {}, lambda a: np.flip(a, 1)),
        (Augment(vflip=1.0), {}, lambda a: np.flip(a, 0)),
        (Augment(hflip=1.0, vflip=1.0), {}, lambda a: np.flip(a, (0, 1))),
        (Augment(rot90=1.0), {"rot90": 1}, lambda a: np.rot90(a, 1)),
        (Augment(rot90=1.0), {"rot90": 2}, lambda a: np.rot90(a, 2)),
        (Augment(rot90=1.0), {"rot90": 3}, lambda a: np.rot90(a, 3)),
        (Augment(rot90=1.0, hflip=1.0), {"rot90": 1}, lambda a: np.rot90(np.flip(a, 1), 1)),
    ]:
        out, omask = aug.apply(image, mask, find_params(aug, image.shape[:2], **want))
        assert np.array_equal(out, np_fn(image).astype(np.float32))
        assert np.array_equal(omask, np_fn(mask)) and omask.dtype == mask.dtype


def test_rot90_non_square_uses_half_turns_only():
    image, mask = pair(12, 20, 3)
    aug = Augment(rot90=1.0)
    turns = {aug.sample(rng(s), (12, 20))["rot90"] for s in range(30)}
    assert turns == {2}
    out, omask = aug(image, mask, rng(0))
    assert np.array_equal(out, np.rot90(image, 2)) and np.array_equal(omask, np.rot90(mask, 2))


# -------------------------------------------------------------- mask labels
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1),
       labels=st.lists(st.integers(0, 60000), min_size=1, max_size=6, unique=True),
       h=st.integers(3, 40), w=st.integers(3, 40), fill_label=st.integers(0, 255),
       dtype=st.sampled_from([np.uint8, np.int32, np.uint16, np.int64]))
def test_mask_values_subset_of_labels_and_fill(seed, labels, h, w, fill_label, dtype):
    g = rng(seed)
    if dtype == np.uint8:
        labels = [v % 256 for v in labels]
    mask = g.choice(np.array(labels, dtype=dtype), size=(h, w))
    image = g.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    cfg = dict(PRESETS["heavy"], elastic=0.5, fill_label=fill_label)
    out, omask = Augment(**cfg)(image, mask, g)
    assert omask.dtype == mask.dtype and omask.shape == mask.shape
    assert set(np.unique(omask).tolist()) <= set(labels) | {fill_label}
    assert out.shape == image.shape and np.isfinite(out).all()


def test_negative_and_large_labels_survive():
    g = rng(3)
    mask = g.choice(np.array([-1, 5, 70000, 2**31 - 1], np.int32), size=(24, 24))
    _, omask = geometric_heavy(elastic=1.0)(np.zeros((24, 24), np.uint8), mask, g)
    assert set(np.unique(omask).tolist()) <= {-1, 5, 70000, 2**31 - 1, 0}


# ------------------------------------------------------------------ alignment
@pytest.mark.parametrize("elastic", [0.0, 1.0])
def test_alignment_oracle(elastic):
    aug = geometric_heavy(elastic=elastic, elastic_alpha=60.0)
    matched, mismatched = [], []
    for seed in range(12):
        mask = shapes_mask(seed=seed)
        image = label_image(mask, seed)
        assert agreement(image.astype(np.float32), mask) == 1.0  # oracle sanity
        params = aug.sample(rng(seed), mask.shape)
        out, omask = aug.apply(image, mask, params)
        matched.append(agreement(out, omask))
        # mask warped by a different draw: the oracle must notice
        _, wrong = aug.apply(image, mask, aug.sample(rng(seed + 100), mask.shape))
        mismatched.append(agreement(out, wrong))
    assert min(matched) >= 0.97, matched
    assert np.mean(mismatched) < 0.9 and sum(m < 0.97 for m in mismatched) >= 10, mismatched


def test_elastic_deforms_both_and_field_amplitude_matches_full_resolution():
    from streamseg.pipeline.augment import _elastic_field

    mask = shapes_mask(seed=1)
    image = label_image(mask, 1)
    out, omask = Augment(elastic=1.0, elastic_alpha=200.0)(image, mask, rng(0))
    assert not np.array_equal(omask, mask) and agreement(out, omask) >= 0.97
    h, w, sigma = 128, 160, 6.0
    dx, dy = _elastic_field(h, w, 0, 1.0, sigma)
    full = [cv2.GaussianBlur(rng(s).uniform(-1, 1, (h, w)).astype(np.float32), (37, 37), sigma).std()
            for s in range(4)]
    assert dx.shape == dy.shape == (h, w)
    assert abs(np.std([dx, dy]) / np.mean(full) - 1.0) < 0.15


# ---------------------------------------------------------------- photometric
def test_photometric_never_changes_mask():
    image, mask = pair(40, 36, 3, labels=5)
    photo = Augment(brightness=0.5, contrast=0.5, gamma=(0.5, 2.0), noise=0.1, blur=2.0)
    for s in range(5):
        out, omask = photo(image, mask, rng(s))
        assert np.array_equal(omask, mask)
        assert not np.array_equal(out, image.astype(np.float32))
        assert out.min() >= 0.0 and out.max() <= 255.0
    heavy = Augment.preset("heavy")
    for s in range(10):
        p = heavy.sample(rng(s), mask.shape)
        geo_only = {**p, **{k: None for k in PHOTOMETRIC}}
        _, m1 = heavy.apply(image, mask, p)
        _, m2 = heavy.apply(image, mask, geo_only)
        assert np.array_equal(m1, m2)


def test_photometric_formulas():
    image = np.full((8, 8, 3), 100, np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    base = Augment().sample(rng(0), (8, 8))
    aug = Augment()
    out, _ = aug.apply(image, mask, {**base, "brightness": 0.1})
    np.testing.assert_allclose(out, 125.5, rtol=1e-6)
    out, _ = aug.apply(image, mask, {**base, "gamma": 2.0})
    np.testing.assert_allclose(out, (100 / 255) ** 2 * 255, rtol=1e-5)
    out, _ = aug.apply(image, mask, {**base, "brightness": 1.0})  # clipped for integer input
    assert out.max() == 255.0
    grad = np.tile(np.arange(0, 200, 25, dtype=np.uint8), (8, 1))
    out, _ = aug.apply(grad, mask, {**base, "contrast": 0.5})
    np.testing.assert_allclose(out, (grad - grad.mean()) * 0.5 + grad.mean(), rtol=1e-5)
    out, _ = aug.apply(image.astype(np.uint16), mask, {**base, "brightness": 0.1})
    np.testing.assert_allclose(out, 100 + 6553.5, rtol=1e-6)
    out, _ = aug.apply(image, mask, {**base, "brightness": 0.1}, value_range=1000)
    np.testing.assert_allclose(out, 200.0, rtol=1e-6)


def test_noise_std_and_p_photometric():
    image = np.full((64, 64, 3), 0.5, np.float32)
    out, _ = Augment(noise=0.1)(image, np.zeros((64, 64), np.uint8), rng(0))
    assert abs(float(out.std()) - 0.1) < 0.01 and abs(float(out.mean()) - 0.5) < 0.01
    never = Augment(brightness=0.5, noise=0.1, p_photometric=0.0)
    assert np.array_equal(never(image, np.zeros((64, 64), np.uint8), rng(0))[0], image)


# ---------------------------------------------------------------------- shapes
@pytest.mark.parametrize("c", [None, 1, 3, 4, 6])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_shapes_and_dtypes(c, dtype):
    image, mask = pair(30, 22, c, dtype)
    for m in (mask, mask[..., None].astype(np.int32), mask.astype(bool)):
        out, omask = Augment.preset("heavy")(image, m, rng(2))
        assert out.shape == image.shape and out.dtype == np.float32
        assert omask.shape == m.shape and omask.dtype == m.dtype
        top = {np.uint8: 255, np.uint16: 65535}.get(dtype, None)
        if top is not None:
            assert out.min() >= 0 and out.max() <= top


@pytest.mark.parametrize("c", [3, 5, 6, 7, 9, 11])
@pytest.mark.parametrize("elastic", [0.0, 1.0])
def test_many_channels_warp_like_single_channels(c, elastic):
    image, mask = pair(25, 31, c)
    aug = geometric_heavy(elastic=elastic)
    p = aug.sample(rng(4), (25, 31))
    out, omask = aug.apply(image, mask, p)
    for i in range(c):
        single, smask = aug.apply(image[..., i], mask, p)
        assert np.array_equal(out[..., i], single)
        assert np.array_equal(omask, smask)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), fill=st.integers(0, 255), elastic=st.booleans(),
       size=st.tuples(st.integers(8, 70), st.integers(8, 70)))
def test_three_channel_uint8_warp_equals_each_channel_alone(seed, fill, elastic, size):
    # 3-channel uint8 images take OpenCV's 4-channel path (padded): the values must not change
    h, w = size
    image, mask = pair(h, w, 3, seed=seed % 1000)
    aug = geometric_heavy(elastic=1.0 if elastic else 0.0, fill_value=float(fill))
    p = aug.sample(rng(seed), (h, w))
    out, _ = aug.apply(image, mask, p)
    for i in range(3):
        single, _ = aug.apply(np.ascontiguousarray(image[..., i]), mask, p)
        assert np.array_equal(out[..., i], single)


def test_non_contiguous_and_float64_inputs():
    image, mask = pair(40, 30, 3)
    aug = Augment.preset("heavy")
    a = aug(image[:, ::-1, ::-1], mask[:, ::-1], rng(1))
    b = aug(np.ascontiguousarray(image[:, ::-1, ::-1]), np.ascontiguousarray(mask[:, ::-1]), rng(1))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    out, _ = aug(image.astype(np.float64) / 255, mask, rng(1))
    assert out.dtype == np.float32 and out.shape == image.shape


def test_fill_values_used_at_borders():
    image = np.full((20, 20, 3), 50, np.uint8)
    mask = np.ones((20, 20), np.uint8)
    aug = Augment(scale=(0.5, 0.5), fill_value=7.0, fill_label=9)
    out, omask = aug(image, mask, rng(0))
    assert out[0, 0, 0] == 7.0 and omask[0, 0] == 9
    assert out[10, 10, 0] == 50.0 and omask[10, 10] == 1


def test_bad_inputs():
    aug = Augment.preset("standard")
    image, mask = pair(16, 16, 3)
    with pytest.raises(LabelError, match="Received:"):
        aug(image, mask.astype(np.float32), rng(0))
    with pytest.raises(InputError, match="Received:"):
        aug(image, mask[:8], rng(0))
    with pytest.raises(InputError, match="Received:"):
        aug(image.astype(np.int32), mask, rng(0))
    with pytest.raises(InputError, match="Received:"):
        aug.apply(image, mask, aug.sample(rng(0), (8, 8)))
    with pytest.raises(OptionError, match="Received:"):
        aug(image, mask, 42)
    with pytest.raises(OptionError, match="value_range"):
        aug(image, mask, rng(0), value_range=0)


# ---------------------------------------------------------------------- options
@pytest.mark.parametrize("kwargs", [
    {"hflip": 1.5}, {"vflip": -0.1}, {"rot90": "0.5"}, {"rotate": -1}, {"rotate": 200},
    {"scale": (1.2, 0.9)}, {"scale": (0.0, 1.0)}, {"scale": 1.1}, {"translate": 2.0},
    {"shear": 90}, {"elastic": 2}, {"elastic_sigma": 0}, {"elastic_alpha": -1},
    {"crop": (0.0, 1.0)}, {"crop": (0.5, 1.5)}, {"crop": (0.5,)}, {"brightness": -0.1},
    {"contrast": 1.5}, {"gamma": (0.0, 1.0)}, {"noise": float("nan")}, {"blur": -1},
    {"p_photometric": 1.01}, {"fill_value": "0"}, {"fill_label": 256}, {"fill_label": 1.0},
    {"fill_label": True}, {"hflip": True},
])
def test_invalid_options(kwargs):
    with pytest.raises(OptionError, match="Received:") as info:
        Augment(**kwargs)
    assert next(iter(kwargs)) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unknown_option_names_listed():
    with pytest.raises(OptionError, match="Received:") as info:
        Augment(bogus=1)
    assert "bogus" in str(info.value) and "hflip" in str(info.value) and "fill_label" in str(info.value)
    with pytest.raises(OptionError, match="elastic_sigma"):
        Augment.from_config({"hflip": 0.5, "rotation": 10})
    with pytest.raises(OptionError, match="standard"):
        Augment.preset("medium")
    with pytest.raises(OptionError, match="Received:"):
        Augment.from_config(3)
    with pytest.raises(OptionError):
        Augment.from_config({1: 2})


def test_presets():
    assert list(PRESETS) == ["none", "light", "standard", "heavy"]
    assert Augment.preset("none") == Augment()
    assert Augment.preset("light") == Augment(hflip=0.5, vflip=0.5)
    std = Augment.preset("standard")
    assert (std.rot90, std.rotate, std.scale, std.translate, std.brightness, std.contrast) == (
        0.5, 15.0, (0.9, 1.1), 0.05, 0.1, 0.1)
    heavy = Augment.preset("heavy")
    assert heavy.shear > 0 and heavy.elastic > 0 and heavy.crop is not None
    assert heavy.gamma != (1.0, 1.0) and heavy.noise > 0 and heavy.blur > 0
    assert all(not Augment.preset(n).is_identity for n in ("light", "standard", "heavy"))


def test_from_config():
    assert Augment.from_config(None) is None
    heavy = Augment.preset("heavy")
    assert Augment.from_config(heavy) is heavy
    assert Augment.from_config("standard") == Augment.preset("standard")
    assert Augment.from_config({"hflip": 0.5, "scale": [0.8, 1.2]}) == Augment(hflip=0.5, scale=(0.8, 1.2))


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_json_pickle_repr_round_trips(name):
    aug = Augment.preset(name)
    cfg = aug.get_config()
    assert Augment(**cfg) == aug
    assert Augment.from_config(json.loads(json.dumps(cfg))) == aug
    clone = pickle.loads(pickle.dumps(aug))
    assert clone == aug and clone.get_config() == cfg
    assert eval(repr(aug), {"Augment": Augment}) == aug
    image, mask = pair(24, 24, 3)
    a, b = aug(image, mask, rng(5)), clone(image, mask, rng(5))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert aug != Augment(hflip=0.25) and aug != "x"
