"""Tests of streamseg.io.volumes / dicom / synth_volumes: reading medical volumes into RAS order.

Oracles come from the field's own libraries: nibabel's ``as_closest_canonical`` for NIfTI,
pydicom's ``apply_modality_lut`` for HU, SimpleITK's own NIfTI writer for NRRD/MHA.
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

import streamseg
from streamseg.errors import InputError, OptionError, UnreadableFileError
from streamseg.io.dicom import MultipleSeriesError, SliceGapWarning, list_dicom_series
from streamseg.io.synth_volumes import synth_volume, write_synth_volumes
from streamseg.io.volumes import case_name, group_cases, read_case, read_volume, volume_suffix

# --------------------------------------------------------------------------- #
# NIfTI
# --------------------------------------------------------------------------- #
_LSA = np.array([[-2.0, 0, 0, 10], [0, 0, 3.0, -5], [0, 1.5, 0, 7], [0, 0, 0, 1]])


def _oblique() -> np.ndarray:
    """LSA-like axis order, rotated 25 degrees about Z and 10 about X: truly oblique."""
    t, u = np.deg2rad(25.0), np.deg2rad(10.0)
    rz = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(u), -np.sin(u)], [0, np.sin(u), np.cos(u)]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ _LSA[:3, :3]
    aff[:3, 3] = [-3.0, 4.0, 12.0]
    return aff


AFFINES = {
    "RAS": np.diag([0.8, 0.9, 2.5, 1.0]),
    "LSA": _LSA,
    "oblique": _oblique(),
    "LPI": np.diag([-1.0, -1.0, -2.0, 1.0]),
    # I, L, A: flipped axes that also move (catches shape mix-ups in the affine's offsets)
    "ILA": np.array([[0, -1.0, 0, 4], [0, 0, 1.2, -8], [-2.0, 0, 0, 30], [0, 0, 0, 1]]),
}


def _int16_volume(shape: tuple[int, ...] = (6, 7, 5)) -> np.ndarray:
    n = int(np.prod(shape))
    return (np.arange(n, dtype=np.int32) * 37 % 3001 - 1500).astype(np.int16).reshape(shape)


def _save(path: Path, data: np.ndarray, affine: np.ndarray, *, endian: str = "<") -> Path:
    header = nib.Nifti1Header() if endian == "<" else nib.Nifti1Header().as_byteswapped(">")
    header.set_data_dtype(data.dtype)
    img = nib.Nifti1Image(data, affine, header)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)
    return path


@pytest.mark.parametrize("name", sorted(AFFINES))
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_is_reoriented_like_as_closest_canonical(tmp_path: Path, name: str, suffix: str) -> None:
    data = _int16_volume()
    path = _save(tmp_path / f"v{suffix}", data, AFFINES[name])
    canon = nib.as_closest_canonical(nib.load(path))
    vol = read_volume(path)
    expected = np.asanyarray(canon.dataobj)
    assert vol.array.dtype == np.int16 and vol.array.dtype.isnative
    assert vol.array.shape == canon.shape  # slice counts after reorientation
    np.testing.assert_array_equal(vol.array, expected)
    np.testing.assert_allclose(vol.affine, canon.affine, atol=1e-6)
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    assert vol.orientation == nib.aff2axcodes(AFFINES[name])
    np.testing.assert_allclose(vol.spacing, canon.header.get_zooms()[:3], rtol=1e-6)
    assert vol.source == str(path)
    assert vol.array.min() < 0  # the negatives survived
    assert vol.array.flags.c_contiguous


def test_lsa_volume_permutes_and_flips_axes(tmp_path: Path) -> None:
    data = _int16_volume((4, 5, 6))
    vol = read_volume(_save(tmp_path / "lsa.nii.gz", data, _LSA))
    # L -> flip axis 0 to R; S on disk axis 1 -> RAS axis 2; A on disk axis 2 -> RAS axis 1.
    np.testing.assert_array_equal(vol.array, data[::-1].transpose(0, 2, 1))
    assert vol.spatial_shape == (4, 6, 5) and vol.channels == 1
    assert vol.spacing == pytest.approx((2.0, 3.0, 1.5))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_big_endian_int16_reads_as_native_int16(tmp_path: Path, suffix: str) -> None:
    data = _int16_volume()
    path = _save(tmp_path / f"be{suffix}", data, np.eye(4), endian=">")
    assert nib.load(path).header.endianness == ">"  # the file really is big-endian
    vol = read_volume(path)
    assert vol.array.dtype == np.dtype("int16") and vol.array.dtype.isnative
    np.testing.assert_array_equal(vol.array, data)


@pytest.mark.parametrize("dtype, expected", [(np.uint8, np.uint8), (np.float32, np.float32),
                                             (np.float64, np.float32), (np.uint16, np.uint16)])
def test_stored_dtype_is_kept(tmp_path: Path, dtype: type, expected: type) -> None:
    data = (np.arange(60).reshape(3, 4, 5) % 200).astype(dtype)
    vol = read_volume(_save(tmp_path / "d.nii.gz", data, np.eye(4)))
    assert vol.array.dtype == expected
    np.testing.assert_array_equal(vol.array, data.astype(expected))


def test_exact_header_scaling_gives_int16_inexact_float32(tmp_path: Path) -> None:
    raw = _int16_volume() // 4
    img = nib.Nifti1Image(raw, np.eye(4))
    img.set_data_dtype(np.int16)
    img.header.set_slope_inter(2.0, -5.0)
    nib.save(img, tmp_path / "exact.nii")
    vol = read_volume(tmp_path / "exact.nii")
    assert vol.array.dtype == np.int16
    np.testing.assert_array_equal(vol.array, raw.astype(np.int32) * 2 - 5)
    img.header.set_slope_inter(0.5, 0.25)
    nib.save(img, tmp_path / "half.nii")
    vol = read_volume(tmp_path / "half.nii")
    assert vol.array.dtype == np.float32
    np.testing.assert_allclose(vol.array, raw * 0.5 + 0.25)
    np.testing.assert_allclose(vol.array, nib.load(tmp_path / "half.nii").get_fdata(), rtol=1e-6)


def test_4d_nifti_becomes_channels(tmp_path: Path) -> None:
    data = _int16_volume((5, 6, 4, 4))  # BraTS-like: four modalities
    path = _save(tmp_path / "brats.nii.gz", data, _LSA)
    vol = read_volume(path)
    canon = nib.as_closest_canonical(nib.load(path))
    assert vol.array.shape == (5, 4, 6, 4) and vol.channels == 4
    np.testing.assert_array_equal(vol.array, np.asanyarray(canon.dataobj))
    np.testing.assert_array_equal(vol.array[..., 2], data[::-1, :, :, 2].transpose(0, 2, 1))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_truncated_nifti_is_one_line_error_naming_the_file(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    good = _save(tmp_path / f"good{suffix}", rng.integers(-900, 900, (30, 30, 20)).astype(np.int16),
                 np.eye(4))
    bad = tmp_path / f"truncated{suffix}"
    raw = good.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UnreadableFileError) as info:
        read_volume(bad)
    assert f"truncated{suffix}" in str(info.value) and "\n" not in str(info.value)
    junk = tmp_path / f"junk{suffix}"
    junk.write_bytes(b"not a volume at all")
    with pytest.raises(UnreadableFileError, match="junk"):
        read_volume(junk)


def test_missing_and_unknown_paths(tmp_path: Path) -> None:
    with pytest.raises(UnreadableFileError, match="nope.nii.gz"):
        read_volume(tmp_path / "nope.nii.gz")
    (tmp_path / "v.xyz").write_bytes(b"x")
    with pytest.raises(InputError, match=r"unknown volume format \.xyz"):
        read_volume(tmp_path / "v.xyz")
    with pytest.raises(InputError, match="DICOM folders only"):
        read_volume(_save(tmp_path / "a.nii", _int16_volume(), np.eye(4)), series_uid="1.2")


def test_public_api_exports_read_volume() -> None:
    assert streamseg.read_volume is read_volume
    assert "Volume" in streamseg.__all__ and "read_volume" in streamseg.__all__
    assert streamseg.Volume.__name__ == "Volume"


# --------------------------------------------------------------------------- #
# nnU-Net per-modality cases
# --------------------------------------------------------------------------- #
def test_suffixes_and_case_names() -> None:
    assert volume_suffix("a/case_001_0000.NII.GZ") == ".nii.gz"
    assert volume_suffix("x.mha") == ".mha"
    assert case_name("case_001_0003.nii.gz", nnunet=True) == "case_001"
    assert case_name("case_001_0003.nii.gz") == "case_001_0003"
    assert case_name("case_001.nii.gz", nnunet=True) == "case_001"


def test_group_cases_detects_nnunet_naming() -> None:
    images = [Path(f"imagesTr/c{i}_{m:04d}.nii.gz") for i in (2, 1) for m in (1, 0)]
    groups = group_cases(images)
    assert list(groups) == ["c1", "c2"]
    assert [p.name for p in groups["c1"]] == ["c1_0000.nii.gz", "c1_0001.nii.gz"]
    labels = [Path(f"labelsTr/c{i}.nii.gz") for i in (1, 2)]
    assert {k: len(v) for k, v in group_cases(labels).items()} == {"c1": 1, "c2": 1}
    # Names ending in four digits but without any _0000 are single-modality cases.
    numbered = [Path(f"p_{i:04d}.nii.gz") for i in (1, 2, 3)]
    assert list(group_cases(numbered)) == ["p_0001", "p_0002", "p_0003"]
    assert list(group_cases([Path("p_0000.nii"), Path("p_0001.nii")], nnunet=False)) == \
        ["p_0000", "p_0001"]
    with pytest.raises(InputError, match="c2_0001"):
        group_cases([Path("c1_0000.nii.gz"), Path("c1_0001.nii.gz"), Path("c2_0000.nii.gz")])


def test_read_case_stacks_modalities_and_rejects_mismatches(tmp_path: Path) -> None:
    a, b = _int16_volume(), _int16_volume()[::-1].copy()
    pa = _save(tmp_path / "case_0000.nii.gz", a, _LSA)
    pb = _save(tmp_path / "case_0001.nii.gz", b, _LSA)
    vol = read_case(group_cases([pb, pa])["case"])
    assert vol.array.shape == read_volume(pa).array.shape + (2,) and vol.array.dtype == np.int16
    np.testing.assert_array_equal(vol.array[..., 0], read_volume(pa).array)
    np.testing.assert_array_equal(vol.array[..., 1], read_volume(pb).array)
    moved = _LSA.copy()
    moved[0, 3] += 0.5
    pc = _save(tmp_path / "moved_0001.nii.gz", b, moved)
    with pytest.raises(InputError, match=r"case_0000\.nii\.gz and moved_0001\.nii\.gz"):
        read_case([pa, pc])
    pd = _save(tmp_path / "small_0001.nii.gz", _int16_volume((6, 7, 4)), _LSA)
    with pytest.raises(InputError, match="small_0001.nii.gz"):
        read_case([pa, pd])


# --------------------------------------------------------------------------- #
# DICOM
# --------------------------------------------------------------------------- #
_UID = "1.2.826.0.1.3680043.8.498"


def _ct_slice(path: Path, pixels: np.ndarray, ipp: tuple[float, float, float], *,
              iop: tuple[float, ...] = (1, 0, 0, 0, 1, 0), spacing: tuple[float, float] = (0.7, 0.8),
              series: str = f"{_UID}.1", desc: str = "AXIAL", slope: float = 1.0,
              intercept: float = -1024.0, number: int = 1) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = f"{series}.{number}"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = f"{_UID}.100"
    ds.SeriesInstanceUID = series
    ds.SeriesDescription = desc
    ds.Modality = "CT"
    ds.InstanceNumber = number
    ds.ImageOrientationPatient = [float(v) for v in iop]
    ds.ImagePositionPatient = [float(v) for v in ipp]
    ds.PixelSpacing = [float(v) for v in spacing]
    ds.SliceThickness = 2.5
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _raw_slice(k: int, rows: int = 12, cols: int = 16) -> np.ndarray:
    r, c = np.mgrid[:rows, :cols]
    return (k * 200 + r * cols + c).astype(np.uint16)


def _axial_series(folder: Path, n: int = 8, *, z0: float = -20.0, step: float = 2.5,
                  skip: tuple[int, ...] = (), seed: int = 0, **kw: object) -> list[float]:
    """Write n axial slices (slice k holds _raw_slice(k)) under shuffled random-looking names."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ks = [k for k in range(n + len(skip)) if k not in skip]
    names = [f"{int(v):08x}.dcm" for v in rng.choice(16**8, len(ks), replace=False)]
    order = rng.permutation(len(ks))
    for name, idx in zip(names, order):
        k = ks[idx]
        _ct_slice(folder / name, _raw_slice(k), (-50.0, -40.0, z0 + step * k), number=int(idx) + 1,
                  **kw)  # type: ignore[arg-type]
    return [z0 + step * k for k in ks]


def test_axial_series_sorted_by_position_with_hu_and_geometry(tmp_path: Path) -> None:
    _axial_series(tmp_path / "ct")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an even series warns of nothing
        vol = read_volume(tmp_path / "ct")
    rows, cols = 12, 16
    assert vol.array.shape == (cols, rows, 8) and vol.array.dtype == np.int16
    # LPS on disk: columns run toward patient Left, rows toward Posterior -> both flipped in RAS.
    assert vol.orientation == ("L", "P", "S") and nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    for k in range(8):
        expected = _raw_slice(k).astype(np.int32) - 1024
        np.testing.assert_array_equal(vol.array[:, :, k], expected[::-1, ::-1].T)
    assert vol.array.min() == -1024 and vol.array.max() == 7 * 200 + rows * cols - 1 - 1024
    assert vol.spacing == pytest.approx((0.8, 0.7, 2.5))
    # voxel (0, 0, 0) is pixel (row 11, column 15) of the lowest slice, in RAS mm
    lps = np.array([-50.0 + 15 * 0.8, -40.0 + 11 * 0.7, -20.0])
    np.testing.assert_allclose(vol.affine[:3, 3], lps * [-1, -1, 1])
    np.testing.assert_allclose(vol.affine[:3, :3], np.diag([0.8, 0.7, 2.5]), atol=1e-9)


def test_coronal_series_is_permuted_to_ras(tmp_path: Path) -> None:
    folder = tmp_path / "cor"
    folder.mkdir()
    # rows along +x (Left), columns downward (-z); normal = +y (Posterior); y decreasing order
    for i, k in enumerate([3, 0, 4, 1, 2]):
        _ct_slice(folder / f"z{i}.dcm", _raw_slice(k, 6, 5), (0.0, 10.0 * k, 30.0),
                  iop=(1, 0, 0, 0, 0, -1), spacing=(2.0, 1.0), number=i + 1)
    vol = read_volume(folder)
    # on disk (columns, rows, slices) = (L, I, P) -> RAS: x from columns, y from slices, z from rows
    assert vol.orientation == ("L", "I", "P")
    assert vol.array.shape == (5, 5, 6) and vol.spacing == pytest.approx((1.0, 10.0, 2.0))
    for k in range(5):  # slice at y = 10k mm (posterior); RAS j grows anterior -> j = 4 - k
        np.testing.assert_array_equal(vol.array[:, 4 - k, :],
                                      (_raw_slice(k, 6, 5).astype(np.int32) - 1024)[::-1, ::-1].T)
    # voxel (i, 4 - k, m) is pixel (row 5 - m, column 4 - i) of slice k; DICOM puts it at
    # LPS = IPP + column * 1.0 * (1, 0, 0) + row * 2.0 * (0, 0, -1)
    for i, k, m in [(0, 0, 0), (4, 3, 2), (1, 4, 5)]:
        r, c = 5 - m, 4 - i
        lps = np.array([0.0 + c * 1.0, 10.0 * k, 30.0 - 2.0 * r])
        np.testing.assert_allclose(vol.affine @ [i, 4 - k, m, 1], [*(lps * [-1, -1, 1]), 1])


def test_two_series_in_one_folder_lists_them_and_series_uid_picks(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    _axial_series(folder, 4, series=f"{_UID}.7", desc="SOFT TISSUE")
    _axial_series(folder, 3, series=f"{_UID}.8", desc="LUNG", seed=1, intercept=-1000.0)
    with pytest.raises(MultipleSeriesError) as info:
        read_volume(folder)
    msg = str(info.value)
    assert f"{_UID}.7 (SOFT TISSUE, 4 slices)" in msg and f"{_UID}.8 (LUNG, 3 slices)" in msg
    assert "series_uid" in msg and "\n" not in msg
    assert isinstance(info.value, InputError)
    assert list_dicom_series(folder) == [(f"{_UID}.7", "SOFT TISSUE", 4), (f"{_UID}.8", "LUNG", 3)]
    vol = read_volume(folder, series_uid=f"{_UID}.8")
    assert vol.array.shape[2] == 3 and vol.array.min() == -1000
    with pytest.raises(InputError, match=r"No series 9\.9"):
        read_volume(folder, series_uid="9.9")


def test_slice_gap_warns_and_names_it(tmp_path: Path) -> None:
    positions = _axial_series(tmp_path / "gap", 6, skip=(3,))
    assert positions[3] - positions[2] == 5.0
    with pytest.warns(SliceGapWarning) as record:
        vol = read_volume(tmp_path / "gap")
    msg = str(record[0].message)
    assert "5 mm between slice positions -15 and -10" in msg and ".dcm and " in msg
    assert vol.array.shape[2] == 6
    np.testing.assert_array_equal(vol.array[:, :, 3], (_raw_slice(4).astype(np.int32) - 1024)[::-1, ::-1].T)


def test_fractional_rescale_gives_float32(tmp_path: Path) -> None:
    _axial_series(tmp_path / "pet", 3, slope=0.5, intercept=0.25)
    vol = read_volume(tmp_path / "pet")
    assert vol.array.dtype == np.float32
    np.testing.assert_allclose(vol.array[:, :, 1], (_raw_slice(1) * 0.5 + 0.25)[::-1, ::-1].T)


def test_empty_and_non_dicom_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="Empty DICOM series folder .*empty: no files"):
        read_volume(tmp_path / "empty")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    with pytest.raises(InputError, match="no DICOM image files"):
        read_volume(tmp_path / "notes")


def test_unreadable_dicom_file_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    _axial_series(folder, 3)
    (folder / "readme.txt").write_text("skipped: not a DICOM suffix")
    (folder / "zz_broken.dcm").write_bytes(b"\x00" * 50)
    with pytest.raises(UnreadableFileError, match="zz_broken.dcm") as info:
        read_volume(folder)
    assert "\n" not in str(info.value)
    (folder / "zz_broken.dcm").unlink()
    victim = sorted(folder.glob("*.dcm"))[0]
    victim.write_bytes(victim.read_bytes()[:-100])  # pixel data cut short
    with pytest.raises(UnreadableFileError, match=victim.name):
        read_volume(folder)


def test_pydicom_shipped_ct_example_hu_range(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_modality_lut

    src = get_testdata_file("CT_small.dcm", download=False)
    if src is None:
        pytest.skip("pydicom's CT_small.dcm is not shipped offline")
    shutil.copy(src, tmp_path / "CT_small.dcm")
    ds = pydicom.dcmread(src)
    hu = apply_modality_lut(ds.pixel_array, ds)
    vol = read_volume(tmp_path)
    assert vol.array.shape == (ds.Columns, ds.Rows, 1) and vol.array.dtype == np.int16
    assert (vol.array.min(), vol.array.max()) == (hu.min(), hu.max())
    np.testing.assert_array_equal(vol.array[:, :, 0], hu[::-1, ::-1].T)
    assert vol.spacing == pytest.approx((float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0]),
                                         float(ds.SliceThickness)))
    np.testing.assert_array_equal(read_volume(tmp_path / "CT_small.dcm").array, vol.array)


def test_compressed_without_decoder_says_what_to_install(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    for module in ("pylibjpeg", "jpeg_ls", "gdcm"):
        if module in sys.modules or __import__("importlib.util").util.find_spec(module):
            pytest.skip(f"a JPEG-LS decoder ({module}) is installed")
    src = get_testdata_file("MR_small_jpeg_ls_lossless.dcm", download=False)
    if src is None:
        pytest.skip("pydicom's JPEG-LS example is not shipped offline")
    shutil.copy(src, tmp_path / "mr.dcm")
    with pytest.raises(UnreadableFileError) as info:
        read_volume(tmp_path)
    msg = str(info.value)
    assert "mr.dcm" in msg and "JPEG-LS" in msg and "pip install pylibjpeg pylibjpeg-libjpeg" in msg


# --------------------------------------------------------------------------- #
# NRRD / MetaImage (optional extra)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd"])
def test_itk_formats_match_itks_own_nifti(tmp_path: Path, suffix: str) -> None:
    sitk = pytest.importorskip("SimpleITK")
    data = _int16_volume((5, 6, 7))  # numpy (z, y, x) as SimpleITK wants it
    img = sitk.GetImageFromArray(data)
    img.SetSpacing((0.7, 0.9, 2.0))
    img.SetOrigin((12.0, -30.0, 5.0))
    img.SetDirection((-1, 0, 0, 0, 0, 1, 0, -1, 0))  # a non-trivial LPS direction
    sitk.WriteImage(img, str(tmp_path / f"v{suffix}"))
    sitk.WriteImage(img, str(tmp_path / "v.nii.gz"))  # ITK's own LPS -> RAS conversion
    vol, ref = read_volume(tmp_path / f"v{suffix}"), read_volume(tmp_path / "v.nii.gz")
    assert vol.array.dtype == np.int16
    np.testing.assert_array_equal(vol.array, ref.array)
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-5)
    assert vol.orientation == ref.orientation and nib.aff2axcodes(vol.affine) == ("R", "A", "S")


def test_itk_vector_image_becomes_channels(tmp_path: Path) -> None:
    sitk = pytest.importorskip("SimpleITK")
    data = _int16_volume((4, 5, 6, 3))
    sitk.WriteImage(sitk.GetImageFromArray(data, isVector=True), str(tmp_path / "rgb.nrrd"))
    vol = read_volume(tmp_path / "rgb.nrrd")
    # identity LPS direction -> x and y flipped in RAS
    np.testing.assert_array_equal(vol.array, data.transpose(2, 1, 0, 3)[::-1, ::-1])


def test_missing_simpleitk_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "v.nrrd").write_bytes(b"NRRD0004\n")
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # import fails as if not installed
    with pytest.raises(UnreadableFileError, match=r"pip install 'streamseg\[volumes\]'"):
        read_volume(tmp_path / "v.nrrd")


# --------------------------------------------------------------------------- #
# synthetic CT volumes
# --------------------------------------------------------------------------- #
def test_synth_volume_is_deterministic_ct_like() -> None:
    image, labels, affine = synth_volume(3, index=1)
    again = synth_volume(3, index=1)
    np.testing.assert_array_equal(image, again[0])
    np.testing.assert_array_equal(labels, again[1])
    assert not np.array_equal(image, synth_volume(3, index=2)[0])
    assert image.shape == labels.shape == (96, 96, 64)
    assert image.dtype == np.int16 and labels.dtype == np.uint8 and affine.dtype == np.float64
    assert set(np.unique(labels)) == {0, 1, 2}
    assert 0 < np.mean(labels == 2) < 0.01  # lesions: small
    assert abs(np.median(image[0]) + 1000) < 50  # air at the edge
    assert 30 < np.median(image[labels == 1]) < 90  # organ in soft-tissue HU
    np.testing.assert_allclose(np.diag(affine)[:3], (1.0, 1.0, 2.5))


def test_synth_volume_classes_and_options() -> None:
    _, labels, _ = synth_volume(0, (32, 24, 16), (1.5, 1.5, 3.0), classes=5)
    assert labels.max() <= 4 and 4 in labels
    _, labels2, _ = synth_volume(0, (32, 24, 16), classes=2)
    assert set(np.unique(labels2)) == {0, 1}
    with pytest.raises(OptionError, match="shape"):
        synth_volume(0, (32, 24))
    with pytest.raises(OptionError, match="orientation"):
        write_synth_volumes("unused", 1, orientation="RRS")


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "ILA"])
def test_written_synth_volumes_read_back_in_ras(tmp_path: Path, orientation: str) -> None:
    pairs = write_synth_volumes(tmp_path / "ds", 2, shape=(24, 20, 12), spacing=(1.0, 1.2, 2.0),
                                seed=5, orientation=orientation)
    assert [p.name for p, _ in pairs] == ["case_000.nii.gz", "case_001.nii.gz"]
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert meta["numTraining"] == 2 and meta["training"][1]["label"] == "./labelsTr/case_001.nii.gz"
    for i, (img_path, lbl_path) in enumerate(pairs):
        assert "".join(nib.aff2axcodes(nib.load(img_path).affine)) == orientation
        image, labels, affine = synth_volume(5, (24, 20, 12), (1.0, 1.2, 2.0), index=i)
        vol, lab = read_volume(img_path), read_volume(lbl_path)
        np.testing.assert_array_equal(vol.array, image)
        np.testing.assert_array_equal(lab.array, labels)
        assert vol.array.dtype == np.int16 and lab.array.dtype == np.uint8
        np.testing.assert_allclose(vol.affine, affine, atol=1e-5)
        assert "".join(vol.orientation) == orientation
