"""On-disk layout of a store: file names, and chunk files of the zarr backend decoded directly.

For the zarr backend the chunk files are decoded with numcodecs when the codec pipeline is
the one streamseg writes (bytes + optional Blosc), which avoids zarr-python's asyncio
machinery (about 1 ms per call) and makes reading safe after ``fork``; any other pipeline
falls back to zarr.
"""

from __future__ import annotations

import collections
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorruptChunkError, IncompleteStoreError, StoreNotFoundError

__all__ = ["FORMAT_VERSION", "MANIFEST_NAME", "PROGRESS_NAME", "PLAN_NAME", "ARRAYS_MARK", "ARRAY_NAMES", "SOURCES_NAME",
           "READ_CHECKSUMS_NAME", "ZarrChunkReader", "file_identity", "load_manifest", "sample_range",
           "zarr_chunk_path"]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PROGRESS_NAME = "_progress.jsonl"
PLAN_NAME = "_plan.json"
#: Written once every array of a new store exists (a kill while creating them is redone on --resume).
ARRAYS_MARK = "_arrays.ok"
SOURCES_NAME = "sources.txt"
READ_CHECKSUMS_NAME = "read_checksums.npy"
ARRAY_NAMES = ("images", "masks")


def sample_range(k: int, chunk_samples: int, count: int) -> str:
    """``"samples 8-11"`` (or ``"sample 22"``): the samples chunk ``k`` holds."""
    first, last = k * chunk_samples, min((k + 1) * chunk_samples, count) - 1
    return f"sample {first}" if last <= first else f"samples {first}-{last}"


def file_identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What changes when a file is replaced or written: device, inode, size, modification time."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def zarr_chunk_path(root: Path, name: str, k: int, ndim: int = 4) -> Path:
    """File of chunk ``k`` of a streamseg zarr array (chunked along the first axis only)."""
    return root / name / "c" / str(k) / "/".join("0" for _ in range(ndim - 1))


def load_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the finished store at ``path``.

    Raises
    ------
    StoreNotFoundError
        Nothing there, or not a streamseg store.
    IncompleteStoreError
        The conversion did not finish (the message says how to resume), or the manifest is
        damaged or from a newer streamseg.
    """
    if not path.exists():
        raise StoreNotFoundError(
            f"No store at {path}: create one with `streamseg convert SRC {path}` "
            f"or `streamseg synth {path} --format zarr`."
        )
    manifest = path / MANIFEST_NAME
    if not manifest.exists():
        if (path / PLAN_NAME).exists():
            done = 0
            if (path / PROGRESS_NAME).exists():
                done = sum(1 for line in (path / PROGRESS_NAME).read_text().splitlines() if line.strip())
            plan = json.loads((path / PLAN_NAME).read_text())
            volumes = plan.get("layout") == "volumes"
            total = plan.get("count" if volumes else "num_chunks", "?")
            raise IncompleteStoreError(
                f"Store {path} is incomplete ({done} of {total} {'cases' if volumes else 'chunks'} written; the conversion "
                "was interrupted). Re-run the same `streamseg convert` command with --resume "
                "to finish it, or with --overwrite to start again."
            )
        raise StoreNotFoundError(
            f"{path} is not a streamseg store (no {MANIFEST_NAME}). Create one with "
            f"`streamseg convert SRC {path}`."
        )
    try:
        meta = json.loads(manifest.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise IncompleteStoreError(
            f"The manifest of {path} is damaged ({exc}); re-convert with --overwrite."
        ) from None
    if not meta.get("complete"):
        raise IncompleteStoreError(
            f"Store {path} is not marked complete; re-run `streamseg convert` with --resume."
        )
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise IncompleteStoreError(
            f"Store {path} has format version {meta.get('format_version')}, newer than this "
            f"streamseg understands ({FORMAT_VERSION}); upgrade streamseg."
        )
    return meta


class ZarrChunkReader:
    """Decode chunk files of one zarr array straight from disk."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name
        meta = json.loads((root / name / "zarr.json").read_text())
        self.shape = tuple(meta["shape"])
        self.dtype = np.dtype(meta["data_type"])
        self.chunk_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        codecs = [c["name"] for c in meta["codecs"]]
        sep = meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/")
        endian = meta["codecs"][0].get("configuration", {}).get("endian", "little")
        self.direct = (
            codecs in (["bytes"], ["bytes", "blosc"])
            and sep == "/"
            and meta.get("chunk_key_encoding", {}).get("name") == "default"
            and (self.dtype.itemsize == 1 or endian == "little")
        )
        self._blosc = codecs == ["bytes", "blosc"]
        self._prefix = os.path.join(str(root), name, "c", "")  # chunk paths as strings: pathlib costs ~10 us
        self._tail = os.sep + os.sep.join("0" for _ in self.shape[1:])
        self._zarr_array: Any = None
        self.chunk_nbytes = int(np.prod(self.chunk_shape)) * self.dtype.itemsize
        self._scratch = threading.local()  # per-thread reusable buffers: no page faults per read
        self.cache_chunks = 0  # decoded chunks kept per thread for reuse=True reads (0: none)

    def chunk_path(self, k: int) -> Path:
        return Path(f"{self._prefix}{k}{self._tail}")

    def _where(self, k: int) -> str:
        """``"Chunk 3 of 'images' (samples 12-15) in PATH"``, for messages."""
        held = sample_range(k, self.chunk_shape[0], self.shape[0])
        return f"Chunk {k} of '{self.name}' ({held}) in {self.root}"

    def read_raw(self, k: int, *, reuse: bool = False) -> bytes | memoryview:
        """Bytes of chunk file ``k``; with ``reuse`` a view of a per-thread buffer."""
        return self._read(k, reuse)[0]

    def _read(self, k: int, reuse: bool) -> tuple[bytes | memoryview, os.stat_result]:
        """The bytes of chunk file ``k`` and the ``fstat`` of the file they came from."""
        path = f"{self._prefix}{k}{self._tail}"
        try:
            if not reuse:
                with open(path, "rb") as fh:
                    return fh.read(), os.fstat(fh.fileno())
            with open(path, "rb", buffering=0) as fh:
                st = os.fstat(fh.fileno())
                buf = getattr(self._scratch, "raw", None)
                if buf is None or len(buf) < st.st_size:
                    buf = self._scratch.raw = bytearray(max(st.st_size, self.chunk_nbytes // 2))
                view = memoryview(buf)[: st.st_size]
                got = fh.readinto(view)
                return view[:got], st
        except FileNotFoundError:
            raise CorruptChunkError(
                f"{self._where(k)} is missing ({path}); the store is damaged: "
                f"run `streamseg verify {self.root}` and re-convert (or leave these samples out)."
            ) from None

    def _cached_chunk(self, k: int, check: Any) -> np.ndarray:
        """Chunk ``k`` from this thread's cache of decoded chunks while its file is unchanged.

        Batches of one shuffle window read the same chunks (a window holds about two batches,
        and the pool gives them to one worker): decoding each once instead of ~2.7 times per
        epoch.  Least recently used chunks go first; their buffers are reused.
        """
        cache = getattr(self._scratch, "cache", None)
        if cache is None:
            cache = self._scratch.cache = collections.OrderedDict()
        hit = cache.get(k)
        if hit is not None:
            try:
                same = file_identity(os.stat(f"{self._prefix}{k}{self._tail}")) == hit[0]
            except OSError:
                same = False
            if same:
                cache.move_to_end(k)
                return hit[1]
            del cache[k]
        raw, st = self._read(k, True)
        identity = file_identity(st)
        if check is not None:
            check(self.name, k, raw, identity)
        spare = cache.popitem(last=False)[1][1] if len(cache) >= self.cache_chunks else None
        out = spare if spare is not None else np.empty(self.chunk_shape, dtype=self.dtype.newbyteorder("<"))
        self._decode_into(raw, k, out)  # a CorruptChunkError leaves the spare buffer behind: fine
        cache[k] = (identity, out)
        return out

    def decode(self, raw: bytes | memoryview, k: int, *, reuse: bool = False) -> np.ndarray:
        """Decode chunk ``k``; with ``reuse`` into a per-thread buffer (valid until the next call)."""
        out = getattr(self._scratch, "chunk", None) if reuse else None
        if out is None:
            out = np.empty(self.chunk_shape, dtype=self.dtype.newbyteorder("<"))
            if reuse:
                self._scratch.chunk = out
        return self._decode_into(raw, k, out)

    def _decode_into(self, raw: bytes | memoryview, k: int, out: np.ndarray) -> np.ndarray:
        try:
            if self._blosc:
                from numcodecs import blosc

                blosc.decompress(raw, out)
            else:
                if len(raw) != self.chunk_nbytes:
                    raise ValueError(f"expected {self.chunk_nbytes} bytes, found {len(raw)}")
                out.reshape(-1).view(np.uint8)[:] = np.frombuffer(raw, np.uint8)
        except Exception as exc:  # blosc raises RuntimeError on garbage
            raise CorruptChunkError(
                f"{self._where(k)} cannot be decoded ({exc}); run `streamseg verify {self.root}` "
                "to list damaged chunks, then re-convert them (or leave these samples out)."
            ) from None
        return out

    def read_chunk(self, k: int, *, reuse: bool = False, check: Any = None) -> np.ndarray:
        """Decoded chunk ``k``; with ``reuse`` the array is overwritten by the next call.

        ``check(name, k, raw, identity)``, when given, sees the file's bytes before they are
        decoded, with the file's :func:`file_identity` (the direct path only), and raises on a
        mismatch.
        """
        if self.direct:
            if reuse and self.cache_chunks > 0:
                return self._cached_chunk(k, check)
            raw, st = self._read(k, reuse)
            if check is not None:
                check(self.name, k, raw, file_identity(st))
            return self.decode(raw, k, reuse=reuse)
        if self._zarr_array is None:
            import zarr

            self._zarr_array = zarr.open_array(self.root / self.name, mode="r")
        c = self.chunk_shape[0]
        return np.asarray(self._zarr_array[k * c : (k + 1) * c])
