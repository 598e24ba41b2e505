"""An exclusive, non-blocking lock on a store destination for the whole of a conversion.

The lock is ``fcntl.flock`` on a small file ``_convert.lock`` *inside* the destination,
holding the PID of the converting process so that a refused second writer can name it.

Why inside the destination and not a sibling ``DST.lock``: the destination's parent may be
unwritable (or shared) while the destination itself is writable, and a sibling file would
be left next to the user's data.  ``--overwrite`` therefore clears the destination's
*contents* but keeps the lock file (see :func:`streamseg.store.writer.prepare_destination`),
so the inode other processes lock stays the same for the whole conversion.  The lock file
alone does not make a store: :func:`streamseg.open_store` needs ``manifest.json`` (or reports
an incomplete store from ``_plan.json``), and ``--overwrite`` knows the file as its own.

The kernel drops an ``flock`` when its holder dies (even by ``SIGKILL``), so a killed
conversion never leaves a stale lock: the file may remain with an old PID, and the next
conversion simply takes the lock and writes its own PID.  On release the file is removed
while still locked; a process that opened the old file meanwhile notices, after locking,
that the path no longer names the file it locked, and tries again.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import TracebackType

from ..errors import StoreExistsError

__all__ = ["LOCK_NAME", "DestinationLock", "lock_holder"]

LOCK_NAME = "_convert.lock"


def lock_holder(dst: str | os.PathLike) -> int | None:
    """PID written into the lock file of ``dst`` (the last process that held it), if any."""
    try:
        text = (Path(dst) / LOCK_NAME).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True


def _wait_for_holder(dst: Path, tries: int = 50, pause_s: float = 0.01) -> int | None:
    """PID of the process that holds ``dst``'s lock, waiting briefly for it to be written.

    The holder writes its PID just after it takes the lock, so a process refused in between
    reads an empty file (or the PID of a killed earlier holder); waiting up to
    ``tries * pause_s`` seconds lets the message name it.
    """
    import time

    for _ in range(tries):
        holder = lock_holder(dst)
        if holder is not None and _alive(holder):  # not a killed holder's PID left in the file
            return holder
        time.sleep(pause_s)
    return None


class DestinationLock:
    """Exclusive lock on a conversion destination (a context manager).

    Parameters
    ----------
    dst : path
        Destination directory; created (with its parents) when missing.

    Raises
    ------
    StoreExistsError
        Another process holds the lock; the message names its PID.
    OSError
        The destination cannot be created or written (the caller maps it to a one-line error).
    """

    def __init__(self, dst: str | os.PathLike) -> None:
        self.dst = Path(dst)
        self.path = self.dst / LOCK_NAME
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> None:
        """Take the lock or raise :class:`StoreExistsError` naming the holder."""
        import fcntl

        if self.dst.exists() and not self.dst.is_dir():
            raise StoreExistsError(f"{self.dst} exists and is a file, not a folder; choose another destination.")
        for _ in range(20):  # only a race with a releasing holder makes this loop again
            if not self.dst.exists():
                self.dst.mkdir(parents=True, exist_ok=True)
                self._created = True
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:  # the folder was removed between mkdir and open
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                holder = _wait_for_holder(self.dst)
                who = f"PID {holder}" if holder is not None else "another process"
                raise StoreExistsError(
                    f"{self.dst} is being written by another streamseg conversion ({who}); wait for it "
                    "to finish (or stop it) and run the command again."
                ) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed the file after we opened it: lock the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
            return
        raise StoreExistsError(f"Could not lock {self.path}: it keeps being replaced by another process; "
                               "run the command again.")

    def release(self) -> None:
        """Remove the lock file (while still holding it) and unlock; remove a folder we created if empty."""
        if self._fd is None:
            return
        import fcntl

        fd, self._fd = self._fd, None
        try:
            try:
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    os.unlink(self.path)
            except OSError:
                pass
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        if self._created:
            try:
                self.dst.rmdir()  # only succeeds when nothing was written (a refused conversion)
            except OSError:
                pass

    def __enter__(self) -> "DestinationLock":
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
