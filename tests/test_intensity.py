"""Signed / float images and intensity normalisation: window, per-case z-score, nnU-Net's CT scheme.

Oracles: numpy on the stored values (window), nibabel-read volumes with ``np.mean`` /
``np.std`` / ``np.percentile`` (per-case and pooled foreground statistics), the documented
seeded draw of foreground voxels, thresholded images against their masks after augmentation
(alignment), and ``workers=0`` batches for worker processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest

from streamseg import Augment, OptionError, SegmentationDataset, Store
from streamseg.io import _volume_stats
from streamseg.io._volume_stats import ForegroundPool, intensity_record, mean_std
from streamseg.io.synth_volumes import write_synth_volumes
from streamseg.io.volume_source import VolumeSliceSource
from streamseg.pipeline.batches import sample_rng
from streamseg.pipeline.intensity import default_normalize
from streamseg.store.converter import convert_source

CASES = 3


def _canonical(path: Path) -> np.ndarray:
    return np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vol")
    write_synth_volumes(root, CASES, shape=(32, 32, 12))
    return root


@pytest.fixture(scope="module")
def vstore(volumes, tmp_path_factory) -> Store:
    src = VolumeSliceSource(volumes, progress=False)
    return convert_source(src, tmp_path_factory.mktemp("vs") / "ct.zarr", chunk_samples=8, progress=False)


def case_arrays(volumes: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(_canonical(volumes / "imagesTr" / f"case_{i:03d}.nii.gz").astype(np.float64),
             _canonical(volumes / "labelsTr" / f"case_{i:03d}.nii.gz"))
            for i in range(CASES)]


def all_batches(ds: SegmentationDataset) -> tuple[np.ndarray, np.ndarray]:
    got = [ds[i] for i in range(len(ds))]
    return np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])


def int16_pairs(n: int = 6, h: int = 48, w: int = 56, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Masks of ellipses/rectangles (label 1 on 0); images -600 HU outside, 200 HU inside, +-20 noise."""
    g = np.random.default_rng(seed)
    masks = np.zeros((n, h, w), np.uint8)
    for m in masks:
        for i in range(4):
            x, y = int(g.integers(0, w - 16)), int(g.integers(0, h - 16))
            a, b = int(g.integers(8, 20)), int(g.integers(8, 20))
            if i % 2:
                cv2.rectangle(m, (x, y), (x + a, y + b), 1, thickness=-1)
            else:
                cv2.ellipse(m, (x + 6, y + 6), (a // 2 + 2, b // 2 + 2), 25.0 * i, 0, 360, 1, -1)
    images = np.where(masks > 0, 200, -600) + g.integers(-20, 21, masks.shape)
    return images.astype(np.int16), masks


# ---------------------------------------------------------------------- window
@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint16])
def test_window_values_equal_numpy_and_clip(dtype):
    g = np.random.default_rng(4)
    low = -1000 if dtype != np.uint16 else 0
    images = g.integers(low, 1500, (10, 12, 14, 2)).astype(dtype)
    if dtype == np.float32:
        images += g.random(images.shape).astype(np.float32)
    masks = np.zeros((10, 12, 14), np.uint8)
    lo, hi = (-175.0, 250.0) if dtype != np.uint16 else (100.0, 900.0)
    ds = SegmentationDataset(Store.from_arrays(images, masks), 4, shuffle=False, normalize="window",
                             window=(lo, hi), workers=0)
    x, _ = all_batches(ds)
    expected = np.clip((images.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)
    np.testing.assert_allclose(x, expected, rtol=0, atol=1e-6)
    assert x.dtype == np.float32 and x.min() == 0.0 and x.max() == 1.0
    assert (x[images <= lo] == 0.0).all() and (x[images >= hi] == 1.0).all()
    assert ((x > 0) & (x < 1)).sum() == ((images > lo) & (images < hi)).sum()


def test_photometric_ops_act_on_windowed_values():
    """Normalised (and clipped) first: brightness 0.5 shifts by half the window, then re-clipped."""
    images, masks = int16_pairs(5)
    lo, hi = -600.0, 200.0
    ds = SegmentationDataset(Store.from_arrays(images, masks), 5, shuffle=False, normalize="window",
                             window=(lo, hi), augment={"brightness": 0.5}, seed=9, workers=0)
    x, _ = ds[0]
    aug = ds.augment
    shifts = []
    for j in range(5):
        b = aug.sample(sample_rng(9, 0, j), images.shape[1:3])["brightness"]
        want = np.clip(np.clip((images[j].astype(np.float64) - lo) / (hi - lo), 0, 1) + b, 0, 1)
        np.testing.assert_allclose(x[j, ..., 0], want, atol=1e-6)
        shifts.append(b)
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert min(shifts) < -0.05 and max(shifts) > 0.05  # both directions were exercised


# ---------------------------------------------------------------------- zscore
def test_zscore_uses_each_cases_mean_and_std(volumes, vstore):
    cases = case_arrays(volumes)
    records = vstore.meta["params"]["source"]["cases"]
    for (image, _), rec in zip(cases, records):
        overall = rec["intensity"]["overall"]
        assert overall["mean"][0] == pytest.approx(image.mean(), rel=1e-12)
        assert overall["std"][0] == pytest.approx(image.std(), rel=1e-12)
    ds = SegmentationDataset(vstore, 8, shuffle=False, normalize="zscore", workers=0)
    x, _ = all_batches(ds)
    raw, _ = vstore.read(np.arange(len(vstore)))
    case_of = [n.split(":")[0] for n in vstore.names]
    assert sorted(set(case_of)) == [f"case_{i:03d}" for i in range(CASES)]
    for i, name in enumerate(case_of):
        image = cases[int(name[-3:])][0]
        want = (raw[i].astype(np.float64) - image.mean()) / image.std()
        np.testing.assert_allclose(x[i], want, rtol=1e-5, atol=1e-5)
    for k in range(CASES):  # each case's voxels come out with mean 0 / std 1
        sel = np.array([c == f"case_{k:03d}" for c in case_of])
        assert abs(float(x[sel].mean())) < 1e-4 and float(x[sel].std()) == pytest.approx(1.0, abs=1e-4)


def test_zscore_with_context_channels_uses_the_modality_statistics(volumes, tmp_path):
    src = VolumeSliceSource(volumes, context=1, progress=False)
    store = convert_source(src, tmp_path / "ctx.zarr", chunk_samples=8, progress=False)
    assert store.image_shape[2] == 3
    ds = SegmentationDataset(store, 12, shuffle=False, normalize="zscore", workers=0)
    x, _ = all_batches(ds)
    raw, _ = store.read(np.arange(len(store)))
    cases = case_arrays(volumes)
    for i, name in enumerate(store.names):
        image = cases[int(name.split(":")[0][-3:])][0]
        np.testing.assert_allclose(x[i], (raw[i] - image.mean()) / image.std(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- ct
def test_ct_clips_to_pooled_foreground_percentiles_then_zscores(volumes, vstore):
    fg_stats = vstore.meta["params"]["source"]["foreground_intensity"]
    cases = case_arrays(volumes)
    pooled = []
    for ci, (image, labels) in enumerate(cases):  # the documented draw, replayed with numpy
        values = image[labels > 0]
        pick = np.random.default_rng([0, ci, 0xF06]).integers(0, values.size, size=10_000)
        pooled.append(values[pick])
    pooled = np.concatenate(pooled)
    p_lo, p_hi = np.percentile(pooled, [0.5, 99.5])
    mean, std = pooled.mean(), pooled.std()
    assert fg_stats["voxels_sampled"] == 30_000 == pooled.size and fg_stats["cases_with_foreground"] == CASES
    assert fg_stats["p0_5"] == [pytest.approx(p_lo)] and fg_stats["p99_5"] == [pytest.approx(p_hi)]
    assert fg_stats["mean"] == [pytest.approx(mean)] and fg_stats["std"] == [pytest.approx(std)]
    every_fg = np.concatenate([im[lab > 0] for im, lab in cases])  # a sample of the whole foreground
    assert abs(mean - every_fg.mean()) < 1.0 and abs(std - every_fg.std()) < 1.0

    ds = SegmentationDataset(vstore, 8, shuffle=False, normalize="ct", workers=0)
    x, _ = all_batches(ds)
    raw, _ = vstore.read(np.arange(len(vstore)))
    want = (np.clip(raw.astype(np.float64), p_lo, p_hi) - mean) / std
    np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-5)
    assert x.min() == pytest.approx((p_lo - mean) / std, abs=1e-5)


def test_foreground_pool_is_deterministic_and_seeded(volumes):
    a = VolumeSliceSource(volumes, progress=False).describe()["foreground_intensity"]
    b = VolumeSliceSource(volumes, progress=False).describe()["foreground_intensity"]
    c = VolumeSliceSource(volumes, seed=5, progress=False).describe()["foreground_intensity"]
    small = VolumeSliceSource(volumes, foreground_samples=100, progress=False).describe()["foreground_intensity"]
    assert a == b and a["mean"] != c["mean"] and small["voxels_sampled"] == 300
    json.dumps(a)
    with pytest.raises(OptionError, match="foreground_samples"):
        VolumeSliceSource(volumes, foreground_samples=-1, progress=False)


def test_pool_without_foreground_has_no_statistics():
    pool = ForegroundPool(0, 50)
    image = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    intensity_record(image, np.zeros(image.shape, bool), pool)
    stats = pool.statistics()
    assert stats["voxels_sampled"] == 0 and stats["mean"] is None and stats["p0_5"] is None


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.float32, np.int32])
def test_mean_std_equal_numpy_block_by_block(dtype, monkeypatch):
    monkeypatch.setattr(_volume_stats, "_BLOCK", 97)  # many blocks, the last one partial
    g = np.random.default_rng(2)
    values = g.integers(-30000 if dtype != np.uint16 else 0, 30000, (11, 13, 7)).astype(dtype)
    if dtype == np.float32:
        values[0, 0, :2] = [np.nan, np.inf]
    finite = values[np.isfinite(values)].astype(np.float64)
    mean, std = mean_std(values)
    assert mean == pytest.approx(finite.mean(), rel=1e-12) and std == pytest.approx(finite.std(), rel=1e-12)
    rec = intensity_record(values[..., None].repeat(2, axis=3), values > 0)
    assert rec["overall"]["mean"] == [pytest.approx(finite.mean())] * 2
    fg = values[values > 0].astype(np.float64)
    assert rec["foreground"]["std"][1] == pytest.approx(fg[np.isfinite(fg)].std())
    assert mean_std(np.zeros(0, dtype)) is None


# ---------------------------------------------------------------------- augmentation
# None: raw HU (fill_value 0 is 0 HU, below the 180..220 HU foreground); photometric ops then act on
# raw values (value_range 1), so only the "standard" preset (brightness/contrast) keeps the threshold
@pytest.mark.parametrize("preset, normalize, window, threshold", [
    ("standard", "window", (-600, 200), 0.5), ("heavy", "window", (-600, 200), 0.5),
    ("standard", None, None, 100.0)])
def test_augmented_int16_store_keeps_labels_aligned(preset, normalize, window, threshold):
    images, masks = int16_pairs(8)
    store = Store.from_arrays(images, masks)
    ds = SegmentationDataset(store, 8, shuffle=False, normalize=normalize, window=window, augment=preset,
                             seed=3, workers=0)
    x, y = ds[0]
    agree = [float(np.mean((x[j, ..., 0] > threshold) == (y[j, ..., 0] == 1))) for j in range(8)]
    assert min(agree) >= 0.97, agree
    other = SegmentationDataset(store, 8, shuffle=False, normalize=normalize, window=window, augment=preset,
                                seed=4, workers=0)[0][1]
    wrong = [float(np.mean((x[j, ..., 0] > threshold) == (other[j, ..., 0] == 1))) for j in range(8)]
    assert np.mean(wrong) < 0.95 and sum(w < 0.97 for w in wrong) >= 6, wrong  # the oracle notices
    plain = SegmentationDataset(store, 8, shuffle=False, normalize=normalize, window=window, workers=0)[0][0]
    assert not np.array_equal(x, plain)
    if normalize == "window":
        assert x.min() >= 0.0 and x.max() <= 1.0


def test_augment_accepts_int16_without_clipping_negative_values():
    images, masks = int16_pairs(1)
    image, mask = images[0], masks[0]
    out, omask = Augment(hflip=1.0)(image, mask, np.random.default_rng(0))
    np.testing.assert_array_equal(out, np.flip(image, 1).astype(np.float32))
    np.testing.assert_array_equal(omask, np.flip(mask, 1))
    aug = Augment(brightness=0.5)
    params = aug.sample(np.random.default_rng(1), image.shape)
    out, _ = aug.apply(image, mask, params, value_range=100.0)
    np.testing.assert_allclose(out, image + np.float32(params["brightness"] * 100.0), atol=1e-3)
    assert out.min() < -500
    rot, _ = Augment(rotate=30.0)(image, mask, np.random.default_rng(2))
    assert rot.dtype == np.float32 and rot.min() < -500 and not float(rot.max()) > 221


@pytest.mark.slow
def test_worker_processes_give_the_batches_of_workers_0(vstore):
    kw = dict(normalize="zscore", augment="heavy", seed=11, shuffle=True)
    inline = all_batches(SegmentationDataset(vstore, 8, workers=0, **kw))
    with SegmentationDataset(vstore, 8, workers=2, use_multiprocessing=True, **kw) as ds:
        pooled = all_batches(ds)
    np.testing.assert_array_equal(inline[0], pooled[0])
    np.testing.assert_array_equal(inline[1], pooled[1])


# ---------------------------------------------------------------------- options
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_unit_is_refused_for_signed_and_float_images(dtype):
    store = Store.from_arrays(np.zeros((2, 4, 4), dtype), np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(OptionError, match=r"'window'.*'zscore'.*'ct'.*'standardize'.*None") as err:
        SegmentationDataset(store, 2, workers=0)
    assert str(err.value).endswith(f"Received: normalize='unit' for {np.dtype(dtype)} images")
    x, _ = SegmentationDataset(store, 2, normalize=None, workers=0)[0]
    assert x.dtype == np.float32


@pytest.mark.parametrize("window, match", [
    (None, r"needs window=\(lo, hi\).*Received: window=None"),
    ((250, -175), r"lo < hi"), ((1, 1), r"lo < hi"), ((0, float("nan")), r"lo < hi"),
    ((0, 1, 2), r"lo < hi"), ("ab", r"lo < hi"), ((True, 2), r"lo < hi"), ((0, 1e39), "float32"),
])
def test_window_option_checked(window, match):
    store = Store.from_arrays(np.zeros((2, 4, 4), np.int16), np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(OptionError, match=match):
        SegmentationDataset(store, 2, normalize="window", window=window, workers=0)


def test_window_refused_with_other_modes_and_unknown_modes_listed():
    store = Store.from_arrays(np.zeros((2, 4, 4), np.uint8), np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(OptionError, match=r"window applies only with normalize='window'.*normalize='unit'"):
        SegmentationDataset(store, 2, window=(0, 1), workers=0)
    with pytest.raises(OptionError, match=r"'window', 'zscore', 'ct'.*Received: normalize='minmax'"):
        SegmentationDataset(store, 2, normalize="minmax", workers=0)


@pytest.mark.parametrize("mode", ["zscore", "ct"])
def test_zscore_and_ct_need_a_volume_store(mode, tmp_path):
    arrays = Store.from_arrays(np.zeros((2, 4, 4), np.int16), np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(OptionError, match=rf"converted from volumes.*VolumeSliceSource.*wrapped arrays.*"
                                          rf"Received: normalize='{mode}'"):
        SegmentationDataset(arrays, 2, normalize=mode, workers=0)


def test_stale_manifests_name_what_is_missing(vstore):
    source = vstore.meta["params"]["source"]

    def with_source(**changes) -> Store:
        store = Store.from_arrays(np.zeros((len(vstore), 32, 32), np.int16), np.zeros((len(vstore), 32, 32),
                                                                                         np.uint8),
                                  names=vstore.names)
        store.meta["params"] = {"source": {**source, **changes}}
        return store

    old_cases = [{**c, "intensity": {"overall": {k: v for k, v in c["intensity"]["overall"].items()
                                                 if k not in ("mean", "std")}}} for c in source["cases"]]
    with pytest.raises(OptionError, match=r"each case's mean/std.*again"):
        SegmentationDataset(with_source(cases=old_cases), 4, normalize="zscore", workers=0)
    no_fg = {k: v for k, v in source.items() if k != "foreground_intensity"}
    store = with_source()
    store.meta["params"]["source"] = no_fg
    with pytest.raises(OptionError, match=r"pooled foreground statistics.*again"):
        SegmentationDataset(store, 4, normalize="ct", workers=0)
    empty = {"p0_5": [None], "p99_5": [None], "mean": [None], "std": [None], "voxels_sampled": 0}
    with pytest.raises(OptionError, match="no case has foreground"):
        SegmentationDataset(with_source(foreground_intensity=empty), 4, normalize="ct", workers=0)
    with pytest.raises(OptionError, match=r"uint16 units but the store holds int16"):
        SegmentationDataset(with_source(image_dtype="uint16"), 4, normalize="ct", workers=0)
    short = [dict(c) for c in source["cases"]]
    short[0]["selected"] -= 1
    with pytest.raises(OptionError, match=r"select 35 samples but the store holds 36"):
        SegmentationDataset(with_source(cases=short), 4, normalize="zscore", workers=0)
    swapped = [dict(c) for c in source["cases"]]
    swapped[0]["name"], swapped[1]["name"] = swapped[1]["name"], swapped[0]["name"]
    with pytest.raises(OptionError, match=r"sample 0 is 'case_000:0'.*case 'case_001'"):
        SegmentationDataset(with_source(cases=swapped), 4, normalize="zscore", workers=0)
    # the in-memory copy with intact statistics works and matches the converted store's mode
    assert default_normalize(with_source()) == "ct" == default_normalize(vstore)


def test_default_normalize():
    u8 = Store.from_arrays(np.zeros((2, 4, 4), np.uint8), np.zeros((2, 4, 4), np.uint8))
    i16 = Store.from_arrays(np.zeros((2, 4, 4), np.int16), np.zeros((2, 4, 4), np.uint8))
    assert default_normalize(u8) == "unit" and default_normalize(i16) is None


@pytest.mark.slow
def test_bench_runs_on_an_int16_store_with_its_default_augmentation(vstore, tmp_path):
    from streamseg.cli import main

    out = tmp_path / "bench.json"
    rc = main(["bench", str(vstore.path), "--steps", "2", "--warmup", "1", "--step-ms", "1", "--batch-size", "4",
               "--json", str(out)])  # default augmentation and worker processes
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["store"]["image_dtype"] == "int16" and default_normalize(vstore) == "ct"
    assert r["options"]["augment"] == "standard" and r["steps"] == 2
