"""Convert once: image/mask folders or arrays into a chunked store.

Work is split by chunk.  Each task loads, checks and resizes the samples of one chunk
and writes the chunk itself (in a worker process when ``workers > 1``), returning only a
small record, so the main process does almost nothing and memory stays bounded by
``workers x chunk`` whatever the number of samples (a chunk that would not fit in the
memory available is refused up front, as is a ``size`` side above :data:`MAX_SIDE`).

The destination is locked for the whole conversion (:mod:`streamseg.store.lock`), and
workers end when the converting process dies (:mod:`streamseg.store._orphans`).

Medical volumes (:mod:`streamseg.store.volume_convert`) become one 2D sample per slice; with
``workers > 1`` each worker gets runs of consecutive chunks covering whole cases, so a case
is read about once (plus once by the checking pass before anything is written).
"""

from __future__ import annotations

import errno
import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DestinationError, InputError, OptionError, SourceMismatchError, StreamsegError, truncate
from ..progress import Progress
from ..io.sources import ArraySource, FolderSource, SynthSource, prepare_pair
from ._orphans import die_with_parent
from ._tasks import run_bounded
from .convert_checks import MAX_SIDE, _check_memory, _validate, check_size
from .dask_run import DaskRunner, check_dask_options, dask_runner, memory_workers
from .lock import DestinationLock
from .reader import Store, open_store
from .volume_convert import chunk_segments, is_volume_input, largest_case_bytes, refuse_slice_store_options, \
    refuse_volume_options, volume_source
from .volume_layout import check_chunk_shape
from .volume_writer import convert_volume_store
from .writer import (
    ChunkSink,
    append_progress,
    default_chunk_samples,
    finalize_store,
    prepare_destination,
)

__all__ = ["convert", "convert_source", "check_size", "MAX_SIDE"]

#: Largest ``size`` side accepted (16384 x 16384 x 3 uint8 is already 768 MiB per sample).


class _ChunkTask:
    """Everything a worker needs to produce one chunk (picklable)."""

    def __init__(self, source: Any, sink: ChunkSink, options: dict[str, Any]) -> None:
        self.source, self.sink, self.options = source, sink, options

    def __call__(self, k: int) -> dict[str, Any]:
        plan = self.sink.plan
        cs = plan["chunk_samples"]
        start, stop = k * cs, min((k + 1) * cs, plan["count"])
        h, w, c = plan["image_shape"]
        images = np.empty((stop - start, h, w, c), plan["image_dtype"])
        masks = np.empty((stop - start, h, w, 1), plan["mask_dtype"])
        names = []
        for j, i in enumerate(range(start, stop)):
            image, mask = _load_checked(self.source, i, self.options, plan)
            images[j], masks[j] = image, mask
            names.append(self.source.name(i))
        return self.sink.write(k, images, masks, names)


def _load_checked(source: Any, i: int, options: dict[str, Any], plan: dict[str, Any] | None
                  ) -> tuple[np.ndarray, np.ndarray]:
    raw_image, raw_mask, iw, mw = source.load(i)
    image, mask = prepare_pair(raw_image, raw_mask, iw, mw, size=options["size"],
                               channels=options["channels"], image_dtype=options["image_dtype"],
                               keep_channels=getattr(source, "keep_channels", False),
                               mask_dtype=options["mask_dtype"])
    if plan is not None:
        h, w, c = plan["image_shape"]
        if image.shape[2] != c:
            raise InputError(f"Image {iw} has {image.shape[2]} channel(s) but the first image has {c}; "
                             "pass --channels 1 or --channels 3 to convert all images alike.")
        if image.shape[:2] != (h, w):
            raise SourceMismatchError(f"Image {iw} is {image.shape[1]}x{image.shape[0]} but the first image "
                                      f"is {w}x{h}; pass --size H W to resize all pairs to one size.")
        if str(image.dtype) != plan["image_dtype"]:
            raise InputError(f"Image {iw} is {image.dtype} but the first image is {plan['image_dtype']}; "
                             "pass --image-dtype uint8 to store every image as 8-bit.")
    return image, mask


def convert(src: str | os.PathLike | None = None, dst: str | os.PathLike | None = None, *,
            images: str | os.PathLike | None = None, masks: str | os.PathLike | None = None,
            images_key: str | None = None, masks_key: str | None = None,
            images_dir: str | os.PathLike | None = None, masks_dir: str | os.PathLike | None = None,
            mask_suffix: str = "", format: str = "zarr", size: tuple[int, int] | None = None,
            channels: int | None = None, image_dtype: str | None = None,
            chunk_samples: int | None = None, compressor: str = "lz4", workers: int = 1,
            overwrite: bool = False, resume: bool = False, progress: Any = "auto",
            layout: str | None = None, axis: str | None = None, context: int | None = None,
            skip_empty: bool | None = None, keep_empty: float | None = None,
            remap_labels: bool | None = None, seed: int | None = None,
            mask_dtype: str | None = None, spacing: tuple[float, float, float] | None = None,
            chunk_shape: tuple[int, int, int] | None = None, dask: str | None = None,
            storage_options: dict[str, Any] | None = None, staging: str | os.PathLike | None = None) -> Any:
    """Convert image/mask pairs (2D files, arrays or medical volumes) into a store.

    Parameters
    ----------
    src : path, optional
        Folder with ``images/`` and ``masks/`` paired by file stem, or a volume data set:
        ``imagesTr/`` + ``labelsTr/`` (Decathlon, nnU-Net) or ``images/`` + ``masks/`` holding
        volume files (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``, ...; ``.nii.gz`` counts as one
        suffix) or DICOM series folders, paired by case name.
    dst : path
        Destination store directory.
    images, masks : path, optional
        ``.npy`` / ``.npz`` arrays instead of a folder (memory-mapped, so they may exceed RAM).
    images_key, masks_key : str, optional
        Member names inside ``.npz`` archives.
    images_dir, masks_dir : path, optional
        Explicit image and mask folders.
    mask_suffix : str
        Suffix of mask file stems (``"_mask"`` pairs ``a.png`` with ``a_mask.png``).
    format : {"zarr", "memmap"}
        Store backend.
    size : (H, W), optional
        Resize every pair (area/linear for images, nearest for masks).
    channels : {1, 3}, optional
        Convert every image to this many channels; required when sources mix them.
    image_dtype : {None, "uint8"}
        Keep the source bit depth (default) or store 16-bit images as 8-bit.
    chunk_samples : int, optional
        Samples per chunk (default: about 2 MiB of image data per chunk).
    compressor : {"lz4", "zstd", "none"}
        Blosc codec for the zarr backend (with byte shuffle).  ``lz4`` (default) decodes about
        10x faster than ``zstd`` (0.014 vs 0.17 ms per 256x256x3 sample here), which training
        pays every epoch; ``zstd`` compresses ~1.4x better, for archives.
    workers : int
        Processes that decode, resize and write chunks.
    overwrite, resume : bool
        Replace an existing store, or finish an interrupted conversion.
    progress : {"auto", "bar", "plain", "quiet"} or bool
        Progress reporting.
    layout : {"slices", "volumes"}, optional
        Volumes only (as are all options below; None means the default, and any of them
        given for a 2D source is refused).  ``"slices"`` (default): every slice along
        ``axis`` is one 2D sample named ``"{case}:{slice}"``.  ``"volumes"``: one entry per
        case, 3D-chunked (``chunk_shape``), read box by box by
        :class:`~streamseg.store.volume_reader.VolumeStore` and ``PatchDataset``; ``size``,
        ``channels``, ``image_dtype``, ``chunk_samples`` and the slice options do not apply.
    axis : {"axial", "coronal", "sagittal"}, optional
        Slicing axis of the RAS-reoriented volume (default axial).
    context : int, optional
        Neighbouring slices stacked on each side as extra channels (2.5D; edges replicated;
        default 0).
    skip_empty : bool, optional
        Drop slices without foreground (default False) ...
    keep_empty : float, optional
        ... keeping this share of them, drawn with ``seed`` (default 0.0).
    remap_labels : bool, optional
        Store labels as ``0..K-1`` (the table of original values goes into the manifest);
        needed for labels above the mask store's range.
    seed : int, optional
        Seed of the ``keep_empty`` draw and of the foreground intensity sample (default 0).
    mask_dtype : {"uint8", "uint16"}, optional
        Mask store dtype (default uint8).  uint16 keeps labels up to 65535 as they are;
        training still needs labels ``0..255`` (``SegmentationDataset``'s ``num_classes`` is
        at most 256), so ``remap_labels`` is usually the better way.
    spacing : (SX, SY, SZ), optional
        Resample every case to this spacing in mm, RAS order (0 keeps an axis): linear for
        images, nearest for masks (scipy.ndimage).  Both layouts.
    chunk_shape : (CX, CY, CZ), optional
        Chunk of a ``layout="volumes"`` store in voxels (default 32 x 32 x 32).
    dask : str, optional
        Write the chunks on a Dask cluster, one task each (:mod:`streamseg.store.dask_run`):
        ``"tcp://HOST:PORT"`` (a running scheduler; ``dst`` must be a path every worker sees)
        or ``"local:N"`` (N processes here; call under ``if __name__ == "__main__":``).  Same
        store as a serial run; ``resume`` works after the client dies; not with ``workers``
        or ``layout="volumes"``.
    storage_options : dict, optional
        With a URL ``dst`` (``s3://bucket/data.zarr``; also ``gs://``, ``az://``, ``file://``
        through fsspec; zarr only): options of the fsspec file system, e.g.
        ``{"endpoint_url": "http://localhost:9000"}``; credentials otherwise come from the
        environment (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``~/.aws``).  The store is
        converted into a local staging folder, then every file is uploaded, ``manifest.json``
        last; ``resume`` uploads only what is missing (see :mod:`streamseg.store.remote_upload`).
    staging : path, optional
        With a URL ``dst``: the folder the store is staged in before the upload (default
        ``<system temp>/streamseg-staging``); it needs the store's size of free disk, and the
        staged store is removed once uploaded.

    Returns
    -------
    Store or VolumeStore
        The finished store, opened.  For volumes, ``store.meta["params"]["source"]`` holds
        the per-case records (``cases``: paths, shape, spacing, affine, orientation on
        disk, intensity range and percentiles, label voxel counts) and the label table.

    Raises
    ------
    StreamsegError
        Bad input or options, one line each (the CLI prints it and exits 2).  Volume input
        is checked case by case before anything is written: image/mask shape or affine
        mismatches, non-integer float masks, truncated or unreadable files (named), empty
        series folders, several series in one folder, lonely images or masks.
    """
    from .remote_fs import is_url

    if storage_options is not None or staging is not None or is_url(dst):
        from .remote_upload import convert_to_url  # object storage: stage here, then upload

        return convert_to_url(convert, {k: v for k, v in locals().items() if k not in ("convert_to_url", "is_url")})
    given = {"layout": layout, "axis": axis, "context": context, "skip_empty": skip_empty,
             "keep_empty": keep_empty, "remap_labels": remap_labels, "seed": seed, "mask_dtype": mask_dtype,
             "spacing": spacing, "chunk_shape": chunk_shape}
    if dst is None:
        raise OptionError("convert needs a destination. Received: dst=None")
    if dask is not None:
        check_dask_options(dask, workers=workers, layout=layout)
    if (images is None) != (masks is None):
        raise OptionError("Pass both images= and masks= arrays, or a source folder. "
                          f"Received: images={truncate(images)}, masks={truncate(masks)}")
    if images is not None:
        if src is not None:
            raise OptionError(f"Give either a source folder or arrays, not both. Received: src={truncate(src)}")
        refuse_volume_options(given)
        source: Any = ArraySource(images, masks, images_key=images_key, masks_key=masks_key)  # type: ignore[arg-type]
    else:
        if src is None and not (images_dir and masks_dir):
            raise OptionError("convert needs a source folder, --images-dir/--masks-dir, or "
                              "--images/--masks arrays. Received: nothing")
        if is_volume_input(src, images_dir=images_dir, masks_dir=masks_dir):
            _validate(format, compressor, size, channels, image_dtype, chunk_samples, workers)  # before reading
            if layout == "volumes":
                refuse_slice_store_options(size=size, channels=channels, image_dtype=image_dtype,
                                           chunk_samples=chunk_samples)
                chunks = check_chunk_shape(chunk_shape)  # before every case is read
                source = volume_source(src, images_dir=images_dir, masks_dir=masks_dir, mask_suffix=mask_suffix,
                                       given=given, progress=progress)

                def check_memory(case_bytes: int) -> None:
                    _check_memory(case_bytes, 1, workers, f"The largest case ({case_bytes / 2**20:.0f} MiB)")

                return convert_volume_store(source, Path(dst), ([str(src)] if src is not None else [])
                                            + _source_paths(source), backend=format, compressor=compressor,
                                            chunk_shape=chunks, seed=int(seed or 0),
                                            workers=workers, overwrite=overwrite, resume=resume,
                                            progress=progress, check_memory=check_memory,
                                            destination_error=_destination_error)
            source = volume_source(src, images_dir=images_dir, masks_dir=masks_dir, mask_suffix=mask_suffix,
                                   given=given, progress=progress)
        else:
            refuse_volume_options(given)
            source = FolderSource(src, images_dir=images_dir, masks_dir=masks_dir, mask_suffix=mask_suffix)
    protect = [src] if src is not None else []
    return _convert_source(source, dst, protect + _source_paths(source), format=format, size=size,
                           channels=channels, image_dtype=image_dtype, chunk_samples=chunk_samples,
                           compressor=compressor, workers=workers, overwrite=overwrite, resume=resume,
                           progress=progress, dask=dask)


def convert_source(source: FolderSource | ArraySource | SynthSource, dst: str | os.PathLike, *,
                   format: str = "zarr", size: tuple[int, int] | None = None, channels: int | None = None,
                   image_dtype: str | None = None, chunk_samples: int | None = None,
                   compressor: str = "lz4", workers: int = 1, overwrite: bool = False,
                   resume: bool = False, progress: Any = "auto", dask: str | None = None) -> Store:
    """Convert any source object (see :mod:`streamseg.io.sources`) into a store; see :func:`convert`.

    The destination is locked for the whole conversion (a second writer is refused, naming
    the PID of the first), ``overwrite`` never deletes the source or anything that is not a
    streamseg store, and the store is marked complete only after every chunk was checked on
    disk against its checksum.  ``dask`` as in :func:`convert`.
    """
    if dask is not None:
        check_dask_options(dask, workers=workers, layout=None)
    return _convert_source(source, dst, _source_paths(source), format=format, size=size, channels=channels,
                           image_dtype=image_dtype, chunk_samples=chunk_samples, compressor=compressor,
                           workers=workers, overwrite=overwrite, resume=resume, progress=progress, dask=dask)


def _source_paths(source: Any) -> list[str]:
    """The folders and files a source reads, which ``--overwrite`` must never delete."""
    paths = [getattr(source, a, None) for a in ("images_dir", "masks_dir")]
    spec = getattr(source, "spec", None)
    if isinstance(source, ArraySource) and spec:
        paths += [spec[0], spec[2]]
    return [str(p) for p in paths if p]


def _destination_error(dst: Path, exc: OSError) -> DestinationError | None:
    """A one-line error for a failure to write ``dst``; None when ``exc`` is about something else."""
    where = exc.filename
    inside = False
    if where is not None:
        try:
            inside = Path(os.path.abspath(where)).is_relative_to(os.path.abspath(dst)) or \
                Path(os.path.abspath(dst)).is_relative_to(os.path.abspath(where))
        except (TypeError, ValueError):
            inside = False
    reasons = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted", errno.ENOSPC: "no space left on the device",
               errno.EDQUOT: "the disk quota is exceeded", errno.ENOTDIR: "a part of the path is a file"}
    if not inside and exc.errno not in (errno.EROFS, errno.ENOSPC, errno.EDQUOT):
        return None
    reason = reasons.get(exc.errno or 0, exc.strerror or exc.__class__.__name__)
    return DestinationError(
        f"Cannot write the store {dst}: {reason} ({where or dst}). Choose a destination you can "
        "write to (check its permissions and free space)."
    )


def _convert_source(source: Any, dst: str | os.PathLike, protect: Sequence[str], *, format: str,
                    size: tuple[int, int] | None, channels: int | None, image_dtype: str | None,
                    chunk_samples: int | None, compressor: str, workers: int, overwrite: bool,
                    resume: bool, progress: Any, dask: str | None = None) -> Store:
    size = _validate(format, compressor, size, channels, image_dtype, chunk_samples, workers)
    mask_dtype = str(getattr(source, "mask_dtype", "uint8"))
    options = {"size": size, "channels": channels, "image_dtype": image_dtype, "mask_dtype": mask_dtype}
    count = len(source)
    if count == 0:
        what = " (every slice was empty and --skip-empty dropped them)" if getattr(source, "skip_empty", 0) else ""
        raise InputError(f"The source holds no samples{what}; nothing to convert.")
    probe_image, _ = _load_checked(source, 0, options, None)
    h, w, c = probe_image.shape
    cs = chunk_samples or default_chunk_samples((h, w, c), probe_image.dtype.itemsize)
    mask_bytes = np.dtype(mask_dtype).itemsize
    case_bytes = largest_case_bytes(source)  # a volume source holds one whole case per process
    _check_memory(h * w * (c * probe_image.dtype.itemsize + mask_bytes), min(cs, count), memory_workers(dask, workers),
                  f"One chunk of {min(cs, count)} {h}x{w}x{c} {probe_image.dtype} sample(s)"
                  + (f" and a case of {case_bytes / 2**20:.0f} MiB" if case_bytes else ""), case_bytes)
    names_crc = 0
    for i in range(count):
        names_crc = zlib.crc32(source.name(i).encode() + b"\n", names_crc)
    plan = {
        "backend": format, "count": count, "image_shape": [h, w, c], "image_dtype": str(probe_image.dtype),
        "mask_dtype": mask_dtype, "chunk_samples": cs, "num_chunks": -(-count // cs),
        "compressor": compressor, "clevel": 3, "shuffle": "shuffle", "names_crc32": names_crc,
        "params": {"source": source.describe(), "size": list(size) if size else None,
                   "channels": channels, "image_dtype": image_dtype},
    }
    dst_path = Path(dst)
    try:
        with DestinationLock(dst_path), dask_runner(dask) as runner:  # connected before anything is written
            return _write_store(source, dst_path, plan, options, protect, overwrite, resume, progress,
                                workers, runner)
    except StreamsegError:
        raise
    except OSError as exc:
        mapped = _destination_error(dst_path, exc)
        if mapped is None:
            raise
        raise mapped from None


def _write_store(source: Any, dst_path: Path, plan: dict[str, Any], options: dict[str, Any],
                 protect: Sequence[str], overwrite: bool, resume: bool, progress: Any, workers: int,
                 runner: DaskRunner | None = None) -> Store:
    """Everything that touches the destination; the caller holds its lock (and ``runner``'s cluster)."""
    count, cs = plan["count"], plan["chunk_samples"]
    done = prepare_destination(dst_path, plan, overwrite=overwrite, resume=resume, protect=protect)
    todo = [k for k in range(plan["num_chunks"]) if k not in done]
    task = _ChunkTask(source, ChunkSink(dst_path, plan), options)
    bar = Progress(count, f"convert -> {dst_path.name}", mode=progress, unit="pairs")
    bar.update(sum(min(cs, count - k * cs) for k in done))
    from numcodecs import blosc

    blosc_threads, blosc.use_threads = blosc.use_threads, False  # one core per worker, for all

    def on_record(rec: dict[str, Any]) -> None:
        append_progress(dst_path, rec)
        bar.update(rec["n"])

    try:
        if runner is not None:
            runner.run(task, todo, on_record)
        elif workers == 1 or len(todo) <= 1:
            for k in todo:
                record = task(k)
                append_progress(dst_path, record)
                bar.update(record["n"])
        else:
            ranges = source.case_ranges() if hasattr(source, "case_ranges") else None
            _run_parallel(task, chunk_segments(todo, cs, count, ranges, workers), workers, dst_path, bar)
    finally:
        blosc.use_threads = blosc_threads
        bar.close()
    finalize_store(dst_path, plan)
    return open_store(dst_path)


# set once per conversion worker by _init_worker: the task and a "parent still alive?" check
_WORKER_TASK: list[tuple[_ChunkTask, Callable[[], bool]]] = []


def _init_worker(task: _ChunkTask, owner: int) -> None:
    """Receive the (large) task once per worker; Blosc runs one thread per worker.

    The worker ends when the converting process ``owner`` dies (even by ``SIGKILL``), so it
    never outlives it holding the caller's pipes or the destination's lock.

    OpenCV's thread count is left alone: ``cv2.setNumThreads`` deadlocks in a forked child
    whose parent had used OpenCV's thread pool (seen with OpenCV 5.0).
    """
    alive = die_with_parent(owner)
    from numcodecs import blosc

    blosc.use_threads = False
    _WORKER_TASK[:] = [(task, alive)]


def _run_chunks(ks: list[int]) -> list[dict[str, Any]]:
    """Write a run of consecutive chunks in this worker (a volume case stays in its cache)."""
    task, alive = _WORKER_TASK[0]
    records = []
    for k in ks:
        if not alive():  # portable fallback to the death signal: orphaned between chunks
            os._exit(1)
        records.append(task(k))
    return records


def _run_parallel(task: _ChunkTask, runs: list[list[int]], workers: int, dst: Path, bar: Progress) -> None:
    """Hand runs of chunks (:func:`~streamseg.store.volume_convert.chunk_segments`) to workers."""
    def record(records: list[dict[str, Any]]) -> None:
        for rec in records:
            append_progress(dst, rec)
            bar.update(rec["n"])

    run_bounded(_run_chunks, runs, workers=workers, initializer=_init_worker, initargs=(task, os.getpid()),
                on_result=record)
