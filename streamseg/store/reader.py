"""Read side of a streamseg store: :func:`open_store` and :class:`Store`.

A store is a directory holding either a Zarr v3 group (arrays ``images`` of shape
``(N, H, W, C)`` and ``masks`` of shape ``(N, H, W, 1)``, chunked along ``N``) or two
``.npy`` files read through memory mapping, plus ``manifest.json``.  The manifest is
written last, so its presence (with ``"complete": true``) marks a finished store.

``Store.read`` reads whole chunks: a batch touching ``k`` chunks costs ``k`` chunk
decodes, whatever the number of samples.  For the zarr backend the chunk files are
decoded directly with numcodecs when the codec pipeline is the one streamseg writes
(bytes + optional Blosc), which avoids zarr-python's asyncio machinery (about 1 ms per
call) and makes reading safe after ``fork``; any other pipeline falls back to zarr.

A ``Store`` pickles as its path, so worker processes reopen it lazily.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import (
    CorruptChunkError,
    IncompleteStoreError,
    OptionError,
    StoreNotFoundError,
    truncate,
)

__all__ = ["Store", "open_store", "MANIFEST_NAME", "PROGRESS_NAME", "FORMAT_VERSION", "ARRAY_NAMES"]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PROGRESS_NAME = "_progress.jsonl"
PLAN_NAME = "_plan.json"
ARRAY_NAMES = ("images", "masks")


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


class _ZarrChunkReader:
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
        self._direct = (
            codecs in (["bytes"], ["bytes", "blosc"])
            and sep == "/"
            and meta.get("chunk_key_encoding", {}).get("name") == "default"
            and (self.dtype.itemsize == 1 or endian == "little")
        )
        self._blosc = codecs == ["bytes", "blosc"]
        self._tail = "/".join("0" for _ in self.shape[1:])
        self._zarr_array: Any = None
        self.chunk_nbytes = int(np.prod(self.chunk_shape)) * self.dtype.itemsize
        self._scratch = threading.local()  # per-thread reusable buffers: no page faults per read

    def chunk_path(self, k: int) -> Path:
        return self.root / self.name / "c" / str(k) / self._tail

    def read_raw(self, k: int, *, reuse: bool = False) -> bytes | memoryview:
        """Bytes of chunk file ``k``; with ``reuse`` a view of a per-thread buffer."""
        path = self.chunk_path(k)
        try:
            if not reuse:
                return path.read_bytes()
            with open(path, "rb", buffering=0) as fh:
                size = os.fstat(fh.fileno()).st_size
                buf = getattr(self._scratch, "raw", None)
                if buf is None or len(buf) < size:
                    buf = self._scratch.raw = bytearray(max(size, self.chunk_nbytes // 2))
                view = memoryview(buf)[:size]
                got = fh.readinto(view)
                return view[:got]
        except FileNotFoundError:
            raise CorruptChunkError(
                f"Chunk {k} of '{self.name}' is missing ({path}); the store is damaged: "
                "run `streamseg verify` and re-convert."
            ) from None

    def decode(self, raw: bytes | memoryview, k: int, *, reuse: bool = False) -> np.ndarray:
        """Decode chunk ``k``; with ``reuse`` into a per-thread buffer (valid until the next call)."""
        out = getattr(self._scratch, "chunk", None) if reuse else None
        if out is None:
            out = np.empty(self.chunk_shape, dtype=self.dtype.newbyteorder("<"))
            if reuse:
                self._scratch.chunk = out
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
                f"Chunk {k} of '{self.name}' in {self.root} cannot be decoded ({exc}); "
                "run `streamseg verify` to list damaged chunks, then re-convert them."
            ) from None
        return out

    def read_chunk(self, k: int, *, reuse: bool = False) -> np.ndarray:
        """Decoded chunk ``k``; with ``reuse`` the array is overwritten by the next call."""
        if self._direct:
            return self.decode(self.read_raw(k, reuse=reuse), k, reuse=reuse)
        if self._zarr_array is None:
            import zarr

            self._zarr_array = zarr.open_array(self.root / self.name, mode="r")
        c = self.chunk_shape[0]
        return np.asarray(self._zarr_array[k * c : (k + 1) * c])


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
    """

    def __init__(self, path: str | os.PathLike, *, _check: bool = True) -> None:
        self.path: Path | None = Path(path)
        self._arrays: tuple[Any, Any] | None = None
        self.meta: dict[str, Any] = _load_manifest(self.path) if _check else {}
        self.backend: str = self.meta.get("backend", "zarr")
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
            Reads go straight to the arrays; no statistics are computed.
        """
        for label, arr in (("images", images), ("masks", masks)):
            if not hasattr(arr, "shape") or not hasattr(arr, "__getitem__"):
                raise OptionError(
                    f"Expected `{label}` to be an array (NumPy, memmap, zarr, h5py). "
                    f"Received: {truncate(type(arr))}"
                )
        if len(images.shape) not in (3, 4) or len(masks.shape) not in (3, 4):
            raise OptionError(
                "Expected images of shape (N, H, W[, C]) and masks of shape (N, H, W[, 1]). "
                f"Received: images {tuple(images.shape)}, masks {tuple(masks.shape)}"
            )
        if tuple(images.shape[:3]) != tuple(masks.shape[:3]):
            raise OptionError(
                "Images and masks must have the same count, height and width. "
                f"Received: images {tuple(images.shape)}, masks {tuple(masks.shape)}"
            )
        if len(masks.shape) == 4 and masks.shape[3] != 1:
            raise OptionError(f"Masks must have one channel. Received: masks {tuple(masks.shape)}")
        if np.dtype(masks.dtype).kind not in "iub":
            raise OptionError(
                "Masks must hold integer labels; round or threshold float masks first. "
                f"Received: masks of dtype {masks.dtype}"
            )
        self = cls.__new__(cls)
        self.path = None
        self._arrays = (images, masks)
        self._readers = None
        self._lazy = {}
        self.backend = "arrays"
        n = int(images.shape[0])
        c = 1 if len(images.shape) == 3 else int(images.shape[3])
        self.meta = {
            "format_version": FORMAT_VERSION,
            "backend": "arrays",
            "complete": True,
            "count": n,
            "image_shape": [int(images.shape[1]), int(images.shape[2]), c],
            "image_dtype": str(np.dtype(images.dtype)),
            "mask_shape": [int(masks.shape[1]), int(masks.shape[2]), 1],
            "mask_dtype": str(np.dtype(masks.dtype)),
            "chunk_samples": int((getattr(images, "chunks", None) or (1,))[0] or 1),
            "names": list(names) if names is not None else None,
        }
        return self

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        if self.path is not None:
            return {"path": str(self.path)}
        images, masks = self._arrays  # type: ignore[misc]
        return {"arrays": (_picklable(images, "images"), _picklable(masks, "masks")), "meta": self.meta}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._readers = None
        self._lazy = {}
        if "path" in state:
            self.path = Path(state["path"])
            self._arrays = None
            self.meta = _load_manifest(self.path)
        else:
            self.meta = state["meta"]
            self.path = None
            self._arrays = tuple(_unpickle_array(a) for a in state["arrays"])  # type: ignore[assignment]
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
        """Source name of every sample, in store order."""
        if "names" not in self._lazy:
            if self.path is not None and (self.path / "sources.txt").exists():
                self._lazy["names"] = (self.path / "sources.txt").read_text().splitlines()
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
    def chunk_reader(self, name: str) -> _ZarrChunkReader:
        """Direct chunk reader for a zarr array (zarr backend only)."""
        if self._readers is None:
            assert self.path is not None and self.backend == "zarr"
            self._readers = {n: _ZarrChunkReader(self.path, n) for n in ARRAY_NAMES}
        return self._readers[name]

    def read_chunk(self, name: str, k: int) -> np.ndarray:
        """Return chunk ``k`` of array ``name`` as a NumPy array (trimmed to the store length)."""
        c = self.chunk_samples
        start, stop = k * c, min((k + 1) * c, len(self))
        if not 0 <= start < len(self):
            raise IndexError(f"Chunk {k} is out of range for {self.num_chunks} chunks.")
        if self.backend == "zarr":
            arr = self.chunk_reader(name).read_chunk(k)
            return arr[: stop - start]
        return np.asarray(self._array(name)[start:stop])

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

    def _read_checked(self, idx: np.ndarray, images: np.ndarray, masks: np.ndarray) -> None:
        if idx.size == 0:
            return
        if self.backend == "arrays":
            self._read_arrays(idx, images, masks)
            return
        if self.backend == "memmap":
            order = np.argsort(idx, kind="stable")
            sorted_idx = idx[order]
            images[order] = self._array("images")[sorted_idx]
            masks[order] = self._array("masks")[sorted_idx]
            return
        csize = self.chunk_samples
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        chunk_of = sorted_idx // csize
        starts = np.concatenate(([0], np.flatnonzero(np.diff(chunk_of)) + 1, [idx.size]))
        for a, b in zip(starts[:-1], starts[1:]):
            k = int(chunk_of[a])
            pos, local = order[a:b], sorted_idx[a:b] - k * csize
            run = b - a
            contiguous = (pos[-1] - pos[0] == run - 1 and local[-1] - local[0] == run - 1
                          and (run == 1 or (np.all(np.diff(pos) == 1) and np.all(np.diff(local) == 1))))
            for name, out in (("images", images), ("masks", masks)):
                chunk = self.chunk_reader(name).read_chunk(k, reuse=True)
                if contiguous:  # one memcpy, no temporary
                    out[pos[0] : pos[0] + run] = chunk[local[0] : local[0] + run].reshape((run,) + out.shape[1:])
                else:
                    out[pos] = chunk[local].reshape((run,) + out.shape[1:])

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


def _picklable(arr: Any, label: str) -> Any:
    if isinstance(arr, np.memmap) and getattr(arr, "filename", None):
        return ("memmap", str(arr.filename), int(arr.offset), arr.shape, str(arr.dtype),
                "F" if arr.flags.f_contiguous and not arr.flags.c_contiguous else "C")
    if type(arr).__module__.startswith("h5py"):
        raise OptionError(
            f"An h5py dataset ({label}) cannot be sent to worker processes. Convert it with "
            "`streamseg.convert` or use workers without multiprocessing. "
            f"Received: {truncate(arr)}"
        )
    return ("plain", arr)


def _unpickle_array(spec: tuple) -> Any:
    if spec[0] == "memmap":
        _, filename, offset, shape, dtype, order = spec
        return np.memmap(filename, mode="r", dtype=dtype, shape=shape, offset=offset, order=order)
    return spec[1]


def _load_manifest(path: Path) -> dict[str, Any]:
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
            total = json.loads((path / PLAN_NAME).read_text()).get("num_chunks", "?")
            raise IncompleteStoreError(
                f"Store {path} is incomplete ({done} of {total} chunks written; the conversion "
                "was interrupted). Re-run the same `streamseg convert` command with --resume "
                "to finish it, or with --overwrite to start again."
            )
        raise StoreNotFoundError(
            f"{path} is not a streamseg store (no {MANIFEST_NAME}). Create one with "
            f"`streamseg convert SRC {path}`."
        )
    try:
        meta = json.loads(manifest.read_text())
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


def open_store(path: str | os.PathLike) -> Store:
    """Open a finished store for reading.

    Parameters
    ----------
    path : str or os.PathLike
        Directory written by ``streamseg convert`` / :func:`streamseg.convert`.

    Returns
    -------
    Store

    Raises
    ------
    StoreNotFoundError
        Nothing there, or not a streamseg store.
    IncompleteStoreError
        The conversion did not finish; the message says how to resume.
    """
    return Store(path)
