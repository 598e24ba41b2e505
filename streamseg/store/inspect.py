"""``streamseg info`` and ``streamseg verify``: describe a store and check its files and chunks.

Neither refuses a damaged store as :func:`~streamseg.open_store` does: ``info`` describes it and
warns about each metadata file that is missing or differs from the manifest; ``verify`` reads
every file it can and reports each problem (file or chunk) as one entry, never a traceback.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorruptChunkError
from ..progress import Progress
from .integrity import check_metadata, npy_data_offset, source_names
from .layout import ARRAY_NAMES, SOURCES_NAME, ZarrChunkReader, load_manifest, zarr_chunk_path

__all__ = ["store_info", "format_info", "verify_store", "describe_problem"]


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
        JSON-serialisable summary; ``warnings`` lists each metadata file that is missing or
        differs from the manifest (sizes, headers and small files compared; ``streamseg
        verify`` checks everything), ``read_checks`` says how reads are checked.
    """
    root = Path(path)
    meta = load_manifest(root)
    if meta.get("layout") == "volumes":
        from .volume_inspect import volume_store_info

        return volume_store_info(root, meta)
    warnings = [problem for _, problem in check_metadata(root, meta)]
    if "files" not in meta:
        warnings.append("the manifest records no metadata files (a store written by an older streamseg): "
                        "only `streamseg verify` can tell whether they changed")
    if "read_checksums" in meta:
        unit = "sample" if meta["read_checksums"]["unit"] == "sample" else "chunk file"
        checks = f"each {unit} once per process and file version ({meta['read_checksums']['algorithm']})"
    else:
        checks = "each chunk once per process (crc32; an older store without read checksums)"
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
        "read_checks": checks,
        "warnings": warnings,
    }


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return str(nbytes)  # pragma: no cover


def format_info(info: dict[str, Any]) -> str:
    """Human-readable text for :func:`store_info`'s summary."""
    if info.get("layout") == "volumes":
        from .volume_inspect import format_volume_info

        return format_volume_info(info)
    labels = ", ".join(f"{k} ({v['fraction']:.1%})" for k, v in info["labels"].items())
    ratio = f"{info['compression_ratio']:.2f}x" if info["compression_ratio"] else "n/a"
    mean = ", ".join(f"{m:.1f}" for m in info["image_mean"])
    std = ", ".join(f"{s:.1f}" for s in info["image_std"])
    lines = [
        f"store        {info['path']}",
        f"format       {info['format']} (streamseg format {info['format_version']}, compressor {info['compressor']})",
        f"samples      {info['count']}",
        f"images       {tuple(info['image_shape'])} {info['image_dtype']}  mean [{mean}]  std [{std}]",
        f"masks        {tuple(info['mask_shape'])} {info['mask_dtype']}",
        f"labels       {labels}",
        f"chunks       {info['num_chunks']} of {info['chunk_samples']} samples",
        f"size         {_human(info['disk_bytes'])} on disk, {_human(info['raw_bytes'])} raw "
        f"(compression {ratio})",
    ]
    if info.get("read_checks"):
        lines.append(f"read checks  {info['read_checks']}")
    lines += [f"warning      {w}" for w in info.get("warnings", [])]
    if info.get("warnings"):
        lines.append(f"             run `streamseg verify {info['path']}` for the full check")
    return "\n".join(lines)


def _array_of(rel: str) -> str | None:
    head = rel.split("/")[0].removesuffix(".npy")
    return head if head in ARRAY_NAMES else None


def _source_names(root: Path, meta: dict[str, Any]) -> list[str]:
    """The samples' source names, or [] when ``sources.txt`` is missing or does not fit."""
    try:
        names = source_names((root / SOURCES_NAME).read_bytes())
    except OSError:
        return []
    return names if len(names) == meta["count"] else []


def describe_problem(entry: dict[str, Any]) -> str:
    """One line for an entry of :func:`verify_store`, e.g. ``"images chunk 2 (samples 8-11,
    s0008, s0009...): checksum mismatch"`` or ``"masks/zarr.json is missing"``."""
    if entry.get("chunk") is None:
        return str(entry["problem"])
    first, last = entry["samples"]
    names = f", {', '.join(entry['names'])}..." if entry["names"] else ""
    return f"{entry['array']} chunk {entry['chunk']} (samples {first}-{last}{names}): {entry['problem']}"


class _ChunkBytes:
    """Reads the raw bytes of one array's chunks for ``verify``, from the files themselves (no
    zarr or ``.npy`` parsing needed, so a garbled ``zarr.json`` or header still lets the chunks be
    checked).  ``problem(k)`` says what is wrong with chunk ``k``, or None."""

    def __init__(self, root: Path, meta: dict[str, Any], name: str) -> None:
        self.root, self.meta, self.name = root, meta, name
        self.expected = [c[name] for c in meta["checksums"]["chunks"]]
        self.usable = True
        self._fh: Any = None
        self._reader: ZarrChunkReader | None = None
        if meta["backend"] == "zarr":
            self.usable = (root / name).is_dir()
            try:
                self._reader = ZarrChunkReader(root, name)
            except (OSError, ValueError, KeyError, TypeError, IndexError):
                self._reader = None  # reported as a file problem; chunks are still crc-checked
            return
        path = root / f"{name}.npy"
        try:
            self._offset = npy_data_offset(path)[0]
        except ValueError:  # a garbled header: the data still starts where the manifest says
            self._offset = (meta.get("files") or {}).get(f"{name}.npy", {}).get("header_size")
        except OSError:
            self._offset = None
        h, w, c = meta["image_shape"]
        dtype = np.dtype(meta["image_dtype" if name == "images" else "mask_dtype"])
        self._sample_bytes = h * w * (c if name == "images" else 1) * dtype.itemsize
        self.usable = self._offset is not None
        if self.usable:
            self._fh = open(path, "rb")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()

    def problem(self, k: int) -> str | None:
        cs, n = self.meta["chunk_samples"], self.meta["count"]
        if self._fh is not None:
            want = (min((k + 1) * cs, n) - k * cs) * self._sample_bytes
            self._fh.seek(self._offset + k * cs * self._sample_bytes)
            raw = self._fh.read(want)
            if len(raw) < want:
                return f"truncated: {self.name}.npy ends inside this chunk"
            return "checksum mismatch" if zlib.crc32(raw) != self.expected[k] else None
        path = zarr_chunk_path(self.root, self.name, k)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return f"missing ({path})"
        except OSError as exc:
            return f"unreadable ({exc.strerror or exc})"
        if zlib.crc32(raw) != self.expected[k]:
            return "checksum mismatch"
        if self._reader is not None:
            try:
                self._reader.decode(raw, k)
            except CorruptChunkError as exc:
                return str(exc)
        return None


def verify_store(path: str | os.PathLike, *, progress: Any = "auto") -> list[dict[str, Any]]:
    """Check every metadata file against the manifest, and every chunk's checksum and decoding.

    Parameters
    ----------
    path : path
        Store directory.
    progress : see :class:`streamseg.progress.Progress`

    Returns
    -------
    list of dict
        One entry per problem, empty when the store is intact.  A damaged chunk: ``array``,
        ``chunk``, ``samples`` (first, last), ``names`` (first few source names), ``file`` and
        ``problem``.  A missing or altered metadata file: ``file``, ``array`` (None unless the
        file belongs to one), ``problem``, and ``chunk``/``samples`` None.
        :func:`describe_problem` turns an entry into one line.

    Raises
    ------
    StoreNotFoundError, IncompleteStoreError
        No finished store (or a damaged manifest) at ``path``.
    """
    root = Path(path)
    meta = load_manifest(root)
    if meta.get("layout") == "volumes":
        from .volume_inspect import verify_volume_store

        return verify_volume_store(root, meta, progress=progress)
    found: list[dict[str, Any]] = [
        {"file": rel, "array": _array_of(rel), "chunk": None, "samples": None, "names": [], "problem": problem}
        for rel, problem in check_metadata(root, meta, full=True)
    ]
    names = _source_names(root, meta)
    cs, count = meta["chunk_samples"], meta["count"]
    sources = [_ChunkBytes(root, meta, name) for name in ARRAY_NAMES]
    try:
        with Progress(meta["num_chunks"], "verify", mode=progress, unit="chunks") as bar:
            for k in range(meta["num_chunks"]):
                for source in sources:
                    problem = source.problem(k) if source.usable else None
                    if problem:
                        first, last = k * cs, min((k + 1) * cs, count) - 1
                        rel = (f"{source.name}.npy" if meta["backend"] == "memmap"
                               else zarr_chunk_path(Path(), source.name, k).as_posix())
                        found.append({"file": rel, "array": source.name, "chunk": k, "samples": [first, last],
                                      "names": names[first : min(last + 1, first + 3)], "problem": problem})
                bar.update(1)
    finally:
        for source in sources:
            source.close()
    return found
