"""Exception hierarchy of streamseg.

Every error raised on purpose by streamseg derives from :class:`StreamsegError`.
Subclasses also inherit the matching builtin so that ``except FileNotFoundError``
and friends keep working.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

_F = TypeVar("_F", bound=Callable[..., Any])

__all__ = [
    "StreamsegError",
    "StoreNotFoundError",
    "IncompleteStoreError",
    "StoreExistsError",
    "DestinationError",
    "CorruptStoreError",
    "CorruptChunkError",
    "RemoteStoreError",
    "InputError",
    "SourceMismatchError",
    "UnreadableFileError",
    "LabelError",
    "OptionError",
    "WorkerError",
    "WorkerDiedError",
    "truncate",
    "reject_unknown_keywords",
]


def truncate(value: object, limit: int = 120) -> str:
    """Return ``repr(value)`` cut to ``limit`` characters, for ``Received: ...`` tails."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class StreamsegError(Exception):
    """Base class of every error streamseg raises on purpose."""


class StoreNotFoundError(StreamsegError, FileNotFoundError):
    """The path does not hold a streamseg store."""


class IncompleteStoreError(StreamsegError, RuntimeError):
    """The store was not finished (conversion interrupted); resume or redo it."""


class StoreExistsError(StreamsegError, FileExistsError):
    """The destination exists and neither overwrite nor resume was asked for."""


class DestinationError(StreamsegError, OSError):
    """The destination cannot be created or written (permissions, read-only file system, disk full)."""


class CorruptStoreError(StreamsegError, OSError):
    """Files of a finished store are missing, or disagree with its manifest (changed after conversion)."""


class CorruptChunkError(CorruptStoreError):
    """A chunk could not be read or decoded, or its checksum does not match."""


class RemoteStoreError(StreamsegError, OSError):
    """Object storage cannot be reached, refuses access, or a transfer failed."""


class InputError(StreamsegError, ValueError):
    """The input data (folders, files, arrays) cannot be converted as given."""


class SourceMismatchError(InputError):
    """Images and masks do not pair up (missing partners, different sizes)."""


class UnreadableFileError(InputError, OSError):
    """A source file is missing, unreadable or not a decodable image."""


class LabelError(StreamsegError, ValueError):
    """Mask labels are invalid (float masks, too many labels, out of range)."""


class OptionError(StreamsegError, ValueError):
    """An option has an invalid name or value."""


class WorkerError(StreamsegError, RuntimeError):
    """A worker process or thread failed while producing a batch."""


class WorkerDiedError(WorkerError):
    """A worker process died (killed, out of memory, crashed) while busy."""


def reject_unknown_keywords(func: _F) -> _F:
    """Make ``func`` raise :class:`OptionError` listing its valid keywords on an unknown one.

    Python's own ``TypeError`` names the bad keyword but not the valid ones; this wrapper
    keeps the signature (``help()``, IDEs and ``inspect.signature`` still show every option)
    and adds the list.
    """
    params = inspect.signature(func).parameters
    valid = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
             and p.default is not p.empty]  # the options; required arguments are not options

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            owner = func.__qualname__.split(".")[0]
            raise OptionError(f"Unknown option(s) {', '.join(unknown)} for {owner}. Valid options: "
                              f"{', '.join(valid)}. Received: {truncate(unknown)}")
        return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
