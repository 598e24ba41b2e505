"""Tests of streamseg.pipeline.patch_sampling (pure 3-D patch sampling logic)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamseg.errors import InputError, OptionError
from streamseg.pipeline.patch_sampling import (
    PatchOptions, choose_label, crop_padded, draw_corner, epoch_plan, forced_per_batch, has_foreground,
    patch_corner, patch_rng, pick_foreground, validate_patch_options,
)

FAST = settings(max_examples=60, deadline=None)


def plan(n, spv=2, b=4, f=0.33, shuffle=True, seed=0, epoch=0):
    return epoch_plan(n, samples_per_volume=spv, batch_size=b, foreground_fraction=f, shuffle=shuffle,
                      seed=seed, epoch=epoch)


# ---------------------------------------------------------------- epoch_plan

@FAST
@given(n=st.integers(0, 40), spv=st.integers(1, 6), b=st.integers(1, 9),
       f=st.sampled_from([0.0, 0.01, 0.2, 0.25, 0.3, 0.33, 0.5, 0.7, 0.99, 1.0]),
       shuffle=st.booleans(), seed=st.integers(0, 2**32), epoch=st.integers(0, 50))
def test_plan_counts_and_forced_per_batch(n, spv, b, f, shuffle, seed, epoch):
    cases, forced = plan(n, spv, b, f, shuffle, seed, epoch)
    assert cases.shape == forced.shape == (n * spv,)
    assert cases.dtype == np.int64 and forced.dtype == bool
    np.testing.assert_array_equal(np.bincount(cases, minlength=n), np.full(n, spv))
    for start in range(0, n * spv, b):
        chunk = forced[start:start + b]
        need = math.ceil(round(f * chunk.size, 9))
        assert chunk.sum() >= need
        assert chunk.sum() == forced_per_batch(chunk.size, f)
        if f == 0:
            assert not chunk.any()


def test_forced_are_the_last_of_each_batch_including_partial():
    _, forced = plan(5, spv=2, b=4, f=0.5, shuffle=False)  # 10 samples: batches of 4, 4, 2
    np.testing.assert_array_equal(forced, [0, 0, 1, 1, 0, 0, 1, 1, 0, 1])


@pytest.mark.parametrize("f, b, expected", [(0.0, 8, 0), (0.3, 10, 3), (0.33, 2, 1), (0.33, 3, 1),
                                            (0.33, 4, 2), (0.5, 3, 2), (1.0, 7, 7), (0.01, 1, 1),
                                            (0.1, 30, 3), (0.7, 10, 7)])
def test_forced_per_batch_is_ceil_without_float_noise(f, b, expected):
    assert forced_per_batch(b, f) == expected


def test_plan_case_major_without_shuffle():
    cases, _ = plan(3, spv=2, shuffle=False, seed=5, epoch=9)
    np.testing.assert_array_equal(cases, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(cases, plan(3, spv=2, shuffle=False, seed=1, epoch=2)[0])


def test_plan_deterministic_and_varies_with_epoch_and_seed():
    a = plan(50, spv=3, seed=7, epoch=2)
    b = plan(50, spv=3, seed=7, epoch=2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], plan(50, spv=3, seed=7, epoch=3)[0])
    assert not np.array_equal(a[0], plan(50, spv=3, seed=8, epoch=2)[0])


@pytest.mark.parametrize("kw, name", [({"samples_per_volume": 0}, "samples_per_volume"),
                                      ({"batch_size": 0}, "batch_size"),
                                      ({"foreground_fraction": 1.5}, "foreground_fraction"),
                                      ({"seed": -1}, "seed"), ({"epoch": 1.0}, "epoch")])
def test_plan_bad_arguments(kw, name):
    args = dict(samples_per_volume=2, batch_size=2, foreground_fraction=0.5, shuffle=True, seed=0, epoch=0)
    args.update(kw)
    with pytest.raises(OptionError, match=rf"{name}.*Received: {name}="):
        epoch_plan(4, **args)


# ---------------------------------------------------------------- choose_label

def frequencies(labels, weights, draws=20000, seed=0):
    rng = np.random.default_rng(seed)
    got = [choose_label(rng, labels, weights) for _ in range(draws)]
    values, counts = np.unique(got, return_counts=True)
    return dict(zip(values.tolist(), counts.tolist()))


def chi_square_ok(counts: dict, expected_p: dict, draws: int) -> bool:
    assert set(counts) <= set(expected_p)
    stat = sum((counts.get(k, 0) - draws * p) ** 2 / (draws * p) for k, p in expected_p.items())
    return stat < 20.0  # df <= 3: far above the 0.999 quantile (16.3)


@pytest.mark.parametrize("weights, expected", [
    (None, {1: 1 / 3, 2: 1 / 3, 3: 1 / 3}),
    ({1: 1.0, 2: 2.0, 3: 1.0}, {1: 0.25, 2: 0.5, 3: 0.25}),
    ([9.0, 1.0, 3.0, 0.0, 5.0], {1: 0.25, 2: 0.75}),         # by label: weights[0] ignored, 3 weighs 0
    ({1: 1.0, 2: 3.0, 7: 100.0}, {1: 0.25, 2: 0.75}),        # 7 absent: ignored; 3 unlisted: 0
    ({1: 0.0, 2: 0.0, 3: 0.0}, {1: 1 / 3, 2: 1 / 3, 3: 1 / 3}),  # all zero: uniform
    ({5: 2.0}, {1: 1 / 3, 2: 1 / 3, 3: 1 / 3}),               # only absent weighted: uniform
])
def test_choose_label_frequencies_follow_weights(weights, expected):
    draws = 20000
    counts = frequencies([0, 1, 2, 3, 3, 0], weights, draws)
    assert chi_square_ok(counts, expected, draws), counts


def test_choose_label_never_absent_or_background():
    rng = np.random.default_rng(1)
    for _ in range(500):
        assert choose_label(rng, np.array([0, 2, 4]), {1: 50.0, 2: 1.0, 3: 50.0, 4: 1.0}) in (2, 4)
    assert choose_label(rng, [0], None) == -1
    assert choose_label(rng, [], {1: 1.0}) == -1
    assert choose_label(rng, [5], [0.0, 1.0]) == 5


def test_choose_label_deterministic():
    a = [choose_label(np.random.default_rng(3), [1, 2, 3], [0, 1, 2, 3]) for _ in range(5)]
    assert len(set(a)) == 1


# ---------------------------------------------------------------- patch_corner

shapes = st.tuples(*[st.integers(1, 40)] * 3)
patches = st.tuples(*[st.integers(1, 48)] * 3)


@FAST
@given(shape=shapes, patch=patches, seed=st.integers(0, 10**6))
def test_random_corner_inside_or_covering(shape, patch, seed):
    rng = np.random.default_rng(seed)
    for _ in range(5):
        c = patch_corner(rng, shape, patch, center=None)
        assert c.dtype == np.int64 and c.shape == (3,)
        for a in range(3):
            if shape[a] >= patch[a]:
                assert 0 <= c[a] <= shape[a] - patch[a]
            else:
                assert shape[a] - patch[a] <= c[a] <= 0  # covers the whole extent


@FAST
@given(data=st.data(), shape=shapes, patch=patches)
def test_centered_corner_contains_voxel(data, shape, patch):
    voxel = tuple(data.draw(st.integers(0, s - 1)) for s in shape)
    c = patch_corner(np.random.default_rng(0), shape, patch, center=voxel)
    for a in range(3):
        assert c[a] <= voxel[a] < c[a] + patch[a]
        if shape[a] >= patch[a]:
            assert 0 <= c[a] <= shape[a] - patch[a]
        else:
            assert shape[a] - patch[a] <= c[a] <= 0


def test_centered_corner_values():
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(patch_corner(rng, (100, 100, 100), (32, 32, 16), center=(50, 50, 50)),
                                  [34, 34, 42])  # center - patch // 2
    np.testing.assert_array_equal(patch_corner(rng, (100, 100, 10), (32, 32, 16), center=(0, 99, 5)),
                                  [0, 68, -3])  # clipped inside; padded axis stays in [-6, 0]


def test_random_corner_uniform_on_a_small_range():
    rng = np.random.default_rng(0)
    got = np.array([patch_corner(rng, (5, 3, 8), (3, 6, 8)) for _ in range(6000)])
    np.testing.assert_array_equal(np.unique(got[:, 0]), [0, 1, 2])
    np.testing.assert_array_equal(np.unique(got[:, 1]), [-3, -2, -1, 0])
    np.testing.assert_array_equal(np.unique(got[:, 2]), [0])
    assert np.bincount(got[:, 0]).min() > 1800


def test_patch_corner_rejects_voxel_outside():
    with pytest.raises(InputError, match="Received: center="):
        patch_corner(np.random.default_rng(0), (4, 4, 4), (2, 2, 2), center=(4, 0, 0))


def test_crop_padded_covers_whole_axis_when_volume_is_small():
    vol = np.arange(5 * 3 * 8, dtype=np.int32).reshape(5, 3, 8) + 1
    rng = np.random.default_rng(2)
    for _ in range(20):
        c = patch_corner(rng, vol.shape, (3, 6, 8))
        out = crop_padded(vol, c, (3, 6, 8))
        assert out.shape == (3, 6, 8)
        # every y of the volume is in the patch, and x/z slabs are the volume's
        np.testing.assert_array_equal(out[:, -c[1]:-c[1] + 3, :], vol[c[0]:c[0] + 3])
        assert (out == 0).sum() == 3 * 3 * 8


def test_crop_padded_outside_and_channels():
    vol = np.ones((4, 4, 4, 2), np.float32)
    out = crop_padded(vol, (-2, 1, 3), (3, 3, 3), fill=-1)
    assert out.shape == (3, 3, 3, 2)
    assert (out == 1).sum() == 1 * 3 * 1 * 2
    assert (crop_padded(vol, (10, 0, 0), (2, 2, 2)) == 0).all()


# ---------------------------------------------------------------- foreground

def test_pick_foreground_uniform_and_errors():
    coords = np.array([[0, 0, 0], [1, 2, 3], [4, 5, 6]])
    rng = np.random.default_rng(0)
    got = [pick_foreground(rng, coords) for _ in range(3000)]
    assert all(isinstance(v, int) for v in got[0])
    values, counts = np.unique(np.array(got), axis=0, return_counts=True)
    np.testing.assert_array_equal(values, coords)
    assert counts.min() > 900
    with pytest.raises(InputError, match="Received: array of shape"):
        pick_foreground(rng, np.zeros((0, 3), int))


def test_draw_corner_forced_patch_holds_the_chosen_class():
    mask = np.zeros((40, 30, 20), np.uint8)
    mask[2:4, 25:28, 1:3] = 2
    mask[30, 10, 18] = 5
    locations = {k: np.argwhere(mask == k) for k in (1, 2, 5)}  # class 1 is empty: absent
    patch = (16, 16, 8)
    seen = set()
    for pos in range(200):
        rng = patch_rng(4, 1, pos)
        corner, label = draw_corner(rng, mask.shape, patch, forced=True, class_locations=locations,
                                    class_weights={1: 100.0, 2: 1.0, 5: 1.0})
        crop = crop_padded(mask, corner, patch)
        assert label in (2, 5) and (crop == label).any() and has_foreground(crop)
        seen.add(label)
    assert seen == {2, 5}


def test_draw_corner_unforced_or_empty_is_uniform():
    loc = {1: np.argwhere(np.ones((2, 2, 2)))}
    for forced, locations in ((False, loc), (True, {}), (True, {1: np.zeros((0, 3), int)}), (True, None)):
        corner, label = draw_corner(np.random.default_rng(0), (10, 10, 10), (4, 4, 4), forced=forced,
                                    class_locations=locations)
        assert label == -1 and np.all((corner >= 0) & (corner <= 6))


def test_patch_rng_deterministic_and_salted():
    a = patch_rng(1, 2, 3).integers(1 << 62, size=4)
    np.testing.assert_array_equal(a, patch_rng(1, 2, 3).integers(1 << 62, size=4))
    assert not np.array_equal(a, np.random.default_rng([1, 2, 3]).integers(1 << 62, size=4))
    assert not np.array_equal(a, patch_rng(1, 2, 4).integers(1 << 62, size=4))


def test_has_foreground():
    assert not has_foreground(np.zeros((2, 2, 2)))
    assert has_foreground(np.eye(3)[None])


# ---------------------------------------------------------------- validate_patch_options

def test_validate_normalises():
    opts = validate_patch_options([np.int64(64), 64, 32], 4, 0.33, [0.0, 1, 2], 2)
    assert opts == PatchOptions((64, 64, 32), 4, 0.33, {1: 1.0, 2: 2.0}, 2)
    assert type(opts.patch_size[0]) is int
    assert validate_patch_options((1, 1, 1), 1, 0, None, 1).class_weights is None
    assert validate_patch_options((1, 1, 1), 1, 1, {0: 5, 3: 1}, 1).class_weights == {3: 1.0}


GOOD = dict(patch_size=(64, 64, 32), samples_per_volume=2, foreground_fraction=0.33, class_weights=None,
            batch_size=2)


@pytest.mark.parametrize("name, value", [
    ("patch_size", (64, 64)), ("patch_size", (64, 0, 32)), ("patch_size", 64), ("patch_size", (64, 64, 3.5)),
    ("patch_size", "abc"), ("patch_size", (True, 2, 2)),
    ("samples_per_volume", 0), ("samples_per_volume", 2.0), ("samples_per_volume", None),
    ("foreground_fraction", -0.1), ("foreground_fraction", 1.01), ("foreground_fraction", float("nan")),
    ("foreground_fraction", "0.5"), ("foreground_fraction", True),
    ("class_weights", {1: -1.0}), ("class_weights", {-1: 1.0}), ("class_weights", [1.0, float("inf")]),
    ("class_weights", {"liver": 1.0}), ("class_weights", 3.0), ("class_weights", "ab"),
    ("batch_size", 0), ("batch_size", -3), ("batch_size", True),
])
def test_validate_bad_option_names_it(name, value):
    with pytest.raises(OptionError) as info:
        validate_patch_options(**{**GOOD, name: value})
    text = str(info.value)
    assert text.startswith(name) and "Received: " in text and name in text.split("Received: ")[1]
