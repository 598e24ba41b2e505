"""Volumes in ``convert``: recognise a volume source, build it, and schedule its chunks by case.

:func:`is_volume_input` tells a folder of medical volumes (``imagesTr/`` + ``labelsTr/``, or
``images/`` + ``masks/`` holding ``.nii.gz`` / ``.nrrd`` / ... files or DICOM series folders)
from a folder of 2D image files; :func:`volume_source` checks the volume-only options and
builds a :class:`~streamseg.io.volume_source.VolumeSliceSource`; :func:`chunk_segments` groups
consecutive chunks so that the chunks of one case go to one worker and each case is read
about once in all.  May import: :mod:`streamseg.io`, :mod:`streamseg.errors`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OptionError, truncate
from ..io.sources import IMAGE_EXTENSIONS
from ..io.volumes import VOLUME_SUFFIXES, volume_suffix

__all__ = ["VOLUME_OPTIONS", "LAYOUTS", "is_volume_input", "volume_source", "refuse_volume_options",
           "chunk_segments", "largest_case_bytes", "refuse_slice_store_options"]

#: Layouts of a volume store: ``slices`` (every slice one 2D sample) and ``volumes`` (one
#: 3D-chunked entry per case, for :class:`~streamseg.PatchDataset`).
LAYOUTS = ("slices", "volumes")
#: Options that only the ``slices`` layout uses.
_SLICE_ONLY = ("axis", "context", "skip_empty", "keep_empty")

#: Options of :func:`~streamseg.store.converter.convert` that apply to volume sources only,
#: with their defaults for volumes and the command-line flag that sets them.
VOLUME_OPTIONS: dict[str, tuple[Any, str]] = {
    "layout": ("slices", "--layout"),
    "axis": ("axial", "--axis"),
    "context": (0, "--context"),
    "skip_empty": (False, "--skip-empty"),
    "keep_empty": (0.0, "--keep-empty"),
    "remap_labels": (False, "--remap-labels"),
    "seed": (0, "--seed"),
    "mask_dtype": ("uint8", "--mask-dtype"),
    "spacing": (None, "--spacing"),
    "chunk_shape": (None, "--chunk-shape"),
}

#: A segment of chunks for one worker holds at most about this many cases (resume and
#: progress granularity) ...
_CASES_PER_SEGMENT = 8
#: ... and there are at least this many segments per worker (load balance).
_SEGMENTS_PER_WORKER = 2


def _image_folder(src: str | os.PathLike | None, images_dir: str | os.PathLike | None) -> Path | None:
    """The folder the volume reader would take the images from (``images/`` before ``imagesTr/``)."""
    if images_dir:
        return Path(images_dir)
    if src is None:
        return None
    base = Path(src)
    for name in ("images", "imagesTr"):
        if (base / name).is_dir():
            return base / name
    return None


def is_volume_input(src: str | os.PathLike | None, *, images_dir: str | os.PathLike | None = None,
                    masks_dir: str | os.PathLike | None = None) -> bool:
    """Whether a source folder holds medical volumes rather than 2D image files.

    Parameters
    ----------
    src : path, optional
        The source folder (``images/`` + ``masks/`` or ``imagesTr/`` + ``labelsTr/``).
    images_dir, masks_dir : path, optional
        Explicit image and mask folders.

    Returns
    -------
    bool
        True for an ``imagesTr/`` folder (Decathlon / nnU-Net), or an image folder holding
        any volume file (:data:`~streamseg.io.volumes.VOLUME_SUFFIXES`, ``.nii.gz`` as one
        suffix), or sub-folders (DICOM series) and no 2D image file.  False otherwise,
        including when the folders do not exist (the 2D reader then says what is missing).
    """
    folder = _image_folder(src, images_dir)
    if folder is None or not folder.is_dir():
        return False
    if folder.name == "imagesTr" and not images_dir:
        return True
    volumes = planes = dirs = False
    for entry in folder.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            dirs = True
        elif volume_suffix(entry) in VOLUME_SUFFIXES:
            volumes = True
            break
        elif entry.suffix.lower() in IMAGE_EXTENSIONS:
            planes = True
    return volumes or (dirs and not planes)


def refuse_volume_options(given: dict[str, Any]) -> None:
    """Refuse volume-only options for a 2D source, naming the first one given.

    Raises
    ------
    OptionError
        One of ``given`` (option name -> value, None meaning "not given") is set.
    """
    for name, value in given.items():
        if value is not None:
            flag = VOLUME_OPTIONS[name][1]
            raise OptionError(f"{flag} ({name}=) applies to medical volume sources only (imagesTr/ + "
                              f"labelsTr/, or images/ + masks/ of .nii.gz/.nrrd/.mha files or DICOM "
                              f"folders); this source holds 2D image files. Received: {name}={truncate(value)}")


def volume_source(src: str | os.PathLike | None, *, images_dir: str | os.PathLike | None,
                  masks_dir: str | os.PathLike | None, mask_suffix: str, given: dict[str, Any],
                  progress: Any) -> Any:
    """Check the volume options and build the slice source (every case is read and checked once).

    Parameters
    ----------
    src, images_dir, masks_dir, mask_suffix
        As for :func:`~streamseg.store.converter.convert`.
    given : dict
        The options of :data:`VOLUME_OPTIONS` as passed (None: the default).
    progress
        Progress mode of the checking pass.

    Returns
    -------
    VolumeSliceSource

    Raises
    ------
    OptionError
        An unknown ``layout``, a slice option (axis, context, skip_empty, keep_empty) with
        ``layout="volumes"``, ``chunk_shape`` with ``layout="slices"``, or a bad option.
    SourceMismatchError, LabelError, UnreadableFileError, InputError
        Bad input, found before anything is written (see the source).
    """
    from ..io.volume_source import VolumeSliceSource

    opts = {name: (given.get(name) if given.get(name) is not None else default)
            for name, (default, _) in VOLUME_OPTIONS.items()}
    layout = opts.pop("layout")
    opts.pop("chunk_shape")
    if layout not in LAYOUTS:
        raise OptionError(f"layout must be one of {', '.join(LAYOUTS)}. Received: {truncate(layout)}")
    if layout == "volumes":
        for name in _SLICE_ONLY:
            if given.get(name) is not None:
                flag = VOLUME_OPTIONS[name][1]
                raise OptionError(f"{flag} ({name}=) applies to --layout slices only; --layout volumes stores "
                                  f"whole cases for 3D patches. Received: {name}={truncate(given[name])}")
    elif given.get("chunk_shape") is not None:
        raise OptionError("--chunk-shape (chunk_shape=) applies to --layout volumes; slice stores are chunked "
                          f"by --chunk-samples. Received: chunk_shape={truncate(given['chunk_shape'])}")
    return VolumeSliceSource(src, images_dir=images_dir, masks_dir=masks_dir, mask_suffix=mask_suffix,
                             progress=progress, **opts)


def refuse_slice_store_options(*, size: Any, channels: Any, image_dtype: Any, chunk_samples: Any) -> None:
    """Refuse the 2D store options that a ``layout="volumes"`` store has no use for.

    Raises
    ------
    OptionError
        Naming the first one given and what to use instead.
    """
    for name, value, hint in (("size", size, "--spacing SX SY SZ resamples volumes"),
                              ("channels", channels, "channels are the modalities of each case"),
                              ("image_dtype", image_dtype, "volumes keep their dtype"),
                              ("chunk_samples", chunk_samples, "use --chunk-shape CX CY CZ")):
        if value is not None:
            raise OptionError(f"{name}= (--{name.replace('_', '-')}) does not apply to --layout volumes: {hint}. "
                              f"Received: {name}={truncate(value)}")


def largest_case_bytes(source: Any) -> int:
    """Bytes one process holds for the largest case of a volume source (image + labels); 0 if none."""
    records = getattr(source, "records", None) or []
    sizes = [0]
    for rec in records:
        voxels = int(np.prod(rec["shape"]))  # shape includes the channel axis of 4D images
        spatial = int(np.prod(rec["shape"][:3]))
        sizes.append(voxels * np.dtype(rec.get("dtype", "float32")).itemsize + 2 * spatial)
    return max(sizes)


def chunk_segments(todo: Sequence[int], chunk_samples: int, count: int,
                   case_ranges: Sequence[tuple[int, int]] | None, workers: int) -> list[list[int]]:
    """Group the chunks to write into runs of consecutive chunks, one run per worker task.

    Without ``case_ranges`` (2D sources) every chunk is its own run.  With them, a run covers
    whole cases where a chunk boundary meets a case boundary, so the one-case cache of each
    worker reads every case once; a run boundary inside a case costs one extra read of that
    case.  Runs hold at most about ``_CASES_PER_SEGMENT`` cases (what an interruption loses
    and how often progress moves) and there are at least ``_SEGMENTS_PER_WORKER`` per
    worker where the chunks allow.

    Parameters
    ----------
    todo : sequence of int
        Chunk numbers still to write, ascending.
    chunk_samples, count : int
        Samples per chunk and in all.
    case_ranges : sequence of (start, stop), optional
        Sample range of each case (``VolumeSliceSource.case_ranges()``).
    workers : int
        Worker processes.

    Returns
    -------
    list of list of int
        The runs, in order; together exactly ``todo``.
    """
    if not case_ranges:
        return [[k] for k in todo]
    starts = {int(a) for a, b in case_ranges if b > a}
    mean_case = count / max(1, len(starts))
    target = max(chunk_samples, min(math.ceil(count / (_SEGMENTS_PER_WORKER * workers)),
                                    math.ceil(_CASES_PER_SEGMENT * mean_case)))
    runs: list[list[int]] = []
    run: list[int] = []
    filled = 0
    for k in todo:
        begin = k * chunk_samples
        if run and (k != run[-1] + 1 or filled >= target or (filled >= target / 2 and begin in starts)):
            runs.append(run)
            run, filled = [], 0
        run.append(k)
        filled += min(chunk_samples, count - begin)
    if run:
        runs.append(run)
    return runs
