"""PatchDataset: 3D patches of a --layout volumes store, foreground oversampling, determinism."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest

from conftest import save_nifti
from streamseg import OptionError, PatchDataset, convert, open_store
from streamseg.pipeline.patch_sampling import forced_per_batch

SHAPE = (48, 40, 24)
AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])


def _write_cases(root: Path, count: int, *, tiny: bool = False, index_labels: bool = False) -> Path:
    """Cases whose image is 10 * label + noise-free background 0 (so a threshold recovers the mask)."""
    rng = np.random.default_rng(7)
    for k in range(count):
        labels = np.zeros(SHAPE, np.uint8)
        if index_labels:
            labels[:] = k + 1
        elif tiny:  # a 3x3x3 lesion: 27 of 46080 voxels (0.06%)
            c = rng.integers(4, np.array(SHAPE) - 4)
            labels[c[0] - 1:c[0] + 2, c[1] - 1:c[1] + 2, c[2] - 1:c[2] + 2] = 1
        else:
            labels[10:30, 8:20, 4:12] = 1
            labels[30:40, 25:35, 14:20] = 2
        image = (labels.astype(np.int16) * 100 - 50).astype(np.int16)
        save_nifti(root / "imagesTr" / f"case_{k:02d}.nii.gz", image, AFFINE)
        save_nifti(root / "labelsTr" / f"case_{k:02d}.nii.gz", labels, AFFINE)
    return root


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("patches")
    src = _write_cases(root / "src", 3)
    convert(src, root / "dst", layout="volumes", chunk_shape=(16, 16, 16), progress=False)
    return root / "dst"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    src = _write_cases(root / "src", 4, tiny=True)
    convert(src, root / "dst", layout="volumes", progress=False)
    return root / "dst"


def _ds(path: Path, **kw: object) -> PatchDataset:
    opts = dict(batch_size=4, patch_size=(16, 16, 8), samples_per_volume=4, normalize=None, workers=0)
    opts.update(kw)
    return PatchDataset(path, **opts)  # type: ignore[arg-type]


def test_shapes_len_and_dtypes(blobs: Path) -> None:
    ds = _ds(blobs, batch_size=5)
    assert len(ds) == math.ceil(3 * 4 / 5)
    x, y = ds[0]
    assert x.shape == (5, 16, 16, 8, 1) and x.dtype == np.float32
    assert y.shape == (5, 16, 16, 8, 1) and y.dtype == np.int32
    xl, yl = ds[len(ds) - 1]
    assert xl.shape[0] == yl.shape[0] == 12 - 5 * 2
    one = _ds(blobs, mask_mode="onehot", num_classes=3)[0][1]
    assert one.shape == (4, 16, 16, 8, 3) and np.all(one.sum(-1) == 1)
    binary = _ds(blobs, mask_mode="binary")[0][1]
    assert binary.dtype == np.float32 and set(np.unique(binary)) <= {0.0, 1.0}


def test_each_case_appears_samples_per_volume_times(tmp_path: Path) -> None:
    """Label = case index + 1 everywhere: every patch's mask says which case it came from."""
    src = _write_cases(tmp_path / "src", 3, index_labels=True)
    convert(src, tmp_path / "dst", layout="volumes", progress=False)
    ds = _ds(tmp_path / "dst", batch_size=3, samples_per_volume=5, foreground_fraction=0.0, num_classes=4)
    seen = []
    for i in range(len(ds)):
        cases = ds.batch_indices(i)
        _, y = ds[i]
        for j, c in enumerate(cases):
            inside = y[j][y[j] > 0]
            assert inside.size and np.all(inside == c + 1)  # patch j comes from the planned case
            seen.append(int(c))
    assert sorted(seen) == sorted([0, 1, 2] * 5)


def test_patches_are_aligned_with_the_volume(blobs: Path) -> None:
    """Without augmentation a patch equals the volume's box at its corner (padded outside)."""
    store = open_store(blobs)
    ds = _ds(blobs, batch_size=6, patch_size=(20, 20, 30))  # Z larger than the volume (24): padded
    x, y = ds[0]
    for j, info in enumerate(ds.patch_info(0)):
        img, lab = store.read_patch(info["case"], info["corner"], (20, 20, 30), image_fill=0)
        inside = np.zeros((20, 20, 30), bool)
        lo = [max(0, c) for c in info["corner"]]
        hi = [min(n, c + 20 if a < 2 else c + 30) for a, (c, n) in enumerate(zip(info["corner"], SHAPE))]
        inside[tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, info["corner"]))] = True
        np.testing.assert_array_equal(y[j, ..., 0], lab)
        np.testing.assert_array_equal(x[j, ..., 0][inside], img[..., 0][inside].astype(np.float32))
        assert np.all(x[j, ..., 0][~inside] == 0.0) and np.all(y[j, ..., 0][~inside] == 0)


@pytest.mark.parametrize("fraction", [0.0, 0.33, 0.5, 1.0])
def test_foreground_oversampling_on_a_tiny_lesion(tiny: Path, fraction: float) -> None:
    ds = _ds(tiny, batch_size=6, patch_size=(16, 16, 8), samples_per_volume=30, foreground_fraction=fraction)
    with_fg = total = 0
    for i in range(len(ds)):
        _, y = ds[i]
        has = (y.reshape(len(y), -1) > 0).any(axis=1)
        assert has.sum() >= forced_per_batch(len(y), fraction)  # per batch, as promised
        with_fg += int(has.sum())
        total += len(y)
    share = with_fg / total
    assert share >= fraction
    if fraction == 0.0:
        # uniform patches: about the chance a 16x16x8 box covers the lesion, ~10-20% here
        assert share < 0.3


def test_class_weights_pick_the_class(blobs: Path) -> None:
    ds = _ds(blobs, batch_size=4, samples_per_volume=8, foreground_fraction=1.0, class_weights={1: 0.0, 2: 1.0})
    for i in range(len(ds)):
        assert all(info["label"] == 2 for info in ds.patch_info(i))
        _, y = ds[i]
        assert all((y[j] == 2).any() for j in range(len(y)))


def test_epochs_differ_and_repeat(blobs: Path) -> None:
    ds = _ds(blobs)
    a0 = ds[0][0].copy()
    ds.on_epoch_end()
    a1 = ds[0][0].copy()
    assert not np.array_equal(a0, a1)
    again = _ds(blobs)
    np.testing.assert_array_equal(again[0][0], a0)
    other_seed = _ds(blobs, seed=1)
    assert not np.array_equal(other_seed[0][0], a0)


@pytest.mark.parametrize("workers,mp,method", [(2, False, None), (2, True, "fork"), (1, True, "spawn")])
def test_batches_identical_whatever_the_workers(blobs: Path, workers: int, mp: bool, method: str | None) -> None:
    aug = {"hflip": 0.5, "dflip": 0.5, "rotate": 10.0, "scale": (0.9, 1.1), "gamma": (0.8, 1.2)}
    ref = _ds(blobs, augment=aug, normalize="window", window=(-50, 50))
    want = [tuple(a.copy() for a in ref[i]) for i in range(len(ref))]
    with _ds(blobs, augment=aug, normalize="window", window=(-50, 50), workers=workers,
             use_multiprocessing=mp, start_method=method) as ds:
        got = [tuple(a.copy() for a in batch) for batch in ds]
    for (wx, wy), (gx, gy) in zip(want, got, strict=True):
        np.testing.assert_array_equal(wx, gx)
        np.testing.assert_array_equal(wy, gy)


def test_augmentation_keeps_image_and_mask_aligned(blobs: Path) -> None:
    """Image = 100 * label - 50, so after a joint transform thresholding the image gives the mask."""
    aug = {"hflip": 0.5, "vflip": 0.5, "dflip": 0.5, "rot90": 0.5, "rotate": 15.0, "scale": (0.85, 1.15)}
    ds = _ds(blobs, batch_size=4, samples_per_volume=8, augment=aug, foreground_fraction=0.5,
             patch_size=(24, 24, 16), pad_value=-50.0)
    agree = []
    for i in range(len(ds)):
        x, y = ds[i]
        label_from_image = np.clip(np.rint((x[..., 0] + 50) / 100), 0, 2)
        agree.append(np.mean(label_from_image == y[..., 0]))
    assert min(agree) > 0.97


def test_reads_decode_only_the_chunks_a_patch_touches(blobs: Path) -> None:
    ds = _ds(blobs, batch_size=1, samples_per_volume=6, patch_size=(16, 16, 8), foreground_fraction=0.0)
    store = ds._feeder.producer.store  # the store the inline producer reads
    for i in range(len(ds)):
        before = store.read_stats["chunks"]
        ds[i]
        (info,) = ds.patch_info(i)
        touched = 1
        for c, p, n in zip(info["corner"], (16, 16, 8), SHAPE):
            lo, hi = max(0, c), min(n, c + p)
            touched *= (hi - 1) // 16 - lo // 16 + 1
        assert store.read_stats["chunks"] - before == 2 * touched  # image and mask chunks
        assert touched <= 8  # never the whole 3x3x2 = 18-chunk volume


def test_normalize_modes(blobs: Path) -> None:
    raw = _ds(blobs, normalize=None)[0][0]
    win = _ds(blobs, normalize="window", window=(-50, 50))[0][0]
    np.testing.assert_allclose(win, np.clip((raw + 50) / 100, 0, 1), atol=1e-6)
    z = _ds(blobs, normalize="zscore")[0][0]
    assert np.isfinite(z).all() and not np.array_equal(z, raw)
    with pytest.raises(OptionError, match="unit"):
        _ds(blobs, normalize="unit")  # int16 images have no fixed range
    with pytest.raises(OptionError, match="standardize"):
        _ds(blobs, normalize="standardize")


def test_bad_options(blobs: Path, tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="patch_size"):
        _ds(blobs, patch_size=(16, 16))
    with pytest.raises(OptionError, match="Valid options"):
        PatchDataset(blobs, 2, (8, 8, 8), sample_per_volume=2)  # type: ignore[call-arg]
    with pytest.raises(OptionError, match="cases"):
        _ds(blobs, cases=[0, 7])
    with pytest.raises(OptionError, match="pad_value"):
        _ds(blobs, pad_value=float("nan"))
    from conftest import index_encoded, write_pairs

    images, masks = index_encoded(4, h=8, w=8)
    convert(write_pairs(tmp_path / "flat", images, masks), tmp_path / "flat.zarr", progress=False)
    with pytest.raises(OptionError, match="--layout volumes"):
        PatchDataset(tmp_path / "flat.zarr", 2, (8, 8, 8))


def test_cases_subset_and_state_round_trip(blobs: Path) -> None:
    ds = _ds(blobs, cases=[2], samples_per_volume=4)
    assert len(ds) == 1 and set(ds.batch_indices(0).tolist()) == {2}
    full = _ds(blobs)
    ds_state = full.state()
    full.on_epoch_end()
    again = _ds(blobs)
    again.load_state(full.state())
    np.testing.assert_array_equal(again[0][0], full[0][0])
    assert ds_state["epoch"] == 0


def test_pickle_round_trip_produces_the_same_batches(blobs: Path) -> None:
    ds = _ds(blobs, augment={"hflip": 0.5})
    copy = pickle.loads(pickle.dumps(ds))
    for i in range(len(ds)):
        np.testing.assert_array_equal(copy[i][0], ds[i][0])


@pytest.mark.slow
def test_fit_small_unet3d_on_patches(blobs: Path) -> None:
    from streamseg.models import small_unet3d

    ds = _ds(blobs, batch_size=2, samples_per_volume=2, patch_size=(16, 16, 8), normalize="window",
             window=(-50, 50), workers=2, use_multiprocessing=True)
    model = small_unet3d((16, 16, 8, 1), 3)
    history = model.fit(ds, epochs=2, verbose=0, callbacks=[ds.epoch_callback()])
    assert len(history.history["loss"]) == 2 and np.isfinite(history.history["loss"]).all()
    assert ds.epoch == 2
    ds.close()


def test_normalizer_matches_the_patches(blobs: Path) -> None:
    store = open_store(blobs)
    for kw in ({"normalize": "window", "window": (-50, 50)}, {"normalize": "ct"}, {"normalize": None}):
        ds = _ds(blobs, batch_size=1, foreground_fraction=0.0, **kw)
        (info,) = ds.patch_info(0)
        x, _ = ds[0]
        image, _ = store.read_case(info["case"])
        whole = ds.normalizer()(image)
        lo = [max(0, c) for c in info["corner"]]
        if all(c >= 0 for c in info["corner"]) and all(c + p <= n for c, p, n in zip(info["corner"], (16, 16, 8), SHAPE)):
            box = whole[lo[0]:lo[0] + 16, lo[1]:lo[1] + 16, lo[2]:lo[2] + 8]
            np.testing.assert_allclose(x[0], box, rtol=1e-6, atol=1e-6)


def test_patch_workers_that_fill_the_cores_yield_after_every_patch(blobs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As for 2D batches: worker processes that fill the cores offer their core after every
    patch once set up in a worker; same patches bit for bit."""
    import os

    from streamseg.parallel.workers import usable_cores

    cores = usable_cores()
    assert _ds(blobs, workers=cores, use_multiprocessing=True)._feeder.producer.yield_between_samples is True
    assert _ds(blobs, workers=cores, use_multiprocessing=False)._feeder.producer.yield_between_samples is False
    if cores > 1:
        assert _ds(blobs, workers=cores - 1, use_multiprocessing=True)._feeder.producer.yield_between_samples is False
    calls: list[int] = []
    monkeypatch.setattr(os, "sched_yield", lambda: calls.append(1), raising=False)
    aug = {"hflip": 0.5, "rotate": 10.0}
    ds = _ds(blobs, augment=aug)
    want = ds[1]
    producer = _ds(blobs, augment=aug, workers=cores, use_multiprocessing=True)._feeder.producer
    producer.setup_process()
    slots = {"images": np.zeros_like(want[0]), "masks": np.zeros_like(want[1])}
    n = producer.produce(ds._task(ds._epoch, 1)[1], slots)
    assert len(calls) == n == want[0].shape[0]
    np.testing.assert_array_equal(slots["images"][:n], want[0])
    np.testing.assert_array_equal(slots["masks"][:n], want[1])
