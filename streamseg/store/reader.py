"""Read side of a store: :func:`open_store` and :class:`Store`.

A store is a directory holding either a Zarr v3 group (arrays ``images`` of shape
``(N, H, W, C)`` and ``masks`` of shape ``(N, H, W, 1)``, chunked along ``N``) or two
``.npy`` files read through memory mapping, plus ``manifest.json``.  The manifest is
written last, so its presence (with ``"complete": true``) marks a finished store.

``Store.read`` reads whole chunks: a batch touching ``k`` chunks costs ``k`` chunk
decodes, whatever the number of samples.  Zarr chunk files are decoded directly
(:class:`~streamseg.store.layout.ZarrChunkReader`).

Reads are checked by default (``verify_reads``): the bytes of each chunk file (zarr) or
sample (memmap) read are compared with checksums recorded at conversion (once per process
and file version), and a mismatch raises :class:`CorruptChunkError` naming the chunk, its samples and the store (see
:mod:`streamseg.store.integrity`).  Opening a store compares its metadata files (sizes,
checksums) with the manifest.

A ``Store`` pickles as its path (and ``verify_reads``), so worker processes reopen it lazily.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorruptStoreError, OptionError, truncate
from .integrity import ReadVerifier, check_metadata, refuse_damaged, source_names, sources_problem
from .wrapped import picklable, unpickle_array, wrapped_meta
from .layout import (
    ARRAY_NAMES,
    FORMAT_VERSION,
    MANIFEST_NAME,
    PLAN_NAME,
    PROGRESS_NAME,
    SOURCES_NAME,
    ZarrChunkReader,
    load_manifest,
)

__all__ = ["Store", "open_store", "MANIFEST_NAME", "PROGRESS_NAME", "PLAN_NAME", "FORMAT_VERSION", "ARRAY_NAMES"]

_ZarrChunkReader = ZarrChunkReader  # the name the writer imports
_GROUP_BYTES = 1 << 20  # memmap reads: samples are copied (and checked) this many bytes at a time


def _chunk_runs(idx: np.ndarray, csize: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(k, pos, local)`` per chunk ``k`` holding samples of ``idx``, in chunk order: ``pos``,
    the positions in ``idx`` of its samples (stable order), ``local`` their rows in the chunk."""
    order = np.argsort(idx, kind="stable")
    sorted_idx = idx[order]
    chunk_of = sorted_idx // csize
    starts = np.concatenate(([0], np.flatnonzero(np.diff(chunk_of)) + 1, [idx.size]))
    for a, b in zip(starts[:-1], starts[1:]):
        k = int(chunk_of[a])
        yield k, order[a:b], sorted_idx[a:b] - k * csize


def _as_index_array(indices: Any, n: int) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.ndim == 0:
        idx = idx.reshape(1)
    if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
        raise OptionError(
            "Expected a 1-D list of integer sample indices. "
            f"Received: {truncate(indices)}"
        )
    idx = idx.astype(np.int64, copy=False)
    if idx.size and (idx.min() < -n or idx.max() >= n):
        bad = idx[(idx < -n) | (idx >= n)][0]
        raise IndexError(f"Sample index {int(bad)} is out of range for a store of {n} samples.")
    return np.where(idx < 0, idx + n, idx)


class Store:
    """A finished streamseg store, or arrays wrapped to look like one.

    Use :func:`open_store` to open a store on disk and :meth:`Store.from_arrays` to wrap
    arrays already in hand.

    Attributes
    ----------
    path : pathlib.Path or None
        Directory of the store (None for wrapped arrays).
    backend : str
        ``"zarr"``, ``"memmap"`` or ``"arrays"``.
    meta : dict
        The manifest.
    verify_reads : bool
        Whether reads are checked against the checksums recorded at conversion (default
        True; False for wrapped arrays, which have none).  See :func:`open_store`.
    """

    def __init__(self, path: str | os.PathLike, *, verify_reads: bool = True) -> None:
        self.path: Path | None = Path(path)
        self._arrays: tuple[Any, Any] | None = None
        self.meta: dict[str, Any] = _open_manifest(self.path)
        self.backend: str = self.meta.get("backend", "zarr")
        self.verify_reads = bool(verify_reads)
        self._readers: dict[str, Any] | None = None
        self._lazy: dict[str, Any] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_arrays(cls, images: Any, masks: Any, *, names: Sequence[str] | None = None) -> "Store":
        """Wrap image and mask arrays already in hand behind the store interface.

        Parameters
        ----------
        images : array-like
            ``(N, H, W, C)`` or ``(N, H, W)`` array: NumPy array, ``np.memmap``, zarr
            array, h5py dataset or anything with ``shape``, ``dtype`` and ``__getitem__``.
        masks : array-like
            ``(N, H, W)`` or ``(N, H, W, 1)`` integer labels.
        names : sequence of str, optional
            Source names of the samples (default ``"0"``, ``"1"``, ...).

        Returns
        -------
        Store
            Reads go straight to the arrays.  Masks under 256 MiB are scanned once for their
            label values (``meta["label_values"]``, from which a dataset takes its default
            ``num_classes``); larger ones are not, and a dataset then needs ``num_classes``.
        """
        self = cls.__new__(cls)
        self.path = None
        self._arrays = (images, masks)
        self._readers = None
        self._lazy = {}
        self.backend = "arrays"
        self.verify_reads = False  # nothing was recorded to check against
        self.meta = wrapped_meta(images, masks, names)  # checks the arrays
        return self

    def with_verify_reads(self, enabled: bool | None) -> "Store":
        """This store with read checks turned on or off (``None``: this store itself)."""
        if enabled is None or bool(enabled) == self.verify_reads or self.path is None:
            return self
        other = copy.copy(self)  # shares the open files and caches
        other.verify_reads = bool(enabled)
        return other

    def keep_decoded_chunks(self, chunks: int) -> None:
        """Keep up to ``chunks`` decoded chunks per array and thread for reads (zarr backend;
        elsewhere nothing to do): batches reading the same chunks decode them once."""
        if self.backend == "zarr" and self.path is not None:
            for name in ARRAY_NAMES:
                self.chunk_reader(name).cache_chunks = max(0, int(chunks))

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        if self.path is not None:
            return {"path": str(self.path), "verify_reads": self.verify_reads}
        images, masks = self._arrays  # type: ignore[misc]
        return {"arrays": (picklable(images, "images"), picklable(masks, "masks")), "meta": self.meta}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._readers = None
        self._lazy = {}
        if "path" in state:
            self.path = Path(state["path"])
            self._arrays = None
            self.meta = _open_manifest(self.path)
            self.verify_reads = bool(state.get("verify_reads", True))
        else:
            self.meta = state["meta"]
            self.path = None
            self._arrays = tuple(unpickle_array(a) for a in state["arrays"])  # type: ignore[assignment]
            self.verify_reads = False
        self.backend = self.meta.get("backend", "zarr")

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else "in-memory arrays"
        return f"Store({where!r}, backend={self.backend!r}, count={len(self)})"

    # ------------------------------------------------------------------ properties
    def __len__(self) -> int:
        return int(self.meta["count"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape ``(H, W, C)`` of one image."""
        return tuple(self.meta["image_shape"])  # type: ignore[return-value]

    @property
    def image_dtype(self) -> np.dtype:
        """Stored image dtype."""
        return np.dtype(self.meta["image_dtype"])

    @property
    def mask_dtype(self) -> np.dtype:
        """Stored mask dtype."""
        return np.dtype(self.meta["mask_dtype"])

    @property
    def chunk_samples(self) -> int:
        """Samples per chunk (1 for wrapped arrays without chunks)."""
        return int(self.meta.get("chunk_samples") or 1)

    @property
    def num_chunks(self) -> int:
        """Number of chunks along the sample axis."""
        return -(-len(self) // self.chunk_samples)

    @property
    def images(self) -> Any:
        """Lazy array-like of shape ``(N, H, W, C)`` (zarr array, memmap or the wrapped array)."""
        return self._array("images")

    @property
    def masks(self) -> Any:
        """Lazy array-like of shape ``(N, H, W, 1)``."""
        return self._array("masks")

    @property
    def names(self) -> list[str]:
        """Source name of every sample, in store order.

        Raises
        ------
        CorruptStoreError
            ``sources.txt`` is missing, or does not name every sample as the manifest records.
        """
        if "names" not in self._lazy:
            listed = self.path is not None and self.meta.get("sources", {}).get("file")
            if listed or (self.path is not None and (self.path / SOURCES_NAME).exists()):
                assert self.path is not None
                try:
                    text = (self.path / SOURCES_NAME).read_bytes()
                except FileNotFoundError:
                    text = None
                found = source_names(text) if text is not None else []
                problem = (f"{SOURCES_NAME} is missing" if text is None
                           else sources_problem(self.meta, text, len(found)))
                if problem:
                    raise CorruptStoreError(
                        f"Store {self.path}: {problem}. Run `streamseg verify {self.path}`, and "
                        "re-convert the store (convert again with --overwrite)."
                    )
                self._lazy["names"] = found
            else:
                given = self.meta.get("names")
                self._lazy["names"] = list(given) if given else [str(i) for i in range(len(self))]
        return self._lazy["names"]

    def _array(self, name: str) -> Any:
        if self._arrays is not None:
            return self._arrays[ARRAY_NAMES.index(name)]
        if name not in self._lazy:
            assert self.path is not None
            if self.backend == "memmap":
                self._lazy[name] = np.load(self.path / f"{name}.npy", mmap_mode="r")
            else:
                import zarr

                self._lazy[name] = zarr.open_array(self.path / name, mode="r")
        return self._lazy[name]

    # ------------------------------------------------------------------ reading
    def chunk_reader(self, name: str) -> ZarrChunkReader:
        """Direct chunk reader for a zarr array (zarr backend only)."""
        if self._readers is None:
            assert self.path is not None and self.backend == "zarr"
            self._readers = {n: ZarrChunkReader(self.path, n) for n in ARRAY_NAMES}
        return self._readers[name]

    def _verifier(self) -> ReadVerifier | None:
        """The read checker of this process, or None when reads are not checked."""
        if not self.verify_reads or self.path is None:
            return None
        if "verifier" not in self._lazy:
            self._lazy["verifier"] = ReadVerifier(self.path, self.meta)
        return self._lazy["verifier"]

    def read_chunk(self, name: str, k: int) -> np.ndarray:
        """Return chunk ``k`` of array ``name`` as a NumPy array (trimmed to the store length)."""
        c = self.chunk_samples
        start, stop = k * c, min((k + 1) * c, len(self))
        if not 0 <= start < len(self):
            raise IndexError(f"Chunk {k} is out of range for {self.num_chunks} chunks.")
        verifier = self._verifier()
        if self.backend == "zarr":
            arr = self.chunk_reader(name).read_chunk(k, check=verifier.check_chunk_file if verifier else None)
            return arr[: stop - start]
        arr = np.array(self._array(name)[start:stop])
        held = np.arange(start, stop)
        if verifier is not None and verifier.needs_check(name, f"{self.path}{os.sep}{name}.npy", held):
            verifier.check_samples(name, held, arr, self._array(name))
        return arr

    def read(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Read the samples at ``indices`` (any order, repeats allowed).

        Parameters
        ----------
        indices : sequence of int
            Sample indices; negative values count from the end.

        Returns
        -------
        images : numpy.ndarray
            ``(B, H, W, C)`` in the stored dtype.
        masks : numpy.ndarray
            ``(B, H, W, 1)`` in the stored dtype.

        Raises
        ------
        CorruptChunkError
            A chunk is missing, cannot be decoded or (with ``verify_reads``) fails its
            checksum; the message names the chunk, its samples and the store.

        Notes
        -----
        Each chunk holding at least one requested sample is read and decoded once.
        """
        idx = _as_index_array(indices, len(self))
        h, w, c = self.image_shape
        images = np.empty((idx.size, h, w, c), self.image_dtype)
        masks = np.empty((idx.size, h, w, 1), self.mask_dtype)
        self._read_checked(idx, images, masks)
        return images, masks

    def read_into(self, indices: np.ndarray, images: np.ndarray, masks: np.ndarray) -> None:
        """Like :meth:`read`, but write into preallocated ``images`` and ``masks``."""
        self._read_checked(_as_index_array(indices, len(self)), images, masks)

    def iter_samples(self, indices: Sequence[int] | np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yield ``(j, image, mask)`` for sample ``indices[j]``, every ``j`` once.

        Without copies where it can, in storage order: views into the memory map or into the
        decoded chunk, valid until the next item, read-only (copy what you keep).  Memmap
        samples not checked yet (``verify_reads``: each is checked on its first read) and
        wrapped arrays go through :meth:`read`, in request order.  Checks and errors as
        :meth:`read`.
        """
        idx = _as_index_array(indices, len(self))
        verifier = self._verifier()
        if idx.size == 0:
            return
        unchecked = self.backend == "memmap" and verifier is not None and any(
            verifier.needs_check(name, f"{self.path}{os.sep}{name}.npy", idx) for name in ("images", "masks"))
        if self.backend == "arrays" or unchecked:
            yield from self._iter_copies(idx)
            return
        if self.backend == "memmap":
            src_i, src_m = self._array("images"), self._array("masks")
            order = np.argsort(idx, kind="stable")
            for i, j in zip(idx[order].tolist(), order.tolist()):
                yield j, src_i[i], src_m[i]
            return
        check = verifier.check_chunk_file if verifier is not None else None
        h, w, c = self.image_shape
        for k, pos, local in _chunk_runs(idx, self.chunk_samples):
            ci = self.chunk_reader("images").read_chunk(k, reuse=True, check=check)
            cm = self.chunk_reader("masks").read_chunk(k, reuse=True, check=check)
            for j, q in zip(pos.tolist(), local.tolist()):
                yield j, ci[q].reshape(h, w, c), cm[q].reshape(h, w, 1)

    def _iter_copies(self, indices: Sequence[int] | np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """:meth:`iter_samples` through one :meth:`read` of the batch, in request order."""
        images, masks = self.read(indices)
        yield from ((j, images[j], masks[j]) for j in range(len(images)))

    def _read_checked(self, idx: np.ndarray, images: np.ndarray, masks: np.ndarray) -> None:
        if idx.size == 0:
            return
        if self.backend == "arrays":
            self._read_arrays(idx, images, masks)
            return
        verifier = self._verifier()
        if self.backend == "memmap":
            order = np.argsort(idx, kind="stable")
            sorted_idx = idx[order]
            for name, out in (("images", images), ("masks", masks)):
                src = self._array(name)
                pending = verifier is not None and verifier.needs_check(name, f"{self.path}{os.sep}{name}.npy", idx)
                if not pending:  # checked already: one copy per sample, straight from the map
                    for i, o in zip(sorted_idx.tolist(), order.tolist()):
                        out[o] = src[i]
                    continue
                # copied in groups small enough to stay in cache between the copy out of the map,
                # the check of the bytes handed out and the store (2x faster than one gather)
                step = max(1, _GROUP_BYTES // max(1, out[:1].nbytes))
                for a in range(0, idx.size, step):
                    part = src[sorted_idx[a : a + step]]
                    if pending:
                        verifier.check_samples(name, sorted_idx[a : a + step], part, src)  # type: ignore[union-attr]
                    out[order[a : a + step]] = part
            return
        check = verifier.check_chunk_file if verifier is not None else None
        for k, pos, local in _chunk_runs(idx, self.chunk_samples):
            run = pos.size
            contiguous = (pos[-1] - pos[0] == run - 1 and local[-1] - local[0] == run - 1
                          and (run == 1 or (np.all(np.diff(pos) == 1) and np.all(np.diff(local) == 1))))
            for name, out in (("images", images), ("masks", masks)):
                chunk = self.chunk_reader(name).read_chunk(k, reuse=True, check=check)
                if contiguous:  # one memcpy, no temporary
                    out[pos[0] : pos[0] + run] = chunk[local[0] : local[0] + run].reshape((run,) + out.shape[1:])
                else:  # one copy per sample: a fancy-index gather copies twice (via a temporary)
                    for p, q in zip(pos.tolist(), local.tolist()):
                        out[p] = chunk[q].reshape(out.shape[1:])

    def _read_arrays(self, idx: np.ndarray, images: np.ndarray, masks: np.ndarray) -> None:
        src_i, src_m = self._arrays  # type: ignore[misc]
        uniq, inverse = np.unique(idx, return_inverse=True)
        if isinstance(src_i, np.ndarray):
            got_i, got_m = src_i[uniq], src_m[uniq]
        else:  # zarr / h5py want sorted, unique indices; read contiguous runs as slices
            got_i = np.stack([np.asarray(src_i[int(i)]) for i in uniq])
            got_m = np.stack([np.asarray(src_m[int(i)]) for i in uniq])
        images[...] = got_i[inverse].reshape(images.shape)
        masks[...] = got_m[inverse].reshape(masks.shape)


def _open_manifest(path: Path) -> dict[str, Any]:
    """The manifest, after comparing the metadata files it records with those on disk."""
    meta = load_manifest(path)
    if meta.get("layout") == "volumes":
        raise OptionError(f"{path} is a --layout volumes store (one 3D entry per case): open it with open_store, "
                          "which returns a VolumeStore, and train on it with PatchDataset; SegmentationDataset "
                          "needs a --layout slices store. Received: layout='volumes'")
    problems = check_metadata(path, meta, content=False)
    if problems:
        raise refuse_damaged(path, problems)
    return meta


def open_store(path: str | os.PathLike, *, verify_reads: bool = True,
               storage_options: dict[str, Any] | None = None, cache_dir: str | os.PathLike | None = None,
               cache_bytes: int | None = None) -> Store:
    """Open a finished store for reading.

    Parameters
    ----------
    path : str or os.PathLike
        Directory written by ``streamseg convert`` / :func:`streamseg.convert`, or the URL of a
        zarr store in object storage (``s3://bucket/data.zarr``; ``gs://``, ``az://``,
        ``file://`` go through fsspec too), opened as a
        :class:`~streamseg.store.remote.RemoteStore`.
    verify_reads : bool
        Check what reads return against the checksums recorded at conversion (default): each
        zarr chunk file and each memmap sample the first time this process reads it, and again
        whenever its file changes (inode, size or modification time).  Reads of bytes already
        checked cost nothing, so only a process's first epoch pays (benchmarks/verify_cost.py).
        Stores written before per-read checksums existed are checked with their per-chunk
        crc32s, each chunk once per process; zarr arrays rewritten with codecs streamseg does
        not write are read through zarr, unchecked.  False reads without checking;
        ``streamseg verify`` checks everything.
    storage_options : dict, optional
        URL only: options of the fsspec file system (S3: ``endpoint_url``, ``anon``,
        ``config_kwargs``, ...).  Credentials otherwise come from the environment or config
        files (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``~/.aws``;
        ``AWS_ENDPOINT_URL`` for an S3-compatible server); no value that may be a secret is
        ever shown in a message or repr.
    cache_dir : path, optional
        URL only: folder of the local read-through chunk cache, shared safely by processes (a
        dataset's workers, several runs), so a second epoch reads from local disk.  Default:
        a private temporary folder, removed with the store.
    cache_bytes : int, optional
        URL only: bound of the cached chunk files (default 10 GiB in ``cache_dir``, 256 MiB in
        the private folder); least recently used chunks are evicted beyond it.

    Returns
    -------
    Store

    Raises
    ------
    StoreNotFoundError
        Nothing there, or not a streamseg store.
    IncompleteStoreError
        The conversion did not finish; the message says how to resume.
    CorruptStoreError
        A metadata file (``zarr.json``, ``sources.txt``, a ``.npy`` header, ...) is missing or
        differs from what the manifest records; the message names it.
    RemoteStoreError
        URL only: the storage cannot be reached, refuses access, or a transfer failed.
    OptionError
        URL only: a memmap store (which needs a local file: convert with ``--format zarr``),
        or storage options the file system rejects; for a local path, any URL-only option.
    """
    from .remote_fs import is_url

    if is_url(path):
        from .remote import open_remote_store

        return open_remote_store(path, storage_options=storage_options, cache_dir=cache_dir,
                                 cache_bytes=cache_bytes, verify_reads=verify_reads)
    if storage_options is not None or cache_dir is not None or cache_bytes is not None:
        raise OptionError("storage_options, cache_dir and cache_bytes apply to a store URL (s3://...). "
                          f"Received: {truncate(str(path))}")
    if load_manifest(Path(path)).get("layout") == "volumes":
        from .volume_reader import VolumeStore

        return VolumeStore(path, verify_reads=verify_reads)  # type: ignore[return-value]
    return Store(path, verify_reads=verify_reads)
