"""The local read-through cache of a remote store: a mirror directory that is itself a store.

The mirror holds the store's metadata files (``manifest.json``, the ``zarr.json`` files,
``sources.txt``, ``read_checksums.npy``), fetched when the store is opened, and the chunk
files fetched so far, at the paths they have in the store.  Reading a mirror is reading a
local store (:class:`~streamseg.store.reader.Store`), checksums included.

Several processes may share one mirror (the workers of a dataset, several runs): files are
written to a temporary name and renamed into place, and the chunk files are bounded by
``bound`` bytes.  Every addition happens under an exclusive lock of ``<mirror>.lock``;
when the bytes recorded in ``_cache_bytes`` would exceed the bound, the least recently used
chunk files (by access time, which a read that finds a chunk in the cache refreshes) are
deleted until the rest fill at most 80% of it.  The chunks of the batch being read are
kept, so a batch whose chunks alone exceed the bound overshoots it by that batch.  A reader
whose chunk vanished between fetching and reading (evicted by another process) fetches it
again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .layout import ARRAY_NAMES, MANIFEST_NAME

__all__ = ["MirrorCache", "mirror_name", "LEDGER_NAME"]

LEDGER_NAME = "_cache_bytes"
_LOW_WATER = 0.8  # eviction stops once the chunk files fill this share of the bound
_TOUCH_NS = 1_000_000_000  # a cached chunk's access time is refreshed at most once a second


def mirror_name(url: str, endpoint: str | None) -> str:
    """Directory name of the mirror of ``url`` (served by ``endpoint``) inside a cache folder."""
    digest = hashlib.sha256(f"{url}\n{endpoint or ''}".encode()).hexdigest()[:16]
    tail = "".join(c if c.isalnum() or c in "._-" else "_" for c in url.rstrip("/").rsplit("/", 1)[-1])[:40]
    return f"{tail}-{digest}"


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


class MirrorCache:
    """The mirror directory ``root`` of one remote store, its chunk files bounded by ``bound`` bytes.

    Parameters
    ----------
    root : pathlib.Path
        The mirror (``<cache_dir>/<mirror_name>``).
    bound : int
        Most bytes of chunk files kept (see the module docstring for the one exception).
    """

    def __init__(self, root: Path, bound: int) -> None:
        self.root = Path(root)
        self.bound = int(bound)
        self._thread_locks: dict[int, threading.Lock] = {}  # per process: a fork copies a held one

    def __repr__(self) -> str:
        return f"MirrorCache({str(self.root)!r}, bound={self.bound})"

    def __getstate__(self) -> dict[str, object]:
        return {"root": str(self.root), "bound": self.bound}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(Path(str(state["root"])), int(state["bound"]))  # type: ignore[misc, call-overload]

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive across threads (a lock of this process) and processes (a POSIX record lock on
        ``<mirror>.lock``, which a forked child does not inherit, unlike ``flock``)."""
        guard = self._thread_locks.setdefault(os.getpid(), threading.Lock())
        with guard:
            self.root.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root.parent / f"{self.root.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    import fcntl

                    fcntl.lockf(fd, fcntl.LOCK_EX)
                except ImportError:  # pragma: no cover - no POSIX locks (Windows): threads only
                    pass
                yield
            finally:
                os.close(fd)  # releases the record lock

    # ------------------------------------------------------------------ metadata
    def manifest_digest(self) -> str | None:
        """sha256 of the mirror's manifest (None when it has none)."""
        try:
            return hashlib.sha256((self.root / MANIFEST_NAME).read_bytes()).hexdigest()
        except OSError:
            return None

    def install(self, files: dict[str, bytes], manifest: bytes) -> None:
        """Replace the mirror by the metadata ``files`` and ``manifest`` (written last); no chunks.

        The caller holds :meth:`lock`.  The old mirror is renamed aside, then deleted, so a
        process still reading it sees its files vanish rather than change.
        """
        if self.root.exists():
            aside = self.root.with_name(f".{self.root.name}.old.{os.getpid()}.{time.monotonic_ns()}")
            os.replace(self.root, aside)
            shutil.rmtree(aside, ignore_errors=True)
        for rel, data in files.items():
            _atomic_write(self.root / rel, data)
        _atomic_write(self.root / LEDGER_NAME, b"0")
        _atomic_write(self.root / MANIFEST_NAME, manifest)

    # ------------------------------------------------------------------ chunks
    def missing(self, rels: list[str]) -> list[str]:
        """The chunk files of ``rels`` not in the mirror; those present are marked as just used."""
        now = time.time_ns()
        out = []
        for rel in rels:
            path = os.path.join(self.root, rel)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                out.append(rel)
                continue
            if now - st.st_atime_ns > _TOUCH_NS:
                try:  # the modification time stays: the read checks know the file by it
                    os.utime(path, ns=(now, st.st_mtime_ns))
                except OSError:
                    pass
        return out

    def put(self, blobs: dict[str, bytes], keep: set[str] | frozenset[str] = frozenset()) -> None:
        """Add chunk files, then evict least recently used ones (never those of ``keep``) when over
        the bound."""
        if not blobs:
            return
        with self.lock():
            added = 0
            for rel, data in blobs.items():
                if not os.path.exists(self.root / rel):  # else fetched meanwhile by another reader
                    _atomic_write(self.root / rel, data)
                    added += len(data)
            total = self._ledger() + added
            if total > self.bound:
                total = self._evict(set(keep) | set(blobs))
            _atomic_write(self.root / LEDGER_NAME, str(total).encode())

    def drop(self, rels: list[str]) -> None:
        """Delete the cached copies of ``rels`` (fetched again on the next read)."""
        with self.lock():
            freed = 0
            for rel in rels:
                try:
                    path = self.root / rel
                    freed += path.stat().st_size
                    path.unlink()
                except FileNotFoundError:
                    pass
            if freed:
                _atomic_write(self.root / LEDGER_NAME, str(max(0, self._ledger() - freed)).encode())

    def chunk_files(self) -> list[tuple[int, int, str]]:
        """``(access time ns, size, relative path)`` of every chunk file in the mirror."""
        found = []
        for name in ARRAY_NAMES:
            base = self.root / name / "c"
            for dirpath, _, files in os.walk(base):
                for f in files:
                    if f.startswith("."):
                        continue  # a temporary file being written
                    full = os.path.join(dirpath, f)
                    try:
                        st = os.stat(full)
                    except FileNotFoundError:
                        continue
                    found.append((st.st_atime_ns, st.st_size, os.path.relpath(full, self.root).replace(os.sep, "/")))
        return found

    def chunk_bytes(self) -> int:
        """Bytes of the chunk files in the mirror now (a full scan)."""
        return sum(size for _, size, _ in self.chunk_files())

    def _ledger(self) -> int:
        try:
            return int((self.root / LEDGER_NAME).read_text() or 0)
        except (OSError, ValueError):
            return self.chunk_bytes()

    def _evict(self, keep: set[str]) -> int:
        """Delete the least recently used chunk files down to the low-water mark; the bytes left."""
        files = sorted(self.chunk_files())
        total = sum(size for _, size, _ in files)
        target = int(self.bound * _LOW_WATER)
        for _, size, rel in files:
            if total <= target:
                break
            if rel in keep:
                continue
            try:
                os.unlink(self.root / rel)
            except FileNotFoundError:
                pass
            total -= size
        return total
