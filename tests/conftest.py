"""Shared fixtures: every store test runs on both backends."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(params=["zarr", "memmap"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


def index_encoded(n: int, h: int = 16, w: int = 20, c: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Images and masks whose values encode the sample index (for order/pairing checks)."""
    images = np.empty((n, h, w, c), np.uint8)
    masks = np.empty((n, h, w), np.uint8)
    for i in range(n):
        images[i] = (i * 7 + np.arange(c)) % 256
        images[i, 0, 0] = i % 256
        masks[i] = i % 5
    return images, masks


def write_pairs(root: Path, images: np.ndarray, masks: np.ndarray, *, ext: str = ".png",
                mask_suffix: str = "") -> Path:
    """Write arrays as image/mask files (RGB images saved in OpenCV's BGR order)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i, (img, msk) in enumerate(zip(images, masks)):
        data = img[..., ::-1] if img.ndim == 3 and img.shape[2] == 3 else img
        assert cv2.imwrite(str(root / "images" / f"s{i:04d}{ext}"), np.ascontiguousarray(data))
        assert cv2.imwrite(str(root / "masks" / f"s{i:04d}{mask_suffix}.png"), msk)
    return root


@pytest.fixture
def arrays_store(tmp_path: Path, backend: str):
    """A converted store of 23 index-encoded samples in chunks of 4, on each backend."""
    from streamseg import convert

    images, masks = index_encoded(23)
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "y.npy", masks)
    store = convert(images=tmp_path / "x.npy", masks=tmp_path / "y.npy", dst=tmp_path / f"s.{backend}",
                    format=backend, chunk_samples=4, progress=False)
    return store, images, masks


def save_nifti(path, data, affine):
    """Write ``data`` as NIfTI with its own dtype (folders made as needed); return the path."""
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.set_data_dtype(data.dtype)
    nib.save(img, path)
    return path
