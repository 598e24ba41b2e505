"""Tests of streamseg.io.volume_source: medical volumes as a source of 2D slices.

Oracles: nibabel (``as_closest_canonical`` volumes, world coordinates from the affine),
numpy (``np.percentile``), and the files as written.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import save_nifti
from streamseg import open_store
from streamseg.errors import InputError, LabelError, OptionError, SourceMismatchError, UnreadableFileError
from streamseg.io._volume_stats import label_counts, percentiles
from streamseg.io.sources import prepare_pair
from streamseg.io.synth_volumes import write_synth_volumes
from streamseg.io.volume_source import VolumeSliceSource
from streamseg.store.converter import convert_source

SHAPE = (32, 32, 12)
AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three CT-like cases stored LSA on disk (imagesTr/ + labelsTr/), 4 label values."""
    root = tmp_path_factory.mktemp("vols")
    write_synth_volumes(root, 3, shape=SHAPE, classes=4, orientation="LSA", seed=3)
    return root


def _canonical(path: Path | str) -> np.ndarray:
    return np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj)


def _source(root: Path, **kw: object) -> VolumeSliceSource:
    return VolumeSliceSource(root, progress=False, **kw)  # type: ignore[arg-type]


_save = save_nifti


# --------------------------------------------------------------------------- #
# counts, names, alignment, orientation
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("axis", list(AXES))
def test_slice_counts_and_names_follow_the_ras_volume(synth: Path, axis: str) -> None:
    src = _source(synth, axis=axis)
    cases = sorted(p.name[: -len(".nii.gz")] for p in (synth / "imagesTr").iterdir())
    sizes = [_canonical(synth / "labelsTr" / f"{c}.nii.gz").shape[AXES[axis]] for c in cases]
    assert len(src) == sum(sizes)
    expected = [f"{c}:{s}" for c, n in zip(cases, sizes) for s in range(n)]
    assert [src.name(i) for i in range(len(src))] == expected
    plane = [d for a, d in enumerate(SHAPE) if a != AXES[axis]]  # (first, second) in-plane axes
    image, mask, iw, mw = src.load(len(src) - 1)
    assert image.shape == (plane[1], plane[0]) and mask.shape == image.shape
    assert image.dtype == np.int16 and mask.dtype == np.uint8 and image.min() < -900  # HU kept
    assert "case_002.nii.gz" in iw and f"{axis} slice {sizes[-1] - 1}" in iw and "labelsTr" in mw


def test_per_label_means_equal_the_nibabel_volumes(synth: Path) -> None:
    src = _source(synth, axis="coronal")
    sums: dict[int, int] = {}
    counts: dict[int, int] = {}
    for i in range(len(src)):
        image, mask, _, _ = src.load(i)
        for v in np.unique(mask):
            sums[int(v)] = sums.get(int(v), 0) + int(image[mask == v].astype(np.int64).sum())
            counts[int(v)] = counts.get(int(v), 0) + int((mask == v).sum())
    oracle_sums: dict[int, int] = {}
    oracle_counts: dict[int, int] = {}
    for p in sorted((synth / "imagesTr").iterdir()):
        image = _canonical(p).astype(np.int64)
        labels = _canonical(synth / "labelsTr" / p.name)
        for v in np.unique(labels):
            oracle_sums[int(v)] = oracle_sums.get(int(v), 0) + int(image[labels == v].sum())
            oracle_counts[int(v)] = oracle_counts.get(int(v), 0) + int((labels == v).sum())
    assert counts == oracle_counts and sums == oracle_sums
    assert len(counts) == 4  # background, two organs, lesion: the check is not vacuous


def _world_cases(tmp_path: Path) -> Path:
    """One nnU-Net case whose 3 modality files hold 10x the world x, y, z (mm) of each voxel."""
    shape = (6, 5, 4)
    affine = np.array([[-2.0, 0, 0, 20], [0, 0, 1.5, -7], [0, 3.0, 0, 4], [0, 0, 0, 1]])  # L, S, A
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    for c in range(3):
        _save(tmp_path / "imagesTr" / f"w_{c:04d}.nii.gz", np.rint(world[..., c] * 10).astype(np.int16), affine)
    _save(tmp_path / "labelsTr" / "w.nii.gz", np.ones(shape, np.uint8), affine)
    return tmp_path


@pytest.mark.parametrize("axis, up, right", [
    ("axial", 1, 0),     # rows: anterior (+y) at the top; columns toward patient right (+x)
    ("coronal", 2, 0),   # rows: superior (+z) at the top; columns toward +x
    ("sagittal", 2, 1),  # rows: superior at the top; columns toward anterior (+y)
])
def test_display_orientation_in_world_coordinates(tmp_path: Path, axis: str, up: int, right: int) -> None:
    src = _source(_world_cases(tmp_path), axis=axis)
    assert src.cases[0].name == "w" and len(src.cases[0].images) == 3  # nnU-Net modalities stacked
    fixed = 3 - up - right
    for i in range(len(src)):
        image, _, _, _ = src.load(i)
        assert image.shape[2] == 3
        assert np.all(np.diff(image[..., up].astype(int), axis=0) < 0)     # decreasing down the rows
        assert np.all(np.diff(image[..., right].astype(int), axis=1) > 0)  # increasing along columns
        assert np.unique(image[..., fixed]).size == 1                     # one plane of the volume
    firsts = [int(src.load(i)[0][0, 0, fixed]) for i in range(len(src))]
    assert firsts == sorted(firsts) and len(set(firsts)) == len(src)  # slice index grows with RAS


def test_context_stacks_neighbours_with_edges_replicated(synth: Path) -> None:
    flat = _source(synth)
    ctx = _source(synth, context=2)
    assert len(ctx) == len(flat)
    for i in (0, 1, 5, 11, 12, 13, len(flat) - 1):  # case edges, interior, the next case
        case, s = flat.name(i).split(":")
        n = SHAPE[2]
        start = i - int(s)
        image, mask, _, _ = ctx.load(i)
        assert image.shape == (SHAPE[1], SHAPE[0], 5)
        for j, d in enumerate(range(-2, 3)):
            neighbour = start + min(max(int(s) + d, 0), n - 1)
            assert flat.name(neighbour).startswith(case + ":")
            np.testing.assert_array_equal(image[..., j], flat.load(neighbour)[0])
        np.testing.assert_array_equal(mask, flat.load(i)[1])


# --------------------------------------------------------------------------- #
# skip-empty, remap, statistics
# --------------------------------------------------------------------------- #
def test_skip_empty_keeps_foreground_plus_seeded_share(synth: Path) -> None:
    a = _source(synth, skip_empty=True, keep_empty=0.25, seed=7)
    b = _source(synth, skip_empty=True, keep_empty=0.25, seed=7)
    assert [a.name(i) for i in range(len(a))] == [b.name(i) for i in range(len(b))]
    kept = {}
    for i in range(len(a)):
        case, s = a.name(i).split(":")
        kept.setdefault(case, []).append(int(s))
    total = 0
    for p in sorted((synth / "labelsTr").iterdir()):
        labels = _canonical(p)
        has = labels.reshape(-1, labels.shape[2]).any(axis=0)
        fg, empty = set(np.flatnonzero(has)), set(np.flatnonzero(~has))
        case = p.name[: -len(".nii.gz")]
        got = set(kept[case])
        assert fg <= got and got - fg <= empty and len(empty) > 0
        assert len(got - fg) == int(np.floor(0.25 * len(empty) + 0.5))
        total += len(got)
    assert len(a) == total
    none = _source(synth, skip_empty=True)
    assert all(int(none.load(i)[1].max()) > 0 for i in range(len(none)))
    other = _source(synth, skip_empty=True, keep_empty=0.25, seed=8)
    assert len(other) == len(a)


def test_case_records_hold_geometry_and_statistics(synth: Path) -> None:
    src = _source(synth)
    params = json.loads(json.dumps(src.describe()))  # JSON-serialisable as it stands
    assert params["kind"] == "volumes" and params["count"] == len(src) and params["axis"] == "axial"
    rec = params["cases"][1]
    path = synth / "imagesTr" / "case_001.nii.gz"
    image = _canonical(path)
    labels = _canonical(synth / "labelsTr" / "case_001.nii.gz")
    canon = nib.as_closest_canonical(nib.load(path))
    assert rec["name"] == "case_001" and rec["image"] == str(path) and rec["orientation"] == "LSA"
    assert rec["shape"] == list(image.shape) and rec["spacing"] == pytest.approx(canon.header.get_zooms())
    np.testing.assert_allclose(rec["affine"], canon.affine)
    fg = image[labels > 0]
    stats = rec["intensity"]
    assert stats["overall"]["min"] == [int(image.min())] and stats["overall"]["max"] == [int(image.max())]
    assert stats["overall"]["p0_5"] + stats["overall"]["p99_5"] == pytest.approx(
        list(np.percentile(image, [0.5, 99.5])))
    assert stats["foreground"]["p0_5"] + stats["foreground"]["p99_5"] == pytest.approx(
        list(np.percentile(fg, [0.5, 99.5])))
    values, counts = np.unique(labels, return_counts=True)
    assert rec["labels"] == {str(int(v)): int(n) for v, n in zip(values, counts)}
    assert rec["slices"] == image.shape[2] == rec["selected"]


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.uint16, np.float32])
def test_percentiles_equal_numpy(dtype: type) -> None:
    rng = np.random.default_rng(0)
    values = rng.integers(-1500 if dtype == np.int16 else 0, 250 if dtype == np.uint8 else 3000,
                          (17, 13, 7)).astype(dtype)
    if dtype == np.float32:
        values = values + rng.random(values.shape).astype(np.float32)
        values[0, 0, 0] = np.nan  # left out
    expected = np.nanpercentile(values.astype(np.float64), [0.5, 99.5])
    assert percentiles(values) == pytest.approx(list(expected))
    if dtype != np.float32:
        got = label_counts(values.astype(np.uint16) if dtype == np.int16 else values)
        assert sum(got.values()) == values.size


def test_remap_labels_table_and_refusal_above_255(tmp_path: Path) -> None:
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    for name, ids in (("a", (0, 3, 1600)), ("b", (0, 41, 1600))):
        labels = np.zeros((8, 6, 4), np.uint16)
        labels[:2], labels[2:4], labels[4:] = ids
        _save(tmp_path / "images" / f"{name}.nii.gz", np.arange(192, dtype=np.int16).reshape(8, 6, 4), affine)
        _save(tmp_path / "masks" / f"{name}.nii.gz", labels, affine)
    with pytest.raises(LabelError, match=r"labels up to 1600.*--remap-labels") as info:
        _source(tmp_path)
    assert "b.nii.gz" in str(info.value) or "a.nii.gz" in str(info.value)
    src = _source(tmp_path, remap_labels=True)
    assert src.describe()["label_table"] == [0, 3, 41, 1600]
    stored = np.concatenate([src.load(i)[1].ravel() for i in range(len(src))])
    assert stored.dtype == np.uint8 and set(np.unique(stored)) == {0, 1, 2, 3}
    original = np.concatenate([np.asarray(src.describe()["label_table"])[src.load(i)[1]].ravel()
                               for i in range(len(src))])
    oracle = np.concatenate([_canonical(tmp_path / "masks" / f"{n}.nii.gz")[:, :, z].T[::-1].ravel()
                             for n in "ab" for z in range(4)])
    np.testing.assert_array_equal(original, oracle)


def test_integral_float_masks_pass_non_integer_refused(tmp_path: Path) -> None:
    affine = np.eye(4)
    _save(tmp_path / "images" / "c.nii.gz", np.zeros((5, 5, 3), np.int16), affine)
    _save(tmp_path / "masks" / "c.nii.gz", np.full((5, 5, 3), 2.0, np.float32), affine)
    assert int(_source(tmp_path).load(0)[1].max()) == 2
    _save(tmp_path / "masks" / "c.nii.gz", np.full((5, 5, 3), 0.5, np.float32), affine)
    with pytest.raises(LabelError, match=r"Mask .*masks/c\.nii\.gz holds non-integer values"):
        _source(tmp_path)


# --------------------------------------------------------------------------- #
# bad input
# --------------------------------------------------------------------------- #
def test_shape_and_affine_mismatch_name_case_and_both(tmp_path: Path) -> None:
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    _save(tmp_path / "images" / "c1.nii.gz", np.zeros((6, 5, 4), np.int16), affine)
    _save(tmp_path / "masks" / "c1.nii.gz", np.zeros((6, 5, 3), np.uint8), affine)
    with pytest.raises(SourceMismatchError, match=r"Case 'c1'.*\(6, 5, 4\).*\(6, 5, 3\)"):
        _source(tmp_path)
    shifted = affine.copy()
    shifted[0, 3] += 0.01
    _save(tmp_path / "masks" / "c1.nii.gz", np.zeros((6, 5, 4), np.uint8), shifted)
    with pytest.raises(SourceMismatchError, match=r"Case 'c1'.*affines differ by up to 0.01 mm") as info:
        _source(tmp_path)
    assert "0.01]" in str(info.value) and "[1.0, 0.0, 0.0, 0.0]" in str(info.value)  # both affines
    assert "\n" not in str(info.value)
    shifted[0, 3] = 5e-4  # within AFFINE_TOLERANCE_MM
    _save(tmp_path / "masks" / "c1.nii.gz", np.zeros((6, 5, 4), np.uint8), shifted)
    assert len(_source(tmp_path)) == 4


def test_same_grid_in_another_orientation_pairs(tmp_path: Path) -> None:
    """The mask stored LPS, the image RAS, covering the same voxels: they pair after reorienting."""
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    image = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)
    labels = (image % 3).astype(np.uint8)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [5, 4]  # index 5 - i along x, 4 - j along y
    _save(tmp_path / "images" / "c.nii.gz", image, affine)
    _save(tmp_path / "masks" / "c.nii.gz", np.ascontiguousarray(labels[::-1, ::-1]), affine @ flip)
    src = _source(tmp_path)
    for i in range(len(src)):
        img, msk, _, _ = src.load(i)
        np.testing.assert_array_equal(msk, img % 3)


def test_lonely_cases_listed(tmp_path: Path) -> None:
    affine = np.eye(4)
    for k in range(8):
        _save(tmp_path / "images" / f"c{k}.nii.gz", np.zeros((4, 4, 2), np.int16), affine)
    _save(tmp_path / "masks" / "c0.nii.gz", np.zeros((4, 4, 2), np.uint8), affine)
    with pytest.raises(SourceMismatchError, match=r"7 case\(s\) .* no mask .*c1, c2, c3, c4, c5 \(and 2 more\)"):
        _source(tmp_path)
    for k in range(1, 8):
        (tmp_path / "images" / f"c{k}.nii.gz").unlink()
    _save(tmp_path / "masks" / "extra.nii", np.zeros((4, 4, 2), np.uint8), affine)
    with pytest.raises(SourceMismatchError, match=r"1 mask\(s\) .* no image .*: extra\."):
        _source(tmp_path)
    (tmp_path / "masks" / "extra.nii").unlink()
    (tmp_path / "masks" / "c0.nii.gz").rename(tmp_path / "masks" / "c0_seg.nii.gz")
    with pytest.raises(SourceMismatchError, match="--mask-suffix"):
        _source(tmp_path)
    assert _source(tmp_path, mask_suffix="_seg").name(1) == "c0:1"


def test_truncated_gzip_and_empty_series_folder_named(tmp_path: Path) -> None:
    affine = np.eye(4)
    path = _save(tmp_path / "images" / "c.nii.gz", np.arange(4000, dtype=np.int16).reshape(20, 20, 10), affine)
    _save(tmp_path / "masks" / "c.nii.gz", np.zeros((20, 20, 10), np.uint8), affine)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(UnreadableFileError, match=r"images/c\.nii\.gz"):
        _source(tmp_path)
    path.unlink()
    (tmp_path / "images" / "c").mkdir()  # a DICOM series folder, but empty
    with pytest.raises(InputError, match=r"Empty DICOM series folder .*images/c"):
        _source(tmp_path)


def test_no_volumes_missing_folders_and_bad_options(tmp_path: Path, synth: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("not a volume")
    with pytest.raises(InputError, match="No volume files"):
        _source(tmp_path)
    with pytest.raises(UnreadableFileError, match="does not exist"):
        _source(tmp_path / "nowhere")
    (tmp_path / "masks").rmdir()
    with pytest.raises(UnreadableFileError, match="No masks folder"):
        _source(tmp_path)
    for kw, match in (({"axis": "transverse"}, "axis must be one of axial"), ({"context": -1}, "context"),
                      ({"keep_empty": 0.5}, "only with skip_empty"),
                      ({"skip_empty": True, "keep_empty": 1.5}, r"\[0, 1\]"),
                      ({"mask_dtype": "int8"}, "mask_dtype")):
        with pytest.raises(OptionError, match=match):
            _source(synth, **kw)


# --------------------------------------------------------------------------- #
# prepare_pair dtypes, pickling, conversion
# --------------------------------------------------------------------------- #
def test_prepare_pair_keeps_int16_and_float32_and_resizes_them() -> None:
    hu = np.linspace(-1000, 1000, 12 * 16).reshape(12, 16).astype(np.int16)
    mask = (np.arange(12 * 16).reshape(12, 16) % 3).astype(np.uint16)
    image, m = prepare_pair(hu, mask, "i", "m", size=None, channels=None)
    assert image.dtype == np.int16 and image.shape == (12, 16, 1) and image.min() == -1000
    np.testing.assert_array_equal(image[..., 0], hu)
    assert m.dtype == np.uint8 and m.shape == (12, 16, 1)
    small, m2 = prepare_pair(hu, mask, "i", "m", size=(6, 8), channels=None)
    assert small.dtype == np.int16 and small.shape == (6, 8, 1) and small.min() < -900
    assert set(np.unique(m2)) <= {0, 1, 2}
    big, _ = prepare_pair(hu.astype(np.float32), mask, "i", "m", size=(24, 32), channels=None)
    assert big.dtype == np.float32 and big.min() == pytest.approx(-1000.0)
    wide, _ = prepare_pair(hu.astype(np.int32), mask, "i", "m", size=None, channels=None)
    assert wide.dtype == np.int16 and wide.min() == -1000  # signed wider ints fit int16
    five = np.stack([hu + k for k in range(5)], -1)
    kept, _ = prepare_pair(five, mask, "i", "m", size=(6, 8), channels=None, keep_channels=True)
    assert kept.shape == (6, 8, 5) and kept.dtype == np.int16
    with pytest.raises(InputError, match="expected \\(H, W\\), \\(H, W, 3\\)"):
        prepare_pair(five, mask, "i", "m", size=None, channels=None)  # 2D files: 5 channels refused
    with pytest.raises(InputError, match="int16.*uint16 images only"):
        prepare_pair(hu, mask, "i", "m", size=None, channels=None, image_dtype="uint8")
    with pytest.raises(InputError, match="outside both uint16 and int16"):
        prepare_pair(hu.astype(np.int32) * 100, mask, "i", "m", size=None, channels=None)
    big_labels = mask * 600
    m16 = prepare_pair(hu, big_labels, "i", "m", size=None, channels=None, mask_dtype="uint16")[1]
    assert m16.dtype == np.uint16 and int(m16.max()) == 1200
    with pytest.raises(LabelError, match="outside 0..255"):
        prepare_pair(hu, big_labels, "i", "m", size=None, channels=None)


def test_source_pickles_without_its_cache(synth: Path) -> None:
    src = _source(synth, context=1, skip_empty=True, keep_empty=0.5)
    before = [src.load(i) for i in (0, 7, len(src) - 1)]
    clone = pickle.loads(pickle.dumps(src))
    assert clone._cache is None and len(clone) == len(src)
    for i, (image, mask, iw, mw) in zip((0, 7, len(src) - 1), before):
        got = clone.load(i)
        np.testing.assert_array_equal(got[0], image)
        np.testing.assert_array_equal(got[1], mask)
        assert got[2:] == (iw, mw)
    assert len(pickle.dumps(src)) < 64 * 1024  # paths and records, no voxels


@pytest.mark.parametrize("context", [0, 1])
def test_convert_source_end_to_end(synth: Path, tmp_path: Path, context: int) -> None:
    src = _source(synth, context=context, skip_empty=True, keep_empty=0.5)
    store = convert_source(src, tmp_path / "store", chunk_samples=7, progress=False)
    assert store.names == [src.name(i) for i in range(len(src))]
    assert store.image_dtype == np.int16 and store.meta["image_shape"] == [32, 32, 2 * context + 1]
    reopened = open_store(tmp_path / "store")
    images, masks = reopened.read(np.arange(len(src)))
    for i in (0, 6, 7, len(src) - 1):  # both sides of a chunk boundary
        image, mask, _, _ = src.load(i)
        np.testing.assert_array_equal(images[i], image.reshape(32, 32, -1))
        np.testing.assert_array_equal(masks[i, ..., 0], mask)
    assert images.min() < -900  # negative HU survive the store
    params = json.loads((tmp_path / "store" / "manifest.json").read_text())["params"]["source"]
    assert params["kind"] == "volumes" and [c["name"] for c in params["cases"]] == ["case_000", "case_001",
                                                                                     "case_002"]
    assert sum(c["selected"] for c in params["cases"]) == len(store)


def _dicom_series(folder: Path, n: int, *, series: str, rows: int = 6, cols: int = 7) -> None:
    """n axial CT slices (LPS on disk), pixel value = 100 * slice + row, HU = pixel - 1024."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = f"{series}.{k + 1}"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = f"{series}.0", series
        ds.Modality, ds.InstanceNumber = "CT", k + 1
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [-10.0, -8.0, 2.5 * k]
        ds.PixelSpacing = [0.8, 0.9]
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 0
        pixels = 100 * k + np.repeat(np.arange(rows)[:, None], cols, axis=1)
        ds.PixelData = pixels.astype(np.uint16).tobytes()
        ds.save_as(folder / f"s{series.rsplit('.', 1)[-1]}_{k:03d}.dcm", enforce_file_format=True)


def test_dicom_series_folder_is_a_case(tmp_path: Path) -> None:
    from streamseg.io.volumes import read_volume

    _dicom_series(tmp_path / "images" / "pat1", 4, series="1.2.826.0.1.3680043.8.498.77")
    vol = read_volume(tmp_path / "images" / "pat1")
    labels = (vol.array > -1024 + 200).astype(np.uint8)  # slices 2 and 3 are foreground
    _save(tmp_path / "masks" / "pat1.nii.gz", labels, vol.affine)
    src = _source(tmp_path, skip_empty=True)
    assert [src.name(i) for i in range(len(src))] == ["pat1:2", "pat1:3"]
    image, mask, iw, _ = src.load(0)
    assert image.dtype == np.int16 and "pat1" in iw
    # DICOM rows run toward posterior; displayed axial rows have anterior at the top: row r of
    # the file is display row r, so HU grows down the rows
    np.testing.assert_array_equal(image[:, 0], 200 + np.arange(6) - 1024)
    assert src.describe()["cases"][0]["orientation"] == "LPS"
    _dicom_series(tmp_path / "images" / "pat1", 4, series="1.2.826.0.1.3680043.8.498.78")
    with pytest.raises(InputError, match="series"):
        _source(tmp_path)
