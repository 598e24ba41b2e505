"""Medical volumes as a source of 2D slices: every slice along one axis becomes one sample.

:class:`VolumeSliceSource` pairs image volumes (NIfTI, NRRD/MHA, DICOM series folders,
nnU-Net per-modality files) with label volumes by case name, checks every pair once, and
serves the slices through the source protocol of :mod:`streamseg.io.sources`
(``__len__``, ``name(i)``, ``load(i)``, ``describe()``), so the ordinary 2D converter writes
them into today's store and everything downstream works unchanged.

Slice orientation
-----------------
Volumes are in RAS order (:func:`streamseg.io.volumes.read_volume`).  A slice at index ``s``
of ``axis`` is the plane ``np.take(volume, s, axis)`` shown as ``imshow(plane.T,
origin="lower")`` shows it, i.e. ``sample = np.rot90(plane)``:
``sample[h, w] = plane[w, n - 1 - h]``.  So

* ``axial`` (Z fixed): ``H`` = Y reversed (anterior at the top), ``W`` = X (toward patient right);
* ``coronal`` (Y fixed): ``H`` = Z reversed (superior at the top), ``W`` = X;
* ``sagittal`` (X fixed): ``H`` = Z reversed (superior at the top), ``W`` = Y (toward anterior).

(Patient left on the image's left: the neurological convention.)  With ``context=K`` the
channels are the slices ``s-K .. s+K`` (indices clipped, so edge slices repeat), slice-major:
channel ``j * C + c`` is channel ``c`` of slice ``s - K + j``.

Cost
----
Construction reads every case (image and mask) once, one case at a time, to check it and
record its statistics; conversion then reads each case again (a one-case cache per process
makes consecutive slices cost one read).  May import: :mod:`streamseg.errors`,
:mod:`streamseg.progress`.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, LabelError, OptionError, SourceMismatchError, UnreadableFileError, truncate
from ..progress import Progress
from ._volume import Volume
from ._volume_stats import FOREGROUND_SAMPLES, ForegroundPool, intensity_record, label_counts, labels_of, \
    stored_image_dtype
from .resample import check_spacing, resample_pair
from .volumes import AFFINE_TOLERANCE_MM, VOLUME_SUFFIXES, group_cases, read_case, read_volume, volume_suffix

__all__ = ["VolumeSliceSource", "find_volume_cases", "read_pair", "VolumeCase", "AXES", "slice_plane"]

#: Slicing axis name -> RAS array axis.
AXES: dict[str, int] = {"axial": 2, "coronal": 1, "sagittal": 0}
_FOLDER_PAIRS = (("images", "masks"), ("imagesTr", "labelsTr"))

#: What H and W of a sample are, per axis (recorded in describe()).
_ORIENTATION = {
    "axial": "H = Y reversed (anterior up), W = X (toward patient right); sample = rot90(volume[:, :, z])",
    "coronal": "H = Z reversed (superior up), W = X (toward patient right); sample = rot90(volume[:, y, :])",
    "sagittal": "H = Z reversed (superior up), W = Y (toward anterior); sample = rot90(volume[x, :, :])",
}


@dataclass(frozen=True)
class VolumeCase:
    """One case: its image file(s) (channel order) or DICOM folder, and its label volume."""

    name: str
    images: tuple[str, ...]
    mask: str


def _first(items: list[str], k: int = 5) -> str:
    shown = ", ".join(items[:k])
    return shown + (f" (and {len(items) - k} more)" if len(items) > k else "")


def _entries(folder: Path) -> tuple[list[Path], list[Path]]:
    """Volume files and sub-folders (DICOM series) of ``folder``; hidden names skipped."""
    files, dirs = [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):  # e.g. macOS '._case.nii.gz' forks in Decathlon archives
            continue
        if p.is_dir():
            dirs.append(p)
        elif volume_suffix(p) in VOLUME_SUFFIXES:
            files.append(p)
    return files, dirs


def _cases(folder: Path, *, nnunet: bool | None) -> dict[str, list[Path]]:
    files, dirs = _entries(folder)
    cases = group_cases(files, nnunet=nnunet)
    for d in dirs:
        if d.name in cases:
            raise InputError(f"Case {d.name!r} is both a DICOM folder and a volume file in {folder}. "
                             f"Received: {truncate([str(p) for p in cases[d.name]])}")
        cases[d.name] = [d]
    return dict(sorted(cases.items()))


def find_volume_cases(src: str | os.PathLike | None, *, images_dir: str | os.PathLike | None = None,
                      masks_dir: str | os.PathLike | None = None,
                      mask_suffix: str = "") -> tuple[Path, Path, list[VolumeCase]]:
    """Find the image/mask case pairs of a volume data set.

    Parameters
    ----------
    src : path, optional
        Folder holding ``images/`` + ``masks/`` or (Decathlon / nnU-Net) ``imagesTr/`` +
        ``labelsTr/``.
    images_dir, masks_dir : path, optional
        Override the two folders.
    mask_suffix : str
        Suffix of mask case names (``"_seg"`` pairs ``a.nii.gz`` with ``a_seg.nii.gz``).

    Returns
    -------
    (images_dir, masks_dir, cases)
        Cases sorted by name.  Images are volume files (``.nii.gz`` counts as one suffix),
        nnU-Net per-modality files (``case_0000.nii.gz``, ... grouped by
        :func:`~streamseg.io.volumes.group_cases`) or DICOM series folders.

    Raises
    ------
    UnreadableFileError
        The folders do not exist.
    SourceMismatchError
        Images without a mask or masks without an image (the first few are named).
    InputError
        No volume files at all.
    """
    base = Path(src) if src is not None else None
    if base is not None and not base.exists():
        raise UnreadableFileError(f"Source folder {base} does not exist; check the path.")
    pair = next(((base / a, base / b) for a, b in _FOLDER_PAIRS
                 if base is not None and (base / a).is_dir()), None) if base else None
    img_dir = Path(images_dir) if images_dir else (pair[0] if pair else (base / "images" if base else None))
    msk_dir = Path(masks_dir) if masks_dir else (pair[1] if pair else (base / "masks" if base else None))
    if img_dir is None or msk_dir is None or not img_dir.is_dir() or not msk_dir.is_dir():
        label, d = ("images", img_dir) if img_dir is None or not img_dir.is_dir() else ("masks", msk_dir)
        raise UnreadableFileError(f"No {label} folder at {d}: SRC must contain images/ and masks/ "
                                  f"(or imagesTr/ and labelsTr/), or pass --{label}-dir.")
    images = _cases(img_dir, nnunet=None)
    masks_raw = _cases(msk_dir, nnunet=False)
    if mask_suffix:
        masks = {(s[: -len(mask_suffix)] if s.endswith(mask_suffix) else s + "\0"): p
                 for s, p in masks_raw.items()}
    else:
        masks = masks_raw
    if not images and not masks:
        raise InputError(f"No volume files or DICOM folders in {img_dir} or {msk_dir} (looked for "
                         f"{', '.join(VOLUME_SUFFIXES)} and series sub-folders).")
    lonely_images = sorted(set(images) - set(masks))
    lonely_masks = sorted(s.rstrip("\0") for s in set(masks) - set(images))
    if lonely_images:
        hint = " (masks named like 'case_seg.nii.gz'? pass --mask-suffix _seg)" if not mask_suffix else ""
        raise SourceMismatchError(f"{len(lonely_images)} case(s) in {img_dir} have no mask in {msk_dir}: "
                                  f"{_first(lonely_images)}{hint}.")
    if lonely_masks:
        raise SourceMismatchError(f"{len(lonely_masks)} mask(s) in {msk_dir} have no image in {img_dir}: "
                                  f"{_first(lonely_masks)}.")
    if any(len(masks[s]) != 1 for s in images):  # pragma: no cover - group_cases(nnunet=False) is 1:1
        raise InputError(f"Several mask files for one case in {msk_dir}.")
    cases = [VolumeCase(s, tuple(str(p) for p in images[s]), str(masks[s][0])) for s in sorted(images)]
    return img_dir, msk_dir, cases


def slice_plane(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Slice ``index`` of RAS ``volume`` along ``axis`` in display orientation (see module docs)."""
    return np.ascontiguousarray(np.rot90(np.take(volume, index, axis=axis), k=1, axes=(0, 1)))


def _affine_text(affine: np.ndarray) -> str:
    return str(np.round(affine, 4).tolist())


def read_pair(case: VolumeCase) -> tuple[Volume, np.ndarray]:
    """Read one case: ``(image Volume, labels)``, checked against each other.

    Raises
    ------
    SourceMismatchError
        Different RAS shapes, or affines differing by more than ``AFFINE_TOLERANCE_MM``
        (the message names the case and gives both).
    LabelError
        Non-integer or negative mask values (the message names the mask file).
    """
    image = read_case(list(case.images)) if len(case.images) > 1 else read_volume(case.images[0])
    mvol = read_volume(case.mask)
    marr = mvol.array
    if marr.ndim == 4:
        if marr.shape[3] != 1:
            raise InputError(f"Mask {case.mask} of case {case.name!r} has {marr.shape[3]} channels; a label "
                             f"volume must be 3D. Received: shape {truncate(marr.shape)}")
        marr = marr[..., 0]
    if image.spatial_shape != mvol.spatial_shape:
        raise SourceMismatchError(
            f"Case {case.name!r}: image {image.source} is {image.spatial_shape} but mask {case.mask} is "
            f"{mvol.spatial_shape} (RAS order); they must cover the same voxel grid.")
    diff = float(np.abs(image.affine - mvol.affine).max())
    if diff > AFFINE_TOLERANCE_MM:
        raise SourceMismatchError(
            f"Case {case.name!r}: image and mask voxel-to-world affines differ by up to {diff:.4g} mm "
            f"(tolerance {AFFINE_TOLERANCE_MM} mm): image {image.source} {_affine_text(image.affine)}, "
            f"mask {case.mask} {_affine_text(mvol.affine)}; resample the mask onto the image grid.")
    return image, labels_of(marr, case.mask)


def _check_options(axis: Any, context: Any, keep_empty: Any, skip_empty: Any, seed: Any,
                   mask_dtype: Any, foreground_samples: Any = FOREGROUND_SAMPLES) -> None:
    if axis not in AXES:
        raise OptionError(f"axis must be one of {', '.join(AXES)}. Received: {truncate(axis)}")
    if isinstance(context, bool) or not isinstance(context, (int, np.integer)) or context < 0:
        raise OptionError(f"context must be an integer >= 0 (slices on each side). Received: {truncate(context)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise OptionError(f"seed must be an integer >= 0. Received: {truncate(seed)}")
    if isinstance(keep_empty, bool) or not isinstance(keep_empty, (int, float, np.floating, np.integer)) \
            or not 0.0 <= float(keep_empty) <= 1.0:
        raise OptionError(f"keep_empty must be a fraction in [0, 1]. Received: {truncate(keep_empty)}")
    if float(keep_empty) > 0 and not skip_empty:
        raise OptionError("keep_empty applies only with skip_empty (it is the share of empty slices "
                          f"kept); pass --skip-empty too. Received: keep_empty={keep_empty!r}")
    if mask_dtype not in ("uint8", "uint16"):
        raise OptionError(f"mask_dtype must be 'uint8' or 'uint16'. Received: {truncate(mask_dtype)}")
    if isinstance(foreground_samples, bool) or not isinstance(foreground_samples, (int, np.integer)) \
            or not 0 <= foreground_samples <= 10_000_000:
        raise OptionError("foreground_samples must be an integer in [0, 10000000] (voxels drawn per case). "
                          f"Received: {truncate(foreground_samples)}")


class VolumeSliceSource:
    """Slices of image/label volume pairs, one sample per slice (see the module docs).

    Parameters
    ----------
    src : path, optional
        Folder holding ``images/`` + ``masks/`` or ``imagesTr/`` + ``labelsTr/``.
    images_dir, masks_dir : path, optional
        Override the two folders.
    mask_suffix : str
        Suffix of mask case names.
    axis : {"axial", "coronal", "sagittal"}
        Slicing axis of the RAS volume.
    context : int
        Neighbouring slices stacked on each side as extra channels (2.5D; edges repeat).
    skip_empty : bool
        Drop slices without foreground (label > 0) ...
    keep_empty : float
        ... except this share of them, drawn per case with
        ``numpy.random.default_rng([seed, case_index])`` (deterministic, worker-independent).
    seed : int
        Seed of that draw.
    remap_labels : bool
        Map the sorted distinct labels of all cases (0 always included) to ``0..K-1``;
        ``describe()["label_table"][k]`` is the original value of stored label ``k``.
        Needed for labels above the store's mask range (atlases with ids up to 1600+).
    mask_dtype : {"uint8", "uint16"}
        The store's mask dtype; labels above its range are refused unless remapped.
    foreground_samples : int
        Foreground voxels drawn per case (uniformly, with replacement, seeded by ``seed`` and
        the case index) into the pooled sample whose 0.5/99.5 percentiles, mean and std
        ``describe()["foreground_intensity"]`` records, as nnU-Net's fingerprint does; the
        dataset's ``normalize="ct"`` uses them.  Memory: 8 bytes per voxel and channel.
    spacing : (SX, SY, SZ), optional
        Resample every case to this spacing in mm (RAS order; 0 keeps an axis) as it is
        read: linear for images, nearest for labels (:mod:`streamseg.io.resample`).  The
        records then hold the resampled shape, spacing and affine, and the source's as
        ``source_shape`` / ``source_spacing``.
    progress : {"auto", "bar", "plain", "quiet"} or bool
        Progress of the checking pass over the cases.

    Raises
    ------
    SourceMismatchError, LabelError, UnreadableFileError, InputError, OptionError
        At construction, before anything is written: lonely cases, image/mask shape or
        affine mismatches, non-integer masks, unreadable files, bad options.
    """

    keep_channels = True  # channels are modalities / context slices (prepare_pair(keep_channels=True))

    def __init__(self, src: str | os.PathLike | None = None, *, images_dir: str | os.PathLike | None = None,
                 masks_dir: str | os.PathLike | None = None, mask_suffix: str = "", axis: str = "axial",
                 context: int = 0, skip_empty: bool = False, keep_empty: float = 0.0, seed: int = 0,
                 remap_labels: bool = False, mask_dtype: str = "uint8",
                 foreground_samples: int = FOREGROUND_SAMPLES, spacing: Any = None,
                 progress: Any = "auto") -> None:
        _check_options(axis, context, keep_empty, skip_empty, seed, mask_dtype, foreground_samples)
        self.spacing = check_spacing(spacing)
        self.foreground_samples = int(foreground_samples)
        self.images_dir, self.masks_dir, self.cases = find_volume_cases(
            src, images_dir=images_dir, masks_dir=masks_dir, mask_suffix=mask_suffix)
        self.axis, self.axis_index, self.context = axis, AXES[axis], int(context)
        self.skip_empty, self.keep_empty, self.seed = bool(skip_empty), float(keep_empty), int(seed)
        self.remap_labels, self.mask_dtype = bool(remap_labels), mask_dtype
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self._source_geometry: dict[int, dict[str, Any]] = {}
        self._lut: np.ndarray | None = None
        self._survey(progress)

    # ------------------------------------------------------------------ survey
    def _survey(self, progress: Any) -> None:
        """Read every case once: check it, record statistics, select its slices."""
        records, selected, dtypes, labels = [], [], [], set()
        lo, hi = np.inf, -np.inf
        pool = ForegroundPool(self.seed, self.foreground_samples)
        bar = Progress(len(self.cases), "check volumes", mode=progress, unit="cases")
        try:
            for ci, case in enumerate(self.cases):
                image, mask = self._read(ci)
                rec, keep = self._case_record(ci, case, image, mask, pool)
                records.append(rec)
                selected.append(keep)
                dtypes.append(image.array.dtype)
                labels.update(int(v) for v in rec["labels"])
                overall = rec["intensity"]["overall"]
                lo = min([lo, *(v for v in overall["min"] if v is not None)])
                hi = max([hi, *(v for v in overall["max"] if v is not None)])
                del image, mask
                bar.update(1)
        finally:
            bar.close()
        self.records = records
        self.foreground_intensity = pool.statistics()
        self.selected = selected
        self.offsets = np.concatenate([[0], np.cumsum([len(s) for s in selected])]).astype(np.int64)
        self.image_dtype = str(stored_image_dtype(dtypes, lo, hi, str(self.images_dir)))
        self.label_table = sorted(labels | {0}) if self.remap_labels else None
        top = int(np.iinfo(np.dtype(self.mask_dtype)).max)
        if self.label_table is not None:
            if len(self.label_table) > top + 1:
                raise LabelError(f"The masks hold {len(self.label_table)} distinct labels; a {self.mask_dtype} "
                                 f"mask store holds at most {top + 1} even after --remap-labels. Received: "
                                 f"{truncate(self.label_table)}")
        elif labels and max(labels) > top:
            worst = max(range(len(records)), key=lambda c: max(map(int, records[c]["labels"]), default=0))
            raise LabelError(f"Mask {records[worst]['mask']} has labels up to {max(labels)}, above the "
                             f"{self.mask_dtype} mask store's 0..{top}; pass --remap-labels "
                             f"(remap_labels=True) to map the {len(labels | {0})} distinct labels to "
                             f"0..K-1 (the table goes into the manifest).")

    def _case_record(self, ci: int, case: VolumeCase, image: Volume, mask: np.ndarray,
                     pool: ForegroundPool | None = None) -> tuple[dict[str, Any], np.ndarray]:
        ax = self.axis_index
        fg = mask > 0
        other = tuple(a for a in range(3) if a != ax)
        has_fg = fg.any(axis=other)
        n = int(has_fg.size)
        if self.skip_empty:
            empty = np.flatnonzero(~has_fg)
            take = int(np.floor(self.keep_empty * empty.size + 0.5))
            rng = np.random.default_rng([self.seed, ci])
            extra = rng.choice(empty, size=take, replace=False) if take else empty[:0]
            keep = np.sort(np.concatenate([np.flatnonzero(has_fg), extra])).astype(np.int32)
        else:
            keep = np.arange(n, dtype=np.int32)
        rec = {
            "name": case.name,
            **self._source_geometry.pop(ci, {}),
            "image": ", ".join(case.images),
            "mask": case.mask,
            "shape": list(image.shape),
            "dtype": str(image.array.dtype),
            "spacing": [float(s) for s in image.spacing],
            "affine": [[float(v) for v in row] for row in image.affine],
            "orientation": "".join(image.orientation),
            "slices": n,
            "foreground_slices": int(has_fg.sum()),
            "selected": int(keep.size),
            "intensity": intensity_record(image.array, fg, pool),
            "labels": {str(k): v for k, v in sorted(label_counts(mask).items())},
        }
        return rec, keep

    def _read(self, ci: int) -> tuple[Volume, np.ndarray]:
        """Case ``ci`` read, checked and (with ``spacing``) resampled."""
        image, mask = read_pair(self.cases[ci])
        if self.spacing is None:
            return image, mask
        arr, lab, affine, reached = resample_pair(image.array, mask, image.affine, image.spacing, self.spacing)
        if arr is not image.array:
            self._source_geometry[ci] = {"source_shape": list(image.shape),
                                         "source_spacing": [float(v) for v in image.spacing],
                                         "source_affine": [[float(v) for v in row] for row in image.affine]}
        return Volume(array=arr, affine=affine, spacing=reached, source=image.source,
                      orientation=image.orientation), lab

    def case_arrays(self, ci: int) -> tuple[np.ndarray, np.ndarray]:
        """Case ``ci`` as stored: image ``(X, Y, Z, C)`` in the store's dtype, labels ``(X, Y, Z)``
        (remapped with ``remap_labels``) in ``mask_dtype``; read once, not cached."""
        image, mask = self._read(ci)
        arr = image.array if image.array.ndim == 4 else image.array[..., np.newaxis]
        return np.ascontiguousarray(arr.astype(self.image_dtype, copy=False)), self._remap(mask)

    # ------------------------------------------------------------------ protocol
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = None  # workers read their own cases
        state["_lut"] = None
        return state

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} slices")
        ci = bisect.bisect_right(self.offsets, i) - 1
        return ci, int(self.selected[ci][i - int(self.offsets[ci])])

    def name(self, i: int) -> str:
        """``"{case}:{slice}"``, the slice index along the axis of the RAS volume."""
        ci, s = self._locate(int(i))
        return f"{self.cases[ci].name}:{s}"

    def case_ranges(self) -> list[tuple[int, int]]:
        """Sample index range ``[start, stop)`` of each case, in case order.

        A converter that hands whole cases to one worker reads each case once in all.
        """
        return [(int(a), int(b)) for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    def case_records(self) -> list[dict[str, Any]]:
        """Per-case records (also in ``describe()["cases"]``): paths, geometry, statistics."""
        return [dict(r) for r in self.records]

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable parameters and per-case records, for the manifest's ``params``.

        ``cases``: :meth:`case_records` (with per-channel ``intensity`` statistics, overall
        and in the foreground, and ``selected``, the case's sample count in store order);
        ``foreground_intensity``: per-channel ``p0_5``, ``p99_5``, ``mean`` and ``std`` of the
        pooled foreground sample (see ``foreground_samples``) and ``voxels_sampled``.
        """
        return {"kind": "volumes", "images_dir": str(self.images_dir), "masks_dir": str(self.masks_dir),
                "count": len(self), "axis": self.axis, "context": self.context,
                "slice_orientation": _ORIENTATION[self.axis], "skip_empty": self.skip_empty,
                "keep_empty": self.keep_empty, "seed": self.seed,
                "spacing": list(self.spacing) if self.spacing else None, "remap_labels": self.remap_labels,
                "label_table": self.label_table, "image_dtype": self.image_dtype,
                "foreground_intensity": dict(self.foreground_intensity), "cases": self.case_records()}

    def _case(self, ci: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is None or self._cache[0] != ci:
            self._cache = None  # free the previous case before reading the next
            image, mask = self._read(ci)
            self._cache = (ci, image.array, mask)
        return self._cache[1], self._cache[2]

    def _remap(self, mask: np.ndarray) -> np.ndarray:
        if self.label_table is None:
            return mask.astype(self.mask_dtype, copy=False)
        if self._lut is None:
            lut = np.zeros(self.label_table[-1] + 1, self.mask_dtype)
            lut[np.asarray(self.label_table)] = np.arange(len(self.label_table))
            self._lut = lut
        return self._lut[mask]  # type: ignore[index]

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray, str, str]:
        """Slice ``i``: image ``(H, W)`` or ``(H, W, C * (2K + 1))`` and mask ``(H, W)``."""
        ci, s = self._locate(int(i))
        volume, labels = self._case(ci)
        ax, k = self.axis_index, self.context
        last = volume.shape[ax] - 1
        planes = [slice_plane(volume, ax, min(max(j, 0), last)) for j in range(s - k, s + k + 1)]
        if len(planes) == 1:
            image = planes[0]
        else:
            image = np.concatenate([p if p.ndim == 3 else p[..., np.newaxis] for p in planes], axis=2)
        image = image.astype(self.image_dtype, copy=False)
        mask = self._remap(slice_plane(labels, ax, s))
        case = self.cases[ci]
        where = f"{case.images[0] if len(case.images) == 1 else case.name} ({self.axis} slice {s})"
        return image, mask, where, f"{case.mask} ({self.axis} slice {s})"

