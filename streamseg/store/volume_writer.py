"""Write a ``--layout volumes`` store: one 3D-chunked entry per case, crash-safe and resumable.

The flow mirrors the 2D writer (:mod:`streamseg.store.writer`): the destination is locked,
``_plan.json`` is written with every case's geometry (from the checking pass of the
source), the arrays' metadata are created, then each case is read once, written slab by
slab (one chunk-wide X slab at a time, so each chunk is encoded once) and recorded in
``_progress.jsonl``; ``--resume`` redoes only cases without a record.  Before the manifest
marks the store complete, every chunk file of every case is re-read and compared with its
recorded crc32.  Layout: :mod:`streamseg.store.volume_layout`.  May import:
:mod:`streamseg.io`, :mod:`streamseg.errors`, :mod:`streamseg.progress`.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IncompleteStoreError, StreamsegError, truncate
from ..progress import Progress
from ._orphans import die_with_parent
from ._tasks import run_bounded
from .layout import ARRAYS_MARK
from .reader import FORMAT_VERSION, MANIFEST_NAME, PLAN_NAME, PROGRESS_NAME
from .volume_layout import CASES_DIR, PATCH_READS, case_dir, chunk_file, chunk_grid, foreground_sample, slab_ranges
from .writer import _atomic_write, _read_progress, append_progress

__all__ = ["volume_plan", "create_volume_arrays", "write_case", "write_volume_store", "finalize_volume_store",
           "array_metadata", "convert_volume_store"]


def volume_plan(source: Any, *, backend: str, compressor: str, chunk_shape: tuple[int, int, int],
                seed: int) -> dict[str, Any]:
    """The plan of a volume store: per-case shapes and the store-wide dtypes and codecs."""
    records = source.case_records()
    channels = {int(r["shape"][3]) if len(r["shape"]) == 4 else 1 for r in records}
    return {
        "layout": "volumes", "backend": backend, "count": len(records), "channels": max(channels),
        "image_dtype": str(source.image_dtype), "mask_dtype": str(source.mask_dtype),
        "chunk_shape": list(chunk_shape), "compressor": compressor if backend == "zarr" else "none",
        "clevel": 3, "shuffle": "shuffle", "seed": int(seed),
        "shapes": [[int(v) for v in r["shape"][:3]] for r in records],
        "names": [r["name"] for r in records],
        "params": {"source": source.describe()},
    }


def array_metadata(dst: Path, k: int, backend: str) -> dict[str, dict[str, int]]:
    """``{"image": {"size", "crc32"}, "mask": ...}`` of case ``k``'s array metadata: its
    ``zarr.json`` files, or the headers of its ``.npy`` files (and their full size)."""
    from .integrity import npy_data_offset

    d = case_dir(dst, k)
    out = {}
    for name in ("image", "mask"):
        if backend == "zarr":
            raw = (d / name / "zarr.json").read_bytes()
            out[name] = {"size": len(raw), "crc32": zlib.crc32(raw)}
        else:
            path = d / f"{name}.npy"
            offset = npy_data_offset(path)[0]
            with open(path, "rb") as fh:
                head = fh.read(offset)
            out[name] = {"size": path.stat().st_size, "header_size": offset, "crc32": zlib.crc32(head)}
    return out


def create_volume_arrays(dst: Path, plan: dict[str, Any]) -> None:
    """Create every case's (empty) arrays: zarr metadata, or sparse ``.npy`` files."""
    c = plan["channels"]
    (dst / CASES_DIR).mkdir(exist_ok=True)
    if plan["backend"] == "memmap":
        for k, shape in enumerate(plan["shapes"]):
            d = case_dir(dst, k)
            d.mkdir(parents=True, exist_ok=True)
            np.lib.format.open_memmap(d / "image.npy", mode="w+", dtype=plan["image_dtype"],
                                      shape=(*shape, c)).flush()
            np.lib.format.open_memmap(d / "mask.npy", mode="w+", dtype=plan["mask_dtype"], shape=tuple(shape)).flush()
        return
    import zarr
    from zarr.codecs import BloscCodec

    group = zarr.open_group(dst, mode="a")  # not "w": that would empty dst, lock file included
    compressors: Any = None
    if plan["compressor"] != "none":
        compressors = [BloscCodec(cname=plan["compressor"], clevel=plan["clevel"], shuffle=plan["shuffle"])]
    cx, cy, cz = plan["chunk_shape"]
    for k, shape in enumerate(plan["shapes"]):
        name = f"{CASES_DIR}/{k:05d}"
        group.create_array(f"{name}/image", shape=(*shape, c), chunks=(cx, cy, cz, c), dtype=plan["image_dtype"],
                           compressors=compressors, fill_value=0, config={"write_empty_chunks": True})
        group.create_array(f"{name}/mask", shape=tuple(shape), chunks=(cx, cy, cz), dtype=plan["mask_dtype"],
                           compressors=compressors, fill_value=0, config={"write_empty_chunks": True})
    group.attrs["streamseg"] = {"format_version": FORMAT_VERSION, "manifest": MANIFEST_NAME, "layout": "volumes"}


def _encoder(plan: dict[str, Any]) -> Any:
    if plan["compressor"] == "none":
        return None
    from numcodecs import Blosc

    return Blosc(cname=plan["compressor"], clevel=plan["clevel"], shuffle=Blosc.SHUFFLE)


def _write_file(path: str, raw: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(raw)
    os.replace(tmp, path)


def write_case(dst: Path, plan: dict[str, Any], k: int, image: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Write case ``k`` (image ``(X, Y, Z, C)``, labels ``(X, Y, Z)``) and return its progress record."""
    shape = tuple(plan["shapes"][k])
    if tuple(image.shape[:3]) != shape or tuple(labels.shape) != shape:  # pragma: no cover - checked pass
        raise IncompleteStoreError(f"Case {plan['names'][k]!r} changed since it was checked: {image.shape} "
                                   f"vs planned {shape}; convert again.")
    image = image.astype(np.dtype(plan["image_dtype"]).newbyteorder("<"), copy=False)
    labels = labels.astype(np.dtype(plan["mask_dtype"]).newbyteorder("<"), copy=False)
    d = case_dir(dst, k)
    cx, cy, cz = plan["chunk_shape"]
    if plan["backend"] == "memmap":
        crcs = []
        for name, data in (("image", image), ("mask", labels)):
            mm = np.load(d / f"{name}.npy", mmap_mode="r+")
            for a, b in slab_ranges(shape[0], cx):
                mm[a:b] = data[a:b]
                crcs.append(zlib.crc32(np.ascontiguousarray(data[a:b])))
            mm.flush()
            del mm
        table = np.array(crcs, np.uint32)
    else:
        codec = _encoder(plan)
        grid = chunk_grid(shape, plan["chunk_shape"])
        table = np.zeros((2, *grid), np.uint32)
        for ai, (name, data) in enumerate((("image", image), ("mask", labels))):
            full_shape = (cx, cy, cz) + data.shape[3:]
            for ix, (x0, x1) in enumerate(slab_ranges(shape[0], cx)):
                slab = data[x0:x1]
                for iy, (y0, y1) in enumerate(slab_ranges(shape[1], cy)):
                    for iz, (z0, z1) in enumerate(slab_ranges(shape[2], cz)):
                        block = slab[:, y0:y1, z0:z1]
                        if block.shape != full_shape:  # edge chunks are stored full size, padded with 0
                            padded = np.zeros(full_shape, data.dtype)
                            padded[: x1 - x0, : y1 - y0, : z1 - z0] = block
                            block = padded
                        block = np.ascontiguousarray(block)
                        raw = bytes(codec.encode(block)) if codec is not None else block.tobytes()
                        _write_file(chunk_file(dst, k, name, (ix, iy, iz)), raw)
                        table[ai, ix, iy, iz] = zlib.crc32(raw)
    np.save(d / "checksums.npy", table)
    fg = foreground_sample(labels, plan["seed"], k)
    np.save(d / "foreground.npy", fg)
    labels_fg, counts_fg = np.unique(fg[:, 3], return_counts=True)
    return {"case": int(k), "name": plan["names"][k],
            "checksums_crc32": zlib.crc32((d / "checksums.npy").read_bytes()),
            "foreground_crc32": zlib.crc32((d / "foreground.npy").read_bytes()),
            "foreground_samples": {str(int(v)): int(n) for v, n in zip(labels_fg, counts_fg)}}


class _CaseTask:
    """Read, convert and write one case (picklable; runs in worker processes)."""

    def __init__(self, source: Any, dst: Path, plan: dict[str, Any]) -> None:
        self.source, self.dst, self.plan = source, Path(dst), plan

    def __call__(self, k: int) -> dict[str, Any]:
        image, labels = self.source.case_arrays(k)
        return write_case(self.dst, self.plan, k, image, labels)


def _init_worker(owner: int) -> None:
    die_with_parent(owner)
    from numcodecs import blosc

    blosc.use_threads = False


def write_volume_store(source: Any, dst: Path, plan: dict[str, Any], done: set[int], *, workers: int,
                       progress: Any) -> None:
    """Write every case not in ``done`` (the caller holds the lock and prepared ``dst``)."""
    todo = [k for k in range(plan["count"]) if k not in done]
    task = _CaseTask(source, dst, plan)
    bar = Progress(plan["count"], f"convert -> {dst.name}", mode=progress, unit="cases")
    bar.update(len(done))

    def record(rec: dict[str, Any]) -> None:
        append_progress(dst, {"chunk": rec["case"], **rec})
        bar.update(1)

    try:
        if workers == 1 or len(todo) <= 1:
            for k in todo:
                record(task(k))
        else:
            run_bounded(task, todo, workers=min(workers, len(todo)), initializer=_init_worker,
                        initargs=(os.getpid(),), on_result=record)
    finally:
        bar.close()


def _check_cases_on_disk(dst: Path, plan: dict[str, Any], records: dict[int, dict[str, Any]]) -> None:
    """Every case recorded, and every chunk file / slab on disk with its recorded crc32."""
    def refuse(problem: str) -> IncompleteStoreError:
        return IncompleteStoreError(f"Cannot mark {dst} complete: {problem}. Something changed the store while "
                                    "it was written; nothing was marked complete. Convert again with --overwrite.")

    missing = [k for k in range(plan["count"]) if k not in records]
    if missing:
        raise refuse(f"case(s) {missing[:5]} have no progress record")
    cx = plan["chunk_shape"][0]
    for k, shape in enumerate(plan["shapes"]):
        d = case_dir(dst, k)
        try:
            raw_table = (d / "checksums.npy").read_bytes()
            fg_raw = (d / "foreground.npy").read_bytes()
        except FileNotFoundError as exc:
            raise refuse(f"{exc.filename} is missing") from None
        if zlib.crc32(raw_table) != records[k]["checksums_crc32"] or zlib.crc32(fg_raw) != records[k]["foreground_crc32"]:
            raise refuse(f"the checksum table or foreground sample of case {k} does not match its record")
        table = np.load(d / "checksums.npy")
        if plan["backend"] == "memmap":
            got = []
            for name in ("image", "mask"):
                mm = np.load(d / f"{name}.npy", mmap_mode="r")
                if tuple(mm.shape[:3]) != tuple(shape):
                    raise refuse(f"{d / name}.npy holds shape {mm.shape}, planned {shape}")
                got += [zlib.crc32(np.ascontiguousarray(mm[a:b])) for a, b in slab_ranges(shape[0], cx)]
                del mm
            if not np.array_equal(np.array(got, np.uint32), table):
                raise refuse(f"case {k} does not match its checksums")
            continue
        for ai, name in enumerate(("image", "mask")):
            for index in np.ndindex(*table.shape[1:]):
                path = chunk_file(dst, k, name, index)
                try:
                    with open(path, "rb") as fh:
                        raw = fh.read()
                except FileNotFoundError:
                    raise refuse(f"chunk {index} of case {k} ({name}) is missing ({path})") from None
                if zlib.crc32(raw) != int(table[(ai, *index)]):
                    raise refuse(f"chunk {index} of case {k} ({name}) does not match its checksum ({path})")


def finalize_volume_store(dst: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """Check every case on disk, write the manifest (the completion mark) and drop the logs."""
    records = _read_progress(dst)
    _check_cases_on_disk(dst, plan, records)
    source = plan["params"]["source"]
    cases = []
    labels: dict[int, int] = {}
    for k, rec in enumerate(source["cases"]):
        entry = dict(rec)
        entry["folder"] = f"{CASES_DIR}/{k:05d}"
        entry["foreground_samples"] = records[k]["foreground_samples"]
        entry["checksums_crc32"] = records[k]["checksums_crc32"]
        entry["foreground_crc32"] = records[k]["foreground_crc32"]
        entry["metadata"] = array_metadata(dst, k, plan["backend"])
        cases.append(entry)
        for v, n in rec["labels"].items():
            labels[int(v)] = labels.get(int(v), 0) + int(n)
    table = source.get("label_table")
    stored_labels = sorted(table.index(v) for v in labels) if table else sorted(labels)
    manifest = {
        "format_version": FORMAT_VERSION, "layout": "volumes", "backend": plan["backend"], "complete": True,
        "count": plan["count"], "channels": plan["channels"], "image_dtype": plan["image_dtype"],
        "mask_dtype": plan["mask_dtype"], "chunk_shape": plan["chunk_shape"], "compressor": plan["compressor"],
        "patch_reads": PATCH_READS, "label_values": stored_labels,
        "labels": {str(v): labels[v] for v in sorted(labels)},
        "checksums": {"algorithm": "crc32",
                      "of": "chunk files" if plan["backend"] == "zarr" else "X slabs of chunk_shape[0] voxels",
                      "table": "cases/NNNNN/checksums.npy"},
        "cases": cases,
        "params": {"source": {key: val for key, val in source.items() if key != "cases"}},
    }
    _atomic_write(dst / MANIFEST_NAME, json.dumps(manifest, indent=1))
    for name in (PROGRESS_NAME, PLAN_NAME, ARRAYS_MARK):
        (dst / name).unlink(missing_ok=True)
    return manifest


def convert_volume_store(source: Any, dst: Path, protect: list[str], *, backend: str, compressor: str,
                         chunk_shape: tuple[int, int, int], seed: int, workers: int, overwrite: bool,
                         resume: bool, progress: Any, check_memory: Any, destination_error: Any) -> Any:
    """Lock ``dst``, prepare it, write every case and mark the store complete; return it opened.

    ``check_memory(case_bytes)`` refuses a conversion whose workers' cases cannot fit in memory;
    ``destination_error(dst, OSError)`` maps a full disk or a read-only destination to one line.
    """
    from .lock import DestinationLock
    from .volume_reader import VolumeStore
    from .writer import prepare_destination

    records = source.case_records()
    if len({(r["shape"][3] if len(r["shape"]) == 4 else 1) for r in records}) > 1:
        from ..errors import InputError

        counts = {r["name"]: (r["shape"][3] if len(r["shape"]) == 4 else 1) for r in records}
        raise InputError("The cases have different numbers of channels (modalities); a volume store holds one "
                         f"channel count. Received: {truncate(counts)}")
    plan = volume_plan(source, backend=backend, compressor=compressor, chunk_shape=chunk_shape, seed=seed)
    itemsize = np.dtype(plan["image_dtype"]).itemsize * plan["channels"] + np.dtype(plan["mask_dtype"]).itemsize
    check_memory(max(int(np.prod(s)) for s in plan["shapes"]) * itemsize)
    try:
        with DestinationLock(dst):
            done = prepare_destination(dst, plan, overwrite=overwrite, resume=resume, protect=protect,
                                       create=create_volume_arrays)
            from numcodecs import blosc

            threads, blosc.use_threads = blosc.use_threads, False
            try:
                write_volume_store(source, dst, plan, done, workers=workers, progress=progress)
            finally:
                blosc.use_threads = threads
            finalize_volume_store(dst, plan)
    except StreamsegError:
        raise
    except OSError as exc:
        mapped = destination_error(dst, exc)
        if mapped is None:
            raise
        raise mapped from None
    return VolumeStore(dst)
