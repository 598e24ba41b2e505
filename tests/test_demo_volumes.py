"""``streamseg demo --volumes``: the 3D part (volume store, patch training, sliding-window prediction)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from streamseg import open_store
from streamseg.demo import dice_scores
from streamseg.store.volume_reader import VolumeStore


def _demo(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    code = ("import sys\nfrom streamseg.cli import main\nrc = main(sys.argv[1:])\n"
            "print('tensorflow imported:', 'tensorflow' in sys.modules)\nsys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, "demo", "--volumes", "--out", str(tmp_path / "d"), *extra],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.getcwd()}, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_demo_volumes_trains_on_patches_and_writes_a_prediction(tmp_path: Path) -> None:
    import nibabel as nib

    proc = _demo(tmp_path, "--count", "3", "--size", "64", "--epochs", "1", "--workers", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    out = proc.stdout
    d = tmp_path / "d"
    store = open_store(d / "volumes-3d.zarr")
    assert isinstance(store, VolumeStore) and len(store) == 3 and store.shape(2) == (64, 64, 48)
    slices = open_store(d / "volumes.zarr")  # the 2D part is still there
    assert len(slices) == 3 * 48 and slices.image_shape == (64, 64, 3) and slices.names[0] == "case_000:0"
    assert "volumes      3 cases" in out and "normalize='ct'" in out and "trained on" in out
    assert (d / "preview.png").stat().st_size > 0
    assert "patches/s" in out and "32x32x16 patches of 2 case(s)" in out and "final loss" in out
    pred_path = d / "case_002_prediction.nii.gz"  # the held-out case, next to the store
    assert f"prediction: {pred_path}" in out and "Dice vs its label: label 1 " in out
    pred = nib.load(pred_path)
    label = nib.load(d / "volumes" / "labelsTr" / "case_002.nii.gz")
    assert pred.shape == label.shape == (64, 64, 48)
    np.testing.assert_allclose(pred.affine, label.affine)
    np.testing.assert_allclose(pred.affine, store.affine(2))
    values = np.asarray(pred.dataobj)
    assert values.dtype == np.uint8 and set(np.unique(values)) <= {0, 1, 2}


def test_demo_volumes_no_train_converts_both_stores_only(tmp_path: Path) -> None:
    proc = _demo(tmp_path, "--count", "2", "--size", "32", "--no-train")
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = tmp_path / "d"
    assert isinstance(open_store(d / "volumes-3d.zarr"), VolumeStore)
    assert len(open_store(d / "volumes.zarr")) == 2 * 48
    assert "volume store: 2 cases, chunks 32 x 32 x 32 voxels" in proc.stdout
    assert "tensorflow imported: False" in proc.stdout
    assert not list(d.glob("*_prediction.nii.gz")) and "patches/s" not in proc.stdout


def test_dice_scores() -> None:
    truth = np.zeros((4, 4, 4), np.uint8)
    pred = np.zeros_like(truth)
    truth[:2] = 1  # 32 voxels
    pred[1:3] = 1  # 32 voxels, 16 shared
    truth[3, 0, 0] = 2  # missed entirely
    pred[3, 3, 3] = 3  # predicted only
    assert dice_scores(pred, truth) == {1: 0.5, 2: 0.0, 3: 0.0}
    assert dice_scores(truth, truth) == {1: 1.0, 2: 1.0}
    assert dice_scores(np.zeros_like(truth), np.zeros_like(truth)) == {}


@pytest.mark.slow
def test_prediction_normalisation_matches_the_patches(tmp_path: Path) -> None:
    """The demo feeds predict_volume the normalisation PatchDataset trained on (normalize='ct')."""
    from streamseg import convert
    from streamseg.demo import _ct_function
    from streamseg.io.synth_volumes import write_synth_volumes
    from streamseg.pipeline.patches import PatchDataset

    write_synth_volumes(tmp_path / "src", 2, shape=(40, 40, 24), seed=3, progress=False)
    store = convert(tmp_path / "src", tmp_path / "v", layout="volumes", chunk_shape=(16, 16, 16), progress=False)
    ds = PatchDataset(store, 4, (16, 16, 8), samples_per_volume=4, foreground_fraction=0.5, normalize="ct",
                      workers=0, shuffle=False)
    x, _ = ds[0]
    norm = _ct_function(ds.options)
    size = (16, 16, 8)
    for j, info in enumerate(ds.patch_info(0)):
        corner, shape = info["corner"], store.shape(info["case"])
        raw, _ = store.read_patch(info["case"], corner, size)
        inside = tuple(slice(max(0, -c), min(p, n - c)) for c, p, n in zip(corner, size, shape))  # in the volume
        expected = norm(raw.astype(np.float32))[inside]
        np.testing.assert_allclose(x[j][inside], expected, rtol=1e-6, atol=1e-5)
