"""Integrity of a store: read checksums, records of the metadata files, checked reads.

Three records in the manifest protect a finished store:

``checksums``
    crc32 of every chunk file (zarr) or of every chunk's raw bytes (memmap), written since the
    first format; ``streamseg verify`` checks them.
``read_checksums``
    :func:`row_checksums` ("blocks64") of every chunk file (zarr) or of every sample's raw bytes
    (memmap), in ``read_checksums.npy``; :class:`ReadVerifier` checks what reads return against
    them, each chunk file or sample the first time a process reads it and again when its file
    changes.  crc32 runs at about 2-3 GB/s on a server core; blocks64 is one NumPy reduction at
    cache speed (~30-40 GB/s).  Stores written before it existed are checked with the crc32s
    instead, each chunk the first time a process reads it.
``files``
    size and crc32 of every metadata file (the ``zarr.json`` files, ``sources.txt``,
    ``read_checksums.npy``; for the memmap backend the ``.npy`` header and the file's size),
    compared by :func:`check_metadata` when a store is opened and by ``verify``/``info``.

blocks64 of ``n`` bytes: the bytes, read as little-endian 64-bit words, are summed (mod 2**64)
per 4 KiB block, ``S_1 .. S_m``, the last partial block zero-padded into ``S_(m+1)``; the value
is ``K_1 S_1 + ... + K_(m+1) S_(m+1) + K_(m+2) n`` (mod 2**64) with fixed odd constants ``K``
(splitmix64 of 1, 2, ...).  A change confined to one word (any changed byte, any burst of up
to 8 aligned bytes) changes one block sum by a non-zero amount, which an odd ``K_i`` keeps
non-zero: it is always detected.  A block zeroed, replaced by another or moved changes the value
unless its word sum happens to stay the same; a change of length always changes it.  Changes
in several blocks cancel only by chance (the ``K_i`` differ); two changes in one block cancel
when their differences are opposite (two flipped bits at the same bit position of two words,
one 0->1 and one 1->0) -- a price paid for speed; ``streamseg verify`` checks crc32s.
"""

from __future__ import annotations

import functools
import io
import json
import locale
import os
import threading
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorruptChunkError, CorruptStoreError
from .layout import ARRAY_NAMES, READ_CHECKSUMS_NAME, SOURCES_NAME, file_identity, sample_range

__all__ = ["READ_ALGORITHM", "row_checksums", "buffer_checksum", "sample_rows", "record_files",
           "check_metadata", "refuse_damaged", "write_read_checksums", "npy_data_offset",
           "sources_problem", "source_names", "ReadVerifier"]

READ_ALGORITHM = "blocks64"
_BLOCK_WORDS = 512  # 4 KiB blocks: the unit of pages and sectors
_SMALL = 1 << 20  # files up to this size have their crc32 checked on open as well as their size


@functools.lru_cache(maxsize=8)
def _weight_table(capacity: int) -> np.ndarray:
    """The first ``capacity`` weights ``K_1, K_2, ...``: splitmix64 of 1, 2, ..., made odd."""
    z = np.arange(1, capacity + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = (z ^ (z >> np.uint64(31))) | np.uint64(1)
    z.flags.writeable = False
    return z


def _weights(m: int) -> np.ndarray:
    return _weight_table(1 << max(10, (m - 1).bit_length()))[:m]


def row_checksums(rows: np.ndarray) -> np.ndarray:
    """blocks64 of every row of a ``(B, n)`` uint8 array whose rows are contiguous.

    Returns
    -------
    numpy.ndarray
        ``(B,)`` uint64.
    """
    b, n = rows.shape
    block = 8 * _BLOCK_WORDS
    full = n // block
    acc = np.empty((b, full + 2), np.uint64)  # block sums, the tail's sum, the length
    if full:
        rows[:, : full * block].view("<u8").reshape(b, full, _BLOCK_WORDS).sum(
            axis=2, dtype=np.uint64, out=acc[:, :full])
    rest = n - full * block
    if rest:
        tail = np.zeros((b, -(-rest // 8) * 8), np.uint8)
        tail[:, :rest] = rows[:, full * block :]
        tail.view("<u8").sum(axis=1, dtype=np.uint64, out=acc[:, full])
    else:
        acc[:, full] = 0
    acc[:, full + 1] = n
    return acc @ _weights(full + 2)


def sample_rows(arr: np.ndarray) -> np.ndarray:
    """The raw bytes of each sample of ``arr`` (first axis) as a ``(B, n)`` uint8 array (no copy
    when ``arr`` is C-contiguous)."""
    arr = np.ascontiguousarray(arr)
    return arr.reshape(arr.shape[0], -1).view(np.uint8)


def buffer_checksum(buf: Any) -> int:
    """blocks64 of a bytes-like object."""
    return int(row_checksums(np.frombuffer(buf, np.uint8).reshape(1, -1))[0])


def _crc32_file(path: Path, limit: int | None = None) -> int:
    crc = 0
    with open(path, "rb") as fh:
        left = limit
        while left is None or left > 0:
            block = fh.read(1 << 20 if left is None else min(1 << 20, left))
            if not block:
                break
            crc = zlib.crc32(block, crc)
            if left is not None:
                left -= len(block)
    return crc


def npy_data_offset(path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    """Offset of the data in a ``.npy`` file, and its shape and dtype; ValueError if garbled."""
    with open(path, "rb") as fh:
        try:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        except (ValueError, SyntaxError, TypeError, EOFError) as exc:
            raise ValueError(str(exc) or type(exc).__name__) from None
        if fortran:
            raise ValueError("Fortran order")
        return fh.tell(), tuple(shape), np.dtype(dtype)


def _metadata_names(backend: str) -> list[str]:
    arrays = [f"{n}/zarr.json" for n in ARRAY_NAMES] if backend == "zarr" else [f"{n}.npy" for n in ARRAY_NAMES]
    return (["zarr.json"] if backend == "zarr" else []) + arrays + [SOURCES_NAME, READ_CHECKSUMS_NAME]


def record_files(dst: Path, backend: str) -> dict[str, dict[str, int]]:
    """``{relative path: {"size", "crc32"}}`` of every metadata file of a store being finished.

    The memmap data files are recorded as ``{"size", "header_size", "header_crc32"}``: their
    size and the bytes of their ``.npy`` header.
    """
    files: dict[str, dict[str, int]] = {}
    for rel in _metadata_names(backend):
        path = dst / rel
        if not path.is_file():
            continue
        size = path.stat().st_size
        if rel.endswith(".npy") and rel != READ_CHECKSUMS_NAME:
            offset = npy_data_offset(path)[0]
            files[rel] = {"size": size, "header_size": offset, "header_crc32": _crc32_file(path, offset)}
        else:
            files[rel] = {"size": size, "crc32": _crc32_file(path)}
    return files


def write_read_checksums(dst: Path, backend: str, records: list[dict[str, Any]]) -> dict[str, str] | None:
    """Write ``read_checksums.npy`` from the chunk records; return its manifest entry.

    Returns None (and writes nothing) when a record lacks them: a conversion resumed from
    progress written by an older streamseg, whose store is then checked as older stores are.
    """
    if not records or any("read" not in r for r in records):
        return None
    if backend == "memmap":
        rows = [list(zip(r["read"]["images"], r["read"]["masks"])) for r in records]
        table = np.array([pair for chunk in rows for pair in chunk], np.uint64).reshape(-1, 2)
    else:
        table = np.array([[r["read"]["images"], r["read"]["masks"]] for r in records], np.uint64)
    buf = io.BytesIO()
    np.save(buf, table, allow_pickle=False)
    tmp = dst / (READ_CHECKSUMS_NAME + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, dst / READ_CHECKSUMS_NAME)
    return {"file": READ_CHECKSUMS_NAME, "algorithm": READ_ALGORITHM,
            "unit": "sample" if backend == "memmap" else "chunk",
            "of": "raw sample bytes" if backend == "memmap" else "chunk files"}


def _layout_problem(root: Path, meta: dict[str, Any], rel: str) -> str | None:
    """What is wrong with metadata file ``rel`` judged by its content alone (old stores too)."""
    path = root / rel
    n, (h, w, c) = int(meta["count"]), meta["image_shape"]
    shapes = {"images": (n, h, w, c), "masks": (n, h, w, 1)}
    dtypes = {"images": meta["image_dtype"], "masks": meta["mask_dtype"]}
    name = rel.split("/")[0].removesuffix(".npy")
    if rel == SOURCES_NAME:
        if not meta.get("sources", {}).get("file"):
            return None
        if not path.is_file():
            return f"{rel} is missing (the source names of the samples)"
        lines = len(source_names(path.read_bytes()))
        return None if lines == n else f"{rel} lists {lines} names for {n} samples (truncated or edited)"
    if rel == READ_CHECKSUMS_NAME:
        return None if path.is_file() or "read_checksums" not in meta else f"{rel} is missing"
    if rel == "zarr.json" or rel.endswith("/zarr.json"):
        if name in ARRAY_NAMES and not path.parent.is_dir():
            return f"{name}/ is missing (every chunk of '{name}' is lost)"
        if not path.is_file():
            return f"{rel} is missing"
        try:
            doc = json.loads(path.read_bytes())
            if name not in ARRAY_NAMES:
                return None if isinstance(doc, dict) else f"{rel} is not a zarr group"
            got = (tuple(doc["shape"]), str(np.dtype(doc["data_type"])),
                   int(doc["chunk_grid"]["configuration"]["chunk_shape"][0]))
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            return f"{rel} is not valid zarr metadata ({type(exc).__name__}: {str(exc)[:60]})"
        want = (shapes[name], dtypes[name], int(meta["chunk_samples"]))
        if got != want:
            return (f"{rel} describes {got[1]} {got[0]} in chunks of {got[2]}; the manifest "
                    f"{want[1]} {want[0]} in chunks of {want[2]}")
        return None
    if not path.is_file():  # images.npy / masks.npy
        return f"{rel} is missing (every sample's {name} is lost)"
    try:
        offset, shape, dtype = npy_data_offset(path)
    except ValueError as exc:
        return f"{rel} has no valid .npy header ({str(exc)[:80]})"
    if shape != shapes[name] or str(dtype) != dtypes[name]:
        return f"{rel} holds {dtype} {shape}; the manifest {dtypes[name]} {shapes[name]}"
    need = offset + int(np.prod(shape)) * dtype.itemsize
    size = path.stat().st_size
    if size != need:
        return f"{rel} is {size} bytes; {need} are needed ({'truncated' if size < need else 'extended'})"
    return None


def _recorded_problem(root: Path, rel: str, rec: dict[str, int], full: bool) -> str | None:
    path = root / rel
    if not path.is_file():
        return f"{rel} is missing"
    size = path.stat().st_size
    if size != rec.get("size"):
        return f"{rel} is {size} bytes; the manifest records {rec.get('size')} (truncated, extended or replaced)"
    if "header_crc32" in rec and _crc32_file(path, rec["header_size"]) != rec["header_crc32"]:
        return f"the .npy header of {rel} was altered (it no longer matches the manifest)"
    if "crc32" in rec and (full or size <= _SMALL) and _crc32_file(path) != rec["crc32"]:
        return f"{rel} was altered (its crc32 differs from the manifest)"
    return None


def check_metadata(root: Path, meta: dict[str, Any], *, full: bool = False,
                   content: bool = True) -> list[tuple[str, str]]:
    """Problems with a store's metadata files, as ``(relative path, problem)`` pairs.

    Parameters
    ----------
    root : pathlib.Path
        Store directory.
    meta : dict
        Its manifest.
    full : bool
        Also compare the crc32 of large files (``sources.txt`` over 1 MiB); sizes, headers and
        small files are always compared.
    content : bool
        Also judge each file by its content (shapes in ``zarr.json``, the ``.npy`` header, the
        number of source names), which works for stores whose manifest records no files.
        ``open_store`` passes False: it compares with the manifest's records only.
    """
    recorded = meta.get("files") or {}
    problems: list[tuple[str, str]] = []
    for rel in _metadata_names(meta.get("backend", "zarr")):
        try:
            problem = _layout_problem(root, meta, rel) if content else None
            if problem is None and rel in recorded:
                problem = _recorded_problem(root, rel, recorded[rel], full)
        except OSError as exc:
            problem = f"{rel} cannot be read ({exc.strerror or exc})"
        if problem:
            problems.append((rel, problem))
    return problems


def refuse_damaged(root: Path, problems: list[tuple[str, str]]) -> CorruptStoreError:
    """The error ``open_store`` raises for metadata that disagrees with the manifest."""
    listed = "; ".join(p for _, p in problems[:4]) + ("; ..." if len(problems) > 4 else "")
    return CorruptStoreError(
        f"Store {root} does not match its manifest: {listed}. Its files were changed after the "
        f"conversion; run `streamseg verify {root}` to list every problem, and re-convert the "
        "store (convert again with --overwrite)."
    )


class ReadVerifier:
    """Checks the bytes a store hands out against its manifest (one per store and process).

    Each chunk file (zarr) or sample (memmap) is checked the first time this process reads it,
    and again whenever its file changes (a new inode, size or modification time: a file
    replaced, rewritten, truncated or copied over).  Reads of bytes already checked cost
    nothing, so batch production pays for checks in the first epoch only (see
    benchmarks/verify_cost.py).  Bytes that change on disk while none of these change (bit rot
    surfacing during a run, after the page cache dropped the checked copy) are caught by the
    next process that reads them and by ``streamseg verify``.

    Parameters
    ----------
    root : pathlib.Path
        Store directory.
    meta : dict
        Its manifest.
    """

    def __init__(self, root: Path, meta: dict[str, Any]) -> None:
        self.root, self.meta = root, meta
        info = meta.get("read_checksums") or {}
        self.unit: str | None = info.get("unit") if info.get("algorithm") == READ_ALGORITHM else None
        self._table: np.ndarray | None = None
        self._lock = threading.Lock()
        self._checked: dict[tuple[str, int], tuple] = {}  # chunk -> identity of the file when checked
        self._files: dict[str, tuple] = {}  # memmap: identity of each array's .npy
        self._samples: dict[str, np.ndarray] = {}  # memmap, per-sample checksums: samples checked

    def _where(self, name: str, k: int) -> str:
        held = sample_range(k, int(self.meta["chunk_samples"]), int(self.meta["count"]))
        return f"Chunk {k} of '{name}' ({held}) in {self.root}"

    def mismatch(self, name: str, k: int, sample: int | None = None) -> CorruptChunkError:
        """The error for chunk ``k`` of array ``name`` whose bytes fail their checksum."""
        which = f"Sample {sample} in c" if sample is not None else "C"
        return CorruptChunkError(
            f"{which}{self._where(name, k)[1:]} fails its checksum: the data changed after the "
            f"conversion (a failing disk, an incomplete copy or an edit). Run `streamseg verify "
            f"{self.root}` to list the damaged chunks, then re-convert the store, or leave these "
            "samples out (indices=...); verify_reads=False reads without checking."
        )

    def table(self) -> np.ndarray:
        """``(units, 2)`` uint64 read checksums (images, masks), loaded once and checked."""
        if self._table is None:
            with self._lock:
                if self._table is None:
                    path = self.root / READ_CHECKSUMS_NAME
                    try:
                        raw = path.read_bytes()
                        rec = (self.meta.get("files") or {}).get(READ_CHECKSUMS_NAME)
                        if rec is not None and zlib.crc32(raw) != rec.get("crc32"):
                            raise ValueError("its crc32 differs from the manifest")
                        table = np.load(io.BytesIO(raw), allow_pickle=False)
                        units = self.meta["count"] if self.unit == "sample" else self.meta["num_chunks"]
                        if table.shape != (units, 2) or table.dtype != np.uint64:
                            raise ValueError(f"it holds {table.dtype} {table.shape}, expected uint64 ({units}, 2)")
                    except (OSError, ValueError) as exc:
                        raise CorruptStoreError(
                            f"{path} cannot be used ({exc}); the store was changed after the conversion. "
                            f"Run `streamseg verify {self.root}`, and re-convert the store (or pass "
                            "verify_reads=False to read without checking)."
                        ) from None
                    self._table = table
        return self._table

    def check_chunk_file(self, name: str, k: int, raw: Any, identity: tuple) -> None:
        """Zarr: check the bytes of chunk file ``k`` just read, unless this file was checked.

        New stores: against its read checksum; older stores: against the manifest's crc32.
        """
        key = (name, k)
        if self._checked.get(key) == identity:
            return
        if self.unit == "chunk":
            ok = buffer_checksum(raw) == int(self.table()[k, ARRAY_NAMES.index(name)])
        else:
            ok = zlib.crc32(raw) == self.meta["checksums"]["chunks"][k][name]
        if not ok:
            raise self.mismatch(name, k)
        self._checked[key] = identity

    def needs_check(self, name: str, path: str, idx: np.ndarray) -> bool:
        """Memmap, once per read: whether any of samples ``idx`` of array ``name`` (file ``path``)
        is unchecked; first forgets the checks of the array if its file changed."""
        identity = file_identity(os.stat(path))
        if self._files.get(name) != identity:
            self._files[name] = identity
            self._samples.pop(name, None)
            for key in [key for key in self._checked if key[0] == name]:
                del self._checked[key]
        if self.unit == "sample":
            seen = self._samples.get(name)
            return seen is None or not seen[idx].all()
        cs = int(self.meta["chunk_samples"])
        return any((name, k) not in self._checked for k in np.unique(idx // cs).tolist())

    def check_samples(self, name: str, idx: np.ndarray, out: np.ndarray, source: Any) -> None:
        """Memmap: check ``out[j]``, the bytes read for sample ``idx[j]`` from array ``source``.

        New stores: each sample not yet checked, against its read checksum.  Older stores: the
        chunks holding ``idx`` not yet checked, read whole from ``source``, against the crc32s.
        """
        cs = int(self.meta["chunk_samples"])
        if self.unit == "sample":
            seen = self._samples.get(name)
            if seen is None:
                seen = self._samples[name] = np.zeros(int(self.meta["count"]), bool)
            new = ~seen[idx]
            if not new.any():
                return
            rows = out if new.all() else out[new]
            todo = idx[new]
            differ = row_checksums(sample_rows(rows)) != self.table()[todo, ARRAY_NAMES.index(name)]
            if differ.any():
                s = int(todo[np.flatnonzero(differ)[0]])
                raise self.mismatch(name, s // cs, sample=s)
            seen[todo] = True
            return
        for k in np.unique(idx // cs).tolist():
            if (name, k) in self._checked:
                continue
            block = np.ascontiguousarray(source[k * cs : (k + 1) * cs])
            if zlib.crc32(memoryview(block).cast("B")) != self.meta["checksums"]["chunks"][k][name]:
                raise self.mismatch(name, k)
            self._checked[(name, k)] = self._files.get(name, ())


def sources_problem(meta: dict[str, Any], text: bytes, lines: int) -> str | None:
    """What is wrong with ``sources.txt``, read as ``text`` holding ``lines`` names, if anything."""
    rec = (meta.get("files") or {}).get(SOURCES_NAME)
    if rec is not None and (len(text) != rec.get("size") or zlib.crc32(text) != rec.get("crc32")):
        return f"{SOURCES_NAME} was altered (its size or crc32 differs from the manifest)"
    if lines != int(meta["count"]):
        return f"{SOURCES_NAME} lists {lines} names for {meta['count']} samples (truncated or edited)"
    return None


def source_names(text: bytes) -> list[str]:
    """The names in the bytes of ``sources.txt`` (written in the locale's encoding)."""
    return text.decode(locale.getpreferredencoding(False), errors="replace").splitlines()
