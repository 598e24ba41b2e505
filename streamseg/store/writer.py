"""Write side of a store: chunk-by-chunk, crash-safe, resumable.

A conversion first writes ``_plan.json`` (shapes, dtypes, parameters, sample names),
then one chunk at a time.  After a chunk is on disk a line describing it (checksums,
label counts, intensity sums) is appended to ``_progress.jsonl``.  ``manifest.json`` is
written last, atomically, and only then does :func:`streamseg.open_store` accept the
store.  A killed conversion leaves a plan and a progress log, so ``--resume`` rewrites
only the chunks that have no progress line, and the result is byte-identical to an
uninterrupted run because every statistic is an exact integer sum per chunk.

Chunks are written by whichever process produced them (:class:`ChunkSink` pickles as
its path), so conversion scales with worker processes.

Nothing here loses data or reports false success: the converter holds the destination's
lock (:mod:`streamseg.store.lock`) throughout; ``--overwrite`` deletes only a streamseg
store that neither holds nor lies inside the source and contains nothing streamseg does not
write; and before the manifest is written every planned chunk is re-read from disk and
checked against its recorded checksum (:func:`_check_chunks_on_disk`).
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import IncompleteStoreError, OptionError, StoreExistsError, truncate
from .integrity import buffer_checksum, record_files, row_checksums, sample_rows, write_read_checksums
from .lock import LOCK_NAME
from .volume_layout import CASE_ARRAYS, CASE_FILES, CASES_DIR
from .layout import ARRAYS_MARK
from .reader import ARRAY_NAMES, FORMAT_VERSION, MANIFEST_NAME, PLAN_NAME, PROGRESS_NAME

__all__ = ["ChunkSink", "chunk_record", "prepare_destination", "finalize_store", "COMPRESSORS",
           "default_chunk_samples"]

COMPRESSORS = ("zstd", "lz4", "none")
FORMATS = ("zarr", "memmap")
#: Top-level files streamseg writes into a store (anything else there is the user's).
_STORE_FILES = frozenset({MANIFEST_NAME, "sources.txt", "read_checksums.npy", PLAN_NAME, PROGRESS_NAME, "zarr.json",
                          ARRAYS_MARK,
                          "images.npy", "masks.npy"})


def default_chunk_samples(image_shape: tuple[int, int, int], itemsize: int, target_mb: float = 2.0) -> int:
    """Samples per chunk so that one image chunk holds about ``target_mb`` MiB."""
    sample_bytes = int(np.prod(image_shape)) * itemsize
    return max(1, int(target_mb * 2**20 // sample_bytes))


def _crc(buf: Any) -> int:
    return zlib.crc32(memoryview(buf).cast("B"))


def chunk_record(k: int, images: np.ndarray, masks: np.ndarray, names: list[str],
                 crcs: dict[str, int]) -> dict[str, Any]:
    """Exact per-chunk statistics: intensity sums per channel and label pixel counts."""
    c = images.shape[-1]
    sums, sqs = [], []
    if images.dtype.kind == "u" and images.dtype.itemsize <= 2:
        levels = np.arange(256 if images.dtype.itemsize == 1 else 65536, dtype=np.int64)
        for ch in range(c):
            hist = np.bincount(images[..., ch].ravel(), minlength=levels.size)
            sums.append(int(hist @ levels))
            sqs.append(int(hist @ (levels * levels)))
    else:
        flat = images.reshape(-1, c).astype(np.float64)
        sums = [float(v) for v in flat.sum(axis=0)]
        sqs = [float(v) for v in (flat * flat).sum(axis=0)]
    counts = np.bincount(masks.ravel(), minlength=1)
    labels = {str(v): int(n) for v, n in enumerate(counts) if n}
    return {"chunk": k, "n": int(images.shape[0]), "crc": crcs, "sum": sums, "sumsq": sqs,
            "labels": labels, "names": names}


class ChunkSink:
    """Writes chunks into a prepared destination; picklable (by path) for worker processes."""

    def __init__(self, path: str | os.PathLike, plan: dict[str, Any]) -> None:
        self.path = Path(path)
        self.plan = plan
        self._arrays: dict[str, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path), "plan": self.plan}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["plan"])  # type: ignore[misc]

    def _open(self) -> dict[str, Any]:
        if self._arrays is None:
            if self.plan["backend"] == "memmap":
                self._arrays = {n: np.load(self.path / f"{n}.npy", mmap_mode="r+") for n in ARRAY_NAMES}
            else:
                from .reader import _ZarrChunkReader

                self._arrays = {n: _ZarrChunkReader(self.path, n) for n in ARRAY_NAMES}
        return self._arrays

    def write(self, k: int, images: np.ndarray, masks: np.ndarray, names: list[str]) -> dict[str, Any]:
        """Write chunk ``k`` and return its progress record (checksums and statistics)."""
        arrays = self._open()
        cs = self.plan["chunk_samples"]
        start = k * cs
        crcs: dict[str, int] = {}
        read: dict[str, Any] = {}  # read checksums (store/integrity.py): per sample (memmap), per file
        for name, data in (("images", images), ("masks", masks)):
            if self.plan["backend"] == "memmap":
                mm = arrays[name]
                mm[start : start + data.shape[0]] = data
                mm.flush()
                crcs[name] = _crc(np.ascontiguousarray(data))
                read[name] = row_checksums(sample_rows(mm[start : start + data.shape[0]])).tolist()
            else:
                crcs[name], read[name] = self._write_zarr_chunk(arrays[name], k, data)
        record = chunk_record(k, images, masks, names, crcs)
        record["read"] = read
        return record

    def _write_zarr_chunk(self, reader: Any, k: int, data: np.ndarray) -> tuple[int, int]:
        full = np.zeros(reader.chunk_shape, reader.dtype)  # the last chunk is padded with fill 0
        full[: data.shape[0]] = data
        full = np.ascontiguousarray(full.astype(reader.dtype.newbyteorder("<"), copy=False))
        raw = bytes(self._blosc_codec().encode(full)) if reader._blosc else full.tobytes()
        path = reader.chunk_path(k)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(raw)
        os.replace(tmp, path)
        return zlib.crc32(raw), buffer_checksum(raw)

    def _blosc_codec(self) -> Any:
        from numcodecs import Blosc

        cname = self.plan["compressor"]
        shuffle = Blosc.BITSHUFFLE if self.plan.get("shuffle") == "bitshuffle" else Blosc.SHUFFLE
        return Blosc(cname=cname, clevel=self.plan.get("clevel", 3), shuffle=shuffle)


def prepare_destination(dst: Path, plan: dict[str, Any], *, overwrite: bool, resume: bool,
                        protect: Sequence[str | os.PathLike] = (),
                        create: Callable[[Path, dict[str, Any]], None] | None = None) -> set[int]:
    """Create (or reopen for resume) the store skeleton; return the chunks already done.

    The caller holds the destination's lock (:class:`~streamseg.store.lock.DestinationLock`),
    so ``dst`` may already exist holding only the lock file, which counts as empty and is kept.

    ``overwrite`` deletes a destination only when it is a streamseg store (a manifest or a
    conversion log in it), does not hold or lie inside any path of ``protect`` (the source
    folders and files), and holds nothing that streamseg does not write into a store;
    otherwise it refuses with :class:`StoreExistsError` and deletes nothing.  ``create`` makes
    the empty arrays (default: the 2D store's ``images`` and ``masks``).
    """
    if dst.exists() and not dst.is_dir():
        raise StoreExistsError(f"{dst} exists and is a file, not a folder; choose another destination.")
    if resume and dst.exists() and (dst / MANIFEST_NAME).exists():
        raise StoreExistsError(f"{dst} is already a complete store; nothing to resume. "
                               "Use --overwrite to convert again.")
    if resume and (dst / PLAN_NAME).exists():
        old = json.loads((dst / PLAN_NAME).read_text())
        diffs = [k for k in set(old) | set(plan) if old.get(k) != plan.get(k)]
        if diffs:
            raise OptionError(
                f"Cannot resume {dst}: it was started with different options or sources "
                f"({', '.join(sorted(diffs)[:5])}). Re-run with the original options, or use "
                f"--overwrite to start again. Received: {truncate({k: plan.get(k) for k in sorted(diffs)[:3]})}"
            )
        if not (dst / ARRAYS_MARK).exists():  # killed while the arrays were being created: redo them
            for entry in os.scandir(dst):
                if entry.name not in (LOCK_NAME, PLAN_NAME):
                    shutil.rmtree(entry.path) if entry.is_dir(follow_symlinks=False) else os.unlink(entry.path)
            _create_all(dst, plan, create)
            return set()
        return set(_read_progress(dst))
    if dst.exists() and any(e.name != LOCK_NAME for e in os.scandir(dst)):
        if not (overwrite or resume):
            raise StoreExistsError(f"{dst} already exists; pass --overwrite to replace it "
                                   "or --resume to finish an interrupted conversion.")
        is_store = any((dst / n).exists() for n in (MANIFEST_NAME, PLAN_NAME, PROGRESS_NAME))
        if not is_store:
            raise StoreExistsError(f"{dst} exists and is not a streamseg store; refusing to delete "
                                   "it. Choose another destination.")
        if not overwrite:
            raise StoreExistsError(f"{dst} has no interrupted conversion to resume (no {PLAN_NAME}); "
                                   "pass --overwrite to convert again.")
        _refuse_source_overlap(dst, protect)
        foreign = _foreign_entries(dst)
        if foreign:
            raise StoreExistsError(
                f"{dst} holds files that streamseg does not write ({', '.join(foreign)}); refusing to "
                "delete them with --overwrite. Move them out of the store, or choose another destination."
            )
        _clear_store(dst)
    dst.mkdir(parents=True, exist_ok=True)
    _atomic_write(dst / PLAN_NAME, json.dumps(plan))  # first: from here on --resume / --overwrite know it
    _create_all(dst, plan, create)
    return set()


def _create_all(dst: Path, plan: dict[str, Any], create: Callable[[Path, dict[str, Any]], None] | None) -> None:
    (create or _create_arrays)(dst, plan)
    _atomic_write(dst / ARRAYS_MARK, "arrays created\n")


def _refuse_source_overlap(dst: Path, protect: Sequence[str | os.PathLike]) -> None:
    here = dst.resolve()
    for p in protect:
        src = Path(p).resolve()
        if src == here or here in src.parents:
            raise StoreExistsError(f"Refusing to --overwrite {dst}: it holds the source {p}; converting "
                                   "would delete the source data. Choose a destination outside the source.")
        if src in here.parents:
            raise StoreExistsError(f"Refusing to --overwrite {dst}: it lies inside the source {p}. Delete "
                                   "the old store yourself, or choose a destination outside the source.")


def _stem(name: str) -> str:
    return name[:-4] if name.endswith(".tmp") else name  # an atomic write cut short by a kill


def _foreign_entries(dst: Path, limit: int = 5) -> list[str]:
    """Up to ``limit`` paths under ``dst`` that streamseg never writes into a store."""
    found: list[str] = []
    for entry in os.scandir(dst):
        name = entry.name
        if name == LOCK_NAME and entry.is_file(follow_symlinks=False):
            continue
        if entry.is_dir(follow_symlinks=False) and name in ARRAY_NAMES:
            found += [f"{name}/{p}" for p in _foreign_in_array(Path(entry.path))]
        elif entry.is_dir(follow_symlinks=False) and name == CASES_DIR:  # a volume store
            found += [f"{name}/{p}" for p in _foreign_in_cases(Path(entry.path))]
        elif not (entry.is_file(follow_symlinks=False) and _stem(name) in _STORE_FILES):
            found.append(name)
        if len(found) >= limit:
            break
    return found[:limit]


def _foreign_in_cases(folder: Path) -> list[str]:
    """Entries of a volume store's ``cases/`` that streamseg does not write there."""
    found: list[str] = []
    for case in os.scandir(folder):
        if _stem(case.name) == "zarr.json" and case.is_file(follow_symlinks=False):
            continue
        if not (case.is_dir(follow_symlinks=False) and case.name.isdigit()):
            found.append(case.name)
            continue
        for entry in os.scandir(case.path):
            if entry.is_dir(follow_symlinks=False) and entry.name in CASE_ARRAYS:
                found += [f"{case.name}/{entry.name}/{p}" for p in _foreign_in_array(Path(entry.path))]
            elif not (entry.is_file(follow_symlinks=False) and _stem(entry.name) in CASE_FILES):
                found.append(f"{case.name}/{entry.name}")
        if len(found) >= 5:
            break
    return found


def _foreign_in_array(folder: Path) -> list[str]:
    found: list[str] = []
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False) and _stem(entry.name) == "zarr.json":
            continue
        if entry.is_dir(follow_symlinks=False) and entry.name == "c":
            stack = [(entry.path, "c")]
            while stack and len(found) < 5:  # chunk keys: c/<k>/0/0/0, every name a number
                path, rel = stack.pop()
                for sub in os.scandir(path):
                    if sub.is_symlink() or not _stem(sub.name).isdigit():
                        found.append(f"{rel}/{sub.name}")
                    elif sub.is_dir():
                        stack.append((sub.path, f"{rel}/{sub.name}"))
            continue
        found.append(entry.name)
    return found


def _clear_store(dst: Path) -> None:
    """Delete a store's contents (checked by :func:`_foreign_entries`), keeping the lock file."""
    for entry in os.scandir(dst):
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


def _create_arrays(dst: Path, plan: dict[str, Any]) -> None:
    n = plan["count"]
    h, w, c = plan["image_shape"]
    shapes = {"images": (n, h, w, c), "masks": (n, h, w, 1)}
    dtypes = {"images": plan["image_dtype"], "masks": plan["mask_dtype"]}
    if plan["backend"] == "memmap":
        for name in ARRAY_NAMES:
            # creates a sparse .npy of the final size; chunks are written into it later
            np.lib.format.open_memmap(dst / f"{name}.npy", mode="w+", dtype=dtypes[name],
                                      shape=shapes[name]).flush()
        return
    import zarr
    from zarr.codecs import BloscCodec

    group = zarr.open_group(dst, mode="a")  # not "w": that empties dst, lock file included
    for name in ARRAY_NAMES:
        compressors: Any = None
        if plan["compressor"] != "none":
            compressors = [BloscCodec(cname=plan["compressor"], clevel=plan.get("clevel", 3),
                                      shuffle=plan.get("shuffle", "shuffle"))]
        group.create_array(name, shape=shapes[name], chunks=(plan["chunk_samples"],) + shapes[name][1:],
                           dtype=dtypes[name], compressors=compressors, fill_value=0,
                           config={"write_empty_chunks": True})
    group.attrs["streamseg"] = {"format_version": FORMAT_VERSION, "manifest": MANIFEST_NAME}


def _read_progress(dst: Path) -> dict[int, dict[str, Any]]:
    records: dict[int, dict[str, Any]] = {}
    path = dst / PROGRESS_NAME
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by a kill: that chunk is simply redone
            continue
        records[int(rec["chunk"])] = rec
    return records


def append_progress(dst: Path, record: dict[str, Any]) -> None:
    """Record a finished chunk (one JSON line, flushed)."""
    with open(dst / PROGRESS_NAME, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, separators=(",", ":")) + "\n")
        fh.flush()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _check_chunks_on_disk(dst: Path, plan: dict[str, Any], records: dict[int, dict[str, Any]]) -> None:
    """Before the completion flag: every planned chunk is recorded and on disk with its checksum.

    Also checks the arrays' metadata (``zarr.json`` / ``.npy`` headers) against the plan, so a
    store emptied or changed by another process meanwhile is never marked complete.

    Raises
    ------
    IncompleteStoreError
        Naming the first problem found; nothing is marked complete.
    """
    def refuse(problem: str) -> IncompleteStoreError:
        return IncompleteStoreError(
            f"Cannot mark {dst} complete: {problem}. Something changed the store while it was "
            "written; nothing was marked complete. Convert again with --overwrite."
        )

    missing = [k for k in range(plan["num_chunks"]) if k not in records]
    if missing:
        raise refuse(f"chunk(s) {missing[:5]} have no progress record")
    n, cs = plan["count"], plan["chunk_samples"]
    h, w, c = plan["image_shape"]
    shapes = {"images": (n, h, w, c), "masks": (n, h, w, 1)}
    dtypes = {"images": plan["image_dtype"], "masks": plan["mask_dtype"]}
    for k in range(plan["num_chunks"]):
        if records[k].get("n") != min(cs, n - k * cs):
            raise refuse(f"the progress record of chunk {k} counts {records[k].get('n')} samples")
    if plan["backend"] == "memmap":
        for name in ARRAY_NAMES:
            try:
                arr = np.load(dst / f"{name}.npy", mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise refuse(f"{name}.npy is missing or unreadable ({exc})") from None
            if arr.shape != shapes[name] or str(arr.dtype) != dtypes[name]:
                raise refuse(f"{name}.npy holds {arr.dtype} {arr.shape}, planned {dtypes[name]} {shapes[name]}")
            for k in range(plan["num_chunks"]):
                if _crc(np.ascontiguousarray(arr[k * cs : (k + 1) * cs])) != records[k]["crc"][name]:
                    raise refuse(f"{name} chunk {k} does not match its checksum")
            del arr
        return
    from .reader import _ZarrChunkReader

    if not (dst / "zarr.json").is_file():
        raise refuse("zarr.json is missing")
    for name in ARRAY_NAMES:
        try:
            reader = _ZarrChunkReader(dst, name)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise refuse(f"{name}/zarr.json is missing or unreadable ({exc.__class__.__name__})") from None
        if reader.shape != shapes[name] or reader.chunk_shape[0] != cs or str(reader.dtype) != dtypes[name]:
            raise refuse(f"{name}/zarr.json does not describe the planned array")
        for k in range(plan["num_chunks"]):
            path = reader.chunk_path(k)
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                raise refuse(f"{name} chunk {k} is missing ({path})") from None
            if zlib.crc32(raw) != records[k]["crc"][name]:
                raise refuse(f"{name} chunk {k} does not match its checksum ({path})")


def finalize_store(dst: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """Combine the per-chunk records into the manifest and mark the store complete."""
    records = _read_progress(dst)
    _check_chunks_on_disk(dst, plan, records)
    ordered = [records[k] for k in range(plan["num_chunks"])]
    h, w, c = plan["image_shape"]
    npix = plan["count"] * h * w
    sums = [sum(r["sum"][ch] for r in ordered) for ch in range(c)]
    sqs = [sum(r["sumsq"][ch] for r in ordered) for ch in range(c)]
    mean = [s / npix for s in sums]
    std = [max(q / npix - m * m, 0.0) ** 0.5 for q, m in zip(sqs, mean)]
    labels: dict[int, int] = {}
    for r in ordered:
        for v, cnt in r["labels"].items():
            labels[int(v)] = labels.get(int(v), 0) + cnt
    names = [name for r in ordered for name in r["names"]]
    _atomic_write(dst / "sources.txt", "\n".join(names) + "\n")
    manifest = {
        "format_version": FORMAT_VERSION,
        "backend": plan["backend"],
        "complete": True,
        "count": plan["count"],
        "image_shape": plan["image_shape"],
        "image_dtype": plan["image_dtype"],
        "mask_shape": [h, w, 1],
        "mask_dtype": plan["mask_dtype"],
        "chunk_samples": plan["chunk_samples"],
        "num_chunks": plan["num_chunks"],
        "compressor": plan["compressor"] if plan["backend"] == "zarr" else "none",
        "labels": {str(v): labels[v] for v in sorted(labels)},
        "label_values": sorted(labels),
        "image_mean": mean,
        "image_std": std,
        "sources": {"file": "sources.txt", "count": len(names), "first": names[:3]},
        "params": plan["params"],
        "checksums": {"algorithm": "crc32", "of": "chunk files" if plan["backend"] == "zarr" else "raw chunk bytes",
                      "chunks": [r["crc"] for r in ordered]},
    }
    read_checksums = write_read_checksums(dst, plan["backend"], ordered)
    if read_checksums is not None:
        manifest["read_checksums"] = read_checksums
    manifest["files"] = record_files(dst, plan["backend"])  # written last: open_store compares them
    _atomic_write(dst / MANIFEST_NAME, json.dumps(manifest, indent=1))
    for name in (PROGRESS_NAME, PLAN_NAME, ARRAYS_MARK):
        (dst / name).unlink(missing_ok=True)
    return manifest
