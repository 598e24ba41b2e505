"""Conversion from folders and arrays: semantics, bad input, crash safety, info/verify."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import index_encoded, write_pairs
from streamseg import (
    IncompleteStoreError,
    InputError,
    LabelError,
    OptionError,
    SourceMismatchError,
    StoreExistsError,
    UnreadableFileError,
    convert,
    open_store,
)
from streamseg.store.inspect import store_info, verify_store


def test_folder_round_trip_rgb_order(tmp_path, backend):
    images, masks = index_encoded(7)
    src = write_pairs(tmp_path / "src", images, masks)
    store = convert(src, tmp_path / "dst", format=backend, chunk_samples=3, progress=False)
    got_i, got_m = store.read(np.arange(7))
    np.testing.assert_array_equal(got_i, images)  # stored as RGB although OpenCV reads BGR
    np.testing.assert_array_equal(got_m[..., 0], masks)
    assert store.names == [f"s{i:04d}" for i in range(7)]


def test_parallel_conversion_is_identical(tmp_path, backend):
    images, masks = index_encoded(17)
    src = write_pairs(tmp_path / "src", images, masks)
    one = convert(src, tmp_path / "one", format=backend, chunk_samples=2, progress=False)
    two = convert(src, tmp_path / "two", format=backend, chunk_samples=2, workers=2, progress=False)
    for a, b in zip(one.read(np.arange(17)), two.read(np.arange(17))):
        np.testing.assert_array_equal(a, b)
    assert one.meta["checksums"] == two.meta["checksums"]


def test_resize_keeps_mask_labels(tmp_path, backend):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (4, 40, 50, 3), dtype=np.uint8)
    masks = rng.choice(np.array([0, 3, 7], np.uint8), size=(4, 40, 50))
    src = write_pairs(tmp_path / "src", images, masks)
    for size in ((20, 25), (64, 80)):
        store = convert(src, tmp_path / f"d{size[0]}", format=backend, size=size, progress=False)
        got_i, got_m = store.read(np.arange(4))
        assert got_i.shape == (4, *size, 3) and got_m.shape == (4, *size, 1)
        assert set(np.unique(got_m)) <= {0, 3, 7}
        assert store.meta["label_values"] == sorted(int(v) for v in np.unique(got_m))


def test_mask_suffix_and_channels_and_16bit(tmp_path):
    img16 = (np.arange(2 * 8 * 8).reshape(2, 8, 8) * 1000 % 65536).astype(np.uint16)
    masks = np.zeros((2, 8, 8), np.uint8)
    src = write_pairs(tmp_path / "src", img16, masks, mask_suffix="_mask")
    with pytest.raises(SourceMismatchError, match="--mask-suffix"):
        convert(src, tmp_path / "bad", progress=False)
    store = convert(src, tmp_path / "d16", mask_suffix="_mask", progress=False)
    assert store.image_dtype == np.uint16
    np.testing.assert_array_equal(store.read([0, 1])[0][..., 0], img16)
    store3 = convert(src, tmp_path / "d3", mask_suffix="_mask", channels=3, image_dtype="uint8", progress=False)
    got = store3.read([1])[0]
    assert got.shape == (1, 8, 8, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[0, ..., 0], ((img16[1].astype(np.uint32) + 128) // 257).astype(np.uint8))


def test_npy_and_npz_sources_are_memory_mapped(tmp_path, backend):
    images, masks = index_encoded(6)
    np.savez(tmp_path / "d.npz", x=images, y=masks)
    store = convert(images=tmp_path / "d.npz", masks=tmp_path / "d.npz", images_key="x", masks_key="y",
                    dst=tmp_path / "s", format=backend, progress=False)
    np.testing.assert_array_equal(store.read(np.arange(6))[0], images)
    from streamseg.io.sources import open_array

    assert isinstance(open_array(tmp_path / "d.npz", "x"), np.memmap)
    np.savez_compressed(tmp_path / "c.npz", x=images, y=masks)
    with pytest.raises(InputError, match="compressed"):
        convert(images=tmp_path / "c.npz", masks=tmp_path / "c.npz", images_key="x", masks_key="y",
                dst=tmp_path / "s2", progress=False)
    with pytest.raises(OptionError, match="holds: x, y"):
        convert(images=tmp_path / "d.npz", masks=tmp_path / "d.npz", dst=tmp_path / "s3", progress=False)


@pytest.mark.parametrize("case, error, match", [
    ("missing_src", UnreadableFileError, "does not exist"),
    ("image_without_mask", SourceMismatchError, "have no mask.*s0001.png"),
    ("mask_without_image", SourceMismatchError, "have no image.*s0002"),
    ("corrupt", UnreadableFileError, "Cannot read .*s0001.png"),
    ("size_mismatch", SourceMismatchError, "pass --size"),
    ("mixed_channels", InputError, "--channels"),
    ("float_mask", LabelError, "floating-point"),
    ("too_many_labels", LabelError, "outside 0..255"),
    ("empty", InputError, "No image files"),
])
def test_bad_input_messages(tmp_path, case, error, match):
    images, masks = index_encoded(3)
    src = tmp_path / "src"
    if case != "missing_src":
        write_pairs(src, images, masks)
    if case == "image_without_mask":
        (src / "masks" / "s0001.png").unlink()
    elif case == "mask_without_image":
        (src / "images" / "s0002.png").unlink()
    elif case == "corrupt":
        (src / "images" / "s0001.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    elif case == "size_mismatch":
        cv2.imwrite(str(src / "masks" / "s0002.png"), np.zeros((5, 5), np.uint8))
    elif case == "mixed_channels":
        cv2.imwrite(str(src / "images" / "s0002.png"), np.zeros((16, 20), np.uint8))
    elif case == "float_mask":
        cv2.imwrite(str(src / "masks" / "s0001.tiff"), np.zeros((16, 20), np.float32))
        (src / "masks" / "s0001.png").unlink()
    elif case == "too_many_labels":
        cv2.imwrite(str(src / "masks" / "s0001.png"), np.full((16, 20), 1000, np.uint16))
    elif case == "empty":
        for p in list((src / "images").iterdir()) + list((src / "masks").iterdir()):
            p.unlink()
    with pytest.raises(error, match=match):
        convert(src, tmp_path / "dst", chunk_samples=1, progress=False)
    if (tmp_path / "dst").exists():  # nothing that looks complete is left behind
        with pytest.raises(IncompleteStoreError):
            open_store(tmp_path / "dst")


def test_existing_destination(tmp_path):
    images, masks = index_encoded(3)
    src = write_pairs(tmp_path / "src", images, masks)
    convert(src, tmp_path / "dst", progress=False)
    with pytest.raises(StoreExistsError, match="--overwrite"):
        convert(src, tmp_path / "dst", progress=False)
    convert(src, tmp_path / "dst", overwrite=True, progress=False)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.txt").write_text("keep me")
    with pytest.raises(StoreExistsError, match="not a streamseg store"):
        convert(src, tmp_path / "precious", overwrite=True, progress=False)
    assert (tmp_path / "precious" / "thesis.txt").read_text() == "keep me"


_SLOW_CONVERT = """
import sys, time
import streamseg.store.converter as c
orig = c._ChunkTask.__call__
def slow(self, k):
    rec = orig(self, k)
    time.sleep(0.15)
    return rec
c._ChunkTask.__call__ = slow
c.convert(images=sys.argv[1], masks=sys.argv[2], dst=sys.argv[3], format=sys.argv[4], chunk_samples=2,
          progress=False)
"""


def test_kill_and_resume_is_identical(tmp_path, backend):
    images, masks = index_encoded(40)
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "y.npy", masks)
    dst = tmp_path / "killed"
    args = [str(tmp_path / "x.npy"), str(tmp_path / "y.npy"), str(dst), backend]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CONVERT, *args], env={**os.environ, "PYTHONPATH": os.getcwd()})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        progress = dst / "_progress.jsonl"
        if progress.exists() and len(progress.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with pytest.raises(IncompleteStoreError, match="--resume"):
        open_store(dst)
    with pytest.raises(StoreExistsError):
        convert(images=args[0], masks=args[1], dst=dst, format=backend, chunk_samples=2, progress=False)
    with pytest.raises(OptionError, match="different options"):
        convert(images=args[0], masks=args[1], dst=dst, format=backend, chunk_samples=4, resume=True,
                progress=False)
    resumed = convert(images=args[0], masks=args[1], dst=dst, format=backend, chunk_samples=2, resume=True,
                      progress=False)
    clean = convert(images=args[0], masks=args[1], dst=tmp_path / "clean", format=backend, chunk_samples=2,
                    progress=False)
    for a, b in zip(resumed.read(np.arange(40)), clean.read(np.arange(40))):
        np.testing.assert_array_equal(a, b)
    meta_a = {k: v for k, v in resumed.meta.items() if k != "params"}
    meta_b = {k: v for k, v in clean.meta.items() if k != "params"}
    assert meta_a == meta_b


def test_info_and_verify_finds_damage(arrays_store, backend):
    store, images, _ = arrays_store
    info = store_info(store.path)
    assert info["count"] == 23 and info["format"] == backend
    assert info["image_shape"] == [23, 16, 20, 3] and info["disk_bytes"] > 0
    assert abs(sum(v["fraction"] for v in info["labels"].values()) - 1) < 1e-9
    assert verify_store(store.path, progress=False) == []
    if backend == "zarr":
        chunk = store.path / "images" / "c" / "2" / "0" / "0" / "0"
        raw = bytearray(chunk.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        chunk.write_bytes(bytes(raw))
    else:
        mm = np.load(store.path / "images.npy", mmap_mode="r+")
        mm[9, 3, 3, 0] ^= 0xFF
        mm.flush()
        del mm
    damaged = verify_store(store.path, progress=False)
    assert [(d["array"], d["chunk"], d["samples"]) for d in damaged] == [("images", 2, [8, 11])]
    assert damaged[0]["names"][0] == "8"


def test_manifest_json_is_valid_json(arrays_store):
    store, _, _ = arrays_store
    meta = json.loads((Path(store.path) / "manifest.json").read_text())
    assert meta["sources"]["count"] == 23
