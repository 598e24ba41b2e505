"""Arrays already in hand behind the store interface (:meth:`Store.from_arrays`): the checks,
the manifest they get, their label scan, and how they travel to worker processes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import OptionError, truncate
from .layout import FORMAT_VERSION

__all__ = ["wrapped_meta", "picklable", "unpickle_array", "scan_labels"]

_LABEL_SCAN_BYTES = 256 * 2**20  # wrapped masks up to this size are scanned for their labels


def wrapped_meta(images: Any, masks: Any, names: Sequence[str] | None) -> dict[str, Any]:
    """Check wrapped ``images`` / ``masks`` (OptionError naming what is wrong); return their manifest."""
    for label, arr in (("images", images), ("masks", masks)):
        if not hasattr(arr, "shape") or not hasattr(arr, "__getitem__"):
            raise OptionError(
                f"Expected `{label}` to be an array (NumPy, memmap, zarr, h5py). "
                f"Received: {truncate(type(arr))}"
            )
    if len(images.shape) not in (3, 4) or len(masks.shape) not in (3, 4):
        raise OptionError(
            "Expected images of shape (N, H, W[, C]) and masks of shape (N, H, W[, 1]). "
            f"Received: images {tuple(images.shape)}, masks {tuple(masks.shape)}"
        )
    if tuple(images.shape[:3]) != tuple(masks.shape[:3]):
        raise OptionError(
            "Images and masks must have the same count, height and width. "
            f"Received: images {tuple(images.shape)}, masks {tuple(masks.shape)}"
        )
    if len(masks.shape) == 4 and masks.shape[3] != 1:
        raise OptionError(f"Masks must have one channel. Received: masks {tuple(masks.shape)}")
    if np.dtype(masks.dtype).kind not in "iub":
        raise OptionError(
            "Masks must hold integer labels; round or threshold float masks first. "
            f"Received: masks of dtype {masks.dtype}"
        )
    n = int(images.shape[0])
    c = 1 if len(images.shape) == 3 else int(images.shape[3])
    meta = {
        "format_version": FORMAT_VERSION,
        "backend": "arrays",
        "complete": True,
        "count": n,
        "image_shape": [int(images.shape[1]), int(images.shape[2]), c],
        "image_dtype": str(np.dtype(images.dtype)),
        "mask_shape": [int(masks.shape[1]), int(masks.shape[2]), 1],
        "mask_dtype": str(np.dtype(masks.dtype)),
        "chunk_samples": int((getattr(images, "chunks", None) or (1,))[0] or 1),
        "names": list(names) if names is not None else None,
    }
    labels = scan_labels(masks)
    if labels is not None:
        meta["label_values"] = labels
    return meta


def picklable(arr: Any, label: str) -> Any:
    """What pickles a wrapped array: a memmap as its file, offset and layout; h5py is refused."""
    if isinstance(arr, np.memmap) and getattr(arr, "filename", None):
        return ("memmap", str(arr.filename), int(arr.offset), arr.shape, str(arr.dtype),
                "F" if arr.flags.f_contiguous and not arr.flags.c_contiguous else "C")
    if type(arr).__module__.startswith("h5py"):
        raise OptionError(
            f"An h5py dataset ({label}) cannot be sent to worker processes. Convert it with "
            "`streamseg.convert` or use workers without multiprocessing. "
            f"Received: {truncate(arr)}"
        )
    return ("plain", arr)


def unpickle_array(spec: tuple) -> Any:
    """The array :func:`picklable` described (a memmap is mapped again, read-only)."""
    if spec[0] == "memmap":
        _, filename, offset, shape, dtype, order = spec
        return np.memmap(filename, mode="r", dtype=dtype, shape=shape, offset=offset, order=order)
    return spec[1]


def scan_labels(masks: Any) -> list[int] | None:
    """Label values of wrapped masks under 256 MiB (one pass); None for larger ones."""
    nbytes = int(np.prod(masks.shape)) * np.dtype(masks.dtype).itemsize
    if nbytes > _LABEL_SCAN_BYTES:
        return None
    data = np.asarray(masks if isinstance(masks, np.ndarray) else masks[...]).reshape(-1)
    if data.size == 0:
        return []
    if data.dtype == np.bool_:
        data = data.view(np.uint8)
    lo, hi = int(data.min()), int(data.max())
    if lo >= 0 and hi < 65536:
        return np.flatnonzero(np.bincount(data, minlength=1)).tolist()
    return [int(v) for v in np.unique(data)]
