"""On-disk layout of a ``--layout volumes`` store: one entry per case, 3D-chunked.

::

    DST/manifest.json              layout "volumes", per-case records (geometry, statistics)
    DST/zarr.json                  zarr v3 group (zarr backend)
    DST/cases/00000/image/         zarr v3 array (X, Y, Z, C), chunks (cx, cy, cz, C), Blosc
    DST/cases/00000/mask/          zarr v3 array (X, Y, Z), chunks (cx, cy, cz)
    DST/cases/00000/image.npy      (memmap backend instead of the two arrays above)
    DST/cases/00000/mask.npy
    DST/cases/00000/checksums.npy  crc32 of every chunk file (zarr) / every X slab (memmap)
    DST/cases/00000/foreground.npy int32 (N, 4): sampled foreground voxels x, y, z, label

Arrays are in RAS order (as :func:`streamseg.io.volumes.read_volume` returns them).  A box
of a case is read by decoding only the chunks it touches (:mod:`streamseg.store.volume_reader`),
so a patch of 96^3 voxels reads about (96/32 + 1)^3 chunks of 32^3, never the whole volume;
any zarr-python reads the arrays too (``zarr.open_array(DST/cases/00000/image)``).
May import: :mod:`streamseg.errors`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CASES_DIR", "CASE_ARRAYS", "CASE_FILES", "DEFAULT_CHUNK_SHAPE", "FOREGROUND_PER_CLASS",
           "case_dir", "chunk_grid", "chunk_file", "check_chunk_shape", "PATCH_READS"]

CASES_DIR = "cases"
CASE_ARRAYS = ("image", "mask")
CASE_FILES = frozenset({"zarr.json", "image.npy", "mask.npy", "checksums.npy", "foreground.npy"})
#: Default chunk edge in voxels: a 96^3 patch decodes ~2.4x its own voxels (64^3 chunks: ~8x).
DEFAULT_CHUNK_SHAPE = (32, 32, 32)
#: Foreground voxels kept per class and case for foreground-centred patches (as nnU-Net).
FOREGROUND_PER_CLASS = 10_000
#: What the manifest says about reading patches.
PATCH_READS = ("A box of a case decodes only the chunks it intersects: cases/NNNNN/image is chunked "
               "(cx, cy, cz, C) and cases/NNNNN/mask (cx, cy, cz) over RAS (X, Y, Z); foreground-centred "
               "patches draw their centre from cases/NNNNN/foreground.npy (x, y, z, label rows, at most "
               f"{FOREGROUND_PER_CLASS} per label), never by scanning a volume.")


def case_dir(root: Path, k: int) -> Path:
    """Folder of case ``k`` (its position in the store, not its name)."""
    return root / CASES_DIR / f"{int(k):05d}"


def chunk_grid(shape: Sequence[int], chunks: Sequence[int]) -> tuple[int, int, int]:
    """Chunks per spatial axis."""
    return tuple(-(-int(n) // int(c)) for n, c in zip(shape[:3], chunks[:3]))  # type: ignore[return-value]


def chunk_file(root: Path, k: int, array: str, index: Sequence[int]) -> str:
    """Path of one chunk file of a zarr-backend case array (zarr v3 default key encoding)."""
    parts = [str(int(i)) for i in index[:3]] + (["0"] if array == "image" else [])
    return os.path.join(str(case_dir(root, k)), array, "c", *parts)


def check_chunk_shape(value: Any) -> tuple[int, int, int]:
    """Three positive integers (at most 1024), or the default for None.

    Raises
    ------
    OptionError
        Anything else.
    """
    from ..errors import OptionError, truncate

    if value is None:
        return DEFAULT_CHUNK_SHAPE
    try:
        vals = tuple(int(v) for v in value)
        ok = len(vals) == 3 and all(1 <= v <= 1024 and float(v) == float(o) for v, o in zip(vals, value))
    except (TypeError, ValueError):
        ok = False
    if not ok or isinstance(value, (str, bytes)):
        raise OptionError("chunk_shape must be three integers in [1, 1024] (voxels per chunk along X, Y, Z). "
                          f"Received: {truncate(value)}")
    return vals  # type: ignore[return-value]


def slab_ranges(n: int, step: int) -> list[tuple[int, int]]:
    """``[(0, step), (step, 2 step), ...]`` covering ``range(n)``."""
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def foreground_sample(labels: np.ndarray, seed: int, k: int, per_class: int = FOREGROUND_PER_CLASS,
                      block: int = 1 << 22) -> np.ndarray:
    """A bounded uniform sample of the foreground voxels of each label, without scanning twice.

    For each label ``l > 0`` with ``n_l`` voxels, ``min(n_l, per_class)`` distinct voxels are
    drawn by rank (``numpy.random.default_rng([seed, k, l])``) and found in blocks of the
    flattened volume, so memory stays bounded however large the foreground.

    Returns
    -------
    numpy.ndarray
        ``int32 (N, 4)``: rows ``x, y, z, label``, sorted by label then position.
    """
    flat = labels.reshape(-1)
    values, counts = np.unique(flat, return_counts=True)
    rows = []
    for value, count in zip(values.tolist(), counts.tolist()):
        if value <= 0:
            continue
        take = min(int(count), per_class)
        rng = np.random.default_rng([int(seed), int(k), int(value)])
        ranks = np.sort(rng.choice(int(count), size=take, replace=False)) if take < count else np.arange(count)
        found = []
        seen = 0
        for start in range(0, flat.size, block):
            pos = np.flatnonzero(flat[start:start + block] == value)
            if pos.size == 0:
                continue
            lo, hi = np.searchsorted(ranks, [seen, seen + pos.size])
            if hi > lo:
                found.append(pos[ranks[lo:hi] - seen] + start)
            seen += pos.size
        where = np.concatenate(found) if found else np.zeros(0, np.int64)
        xyz = np.stack(np.unravel_index(where, labels.shape), axis=1)
        rows.append(np.concatenate([xyz, np.full((xyz.shape[0], 1), value)], axis=1))
    if not rows:
        return np.zeros((0, 4), np.int32)
    return np.concatenate(rows).astype(np.int32)
