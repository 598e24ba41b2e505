"""``streamseg info`` and ``streamseg verify``: describe a store and check its chunks."""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorruptChunkError
from ..progress import Progress
from .reader import ARRAY_NAMES, Store, open_store

__all__ = ["store_info", "format_info", "verify_store"]


def _disk_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


def store_info(path: str | os.PathLike) -> dict[str, Any]:
    """Summary of a store: counts, shapes, dtypes, labels, size on disk and compression.

    Parameters
    ----------
    path : path
        Store directory.

    Returns
    -------
    dict
        JSON-serialisable summary.
    """
    store = open_store(path)
    meta = store.meta
    h, w, c = meta["image_shape"]
    n = meta["count"]
    raw = n * h * w * (c * np.dtype(meta["image_dtype"]).itemsize + np.dtype(meta["mask_dtype"]).itemsize)
    disk = _disk_bytes(Path(path))
    pixels = sum(meta["labels"].values()) or 1
    return {
        "path": str(path),
        "format": meta["backend"],
        "format_version": meta["format_version"],
        "count": n,
        "image_shape": [n, h, w, c],
        "image_dtype": meta["image_dtype"],
        "mask_shape": [n, h, w, 1],
        "mask_dtype": meta["mask_dtype"],
        "chunk_samples": meta["chunk_samples"],
        "num_chunks": meta["num_chunks"],
        "compressor": meta["compressor"],
        "labels": {k: {"pixels": v, "fraction": v / pixels} for k, v in meta["labels"].items()},
        "image_mean": meta["image_mean"],
        "image_std": meta["image_std"],
        "raw_bytes": raw,
        "disk_bytes": disk,
        "compression_ratio": raw / disk if disk else None,
        "first_sources": meta["sources"]["first"],
    }


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return str(nbytes)  # pragma: no cover


def format_info(info: dict[str, Any]) -> str:
    """Human-readable text for :func:`store_info`'s summary."""
    labels = ", ".join(f"{k} ({v['fraction']:.1%})" for k, v in info["labels"].items())
    ratio = f"{info['compression_ratio']:.2f}x" if info["compression_ratio"] else "n/a"
    mean = ", ".join(f"{m:.1f}" for m in info["image_mean"])
    std = ", ".join(f"{s:.1f}" for s in info["image_std"])
    return "\n".join([
        f"store        {info['path']}",
        f"format       {info['format']} (streamseg format {info['format_version']}, compressor {info['compressor']})",
        f"samples      {info['count']}",
        f"images       {tuple(info['image_shape'])} {info['image_dtype']}  mean [{mean}]  std [{std}]",
        f"masks        {tuple(info['mask_shape'])} {info['mask_dtype']}",
        f"labels       {labels}",
        f"chunks       {info['num_chunks']} of {info['chunk_samples']} samples",
        f"size         {_human(info['disk_bytes'])} on disk, {_human(info['raw_bytes'])} raw "
        f"(compression {ratio})",
    ])


def _chunk_bytes(store: Store, name: str, k: int) -> bytes:
    if store.backend == "zarr":
        return store.chunk_reader(name).read_raw(k)
    arr = store.images if name == "images" else store.masks
    cs = store.chunk_samples
    return np.ascontiguousarray(arr[k * cs : (k + 1) * cs]).tobytes()


def verify_store(path: str | os.PathLike, *, progress: Any = "auto") -> list[dict[str, Any]]:
    """Re-read every chunk, check its checksum and that it decodes.

    Parameters
    ----------
    path : path
        Store directory.
    progress : see :class:`streamseg.progress.Progress`

    Returns
    -------
    list of dict
        One entry per damaged chunk: ``array``, ``chunk``, ``samples`` (first, last), ``names``
        (first few source names) and ``problem``.  Empty when the store is intact.
    """
    store = open_store(path)
    expected = store.meta["checksums"]["chunks"]
    cs = store.chunk_samples
    damaged: list[dict[str, Any]] = []
    with Progress(store.num_chunks, "verify", mode=progress, unit="chunks") as bar:
        for k in range(store.num_chunks):
            for name in ARRAY_NAMES:
                problem = None
                try:
                    raw = _chunk_bytes(store, name, k)
                    if zlib.crc32(raw) != expected[k][name]:
                        problem = "checksum mismatch"
                    elif store.backend == "zarr":
                        store.chunk_reader(name).decode(raw, k)
                except CorruptChunkError as exc:
                    problem = str(exc)
                if problem:
                    first, last = k * cs, min((k + 1) * cs, len(store)) - 1
                    damaged.append({"array": name, "chunk": k, "samples": [first, last],
                                    "names": store.names[first : min(last + 1, first + 3)],
                                    "problem": problem})
            bar.update(1)
    return damaged
