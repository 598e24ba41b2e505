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
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorruptChunkError, CorruptStoreError, OptionError, truncate
from .layout import load_manifest
from .volume_layout import case_dir

__all__ = ["VolumeStore"]


class VolumeStore:
    """A finished volume store: one entry per case, 3D-chunked (see :mod:`~streamseg.store.volume_layout`).

    Parameters
    ----------
    path : path
        The store directory.
    verify_reads : bool
        Check chunk files against their recorded crc32 (zarr backend) the first time this
        process reads them and again whenever a file changes (inode, size or modification
        time), as the 2D store does; every X slab once per process (memmap backend).

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
        self._reset()

    def _reset(self) -> None:
        """Derive the attributes from the manifest and start with empty per-process caches."""
        self.backend = self.meta["backend"]
        self.chunk_shape = tuple(int(v) for v in self.meta["chunk_shape"])
        self.image_dtype = np.dtype(self.meta["image_dtype"])
        self.mask_dtype = np.dtype(self.meta["mask_dtype"])
        self.channels = int(self.meta["channels"])
        self.cases = self.meta["cases"]
        self._tables: dict[int, np.ndarray] = {}
        self._mm: dict[tuple[int, str], np.ndarray] = {}
        self._checked_slabs: set[tuple[int, int]] = set()
        self._checked_meta: set[int] = set()
        self._decoder: Any = None
        self._chunk_voxels = int(np.prod(self.chunk_shape))
        self._local = threading.local()  # per-thread decode buffers
        self._verified: dict[int, np.ndarray] = {}  # case -> identity of each chunk file checked
        self.read_stats = {"boxes": 0, "chunks": 0, "bytes_read": 0, "voxels_decoded": 0}

    # ------------------------------------------------------------------ pickling (workers)
    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path), "verify_reads": self.verify_reads, "meta": self.meta}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = Path(state["path"])
        self.verify_reads = state["verify_reads"]
        self.meta = state["meta"]
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
        table = self._table(k) if self.verify_reads else None
        base = os.path.join(str(case_dir(self.path, k)), "")
        axes = []  # per axis: (chunk index, source slice, destination slice) of every chunk touched
        for a, b, c in zip(lo, hi, cs):
            axes.append([(i, slice(max(a, i * c) - i * c, min(b, (i + 1) * c) - i * c),
                          slice(max(a, i * c) - a, min(b, (i + 1) * c) - a)) for i in range(a // c, (b - 1) // c + 1)])
        for ai, (name, out) in enumerate((("image", image), ("mask", mask))):
            buf = self._scratch(name)
            crcs = None if table is None else table[ai]
            suffix = "/0" if name == "image" else ""
            for ix, sx, dx in axes[0]:
                for iy, sy, dy in axes[1]:
                    for iz, sz, dz in axes[2]:
                        path = f"{base}{name}/c/{ix}/{iy}/{iz}{suffix}"
                        self._decode_into(k, name, (ix, iy, iz), path, buf,
                                          None if crcs is None else int(crcs[ix, iy, iz]))
                        out[dx, dy, dz] = buf[sx, sy, sz]

    def _scratch(self, name: str) -> np.ndarray:
        """A per-thread buffer of one decoded chunk of ``name`` (reused: no allocation per chunk)."""
        local = self._local
        buf = getattr(local, name, None)
        if buf is None:
            dtype = (self.image_dtype if name == "image" else self.mask_dtype).newbyteorder("<")
            shape = (*self.chunk_shape, self.channels) if name == "image" else self.chunk_shape
            buf = np.empty(shape, dtype)
            setattr(local, name, buf)
        return buf

    def _decode_into(self, k: int, name: str, cidx: tuple[int, int, int], path: str, out: np.ndarray,
                     crc: int | None) -> None:
        """Read chunk file ``path``, check its crc32 and decode it into ``out``."""
        limit = out.nbytes + 4096  # Blosc's header and a little slack: anything larger is damaged
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise CorruptChunkError(f"{self._where(k, name, cidx)} is missing ({path}); the store is damaged: "
                                    "re-convert it.") from None
        try:
            raw = os.read(fd, limit + 1)
            if crc is not None:  # checked once per process and file version, like the 2D store
                st = os.fstat(fd)
                seen = self._verified.get(k)
                if seen is None:
                    seen = self._verified[k] = np.zeros((2, *self._table(k).shape[1:]), np.uint64)
                ident = hash((st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)) & 0x7FFF_FFFF_FFFF_FFFF | 1
                at = (0 if name == "image" else 1, *cidx)
                if int(seen[at]) == ident:
                    crc = None
        finally:
            os.close(fd)
        if (crc is not None and zlib.crc32(raw) != crc) or len(raw) > limit:
            raise CorruptChunkError(f"{self._where(k, name, cidx)} does not match its checksum ({path}); the "
                                    "store is damaged: re-convert it.")
        try:
            if self.meta.get("compressor", "none") != "none":
                if self._decoder is None:
                    from numcodecs import blosc

                    self._decoder = blosc
                self._decoder.decompress(raw, out)
            else:
                out.reshape(-1).view(np.uint8)[:] = np.frombuffer(raw, np.uint8)
        except Exception as exc:  # blosc raises RuntimeError on garbage, numpy ValueError on size
            raise CorruptChunkError(f"{self._where(k, name, cidx)} cannot be decoded ({exc}); re-convert the "
                                    "store.") from None
        if crc is not None:
            seen[at] = ident
        stats = self.read_stats
        stats["chunks"] += 1
        stats["bytes_read"] += len(raw)
        stats["voxels_decoded"] += self._chunk_voxels

    def _where(self, k: int, name: str, cidx: tuple[int, int, int]) -> str:
        return f"Chunk {cidx} of case {k} ({self.cases[k]['name']!r}, {name}) in {self.path}"

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
