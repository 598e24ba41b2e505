"""Checks a conversion runs before it reads or writes anything: option values, the sample size,
and whether the chunks the workers hold fit in the memory available now."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import OptionError, truncate
from .writer import COMPRESSORS, FORMATS

__all__ = ["MAX_SIDE", "check_size"]

MAX_SIDE = 16384
_MEMORY_FRACTION = 0.8  # of the memory available at the start, for all workers' chunks together


def _validate(format: str, compressor: str, size: Any, channels: Any, image_dtype: Any,
              chunk_samples: Any, workers: int) -> tuple[int, int] | None:
    if format not in FORMATS:
        raise OptionError(f"format must be one of {', '.join(FORMATS)}. Received: {truncate(format)}")
    if compressor not in COMPRESSORS:
        raise OptionError(f"compressor must be one of {', '.join(COMPRESSORS)}. Received: {truncate(compressor)}")
    if channels not in (None, 1, 3):
        raise OptionError(f"channels must be 1 or 3 (or None to keep). Received: {truncate(channels)}")
    if image_dtype not in (None, "uint8"):
        raise OptionError(f"image_dtype must be None (keep) or 'uint8'. Received: {truncate(image_dtype)}")
    if chunk_samples is not None and (not isinstance(chunk_samples, int) or chunk_samples < 1):
        raise OptionError(f"chunk_samples must be a positive integer. Received: {truncate(chunk_samples)}")
    if not isinstance(workers, int) or workers < 1:
        raise OptionError(f"workers must be a positive integer. Received: {truncate(workers)}")
    return check_size(size, channels=channels, workers=workers)


def check_size(size: Any, *, channels: int | None = None, workers: int = 1) -> tuple[int, int] | None:
    """Validate a sample size ``(H, W)`` before any image is made that large.

    Each side must be at most :data:`MAX_SIDE`, and one sample per worker must fit in the
    memory available now (counting at least one byte per image channel and one per mask pixel).

    Parameters
    ----------
    size : (H, W) or None
        The requested size; None keeps the sources' size.
    channels : int, optional
        Image channels, when known.
    workers : int
        Processes that will each hold a sample (and its chunk).

    Returns
    -------
    (int, int) or None
        The size as plain integers.

    Raises
    ------
    OptionError
        Not two positive integers, a side above :data:`MAX_SIDE`, or too big for the memory.
    """
    if size is None:
        return None
    if len(size) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in size):
        raise OptionError(f"size must be two positive integers (H, W). Received: {truncate(size)}")
    if max(size) > MAX_SIDE:
        raise OptionError(f"size must be at most {MAX_SIDE} pixels per side; pass a smaller --size H W. "
                          f"Received: {truncate(tuple(int(v) for v in size))}")
    h, w = int(size[0]), int(size[1])
    _check_memory(h * w * ((channels or 1) + 1), 1, workers, f"--size {h} {w}")
    return h, w


def _check_memory(sample_bytes: int, chunk_samples: int, workers: int, what: str, held: int = 0) -> None:
    """Refuse a conversion whose chunks cannot fit in the memory available now.

    Each worker holds a chunk (images and masks), its padded copy and the encoded bytes, plus
    the sample being decoded and resized: about ``3 x chunk + 2 x sample`` per worker, plus
    ``held`` bytes it keeps besides (a volume source's current case).
    """
    import psutil

    need = workers * (3 * chunk_samples * sample_bytes + 2 * sample_bytes + held)
    usable = int(_MEMORY_FRACTION * psutil.virtual_memory().available)
    if need > usable:
        gib = 2.0**30
        raise OptionError(
            f"{what} needs about {need / gib:.1f} GiB of memory ({workers} worker(s) x {chunk_samples} "
            f"sample(s) per chunk) but at most {usable / gib:.1f} GiB may be used ({_MEMORY_FRACTION:.0%} "
            "of the memory available now); pass a smaller --size, a smaller --chunk-samples or fewer --workers."
        )
