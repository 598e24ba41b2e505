"""Read medical volumes (NIfTI, NRRD/MHA/MHD, DICOM series) into RAS-ordered arrays.

:func:`read_volume` dispatches on the path: ``.nii`` / ``.nii.gz`` through nibabel, ``.nrrd``
/ ``.nhdr`` / ``.mha`` / ``.mhd`` through SimpleITK (the optional ``volumes`` extra), a folder
(or a single ``.dcm`` file) through pydicom (:mod:`streamseg.io.dicom`).  Every result is a
:class:`Volume` whose array is reoriented to the closest canonical RAS order, so that volumes
of one data set line up whatever their on-disk orientation.

:func:`read_case` stacks nnU-Net-style per-modality files (``case_0000.nii.gz``,
``case_0001.nii.gz``) as channels; :func:`case_name` and :func:`group_cases` name and group
them.  May import: :mod:`streamseg.errors`.

Examples
--------
>>> vol = read_volume("ct/case_001.nii.gz")                      # doctest: +SKIP
>>> vol.array.shape, vol.array.dtype, vol.orientation             # doctest: +SKIP
((512, 512, 200), dtype('int16'), ('L', 'P', 'S'))
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..errors import InputError, UnreadableFileError, truncate
from ._volume import Volume, canonical_volume, hu_array

__all__ = [
    "Volume",
    "read_volume",
    "read_case",
    "case_name",
    "group_cases",
    "volume_suffix",
    "VOLUME_SUFFIXES",
]

#: File suffixes :func:`read_volume` reads (``.nii.gz`` counts as one suffix).
VOLUME_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
_ITK_SUFFIXES = frozenset({".nrrd", ".nhdr", ".mha", ".mhd"})
_NNUNET = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_ITK_HINT = ("install the optional extra: pip install 'streamseg[volumes]' "
             "(or pip install SimpleITK)")
#: Same affine means: every entry of the two 4x4 matrices within this many millimetres.
AFFINE_TOLERANCE_MM = 1e-3


def volume_suffix(path: str | os.PathLike) -> str:
    """Return the volume suffix of ``path``, lower-case, ``.nii.gz`` as one (``''`` if none)."""
    name = Path(path).name.lower()
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return Path(name).suffix


def _stem(path: str | os.PathLike) -> str:
    name = Path(path).name
    suffix = volume_suffix(path)
    return name[: len(name) - len(suffix)] if suffix else name


def read_volume(path: str | os.PathLike, *, series_uid: str | None = None) -> Volume:
    """Read one medical volume, reoriented to RAS axis order.

    Parameters
    ----------
    path : str or os.PathLike
        A NIfTI file (``.nii``, ``.nii.gz``), an NRRD/MetaImage file (``.nrrd``, ``.nhdr``,
        ``.mha``, ``.mhd``; needs the ``volumes`` extra, i.e. SimpleITK), a folder holding one
        DICOM series, or a single ``.dcm`` file.
    series_uid : str, optional
        For a DICOM folder holding several series: the SeriesInstanceUID to read.

    Returns
    -------
    Volume
        ``array`` ``(X, Y, Z)`` or ``(X, Y, Z, C)`` in RAS order, stored dtype kept
        (native byte order), ``affine`` in RAS world millimetres, ``spacing`` per array axis.
        4D NIfTI files (e.g. BraTS-like ``(X, Y, Z, 4)``) become channels.

    Raises
    ------
    UnreadableFileError
        Missing, truncated or undecodable file (the message names it), or a reader that is
        not installed (the message says what to install).
    InputError
        Unsupported suffix, several DICOM series without ``series_uid``, an empty folder,
        inconsistent slices.
    """
    p = Path(path)
    if not p.exists():
        raise UnreadableFileError(f"No such volume file or folder: {p}. Received: {truncate(str(path))}")
    if p.is_dir() or volume_suffix(p) == ".dcm":
        from .dicom import read_dicom_series

        return read_dicom_series(p, series_uid=series_uid)
    if series_uid is not None:
        raise InputError(f"series_uid applies to DICOM folders only, not to {p.name}. "
                         f"Received: {truncate(series_uid)}")
    suffix = volume_suffix(p)
    if suffix in (".nii", ".nii.gz"):
        return _read_nifti(p)
    if suffix in _ITK_SUFFIXES:
        return _read_itk(p)
    raise InputError(f"Cannot read {p.name}: unknown volume format {suffix or '(no suffix)'}; "
                     f"expected one of {', '.join(VOLUME_SUFFIXES)} or a DICOM folder. "
                     f"Received: {truncate(str(path))}")


def _read_nifti(path: Path) -> Volume:
    """NIfTI-1/2 through nibabel: stored dtype, header scaling applied exactly."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        img = nib.load(path)
        proxy = img.dataobj
        raw = np.asarray(proxy.get_unscaled()) if hasattr(proxy, "get_unscaled") else np.asarray(proxy)
        slope = float(getattr(proxy, "slope", 1.0))
        inter = float(getattr(proxy, "inter", 0.0))
        affine = np.asarray(img.affine, dtype=np.float64)
    except (ImageFileError, OSError, EOFError, zlib.error, ValueError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnreadableFileError(f"Cannot read NIfTI file {path}: truncated, damaged or not "
                                  f"NIfTI ({detail})") from None
    if (slope, inter) != (1.0, 0.0):
        raw = hu_array(raw, slope, inter)
    elif raw.dtype == np.float64:
        raw = raw.astype(np.float32)  # "float stays float32": no float64 volumes downstream
    return canonical_volume(raw, affine, str(path))


def _read_itk(path: Path) -> Volume:
    """NRRD / MetaImage through SimpleITK (ITK's LPS world converted to RAS)."""
    try:
        import SimpleITK as sitk
    except ImportError:
        raise UnreadableFileError(f"Cannot read {path.name}: {volume_suffix(path)} files need "
                                  f"SimpleITK, which is not installed; {_ITK_HINT}") from None
    try:
        img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(img)  # (z, y, x[, c]): reverse of ITK's index order
    except RuntimeError as exc:
        detail = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "unreadable")
        raise UnreadableFileError(f"Cannot read {path}: truncated, damaged or unsupported "
                                  f"({truncate(detail, 200)})") from None
    dim = img.GetDimension()
    vector = img.GetNumberOfComponentsPerPixel() > 1
    if dim not in (2, 3):
        raise InputError(f"{path}: only 2D and 3D images are supported, this one has {dim} "
                         f"dimensions. Received: size {truncate(img.GetSize())}")
    order = tuple(range(dim))[::-1] + ((dim,) if vector else ())
    arr = arr.transpose(order)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(dim, dim)
    lps = np.eye(4)
    lps[:dim, :dim] = direction * np.asarray(img.GetSpacing(), dtype=np.float64)
    lps[:dim, 3] = img.GetOrigin()
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    return canonical_volume(arr, ras, str(path))


# --------------------------------------------------------------------------- #
# nnU-Net style cases: one file per modality
# --------------------------------------------------------------------------- #
def case_name(path: str | os.PathLike, *, nnunet: bool = False) -> str:
    """Return the case name of a volume file: its name without the volume suffix.

    ``case_001.nii.gz`` -> ``case_001``.  With ``nnunet=True`` the 4-digit modality suffix
    of nnU-Net naming is stripped too: ``case_001_0000.nii.gz`` -> ``case_001`` (a name
    without such a suffix is returned whole).  :func:`group_cases` decides ``nnunet`` for a
    whole folder.
    """
    stem = _stem(path)
    if nnunet:
        match = _NNUNET.match(stem)
        if match:
            return match.group("case")
    return stem


def _uses_nnunet_naming(paths: Sequence[Path]) -> bool:
    """True when every name ends in ``_NNNN`` and every case has channels ``0000..C-1``."""
    if not paths:
        return False
    cases: dict[str, set[int]] = {}
    for p in paths:
        match = _NNUNET.match(_stem(p))
        if not match:
            return False
        cases.setdefault(match.group("case"), set()).add(int(match.group("channel")))
    return all(0 in channels for channels in cases.values())


def group_cases(paths: Iterable[str | os.PathLike], *,
                nnunet: bool | None = None) -> dict[str, list[Path]]:
    """Group volume files into cases, channel files in modality order.

    Parameters
    ----------
    paths : iterable of path
        Volume files (typically one folder's listing, e.g. nnU-Net's ``imagesTr``).
    nnunet : bool, optional
        ``True``: names end in ``_NNNN`` (modality index) and files of one case stack as
        channels.  ``False``: every file is its own case.  ``None`` (default): nnU-Net naming
        when *every* name ends in ``_NNNN`` and every case has a ``_0000`` file (a folder of
        labels ``case_001.nii.gz`` or images ``case_001.nii.gz`` stays one file per case).
        Pass ``False`` for single-modality files whose own names end in 4 digits from
        ``_0000`` on (``patient_0000.nii.gz``, ``patient_0001.nii.gz``, ...).

    Returns
    -------
    dict
        Case name -> list of paths (channel order), sorted by case name.

    Raises
    ------
    InputError
        nnU-Net naming where cases have different modality sets (the message names a case
        and the missing modality file), or two files with one case name.
    """
    items = sorted(Path(p) for p in paths)
    use = _uses_nnunet_naming(items) if nnunet is None else bool(nnunet)
    cases: dict[str, dict[int, Path]] = {}
    for p in items:
        match = _NNUNET.match(_stem(p)) if use else None
        name = match.group("case") if match else _stem(p)
        channel = int(match.group("channel")) if match else 0
        slot = cases.setdefault(name, {})
        if channel in slot:
            raise InputError(f"Two files for case {name!r} (channel {channel:04d}): "
                             f"{slot[channel].name} and {p.name}. Received: {truncate(str(p))}")
        slot[channel] = p
    if use and cases:
        expected = sorted(set().union(*cases.values()))
        for name, slot in cases.items():
            missing = [c for c in expected if c not in slot]
            if missing:
                raise InputError(f"Case {name!r} lacks modality file {name}_{missing[0]:04d} "
                                 f"(other cases have channels {', '.join(f'{c:04d}' for c in expected)}). "
                                 f"Received: {truncate(sorted(q.name for q in slot.values()))}")
    return {name: [slot[c] for c in sorted(slot)] for name, slot in sorted(cases.items())}


def read_case(paths: Sequence[str | os.PathLike] | str | os.PathLike) -> Volume:
    """Read one case's per-modality files and stack them as channels, ``(X, Y, Z, C)``.

    Every file must have the same spatial shape and the same affine (within
    :data:`AFFINE_TOLERANCE_MM`) after reorientation; 4D files contribute all their
    channels.  The dtype is the common dtype of the files (``float32`` rather than
    ``float64``).  A single path reads as :func:`read_volume` does.

    Raises
    ------
    InputError
        No paths, or two files whose shapes or affines differ (the message names both).
    """
    if isinstance(paths, (str, os.PathLike)):
        return read_volume(paths)
    files = [Path(p) for p in paths]
    if not files:
        raise InputError("read_case needs at least one volume file. Received: []")
    vols = [read_volume(p) for p in files]
    if len(vols) == 1:
        return vols[0]
    first = vols[0]
    for vol, p in zip(vols[1:], files[1:]):
        if vol.spatial_shape != first.spatial_shape:
            raise InputError(f"Modality files of one case differ in shape: {files[0].name} is "
                             f"{first.spatial_shape}, {p.name} is {vol.spatial_shape} (in RAS "
                             f"order). Received: {truncate([str(f) for f in files])}")
        diff = float(np.abs(vol.affine - first.affine).max())
        if diff > AFFINE_TOLERANCE_MM:
            raise InputError(f"Modality files of one case differ in voxel-to-world affine by up to "
                             f"{diff:.4g} mm: {files[0].name} and {p.name}. Received: "
                             f"{truncate([str(f) for f in files])}")
    dtype = np.result_type(*(v.array.dtype for v in vols))
    if dtype == np.float64 and all(v.array.dtype != np.float64 for v in vols):
        dtype = np.dtype(np.float32)
    parts = [v.array if v.array.ndim == 4 else v.array[..., np.newaxis] for v in vols]
    stacked = np.concatenate([p.astype(dtype, copy=False) for p in parts], axis=3)
    return Volume(array=stacked, affine=first.affine.copy(), spacing=first.spacing,
                  source=", ".join(str(f) for f in files), orientation=first.orientation)
