"""Stores in object storage: :func:`convert` with a URL destination; ``info`` and ``verify``.

A conversion to ``s3://bucket/data.zarr`` converts into a local staging store first (it needs
the store's size of local disk), then uploads every file concurrently, ``manifest.json`` last:
a store that opens is always complete.  ``_upload.json`` is uploaded first and deleted last,
so an interrupted upload is recognised (``open_store`` refuses it, naming ``--resume``), and
``resume`` uploads only the files missing or of another size.  The staging store is removed
once the upload succeeded; with ``resume`` after a failed upload it is reused (or, when it is
gone, converted again: a conversion is deterministic, so the chunks already uploaded match).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import OptionError, StoreExistsError, StreamsegError, truncate
from ..progress import Progress
from .layout import MANIFEST_NAME, PLAN_NAME
from .lock import LOCK_NAME
from .remote import UPLOAD_MARK, RemoteStore, open_remote_store
from .remote_fs import RemoteLocation, RemoteStoreError, is_url, redact_options

__all__ = ["convert_to_url", "upload_files", "upload_store", "remote_store_info", "verify_remote_store",
           "default_staging"]

_BATCH = 64  # files per round of concurrent uploads (progress is reported between rounds)
_NOT_UPLOADED = {MANIFEST_NAME, LOCK_NAME, UPLOAD_MARK}


def default_staging() -> Path:
    """Where conversions to a URL stage their store without ``staging``: the system temp folder."""
    return Path(tempfile.gettempdir()) / "streamseg-staging"


def upload_files(loc: RemoteLocation, pairs: list[tuple[Path, str]]) -> None:
    """Upload ``(local file, relative path)`` pairs concurrently; raise on the first failure."""
    failed = loc.put_many(pairs)
    if failed:
        rel, exc = failed[0]
        err = loc.error(exc, "upload to")
        raise type(err)(f"{err} ({len(failed)} of {len(pairs)} files failed, first {rel}; rerun with --resume "
                        "to upload the rest)")


def _remote_state(loc: RemoteLocation) -> tuple[dict[str, int], bool, bool]:
    """Sizes of the files at the destination; whether it has a manifest; whether an upload mark."""
    try:
        sizes = loc.sizes()
    except Exception as exc:  # noqa: BLE001 - mapped to one line
        raise loc.error(exc, "list") from None
    return sizes, MANIFEST_NAME in sizes, UPLOAD_MARK in sizes


def _clear_remote(loc: RemoteLocation, sizes: dict[str, int]) -> None:
    """Delete a remote store: its manifest first, so that it never opens half-deleted."""
    try:
        loc.remove([MANIFEST_NAME])
        loc.remove([rel for rel in sizes if rel not in (MANIFEST_NAME, UPLOAD_MARK)])
    except Exception as exc:  # noqa: BLE001
        raise loc.error(exc, "delete the old store at") from None


def _mark(loc: RemoteLocation, files: int) -> None:
    """Upload the mark of an unfinished upload (which also shows the destination can be written)."""
    try:
        loc.pipe(UPLOAD_MARK, json.dumps({"files": files, "by": "streamseg convert"}).encode())
    except Exception as exc:  # noqa: BLE001
        raise loc.error(exc, "upload to") from None


def upload_store(local: Path, loc: RemoteLocation, *, resume: bool = False, progress: Any = "auto") -> None:
    """Upload the finished local store ``local`` to ``loc``: the upload mark, every file (those
    of the same size already there skipped with ``resume``), checks, the manifest, then the mark
    is removed."""
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.name not in _NOT_UPLOADED)
    pairs = [(p, p.relative_to(local).as_posix()) for p in files]
    sizes = _remote_state(loc)[0]
    _mark(loc, len(pairs) + 1)
    todo = [(p, rel) for p, rel in pairs if not resume or sizes.get(rel) != p.stat().st_size]
    bar = Progress(len(pairs), f"upload -> {loc.name}", mode=progress, unit="files")
    bar.update(len(pairs) - len(todo))
    try:
        for a in range(0, len(todo), _BATCH):
            upload_files(loc, todo[a : a + _BATCH])
            bar.update(len(todo[a : a + _BATCH]))
    except StreamsegError:
        raise
    except Exception as exc:  # noqa: BLE001 - a failure outside the transfers themselves
        err = loc.error(exc, "upload to")
        raise type(err)(f"{err} (the upload was interrupted; rerun with --resume to upload the rest)") from None
    finally:
        bar.close()
    there, _, _ = _remote_state(loc)
    short = [rel for p, rel in pairs if there.get(rel) != p.stat().st_size]
    if short:
        raise RemoteStoreError(f"After uploading to {loc.display}, {len(short)} file(s) are missing or of another size "
                               f"there (first {short[0]}); rerun with --resume. Received: {loc.display}")
    try:
        loc.fs.put_file(str(local / MANIFEST_NAME), loc.path(MANIFEST_NAME))  # last: the store is complete
        loc.remove([UPLOAD_MARK])
    except Exception as exc:  # noqa: BLE001
        raise loc.error(exc, "upload to") from None


def convert_to_url(convert: Callable[..., Any], params: dict[str, Any]) -> RemoteStore:
    """:func:`~streamseg.store.converter.convert` with ``params`` (its arguments) for a URL
    destination, or with ``storage_options`` / ``staging`` (refused for a local one)."""
    params = dict(params)
    dst, options, staging = params.pop("dst"), params.pop("storage_options", None), params.pop("staging", None)
    if not is_url(dst):
        raise OptionError("storage_options and staging apply to a URL destination (s3://, gs://, az://, file://). "
                          f"Received: dst={truncate(str(dst))}, storage_options={redact_options(options)}, "
                          f"staging={truncate(staging)}")
    loc = RemoteLocation(dst, options)
    if params.get("format", "zarr") != "zarr" or params.get("layout") == "volumes":
        raise OptionError(f"Object storage holds zarr stores of 2D samples only: convert with --format zarr (and "
                          f"--layout slices) to {loc.display}; memmap stores need a local file. Received: "
                          f"format={params.get('format')!r}" + (f", layout={params['layout']!r}"
                                                                 if params.get("layout") else ""))
    overwrite, resume = bool(params.pop("overwrite", False)), bool(params.pop("resume", False))
    sizes, complete, marked = _remote_state(loc)
    if complete and not overwrite:
        raise StoreExistsError(f"{loc.display} is already a complete store" + ("; nothing to resume. Use --overwrite "
                               "to convert again." if resume else "; pass --overwrite to replace it."))
    if sizes and not (complete or marked):
        raise StoreExistsError(f"{loc.display} holds files but no streamseg store (no {MANIFEST_NAME} nor "
                               f"{UPLOAD_MARK}); refusing to write there. Choose another destination.")
    if marked and not complete and not (overwrite or resume):
        raise StoreExistsError(f"{loc.display} holds an interrupted upload; pass --resume to finish it or "
                               "--overwrite to start again.")
    endpoint = (options or {}).get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL", "")
    key = hashlib.sha256(f"{loc.url}\n{endpoint}".encode()).hexdigest()[:12]
    parent = Path(staging) if staging is not None else default_staging()
    local = parent / key / loc.name
    if overwrite and sizes:
        _clear_remote(loc, sizes)
        sizes = {}
    fresh = not sizes  # nothing there before: a failed conversion leaves nothing either
    if not marked or overwrite:
        _mark(loc, 0)  # before converting: a bucket that is missing or read-only fails now
    if not (resume and (local / MANIFEST_NAME).exists()):  # else: staged already, the upload was cut short
        again = resume and (local / PLAN_NAME).exists()
        try:
            try:
                local.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OptionError(f"The staging folder {parent} cannot be created ({exc.strerror or exc}); pass "
                                  f"--staging DIR on a disk with room for the store. Received: {parent}") from None
            convert(**params, dst=local, resume=again, overwrite=not again)
        except BaseException:
            if fresh:
                try:
                    loc.remove([UPLOAD_MARK])  # --resume still finds the staged conversion
                except Exception:  # noqa: BLE001 - the conversion's own error matters
                    pass
            raise
    upload_store(local, loc, resume=resume or bool(sizes), progress=params.get("progress", "auto"))
    shutil.rmtree(local.parent, ignore_errors=True)
    if staging is None:
        try:
            parent.rmdir()  # only when empty (another conversion may stage there)
        except OSError:
            pass
    return open_remote_store(dst, storage_options=options)


def remote_store_info(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """:func:`~streamseg.store.inspect.store_info` of the store at ``url`` (metadata only fetched);
    ``disk_bytes`` is the size of its files in object storage."""
    from .inspect import store_info

    store = open_remote_store(url, storage_options=storage_options)
    info = store_info(store.path)
    try:
        stored = sum(store._loc.sizes().values())
    except Exception as exc:  # noqa: BLE001
        raise store._loc.error(exc, "list") from None
    info["path"] = store.url
    info["disk_bytes"] = stored
    info["compression_ratio"] = info["raw_bytes"] / stored if stored else None
    info["warnings"] = [str(w).replace(str(store.path), store.url) for w in info.get("warnings", [])]
    return info



def verify_remote_store(url: str, storage_options: dict[str, Any] | None = None, *,
                        progress: Any = "auto") -> list[dict[str, Any]]:
    """:func:`~streamseg.store.inspect.verify_store` of the store at ``url``: every chunk file is
    downloaded into a private temporary mirror (it needs the store's size of local disk), then
    checked; a chunk missing from object storage is reported like one missing on disk."""
    from .inspect import verify_store
    from .remote import chunk_rel

    store = open_remote_store(url, storage_options=storage_options, cache_bytes=2**62)
    rels = [chunk_rel(n, k) for k in range(store.num_chunks) for n in ("images", "masks")]
    bar = Progress(len(rels), f"download {store._loc.name}", mode=progress, unit="files")
    try:
        for a in range(0, len(rels), 4 * _BATCH):
            got = store._loc.cat_many(rels[a : a + 4 * _BATCH])
            for rel, data in got.items():
                if not isinstance(data, (bytes, FileNotFoundError)):
                    raise store._loc.error(data, "read")
            store.cache.put({rel: data for rel, data in got.items() if isinstance(data, bytes)})
            bar.update(len(got))
    finally:
        bar.close()
    found = verify_store(store.path, progress=progress)
    for entry in found:
        entry["problem"] = str(entry["problem"]).replace(str(store.path), store.url)
    return found
