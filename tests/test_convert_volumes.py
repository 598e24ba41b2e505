"""`convert`, `synth`, `info` and `demo` on medical volumes (issue 12).

Oracles: nibabel (``as_closest_canonical`` volumes and header zooms), the files as written,
and ``slice = rot90(volume[:, :, z])`` (axial display orientation, see
:mod:`streamseg.io.volume_source`).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import index_encoded, save_nifti, write_pairs
from streamseg import OptionError, convert, open_store
from streamseg.cli import main
from streamseg.io.synth_volumes import write_synth_volumes
from streamseg.store.volume_convert import chunk_segments, is_volume_input

SHAPE = (32, 32, 12)
CASES = ("case_000", "case_001", "case_002")


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three CT-like cases, stored LSA on disk (imagesTr/ + labelsTr/), labels 0..3."""
    root = tmp_path_factory.mktemp("vols")
    write_synth_volumes(root, 3, shape=SHAPE, classes=4, orientation="LSA", seed=3)
    return root


def _canonical(path: Path) -> np.ndarray:
    return np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj)


def _volumes(root: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    return [(c, _canonical(root / "imagesTr" / f"{c}.nii.gz"), _canonical(root / "labelsTr" / f"{c}.nii.gz"))
            for c in CASES]


_save = save_nifti


def _error(capsys: pytest.CaptureFixture, *args: object, command: str = "convert") -> str:
    """Run the CLI (quiet: no progress lines) expecting a one-line error with exit 2; return it."""
    rc = main([str(a) for a in args] + (["--quiet"] if command in ("convert", "synth") else []))
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, lines
    assert len(lines) == 1 and lines[0].startswith(f"streamseg {command}: error: "), lines
    return lines[0]


def _no_store(dst: Path) -> None:
    assert not (dst / "manifest.json").exists()
    with pytest.raises(Exception):
        open_store(dst)


# --------------------------------------------------------------------------- #
# the store holds the slices, aligned with their masks
# --------------------------------------------------------------------------- #
def test_convert_volumes_api_names_dtype_and_alignment(synth: Path, tmp_path: Path, backend: str) -> None:
    store = convert(synth, tmp_path / "s", format=backend, chunk_samples=5, progress=False)
    vols = _volumes(synth)
    assert store.names == [f"{c}:{z}" for c, img, _ in vols for z in range(img.shape[2])]
    assert len(store) == sum(img.shape[2] for _, img, _ in vols) == 36
    assert store.image_dtype == np.int16 and store.mask_dtype == np.uint8
    assert store.image_shape == (SHAPE[1], SHAPE[0], 1)  # H = Y, W = X for axial slices
    images, masks = store.read(np.arange(len(store)))
    assert images.min() == -1024  # HU kept, air below zero
    for label in range(4):  # per-label sum and count of the voxels: store slices == nibabel volumes
        want = [(img[lab == label].astype(np.int64).sum(), int((lab == label).sum())) for _, img, lab in vols]
        got = images[..., 0][masks[..., 0] == label].astype(np.int64)
        assert (int(got.sum()), got.size) == (sum(w[0] for w in want), sum(w[1] for w in want)), label
    _, img, lab = vols[1]
    np.testing.assert_array_equal(images[12 + 5, ..., 0], np.rot90(img[:, :, 5]))
    np.testing.assert_array_equal(masks[12 + 5, ..., 0], np.rot90(lab[:, :, 5]))
    cases = store.meta["params"]["source"]["cases"]
    assert [c["name"] for c in cases] == list(CASES)
    assert all(c["orientation"] == "LSA" and c["spacing"] == [1.0, 1.0, 2.5] for c in cases)
    assert cases[0]["labels"] == {str(k): int((vols[0][2] == k).sum()) for k in range(4) if (vols[0][2] == k).any()}


def test_context_channels_and_edges(synth: Path, tmp_path: Path) -> None:
    flat = convert(synth, tmp_path / "flat", chunk_samples=7, progress=False)
    ctx = convert(synth, tmp_path / "ctx", context=2, chunk_samples=7, progress=False)
    assert ctx.image_shape == (SHAPE[1], SHAPE[0], 5) and ctx.names == flat.names
    a, _ = flat.read(np.arange(len(flat)))
    b, _ = ctx.read(np.arange(len(ctx)))
    np.testing.assert_array_equal(b[..., 2], a[..., 0])  # the centre channel is the slice itself
    np.testing.assert_array_equal(b[13, ..., 0], a[12, ..., 0])  # case_001:1, two below: slice 0 (replicated)
    np.testing.assert_array_equal(b[13, ..., 4], a[15, ..., 0])  # two above: slice 3
    np.testing.assert_array_equal(b[11, ..., 4], a[11, ..., 0])  # case_000:11, top edge repeats, never case_001


def test_skip_empty_counts(synth: Path, tmp_path: Path) -> None:
    vols = _volumes(synth)
    fg = [lab.reshape(-1, lab.shape[2]).any(axis=0) for _, _, lab in vols]
    store = convert(synth, tmp_path / "fg", skip_empty=True, progress=False)
    assert store.names == [f"{c}:{z}" for (c, _, _), f in zip(vols, fg) for z in np.flatnonzero(f)]
    some = convert(synth, tmp_path / "some", skip_empty=True, keep_empty=0.5, seed=4, progress=False)
    assert len(some) == sum(int(f.sum()) + int(np.floor(0.5 * (~f).sum() + 0.5)) for f in fg)
    again = convert(synth, tmp_path / "again", skip_empty=True, keep_empty=0.5, seed=4, progress=False)
    assert again.names == some.names  # seeded


def test_size_resizes_context_slices_and_masks_nearest(synth: Path, tmp_path: Path) -> None:
    store = convert(synth, tmp_path / "small", size=(20, 24), context=2, progress=False)
    assert store.image_shape == (20, 24, 5)
    _, masks = store.read(np.arange(len(store)))
    assert set(np.unique(masks)) <= {0, 1, 2, 3}


def test_labels_above_255_remap_or_uint16(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    labels = np.zeros((8, 6, 4), np.uint16)
    labels[2:4], labels[4:] = 7, 1000
    _save(tmp_path / "src" / "images" / "a.nii.gz", np.arange(192, dtype=np.int16).reshape(8, 6, 4), affine)
    _save(tmp_path / "src" / "masks" / "a.nii.gz", labels, affine)
    line = _error(capsys, "convert", tmp_path / "src", tmp_path / "s8")
    assert "labels up to 1000" in line and "--remap-labels" in line
    _no_store(tmp_path / "s8")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "r"), "--remap-labels", "--quiet"]) == 0
    remapped = open_store(tmp_path / "r")
    assert remapped.meta["params"]["source"]["label_table"] == [0, 7, 1000]
    assert remapped.meta["label_values"] == [0, 1, 2] and remapped.mask_dtype == np.uint8
    wide = convert(tmp_path / "src", tmp_path / "u16", mask_dtype="uint16", progress=False)
    assert wide.mask_dtype == np.uint16 and wide.meta["label_values"] == [0, 7, 1000]
    _, masks = wide.read(np.arange(len(wide)))
    np.testing.assert_array_equal(masks[..., 0], np.stack([np.rot90(labels[:, :, z]) for z in range(4)]))


# --------------------------------------------------------------------------- #
# command line: convert, info, synth
# --------------------------------------------------------------------------- #
def test_cli_convert_and_info(synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dst = tmp_path / "s.zarr"
    assert main(["convert", str(synth), str(dst), "--axis", "coronal", "--context", "1", "--quiet"]) == 0
    store = open_store(dst)
    assert len(store) == 3 * SHAPE[1] and store.names[0] == "case_000:0" and store.image_shape[2] == 3
    assert store.image_shape[:2] == (SHAPE[2], SHAPE[0])  # coronal: H = Z, W = X
    capsys.readouterr()
    assert main(["info", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "samples      96" in out  # format_info's lines come first
    assert "volumes      3 cases" in out and "coronal, 96 of 96 slices, context 1" in out
    assert "spacing      1 x 1 x 2.5 mm" in out and "on disk      LSA (3)" in out
    assert "(HU, if CT)" in out and "vol labels   0:" in out
    assert main(["info", str(dst), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    vols = info["volumes"]
    zooms = nib.load(synth / "imagesTr" / "case_000.nii.gz").header.get_zooms()
    assert vols["cases"] == 3 and vols["axis"] == "coronal" and vols["context"] == 1
    assert sorted(v[0] for v in vols["spacing"]) == sorted(float(z) for z in zooms)
    lo = min(int(_canonical(synth / "imagesTr" / f"{c}.nii.gz").min()) for c in CASES)
    hi = max(int(_canonical(synth / "imagesTr" / f"{c}.nii.gz").max()) for c in CASES)
    assert vols["intensity"]["overall"] == [[lo, hi]]
    voxels = collections.Counter()
    for c in CASES:
        voxels.update(collections.Counter(_canonical(synth / "labelsTr" / f"{c}.nii.gz").ravel().tolist()))
    assert vols["labels"] == {str(k): voxels[k] for k in sorted(voxels)}


def test_info_on_a_2d_store_has_no_volume_part(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images, masks = index_encoded(4, h=8, w=8)
    write_pairs(tmp_path / "src", images, masks)
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "s"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "s"), "--json"]) == 0
    assert "volumes" not in json.loads(capsys.readouterr().out)
    assert main(["info", str(tmp_path / "s")]) == 0
    assert "volumes " not in capsys.readouterr().out


def test_synth_volumes_writes_nifti(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dst = tmp_path / "ct"
    assert main(["synth", str(dst), "--volumes", "--count", "2", "--shape", "16", "20", "8",
                 "--spacing", "0.8", "0.8", "3", "--quiet"]) == 0
    assert "wrote 2 CT-like volumes" in capsys.readouterr().out
    for c in ("case_000", "case_001"):
        img, lab = nib.load(dst / "imagesTr" / f"{c}.nii.gz"), nib.load(dst / "labelsTr" / f"{c}.nii.gz")
        assert img.shape == lab.shape == (16, 20, 8)
        assert tuple(float(z) for z in img.header.get_zooms()) == pytest.approx((0.8, 0.8, 3.0))
        data = np.asarray(img.dataobj)
        assert data.dtype == np.int16 and data.min() < -900 and data.max() > 0  # air and tissue in HU
        assert np.asarray(lab.dataobj).max() >= 1
    assert json.loads((dst / "dataset.json").read_text())["numTraining"] == 2
    assert is_volume_input(dst)
    assert "--size" in _error(capsys, "synth", dst, "--volumes", "--size", "8", "8", command="synth")
    assert "--shape" in _error(capsys, "synth", dst, "--shape", "8", "8", "8", command="synth")


# --------------------------------------------------------------------------- #
# bad input: one line, exit 2, nothing that looks like a store
# --------------------------------------------------------------------------- #
def test_bad_volume_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    src, dst = tmp_path / "src", tmp_path / "dst"
    _save(src / "images" / "c1.nii.gz", np.zeros((6, 5, 4), np.int16), affine)
    shifted = affine.copy()
    shifted[0, 3] = 0.5
    _save(src / "masks" / "c1.nii.gz", np.zeros((6, 5, 4), np.uint8), shifted)
    line = _error(capsys, "convert", src, dst)
    assert "Case 'c1'" in line and "affines differ" in line
    _no_store(dst)
    _save(src / "masks" / "c1.nii.gz", np.zeros((6, 5, 3), np.uint8), affine)
    assert "(6, 5, 4)" in _error(capsys, "convert", src, dst)
    _save(src / "masks" / "c1.nii.gz", np.full((6, 5, 4), 0.5, np.float32), affine)
    assert "non-integer" in _error(capsys, "convert", src, dst)
    _save(src / "masks" / "c1.nii.gz", np.zeros((6, 5, 4), np.uint8), affine)
    _save(src / "masks" / "c2.nii.gz", np.zeros((6, 5, 4), np.uint8), affine)
    line = _error(capsys, "convert", src, dst)
    assert "have no image" in line and "c2" in line
    (src / "masks" / "c2.nii.gz").unlink()
    _save(src / "images" / "c3.nii.gz", np.zeros((6, 5, 4), np.int16), affine)
    line = _error(capsys, "convert", src, dst)
    assert "have no mask" in line and "c3" in line
    path = _save(src / "images" / "c3.nii.gz", np.arange(4000, dtype=np.int16).reshape(20, 20, 10), affine)
    _save(src / "masks" / "c3.nii.gz", np.zeros((20, 20, 10), np.uint8), affine)
    path.write_bytes(path.read_bytes()[:-200])
    assert "images/c3.nii.gz" in _error(capsys, "convert", src, dst)
    path.unlink()
    (src / "masks" / "c3.nii.gz").unlink()
    (src / "images" / "c3").mkdir()
    _save(src / "masks" / "c3.nii.gz", np.zeros((6, 5, 4), np.uint8), affine)
    assert "Empty DICOM series folder" in _error(capsys, "convert", src, dst)
    _no_store(dst)


def test_mismatched_affine_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    shifted = affine.copy()
    shifted[1, 3] = 2.0
    _save(tmp_path / "images" / "p.nii.gz", np.zeros((6, 5, 4), np.int16), affine)
    _save(tmp_path / "masks" / "p.nii.gz", np.zeros((6, 5, 4), np.uint8), shifted)
    line = _error(capsys, "convert", tmp_path, tmp_path / "out")
    assert "Case 'p'" in line and "affines differ by up to 2 mm" in line and "masks/p.nii.gz" in line
    _no_store(tmp_path / "out")


def test_refused_options(synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    line = _error(capsys, "convert", synth, tmp_path / "v", "--layout", "volumes", "--context", "1")
    assert "--context" in line and "--layout slices only" in line and line.endswith("Received: context=1")
    line = _error(capsys, "convert", synth, tmp_path / "v", "--layout", "volumes", "--size", "32", "32")
    assert "--size" in line and "--spacing" in line
    line = _error(capsys, "convert", synth, tmp_path / "v", "--chunk-shape", "8", "8", "8")
    assert "--chunk-shape" in line and "applies to --layout volumes" in line
    _no_store(tmp_path / "v")
    images, masks = index_encoded(3, h=8, w=8)
    flat = write_pairs(tmp_path / "flat", images, masks)
    for flag in (["--context", "1"], ["--axis", "axial"], ["--skip-empty"], ["--remap-labels"],
                 ["--layout", "slices"], ["--seed", "1"], ["--spacing", "1", "1", "1"],
                 ["--chunk-shape", "8", "8", "8"]):
        line = _error(capsys, "convert", flat, tmp_path / "f", *flag)
        assert flag[0] in line and "medical volume sources only" in line
    _no_store(tmp_path / "f")
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "y.npy", masks)
    with pytest.raises(OptionError, match="context"):
        convert(images=tmp_path / "x.npy", masks=tmp_path / "y.npy", dst=tmp_path / "a", context=1, progress=False)
    assert "keep_empty applies only with skip_empty" in _error(capsys, "convert", synth, tmp_path / "k",
                                                                "--keep-empty", "0.3")


def test_dicom_series_folders_convert(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from streamseg.io.volumes import read_volume
    from test_volume_source import _dicom_series

    _dicom_series(tmp_path / "images" / "pat1", 4, series="1.2.826.0.1.3680043.8.498.77")
    vol = read_volume(tmp_path / "images" / "pat1")
    _save(tmp_path / "masks" / "pat1.nii.gz", (vol.array > -1024 + 200).astype(np.uint8), vol.affine)
    assert is_volume_input(tmp_path)
    assert main(["convert", str(tmp_path), str(tmp_path / "s"), "--skip-empty", "--quiet"]) == 0
    store = open_store(tmp_path / "s")
    assert store.names == ["pat1:2", "pat1:3"] and store.image_dtype == np.int16
    _dicom_series(tmp_path / "images" / "pat1", 4, series="1.2.826.0.1.3680043.8.498.78")
    assert "series" in _error(capsys, "convert", tmp_path, tmp_path / "s2")


def test_volume_input_detection(tmp_path: Path) -> None:
    (tmp_path / "a" / "images").mkdir(parents=True)
    (tmp_path / "a" / "images" / "x.png").write_bytes(b"")
    assert not is_volume_input(tmp_path / "a")
    (tmp_path / "a" / "images" / "sub").mkdir()  # a stray folder next to 2D images
    assert not is_volume_input(tmp_path / "a")
    (tmp_path / "a" / "images" / "x.png").unlink()
    assert is_volume_input(tmp_path / "a")  # only folders: DICOM series
    (tmp_path / "b" / "imagesTr").mkdir(parents=True)
    assert is_volume_input(tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "y.nii.gz").write_bytes(b"")
    assert is_volume_input(None, images_dir=tmp_path / "c", masks_dir=tmp_path / "c")
    assert not is_volume_input(tmp_path / "nowhere")


# --------------------------------------------------------------------------- #
# workers: whole cases per worker, byte-identical stores
# --------------------------------------------------------------------------- #
def test_chunk_segments() -> None:
    assert chunk_segments([0, 1, 2], 4, 12, None, 2) == [[0], [1], [2]]  # 2D: chunk by chunk
    ranges = [(0, 12), (12, 24), (24, 36)]
    runs = chunk_segments(list(range(9)), 4, 36, ranges, 2)
    assert runs == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # cut where chunks meet case starts
    assert chunk_segments([0, 1, 5, 6, 7, 8], 4, 36, ranges, 2) == [[0, 1], [5, 6, 7], [8]]  # resume gaps split runs
    runs = chunk_segments(list(range(100)), 7, 700, [(i * 35, i * 35 + 35) for i in range(20)], 2)
    assert [k for r in runs for k in r] == list(range(100))
    assert all(r == list(range(r[0], r[-1] + 1)) for r in runs) and 4 <= len(runs) <= 25


@pytest.mark.slow
def test_workers_read_each_case_once_and_match_one_worker(synth: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import streamseg.io.volume_source as vs

    log = tmp_path / "reads.txt"
    original = vs.read_volume

    def counting(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if log.exists():  # only while counting
            with open(log, "a") as fh:
                fh.write(f"{path}\n")
        return original(path, *args, **kwargs)

    monkeypatch.setattr(vs, "read_volume", counting)
    one = convert(synth, tmp_path / "w1", chunk_samples=4, progress=False)
    from streamseg.io.volume_source import VolumeSliceSource
    from streamseg.store.converter import convert_source

    source = VolumeSliceSource(synth, progress=False)  # its checking pass is not counted
    log.write_text("")
    two = convert_source(source, tmp_path / "w2", chunk_samples=4, workers=2, progress=False)
    reads = collections.Counter(Path(p).name for p in log.read_text().split() if "imagesTr" in p)
    assert sum(reads.values()) <= len(CASES) + 1 and max(reads.values()) <= 2, reads  # chunk by chunk: 7
    m1 = json.loads((tmp_path / "w1" / "manifest.json").read_text())
    m2 = json.loads((tmp_path / "w2" / "manifest.json").read_text())
    assert m1["checksums"] == m2["checksums"] and m1["num_chunks"] == 9
    assert one.names == two.names
    for name in ("images", "masks"):
        a = sorted(p.relative_to(tmp_path / "w1") for p in (tmp_path / "w1" / name).rglob("*") if p.is_file())
        assert a == sorted(p.relative_to(tmp_path / "w2") for p in (tmp_path / "w2" / name).rglob("*") if p.is_file())
        assert all((tmp_path / "w1" / f).read_bytes() == (tmp_path / "w2" / f).read_bytes() for f in a)
