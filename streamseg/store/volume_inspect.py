"""``streamseg info`` and ``streamseg verify`` for ``--layout volumes`` stores.

May import: :mod:`streamseg.errors`, :mod:`streamseg.progress`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StreamsegError
from ..progress import Progress
from .inspect import _disk_bytes
from .volume_layout import CASES_DIR

__all__ = ["volume_store_info", "format_volume_info", "verify_volume_store"]


def volume_store_info(root: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """JSON-serialisable summary of a volume store (cases, chunks, labels, size, patch reads)."""
    cases = meta["cases"]
    itemsize = np.dtype(meta["image_dtype"]).itemsize * meta["channels"] + np.dtype(meta["mask_dtype"]).itemsize
    raw = sum(int(np.prod(c["shape"][:3])) for c in cases) * itemsize
    disk = _disk_bytes(root / CASES_DIR)
    voxels = sum(meta["labels"].values()) or 1
    return {
        "path": str(root), "layout": "volumes", "format": meta["backend"], "format_version": meta["format_version"],
        "count": meta["count"], "cases": meta["count"], "channels": meta["channels"],
        "image_dtype": meta["image_dtype"], "mask_dtype": meta["mask_dtype"], "chunk_shape": meta["chunk_shape"],
        "compressor": meta["compressor"], "label_values": meta["label_values"],
        "labels": {k: {"voxels": v, "fraction": v / voxels} for k, v in meta["labels"].items()},
        "raw_bytes": raw, "disk_bytes": disk, "compression_ratio": raw / disk if disk else None,
        "first_cases": [c["name"] for c in cases[:3]], "patch_reads": meta.get("patch_reads"),
        "read_checks": ("each chunk file once per process and file version, crc32" if meta["backend"] == "zarr"
                        else "every X slab once per process, crc32"),
        "warnings": [],
    }


def format_volume_info(info: dict[str, Any]) -> str:
    """Human-readable text of :func:`volume_store_info` (the volume lines follow it)."""
    from .inspect import _human

    ratio = f"{info['compression_ratio']:.2f}x" if info["compression_ratio"] else "n/a"
    return "\n".join([
        f"store        {info['path']}",
        f"format       {info['format']}, layout volumes (streamseg format {info['format_version']}, "
        f"compressor {info['compressor']})",
        f"cases        {info['cases']} (one 3D entry each), {info['channels']} channel(s) {info['image_dtype']}, "
        f"masks {info['mask_dtype']}",
        f"chunks       {' x '.join(str(v) for v in info['chunk_shape'])} voxels",
        f"size         {_human(info['disk_bytes'])} on disk, {_human(info['raw_bytes'])} raw (compression {ratio})",
        f"read checks  {info['read_checks']}",
        f"patch reads  {info['patch_reads']}",
    ])


def verify_volume_store(root: Path, meta: dict[str, Any], *, progress: Any = "auto") -> list[dict[str, Any]]:
    """Read every case of a volume store, checking every chunk / slab and the foreground sample.

    Returns one entry per damaged case (``file``, ``array`` None, ``chunk`` None, ``problem``
    naming the case and what is wrong), empty when the store is intact.
    """
    from .volume_reader import VolumeStore

    store = VolumeStore(root, verify_reads=True)
    found: list[dict[str, Any]] = []
    with Progress(len(store), "verify", mode=progress, unit="cases") as bar:
        for k in range(len(store)):
            rel = f"{CASES_DIR}/{k:05d}"
            try:
                store.read_case(k)
                store.foreground(k)
            except (StreamsegError, OSError, ValueError) as exc:
                found.append({"file": rel, "array": None, "chunk": None, "samples": None, "names": [],
                              "problem": f"case {k} ({store.names[k]!r}): {exc}"})
            store._reset()  # free the per-case tables
            bar.update(1)
    return found
