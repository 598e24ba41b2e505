"""Read a ``--layout volumes`` store: :class:`VolumeStore`, any box of any case.

:func:`~streamseg.store.reader.open_store` returns a :class:`VolumeStore` for such a store;
``len(store)`` is the number of cases.  A box is read by decoding only the chunk files it
intersects (Blosc via numcodecs, straight from disk: no zarr event loop, safe after
``fork``), each checked against the crc32 recorded at conversion before it is decoded
(``verify_reads``); the memmap backend checks each X slab a box touches once per process.
May import: :mod:`streamseg.errors`.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorruptChunkError, CorruptStoreError, OptionError, truncate
from .layout import load_manifest
from .volume_layout import case_dir, chunk_file, chunk_grid

__all__ = ["VolumeStore"]


class VolumeStore:
    """A finished volume store: one entry per case, 3D-chunked (see :mod:`~streamseg.store.volume_layout`).

    Parameters
    ----------
    path : path
        The store directory.
    verify_reads : bool
        Check every chunk file read against its recorded crc32 (zarr backend; about 1%
        of a decode) or every X slab once per process (memmap backend).

    Attributes
    ----------
    meta : dict
        The manifest (``meta["cases"][i]``: name, source paths, shape, spacing, affine,
        orientation on disk, intensity statistics, label voxel counts, foreground samples).
    read_stats : dict
        This process's counts since opening: ``boxes``, ``chunks`` decoded, ``bytes_read``
        from chunk files and ``voxels_decoded`` (compare with the box voxels to see the read
        amplification).
    """

    layout = "volumes"

    def __init__(self, path: str | os.PathLike, *, verify_reads: bool = True) -> None:
        self.path = Path(path)
        self.verify_reads = bool(verify_reads)
        self.meta = load_manifest(self.path)
        if self.meta.get("layout") != "volumes":
            raise OptionError(f"{self.path} is a 2D store (one sample per slice or image); open it with "
                              f"open_store / Store. Received: layout={self.meta.get('layout', 'samples')!r}")
        self.backend = self.meta["backend"]
        self.chunk_shape = tuple(int(v) for v in self.meta["chunk_shape"])
        self.image_dtype = np.dtype(self.meta["image_dtype"])
        self.mask_dtype = np.dtype(self.meta["mask_dtype"])
        self.channels = int(self.meta["channels"])
        self.cases = self.meta["cases"]
        self._reset()

    def _reset(self) -> None:
        self._tables: dict[int, np.ndarray] = {}
        self._mm: dict[tuple[int, str], np.ndarray] = {}
        self._checked_slabs: set[tuple[int, int]] = set()
        self._checked_meta: set[int] = set()
        self._decoder: Any = None
        self.read_stats = {"boxes": 0, "chunks": 0, "bytes_read": 0, "voxels_decoded": 0}

    # ------------------------------------------------------------------ pickling (workers)
    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path), "verify_reads": self.verify_reads, "meta": self.meta}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = Path(state["path"])
        self.verify_reads = state["verify_reads"]
        self.meta = state["meta"]
        self.backend = self.meta["backend"]
        self.chunk_shape = tuple(int(v) for v in self.meta["chunk_shape"])
        self.image_dtype = np.dtype(self.meta["image_dtype"])
        self.mask_dtype = np.dtype(self.meta["mask_dtype"])
        self.channels = int(self.meta["channels"])
        self.cases = self.meta["cases"]
        self._reset()

    # ------------------------------------------------------------------ description
    def __len__(self) -> int:
        return len(self.cases)

    def __repr__(self) -> str:
        return (f"VolumeStore({str(self.path)!r}, cases={len(self)}, channels={self.channels}, "
                f"dtype={self.image_dtype}, chunks={self.chunk_shape}, backend={self.backend!r})")

    @property
    def names(self) -> list[str]:
        """Case names, in store order."""
        return [c["name"] for c in self.cases]

    @property
    def label_values(self) -> list[int]:
        """Label values stored in the masks (after ``--remap-labels``)."""
        return [int(v) for v in self.meta["label_values"]]

    def case(self, i: int) -> dict[str, Any]:
        """The manifest record of case ``i``."""
        return self.cases[self._index(i)]

    def shape(self, i: int) -> tuple[int, int, int]:
        """Spatial shape ``(X, Y, Z)`` of case ``i``."""
        return tuple(int(v) for v in self.case(i)["shape"][:3])  # type: ignore[return-value]

    def spacing(self, i: int) -> tuple[float, float, float]:
        """Millimetres per axis of case ``i`` (after any ``--spacing`` resampling)."""
        return tuple(float(v) for v in self.case(i)["spacing"])  # type: ignore[return-value]

    def affine(self, i: int) -> np.ndarray:
        """The ``(4, 4)`` RAS voxel-to-world affine of case ``i`` as stored."""
        return np.asarray(self.case(i)["affine"], np.float64)

    def _index(self, i: Any) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -len(self) <= i < len(self):
            raise IndexError(f"case {truncate(i)} out of range for a store of {len(self)} cases")
        return int(i) % len(self)

    # ------------------------------------------------------------------ foreground
    def foreground(self, i: int) -> dict[int, np.ndarray]:
        """Sampled foreground voxels of case ``i``: ``{label: int32 (N, 3) x, y, z}``.

        At most :data:`~streamseg.store.volume_layout.FOREGROUND_PER_CLASS` per label, drawn
        at conversion; labels absent from the case are absent here.
        """
        k = self._index(i)
        path = case_dir(self.path, k) / "foreground.npy"
        raw = path.read_bytes()
        if self.verify_reads and zlib.crc32(raw) != self.cases[k].get("foreground_crc32", zlib.crc32(raw)):
            raise CorruptChunkError(f"The foreground sample of case {k} ({self.cases[k]['name']!r}) in {self.path} "
                                    f"does not match its checksum ({path}); re-convert the store.")
        rows = np.load(path)
        return {int(v): np.ascontiguousarray(rows[rows[:, 3] == v, :3]) for v in np.unique(rows[:, 3])}

    # ------------------------------------------------------------------ reading
    def read_case(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole case: image ``(X, Y, Z, C)`` (stored dtype) and mask ``(X, Y, Z)``."""
        return self.read_box(i, (0, 0, 0), self.shape(i))

    def read_box(self, i: int, lo: Sequence[int], hi: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Voxels ``lo <= (x, y, z) < hi`` of case ``i``: image ``(dx, dy, dz, C)``, mask ``(dx, dy, dz)``.

        Raises
        ------
        IndexError
            The box is empty or leaves the volume (:meth:`read_patch` pads instead).
        CorruptChunkError
            A chunk file is missing, does not match its checksum or cannot be decoded.
        """
        k = self._index(i)
        shape = self.shape(k)
        lo3, hi3 = [int(v) for v in lo], [int(v) for v in hi]
        if len(lo3) != 3 or len(hi3) != 3 or any(a < 0 or b > n or a >= b for a, b, n in zip(lo3, hi3, shape)):
            raise IndexError(f"box {lo3}..{hi3} is not inside case {k} of shape {shape}; read_patch pads boxes "
                             "that leave the volume.")
        size = [b - a for a, b in zip(lo3, hi3)]
        image = np.empty((*size, self.channels), self.image_dtype)
        mask = np.empty(size, self.mask_dtype)
        self._fill(k, lo3, hi3, image, mask)
        self.read_stats["boxes"] += 1
        return image, mask

    def read_patch(self, i: int, corner: Sequence[int], size: Sequence[int], *,
                   image_fill: float = 0) -> tuple[np.ndarray, np.ndarray]:
        """A box of ``size`` at ``corner`` (which may leave the volume): outside voxels are
        ``image_fill`` in the image and 0 in the mask."""
        k = self._index(i)
        shape = self.shape(k)
        c0 = [int(v) for v in corner]
        sz = [int(v) for v in size]
        image = np.full((*sz, self.channels), image_fill, self.image_dtype)
        mask = np.zeros(sz, self.mask_dtype)
        lo = [max(0, a) for a in c0]
        hi = [min(n, a + s) for a, s, n in zip(c0, sz, shape)]
        if all(b > a for a, b in zip(lo, hi)):
            sl = tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, c0))
            self._fill(k, lo, hi, image[sl], mask[sl])
        self.read_stats["boxes"] += 1
        return image, mask

    def _fill(self, k: int, lo: list[int], hi: list[int], image: np.ndarray, mask: np.ndarray) -> None:
        self._check_case_metadata(k)
        if self.backend == "memmap":
            self._fill_memmap(k, lo, hi, image, mask)
            return
        cs = self.chunk_shape
        grid = chunk_grid(self.shape(k), cs)
        ranges = [range(a // c, (b - 1) // c + 1) for a, b, c in zip(lo, hi, cs)]
        table = self._table(k) if self.verify_reads else None
        for ai, (name, out) in enumerate((("image", image), ("mask", mask))):
            dtype = self.image_dtype if name == "image" else self.mask_dtype
            full = (*cs, self.channels) if name == "image" else cs
            for index in np.ndindex(*(len(r) for r in ranges)):
                cidx = tuple(r[j] for r, j in zip(ranges, index))
                block = self._decode(k, name, cidx, full, dtype, None if table is None else int(table[(ai, *cidx)]),
                                     grid)
                src, dst = [], []
                for a, b, c, ci in zip(lo, hi, cs, cidx):
                    s0, s1 = max(a, ci * c), min(b, (ci + 1) * c)
                    src.append(slice(s0 - ci * c, s1 - ci * c))
                    dst.append(slice(s0 - a, s1 - a))
                out[tuple(dst)] = block[tuple(src)]

    def _decode(self, k: int, name: str, cidx: tuple[int, ...], full: tuple[int, ...], dtype: np.dtype,
                crc: int | None, grid: tuple[int, ...]) -> np.ndarray:
        path = chunk_file(self.path, k, name, cidx)
        where = f"Chunk {cidx} of case {k} ({self.cases[k]['name']!r}, {name}) in {self.path}"
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            raise CorruptChunkError(f"{where} is missing ({path}); the store is damaged: re-convert it.") from None
        if crc is not None and zlib.crc32(raw) != crc:
            raise CorruptChunkError(f"{where} does not match its checksum ({path}); the store is damaged: "
                                    "re-convert it.")
        out = np.empty(full, dtype.newbyteorder("<"))
        try:
            if self.meta.get("compressor", "none") != "none":
                if self._decoder is None:
                    from numcodecs import blosc

                    self._decoder = blosc
                self._decoder.decompress(raw, out)
            else:
                out.reshape(-1).view(np.uint8)[:] = np.frombuffer(raw, np.uint8)
        except Exception as exc:  # blosc raises RuntimeError on garbage, numpy ValueError on size
            raise CorruptChunkError(f"{where} cannot be decoded ({exc}); re-convert the store.") from None
        stats = self.read_stats
        stats["chunks"] += 1
        stats["bytes_read"] += len(raw)
        stats["voxels_decoded"] += int(np.prod(full[:3]))
        return out

    def _table(self, k: int) -> np.ndarray:
        table = self._tables.get(k)
        if table is None:
            path = case_dir(self.path, k) / "checksums.npy"
            raw = path.read_bytes()
            if zlib.crc32(raw) != self.cases[k]["checksums_crc32"]:
                raise CorruptChunkError(f"The checksum table of case {k} ({self.cases[k]['name']!r}) in {self.path} "
                                        f"was altered ({path}); re-convert the store.")
            table = self._tables[k] = np.load(path)
        return table

    def _check_case_metadata(self, k: int) -> None:
        """The case's array metadata match the manifest (once per process and case)."""
        if k in self._checked_meta:
            return
        d = case_dir(self.path, k)
        for name, rec in self.cases[k].get("metadata", {}).items():
            path = d / name / "zarr.json" if self.backend == "zarr" else d / f"{name}.npy"
            try:
                size = path.stat().st_size
                with open(path, "rb") as fh:
                    head = fh.read(rec.get("header_size", size))
            except FileNotFoundError:
                raise CorruptStoreError(f"{path} is missing (case {k}, {self.cases[k]['name']!r}); the store is "
                                        "damaged: re-convert it.") from None
            if size != rec["size"] or zlib.crc32(head) != rec["crc32"]:
                raise CorruptStoreError(f"{path} does not match the manifest (case {k}, {self.cases[k]['name']!r}): "
                                        "it was changed after the conversion; re-convert the store.")
        self._checked_meta.add(k)

    def _memmap(self, k: int, name: str) -> np.ndarray:
        arr = self._mm.get((k, name))
        if arr is None:
            arr = self._mm[(k, name)] = np.load(case_dir(self.path, k) / f"{name}.npy", mmap_mode="r")
        return arr

    def _fill_memmap(self, k: int, lo: list[int], hi: list[int], image: np.ndarray, mask: np.ndarray) -> None:
        img, msk = self._memmap(k, "image"), self._memmap(k, "mask")
        if self.verify_reads:
            cx = self.chunk_shape[0]
            nslab = -(-self.shape(k)[0] // cx)
            for s in range(lo[0] // cx, (hi[0] - 1) // cx + 1):
                if (k, s) in self._checked_slabs:
                    continue
                table = self._table(k)
                for j, arr in enumerate((img, msk)):
                    if zlib.crc32(np.ascontiguousarray(arr[s * cx:(s + 1) * cx])) != int(table[j * nslab + s]):
                        raise CorruptChunkError(f"Slab {s} (x {s * cx}..{(s + 1) * cx - 1}) of case {k} "
                                                f"({self.cases[k]['name']!r}, {('image', 'mask')[j]}) in {self.path} "
                                                "does not match its checksum; re-convert the store.")
                self._checked_slabs.add((k, s))
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        image[...] = img[box]
        mask[...] = msk[box]
        self.read_stats["voxels_decoded"] += int(np.prod([b - a for a, b in zip(lo, hi)]))
