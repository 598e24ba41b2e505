"""Read one DICOM series (a folder of single-frame slices) into a RAS-ordered :class:`Volume`.

Slices are found by reading headers only (``stop_before_pixels``), grouped by
SeriesInstanceUID, ordered by ImagePositionPatient projected on the slice normal (never by
file name), then decoded with pydicom and rescaled to modality units (Hounsfield units for
CT) with RescaleSlope/RescaleIntercept.  The LPS geometry of DICOM (ImageOrientationPatient,
ImagePositionPatient, PixelSpacing, slice step) becomes a RAS affine, and the array is
reoriented to the closest canonical RAS order like every other volume.  May import:
:mod:`streamseg.errors`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, UnreadableFileError, truncate
from ._volume import Volume, canonical_volume, hu_array

__all__ = [
    "read_dicom_series",
    "list_dicom_series",
    "DicomWarning",
    "SliceGapWarning",
    "MultipleSeriesError",
]

#: Files with these suffixes (or none) must be DICOM; other non-DICOM files are skipped.
_DICOM_SUFFIXES = frozenset({"", ".dcm", ".dicom", ".ima", ".dic"})
_DEFAULT_IOP = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
#: Slice gaps may differ from the median step by this much before a warning (mm, fraction).
GAP_TOLERANCE_MM = 0.01
GAP_TOLERANCE_FRACTION = 0.01
_JPEG = "pylibjpeg pylibjpeg-libjpeg"
_J2K = "pylibjpeg pylibjpeg-openjpeg"
_DECODER_HINTS = {
    "1.2.840.10008.1.2.4.50": f"pip install {_JPEG} (or pillow, or python-gdcm)",
    "1.2.840.10008.1.2.4.51": f"pip install {_JPEG} (or pillow, or python-gdcm)",
    "1.2.840.10008.1.2.4.57": f"pip install {_JPEG} (or python-gdcm)",
    "1.2.840.10008.1.2.4.70": f"pip install {_JPEG} (or python-gdcm)",
    "1.2.840.10008.1.2.4.80": f"pip install {_JPEG} (or pyjpegls, or python-gdcm)",
    "1.2.840.10008.1.2.4.81": f"pip install {_JPEG} (or pyjpegls, or python-gdcm)",
    "1.2.840.10008.1.2.4.90": f"pip install {_J2K} (or pillow, or python-gdcm)",
    "1.2.840.10008.1.2.4.91": f"pip install {_J2K} (or pillow, or python-gdcm)",
    "1.2.840.10008.1.2.4.201": f"pip install {_J2K}",
    "1.2.840.10008.1.2.4.202": f"pip install {_J2K}",
    "1.2.840.10008.1.2.4.203": f"pip install {_J2K}",
    "1.2.840.10008.1.2.5": "pip install pylibjpeg pylibjpeg-rle",
}
_ANY_DECODER = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or python-gdcm)"


class DicomWarning(UserWarning):
    """A DICOM series was read, but something about it is questionable."""


class SliceGapWarning(DicomWarning):
    """The slices of a DICOM series are not evenly spaced (a missing slice, a gap)."""


class MultipleSeriesError(InputError):
    """A DICOM folder holds several series and none was picked with ``series_uid``.

    Attributes
    ----------
    series : list of tuple
        ``(SeriesInstanceUID, description, slice count)`` per series.
    """

    def __init__(self, message: str, series: list[tuple[str, str, int]]) -> None:
        super().__init__(message)
        self.series = series


@dataclass(frozen=True)
class _Slice:
    """Header facts of one image file (read without pixel data)."""

    path: Path
    series_uid: str
    description: str
    modality: str
    rows: int
    columns: int
    frames: int
    iop: tuple[float, ...] | None
    ipp: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    thickness: float | None
    rescaled: bool
    slope: float
    intercept: float


def _floats(value: Any, count: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == count and all(np.isfinite(out)) else None


def _number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) and out > 0 else None


def _header(path: Path, ds: Any) -> _Slice:
    spacing = _floats(ds.get("PixelSpacing"), 2) or _floats(ds.get("ImagerPixelSpacing"), 2)
    rescaled = "RescaleSlope" in ds or "RescaleIntercept" in ds
    try:
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as exc:
        raise UnreadableFileError(f"DICOM file {path} has an invalid rescale or frame count "
                                  f"({exc})") from None
    return _Slice(
        path=path,
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        description=str(ds.get("SeriesDescription", "") or ""),
        modality=str(ds.get("Modality", "") or ""),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        frames=frames,
        iop=_floats(ds.get("ImageOrientationPatient"), 6),
        ipp=_floats(ds.get("ImagePositionPatient"), 3),
        pixel_spacing=spacing,  # type: ignore[arg-type]
        thickness=_number(ds.get("SpacingBetweenSlices")) or _number(ds.get("SliceThickness")),
        rescaled=rescaled,
        slope=slope,
        intercept=intercept,
    )


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR")


def _scan(path: Path) -> tuple[list[_Slice], int]:
    """Header-only pass: image slices found, and the number of non-DICOM files skipped."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    slices: list[_Slice] = []
    skipped = 0
    for f in _files(path):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except InvalidDicomError:
            if f.suffix.lower() in _DICOM_SUFFIXES or f == path:
                raise UnreadableFileError(f"Cannot read DICOM file {f}: not a DICOM file (no "
                                          f"DICM preamble or meta header)") from None
            skipped += 1  # notes.txt, thumbnails, ...: not part of the series
            continue
        except Exception as exc:  # pydicom raises assorted errors on truncated/damaged headers
            raise UnreadableFileError(f"Cannot read DICOM file {f}: truncated or damaged "
                                      f"header ({type(exc).__name__}: {truncate(str(exc), 160)})"
                                      ) from None
        if "Rows" not in ds or "Columns" not in ds:
            skipped += 1  # structured reports, RT structures, presentation states: no image
            continue
        slices.append(_header(f, ds))
    return slices, skipped


def _group(slices: list[_Slice]) -> dict[str, list[_Slice]]:
    groups: dict[str, list[_Slice]] = {}
    for s in slices:
        groups.setdefault(s.series_uid, []).append(s)
    return groups


def list_dicom_series(folder: str | os.PathLike) -> list[tuple[str, str, int]]:
    """Return ``(SeriesInstanceUID, SeriesDescription, slice count)`` for each series in ``folder``.

    Reads headers only.  Sorted by UID.
    """
    slices, _ = _scan(Path(folder))
    return [(uid, group[0].description, len(group)) for uid, group in sorted(_group(slices).items())]


def _describe(series: list[tuple[str, str, int]]) -> str:
    return "; ".join(f"{uid or '(no UID)'} ({desc or 'no description'}, {n} slice"
                     f"{'s' if n != 1 else ''})" for uid, desc, n in series)


def read_dicom_series(folder: str | os.PathLike, *, series_uid: str | None = None) -> Volume:
    """Read the DICOM series in ``folder`` as one RAS-ordered volume.

    Parameters
    ----------
    folder : str or os.PathLike
        A folder of single-frame DICOM files (sub-folders are not searched; hidden files,
        ``DICOMDIR`` and non-DICOM files with other suffixes such as ``.txt`` are skipped),
        or one DICOM file (a one-slice volume).
    series_uid : str, optional
        The SeriesInstanceUID to read when the folder holds several series.

    Returns
    -------
    Volume
        ``(X, Y, Z)`` (or ``(X, Y, Z, 3)`` for colour) in RAS order.  With rescale tags the
        values are modality units (HU for CT), ``int16`` when every value is an exact
        integer in int16 range, else ``float32``; without them the stored dtype is kept.

    Raises
    ------
    MultipleSeriesError
        Several series and no ``series_uid``: the message lists UIDs, descriptions and
        slice counts.
    InputError
        No DICOM image in the folder, an unknown ``series_uid``, slices that disagree in
        size or orientation, lack a position, or share one, multi-frame files.
    UnreadableFileError
        A damaged file (named), or compressed pixel data whose decoder is not installed
        (the message says which package to install).

    Warns
    -----
    SliceGapWarning
        Uneven slice spacing: names the gap, its slice positions and files.
    """
    path = Path(folder)
    if not path.exists():
        raise UnreadableFileError(f"No such DICOM folder or file: {path}. Received: "
                                  f"{truncate(str(folder))}")
    slices, skipped = _scan(path)
    if not slices:
        what = ("no files" if not skipped and not any(True for _ in _files(path))
                else f"no DICOM image files ({skipped} other file{'s' if skipped != 1 else ''} skipped)")
        raise InputError(f"Empty DICOM series folder {path}: {what}. Received: {truncate(str(folder))}")
    groups = _group(slices)
    summary = [(uid, g[0].description, len(g)) for uid, g in sorted(groups.items())]
    if series_uid is not None:
        if series_uid not in groups:
            raise InputError(f"No series {series_uid} in {path}; it holds {_describe(summary)}. "
                             f"Received: series_uid={truncate(series_uid)}")
        chosen = groups[series_uid]
    elif len(groups) > 1:
        raise MultipleSeriesError(
            f"DICOM folder {path} holds {len(groups)} series; pass series_uid= one of: "
            f"{_describe(summary)}. Received: {truncate(str(folder))}", summary)
    else:
        chosen = next(iter(groups.values()))
    return _assemble(chosen, str(path))


def _geometry(slices: list[_Slice]) -> tuple[list[_Slice], np.ndarray]:
    """Order slices along their normal and return them with the LPS affine of (col, row, slice)."""
    first = slices[0]
    for s in slices[1:]:
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise InputError(f"DICOM slices differ in size: {first.path.name} is {first.rows}x"
                             f"{first.columns}, {s.path.name} is {s.rows}x{s.columns}. "
                             f"Received: series {truncate(first.series_uid)}")
    if len(slices) == 1:
        iop = np.asarray(first.iop or _DEFAULT_IOP)
        ipp = np.asarray(first.ipp or (0.0, 0.0, 0.0))
    else:
        lacking = next((s for s in slices if s.iop is None or s.ipp is None), None)
        if lacking is not None:
            raise InputError(f"DICOM file {lacking.path} lacks ImagePositionPatient or "
                             f"ImageOrientationPatient; slices cannot be ordered in space. "
                             f"Received: series {truncate(first.series_uid)}")
        iop = np.asarray(first.iop)
        for s in slices[1:]:
            if not np.allclose(s.iop, iop, atol=1e-3):  # type: ignore[arg-type]
                raise InputError(f"DICOM slices differ in ImageOrientationPatient: "
                                 f"{first.path.name} {truncate(first.iop)}, {s.path.name} "
                                 f"{truncate(s.iop)}. Received: series {truncate(first.series_uid)}")
        ipp = np.asarray(first.ipp)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    if np.linalg.norm(normal) < 1e-6:
        raise InputError(f"DICOM file {first.path} has a degenerate ImageOrientationPatient. "
                         f"Received: {truncate(iop.tolist())}")
    normal = normal / np.linalg.norm(normal)
    ordered = sorted(slices, key=lambda s: float(np.dot(s.ipp or (0.0, 0.0, 0.0), normal)))
    pos = np.array([float(np.dot(s.ipp or (0.0, 0.0, 0.0), normal)) for s in ordered])
    if len(ordered) == 1:
        step_vec = normal * (first.thickness or 1.0)
    else:
        diffs = np.diff(pos)
        dup = int(np.argmin(diffs))
        if diffs[dup] < 1e-4:
            raise InputError(f"Two DICOM slices at one position ({pos[dup]:.4g} mm along the "
                             f"normal): {ordered[dup].path.name} and {ordered[dup + 1].path.name}; "
                             f"series with several phases or echoes are not supported. "
                             f"Received: series {truncate(first.series_uid)}")
        step = float(np.median(diffs))
        tol = GAP_TOLERANCE_MM + GAP_TOLERANCE_FRACTION * step
        uneven = np.flatnonzero(np.abs(diffs - step) > tol)
        if uneven.size:
            gaps = ", ".join(
                f"{diffs[i]:.4g} mm between slice positions {pos[i]:.4g} and {pos[i + 1]:.4g} "
                f"({ordered[i].path.name} and {ordered[i + 1].path.name})" for i in uneven[:3])
            more = f" and {uneven.size - 3} more" if uneven.size > 3 else ""
            warnings.warn(f"Uneven slice spacing in DICOM series {first.series_uid or '?'}: gap of "
                          f"{gaps}{more}; the other slices are {step:.4g} mm apart and the "
                          f"volume assumes that spacing throughout", SliceGapWarning, stacklevel=4)
            step_vec = normal * step
        else:  # exact, including any gantry tilt (a sheared affine)
            step_vec = (np.asarray(ordered[-1].ipp) - np.asarray(ordered[0].ipp)) / (len(ordered) - 1)
        ipp = np.asarray(ordered[0].ipp)
    if first.pixel_spacing is None:
        warnings.warn(f"DICOM file {first.path.name} has no PixelSpacing; assuming 1 mm",
                      DicomWarning, stacklevel=4)
    row_spacing, col_spacing = first.pixel_spacing or (1.0, 1.0)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing  # array axis 0: along a row (column index)
    lps[:3, 1] = col_dir * row_spacing  # array axis 1: down a column (row index)
    lps[:3, 2] = step_vec
    lps[:3, 3] = ipp
    return ordered, lps


def _pixels(s: _Slice) -> np.ndarray:
    import pydicom

    try:
        ds = pydicom.dcmread(s.path)
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        try:
            return np.asarray(ds.pixel_array)
        except Exception as exc:
            if ts is not None and getattr(ts, "is_compressed", False) and (
                    isinstance(exc, (RuntimeError, NotImplementedError, ImportError))):
                hint = _DECODER_HINTS.get(str(ts), _ANY_DECODER)
                raise UnreadableFileError(
                    f"Cannot decode DICOM file {s.path}: its pixel data are compressed as "
                    f"{ts.name} and no decoder for it is installed; {hint}") from None
            raise
    except UnreadableFileError:
        raise
    except Exception as exc:  # truncated pixel data, bad VRs, ...: name the file
        raise UnreadableFileError(f"Cannot read DICOM file {s.path}: truncated or damaged pixel "
                                  f"data ({type(exc).__name__}: {truncate(str(exc), 160)})") from None


def _assemble(slices: list[_Slice], source: str) -> Volume:
    multi = next((s for s in slices if s.frames > 1), None)
    if multi is not None:
        raise InputError(f"DICOM file {multi.path} holds {multi.frames} frames; multi-frame "
                         f"(enhanced) DICOM is not supported yet, only one slice per file. "
                         f"Received: {truncate(str(multi.path))}")
    ordered, lps = _geometry(slices)
    raw: np.ndarray | None = None
    for k, s in enumerate(ordered):
        pix = _pixels(s)
        if pix.shape[:2] != (s.rows, s.columns):
            raise UnreadableFileError(f"DICOM file {s.path}: pixel data are {pix.shape}, header "
                                      f"says {s.rows}x{s.columns}")
        if raw is None:
            raw = np.empty((len(ordered),) + pix.shape, dtype=pix.dtype)
        elif pix.shape != raw.shape[1:]:
            raise InputError(f"DICOM slices differ in samples per pixel: {ordered[0].path.name} "
                             f"{raw.shape[1:]}, {s.path.name} {pix.shape}. Received: {source}")
        elif not np.can_cast(pix.dtype, raw.dtype, "safe"):
            raw = raw.astype(np.result_type(raw.dtype, pix.dtype))
        raw[k] = pix
    if raw is None:  # read_dicom_series never passes an empty series
        raise InputError(f"DICOM series without slices. Received: {source}")
    if any(s.rescaled for s in ordered):
        shape = (len(ordered),) + (1,) * (raw.ndim - 1)
        slopes = np.array([s.slope for s in ordered]).reshape(shape)
        inters = np.array([s.intercept for s in ordered]).reshape(shape)
        raw = hu_array(raw, slopes, inters)
    order = (2, 1, 0, 3) if raw.ndim == 4 else (2, 1, 0)
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return canonical_volume(raw.transpose(order), ras, source)
