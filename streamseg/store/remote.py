"""Stores in object storage (S3 and anything else fsspec reaches), zarr backend: reading.

``open_store("s3://bucket/data.zarr", storage_options={...}, cache_dir=..., cache_bytes=...)``
returns a :class:`RemoteStore`, usable wherever a local store is (``SegmentationDataset``,
worker processes).  It reads through a local mirror (:mod:`streamseg.store.remote_cache`):
the metadata files are fetched at open, and before each read the chunk files it needs that
the mirror lacks are fetched concurrently (one request each, all in flight together, for
both arrays), after which the read is a local store's read, checksums included.  A second
epoch reads from local disk while the mirror holds the chunks (``cache_bytes``).

A ``RemoteStore`` pickles as its URL, storage options, mirror and bound: a worker process
reuses the mirror without a request when its manifest is the one the parent opened, and
makes its own file system either way (see :mod:`streamseg.store.remote_fs`).  The pickle
carries the storage options as given (the workers need them), so credentials are better
left to the environment; its repr and every message show them redacted.

Writing a remote store is :func:`streamseg.convert` with a URL destination
(:mod:`streamseg.store.remote_upload`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorruptChunkError, CorruptStoreError, IncompleteStoreError, OptionError, StreamsegError, \
    truncate
from .layout import ARRAY_NAMES, FORMAT_VERSION, MANIFEST_NAME, READ_CHECKSUMS_NAME, SOURCES_NAME, sample_range, \
    zarr_chunk_path
from .reader import Store
from .remote_cache import MirrorCache, mirror_name
from .remote_fs import RemoteLocation, RemoteStoreError, is_url, redact_options

__all__ = ["RemoteStore", "RemoteArray", "RemoteStoreError", "open_remote_store", "is_url", "chunk_rel", "UPLOAD_MARK",
           "DEFAULT_CACHE_BYTES", "PRIVATE_CACHE_BYTES"]

#: Bound of the chunk cache in a ``cache_dir`` given without ``cache_bytes``.
DEFAULT_CACHE_BYTES = 10 * 2**30
#: Bound of the private temporary cache used without ``cache_dir``.
PRIVATE_CACHE_BYTES = 256 * 2**20
#: Uploaded first and deleted last by a conversion to a URL: marks an unfinished upload.
UPLOAD_MARK = "_upload.json"
_METADATA = ("zarr.json", "images/zarr.json", "masks/zarr.json", SOURCES_NAME, READ_CHECKSUMS_NAME)


def _remove_owned(path: str, owner: int) -> None:
    if os.getpid() == owner:  # never from a forked child that happens to exit normally
        shutil.rmtree(path, ignore_errors=True)


class _PrivateDir:
    """A temporary cache folder removed when the last store using it is gone (in its process)."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="streamseg-cache-"))
        weakref.finalize(self, _remove_owned, str(self.path), os.getpid())


def chunk_rel(name: str, k: int) -> str:
    """Path of chunk ``k`` of array ``name`` inside a store (``images/c/3/0/0/0``)."""
    return zarr_chunk_path(Path(""), name, k).as_posix()


class RemoteStore(Store):
    """A finished zarr store in object storage, read through a local mirror.

    Open one with :func:`streamseg.open_store` and a URL.  Attributes are those of
    :class:`~streamseg.store.reader.Store` (``path`` is the local mirror), plus:

    Attributes
    ----------
    url : str
        The store's URL (without any credentials it held).
    cache : MirrorCache
        The local mirror and its bound.
    """

    def __init__(self, url: str, *, storage_options: dict[str, Any] | None = None,
                 cache_dir: str | os.PathLike | None = None, cache_bytes: int | None = None,
                 verify_reads: bool = True) -> None:
        self._loc = RemoteLocation(url, storage_options)
        self.url = self._loc.display
        if cache_bytes is not None and (isinstance(cache_bytes, bool) or not isinstance(cache_bytes, (int, np.integer))
                                        or cache_bytes < 1):
            raise OptionError(f"cache_bytes must be a positive number of bytes. Received: {truncate(cache_bytes)}")
        self._tmp: _PrivateDir | None = None
        if cache_dir is None:
            self._tmp = _PrivateDir()
            base, bound = self._tmp.path, int(cache_bytes or PRIVATE_CACHE_BYTES)
        else:
            base, bound = Path(cache_dir), int(cache_bytes or DEFAULT_CACHE_BYTES)
            try:
                base.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OptionError(f"cache_dir {base} cannot be created ({exc.strerror or exc}); pass a folder "
                                  f"you can write to. Received: {truncate(str(cache_dir))}") from None
        endpoint = (storage_options or {}).get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
        self.cache = MirrorCache(base / mirror_name(self._loc.url, endpoint), bound)
        self._open(verify_reads, self._sync_mirror())

    # ------------------------------------------------------------------ opening
    def _fetch_manifest(self) -> bytes:
        got = self._loc.cat_many([MANIFEST_NAME, UPLOAD_MARK])
        manifest, mark = got[MANIFEST_NAME], got[UPLOAD_MARK]
        if isinstance(manifest, bytes):
            return manifest
        if isinstance(manifest, FileNotFoundError) and isinstance(mark, bytes):
            try:
                total = int(json.loads(mark).get("files", 0))
            except (ValueError, AttributeError):
                total = 0
            done = max(0, len(self._loc.sizes()) - 1)
            raise IncompleteStoreError(
                f"Store {self.url} is incomplete ({done} of {total or '?'} files uploaded; the conversion or "
                "its upload was interrupted). Re-run the same `streamseg convert` command with --resume to "
                "finish it, or with --overwrite to start again.")
        if isinstance(manifest, FileNotFoundError):
            raise self._loc.error(FileNotFoundError(f"{MANIFEST_NAME} not found"), "open")
        raise self._loc.error(manifest, "open")

    def _sync_mirror(self, force: bool = False) -> str:
        """Fetch the manifest and, when the mirror holds another (or none), the metadata files."""
        manifest = self._fetch_manifest()
        try:
            meta = json.loads(manifest)
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            raise IncompleteStoreError(f"The manifest of {self.url} is damaged ({exc}); re-convert with "
                                       "--overwrite.") from None
        if not meta.get("complete"):
            raise IncompleteStoreError(f"Store {self.url} is not marked complete; re-run `streamseg convert` with "
                                       "--resume.")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise IncompleteStoreError(f"Store {self.url} has format version {meta.get('format_version')}, newer than "
                                       f"this streamseg understands ({FORMAT_VERSION}); upgrade streamseg.")
        if meta.get("backend", "zarr") != "zarr" or meta.get("layout") == "volumes":
            what = ("a memmap store, which needs a local file" if meta.get("backend") == "memmap"
                    else "a --layout volumes store")
            raise OptionError(
                f"{self.url} is {what}; object storage holds zarr stores of 2D samples only: convert with "
                f"--format zarr (and --layout slices). Received: backend={meta.get('backend')!r}"
                + (f", layout={meta.get('layout')!r}" if meta.get("layout") else ""))
        import hashlib

        digest = hashlib.sha256(manifest).hexdigest()
        with self.cache.lock():
            if force or self.cache.manifest_digest() != digest:
                got = self._loc.cat_many(list(_METADATA))
                files = {}
                for rel, data in got.items():
                    if isinstance(data, bytes):
                        files[rel] = data
                    elif not isinstance(data, FileNotFoundError):  # a missing one is reported by the checks
                        raise self._loc.error(data, "read")
                try:
                    self.cache.install(files, manifest)
                except OSError as exc:
                    raise OptionError(f"The cache {self.cache.root} cannot be written ({exc.strerror or exc}); pass "
                                      f"a cache_dir you can write to. Received: {self.cache.root}") from None
        return digest

    def _open(self, verify_reads: bool, digest: str) -> None:
        self._digest = digest
        try:
            Store.__init__(self, self.cache.root, verify_reads=verify_reads)
        except CorruptStoreError:  # the mirror's copy was damaged: fetch it again, once
            self._digest = self._sync_mirror(force=True)
            try:
                Store.__init__(self, self.cache.root, verify_reads=verify_reads)
            except StreamsegError as exc:
                raise self._relabel(exc) from None
        except StreamsegError as exc:
            raise self._relabel(exc) from None

    def _relabel(self, exc: StreamsegError) -> StreamsegError:
        """``exc`` naming the URL instead of the mirror."""
        text = str(exc).replace(f"{self.cache.root}{os.sep}", f"{self.url}/").replace(str(self.cache.root), self.url)
        try:
            return type(exc)(text)
        except Exception:  # noqa: BLE001 - an error class taking other arguments
            return exc

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        return {"loc": self._loc, "mirror": str(self.cache.root), "bound": self.cache.bound,
                "verify_reads": self.verify_reads, "digest": self._digest}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._loc = state["loc"]
        self.url = self._loc.display
        self._tmp = None  # the process that made the private cache removes it
        self.cache = MirrorCache(Path(state["mirror"]), state["bound"])
        digest = state["digest"]
        if self.cache.manifest_digest() != digest:  # another machine, or the mirror is gone
            digest = self._sync_mirror()
        self._open(state["verify_reads"], digest)

    def __repr__(self) -> str:
        return f"RemoteStore({self.url!r}, backend={self.backend!r}, count={len(self)}, cache={str(self.cache.root)!r})"

    @property
    def storage_options(self) -> dict[str, Any]:
        """The storage options, with every value that may be a secret shown as ``'***'``."""
        return redact_options(self._loc.options)

    # ------------------------------------------------------------------ reading
    def ensure_chunks(self, chunks: list[int], names: tuple[str, ...] = ARRAY_NAMES) -> int:
        """Fetch the chunk files of ``chunks`` (both arrays) the mirror lacks, concurrently; the
        number fetched."""
        rels = [chunk_rel(n, int(k)) for k in chunks for n in names]
        missing = self.cache.missing(rels)
        if not missing:
            return 0
        got = self._loc.cat_many(missing)
        blobs = {}
        for rel, data in got.items():
            if isinstance(data, bytes):
                blobs[rel] = data
                continue
            if isinstance(data, FileNotFoundError):
                name, k = rel.split("/")[0], int(rel.split("/")[2])
                held = sample_range(k, self.chunk_samples, len(self))
                raise CorruptChunkError(
                    f"Chunk {k} of '{name}' ({held}) in {self.url} is missing ({self._loc.url_of(rel)}); the store is "
                    f"damaged: re-convert it (convert again with --overwrite), or leave these samples out.")
            raise self._loc.error(data, "read")
        self.cache.put(blobs, keep=set(rels))
        return len(blobs)

    def _with_chunks(self, chunks: list[int], names: tuple[str, ...], read: Any) -> Any:
        self.ensure_chunks(chunks, names)
        try:
            return read()
        except CorruptChunkError:  # evicted by another process meanwhile, or a damaged cached copy
            self.cache.drop([chunk_rel(n, int(k)) for k in chunks for n in names])
            self.ensure_chunks(chunks, names)
            try:
                return read()
            except StreamsegError as exc:
                raise self._relabel(exc) from None

    def read_chunk(self, name: str, k: int) -> np.ndarray:
        """Return chunk ``k`` of array ``name`` (fetched into the mirror first if needed)."""
        if not 0 <= k < self.num_chunks:
            raise IndexError(f"Chunk {k} is out of range for {self.num_chunks} chunks.")
        return self._with_chunks([k], (name,), lambda: Store.read_chunk(self, name, k))

    def iter_samples(self, indices: Any) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """As :meth:`Store.iter_samples`, through :meth:`read` (chunks fetched into the mirror first)."""
        return self._iter_copies(indices)

    def _read_checked(self, idx: np.ndarray, images: np.ndarray, masks: np.ndarray) -> None:
        if idx.size == 0:
            return
        chunks = np.unique(idx // self.chunk_samples).tolist()
        self._with_chunks(chunks, ARRAY_NAMES, lambda: Store._read_checked(self, idx, images, masks))

    def _array(self, name: str) -> Any:
        if name not in self._lazy:
            self._lazy[name] = RemoteArray(self, name)
        return self._lazy[name]


class RemoteArray:
    """Lazy ``images`` / ``masks`` of a :class:`RemoteStore`: indexing along the first axis reads
    the chunks it needs (through the cache, checked); further axes are sliced afterwards."""

    def __init__(self, store: RemoteStore, name: str) -> None:
        self._store, self.name = store, name
        h, w, c = store.image_shape
        self.shape = (len(store), h, w, c if name == "images" else 1)
        self.dtype = store.image_dtype if name == "images" else store.mask_dtype
        self.chunks = (store.chunk_samples,) + self.shape[1:]
        self.ndim = 4

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"RemoteArray({self._store.url!r}, {self.name!r}, shape={self.shape}, dtype={self.dtype})"

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        first, rest = (key[0], key[1:]) if key and key[0] is not Ellipsis else (slice(None), key)
        n = self.shape[0]
        scalar = isinstance(first, (int, np.integer))
        if scalar:
            idx = np.array([first + n if first < 0 else first])
            if not 0 <= idx[0] < n:
                raise IndexError(f"index {first} is out of range for {n} samples")
        elif isinstance(first, slice):
            idx = np.arange(n)[first]
        else:
            idx = np.arange(n)[np.asarray(first)]
        out = np.empty((idx.size,) + self.shape[1:], self.dtype)
        cs = self._store.chunk_samples
        for k in np.unique(idx // cs).tolist():
            where = np.flatnonzero(idx // cs == k)
            out[where] = self._store.read_chunk(self.name, k)[idx[where] - k * cs]
        out = out[0] if scalar else out
        return out[rest] if rest else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = self[:]
        return data.astype(dtype) if dtype is not None else data


def open_remote_store(url: str, *, storage_options: dict[str, Any] | None = None,
                      cache_dir: str | os.PathLike | None = None, cache_bytes: int | None = None,
                      verify_reads: bool = True) -> RemoteStore:
    """Open the finished zarr store at ``url``; see :func:`streamseg.open_store`."""
    return RemoteStore(url, storage_options=storage_options, cache_dir=cache_dir, cache_bytes=cache_bytes,
                       verify_reads=verify_reads)
