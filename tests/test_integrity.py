"""No silent corruption: checked reads, metadata files recorded in the manifest, named samples."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import index_encoded
from streamseg import CorruptChunkError, LabelError, OptionError, Store, convert, open_store
from streamseg.cli import main as cli_main
from streamseg.errors import CorruptStoreError
from streamseg.pipeline.batches import BatchOptions, BatchProducer
from streamseg.store.inspect import describe_problem, format_info, store_info, verify_store
from streamseg.store.integrity import buffer_checksum, row_checksums


def _store(tmp_path: Path, backend: str, *, n: int = 23,
           compressor: str = "none") -> tuple[Path, np.ndarray, np.ndarray]:
    """23 index-encoded samples in chunks of 4; zarr chunks uncompressed, so a flipped byte
    decodes silently into wrong pixels unless the read is checked."""
    images, masks = index_encoded(n)
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "y.npy", masks)
    dst = tmp_path / f"s.{backend}"
    convert(images=tmp_path / "x.npy", masks=tmp_path / "y.npy", dst=dst, format=backend, chunk_samples=4,
            compressor=compressor, progress=False)
    return dst, images, masks


def _flip(dst: Path, backend: str, name: str, sample: int, value: int | None = None) -> None:
    """Change one byte of ``name`` inside ``sample`` (chunk ``sample // 4``) on disk."""
    if backend == "zarr":
        chunk = dst / name / "c" / str(sample // 4) / "0" / "0" / "0"
        raw = bytearray(chunk.read_bytes())
        per_sample = len(raw) // 4
        pos = (sample % 4) * per_sample + per_sample // 2
        raw[pos] = value if value is not None else raw[pos] ^ 0x10
        chunk.write_bytes(bytes(raw))
    else:
        mm = np.load(dst / f"{name}.npy", mmap_mode="r+")
        mm[sample, 5, 5, 0] = value if value is not None else mm[sample, 5, 5, 0] ^ 0x10
        mm.flush()
        del mm


# ---------------------------------------------------------------------------- item 4: checked reads
def test_flipped_byte_raises_naming_chunk_samples_and_store(tmp_path, backend):
    dst, images, masks = _store(tmp_path, backend)
    _flip(dst, backend, "images", 9)
    store = open_store(dst)
    assert store.verify_reads
    got_i, _ = store.read([0, 1, 20])  # other chunks read fine
    np.testing.assert_array_equal(got_i, images[[0, 1, 20]])
    with pytest.raises(CorruptChunkError) as err:
        store.read([3, 9])
    text = str(err.value)
    assert f"hunk 2 of 'images' (samples 8-11) in {dst}" in text and "fails its checksum" in text
    assert "streamseg verify" in text
    if backend == "memmap":
        assert text.startswith("Sample 9 in chunk 2")
    # unchecked, the damage comes through silently (what happened before)
    unchecked = open_store(dst, verify_reads=False)
    assert not np.array_equal(unchecked.read([9])[0], images[[9]])
    # the batch producer (what the dataset's workers run) raises it unchanged
    producer = BatchProducer(store, BatchOptions(num_classes=5))
    out = {"images": np.empty((4, 16, 20, 3), np.float32), "masks": np.empty((4, 16, 20, 1), np.int32)}
    with pytest.raises(CorruptChunkError, match=r"[Cc]hunk 2 of 'images' \(samples 8-11\)"):
        producer.produce((0, np.arange(8, 12)), out)
    assert [(d["array"], d["chunk"]) for d in verify_store(dst, progress=False)] == [("images", 2)]


def test_flipped_mask_byte_is_a_checksum_error_not_a_label_error(tmp_path, backend):
    from streamseg import SegmentationDataset

    dst, _, _ = _store(tmp_path, backend)
    _flip(dst, backend, "masks", 13, value=200)
    ds = SegmentationDataset(dst, 4, shuffle=False, workers=0)
    assert ds.num_classes == 5
    np.testing.assert_array_equal(ds[0][1][..., 0], index_encoded(4)[1])
    with pytest.raises(CorruptChunkError, match=r"[Cc]hunk 3 of 'masks' \(samples 12-15\)"):
        ds[3]
    unchecked = SegmentationDataset(dst, 4, shuffle=False, workers=0, verify_reads=False)
    assert not unchecked.store.verify_reads and ds.store.verify_reads
    with pytest.raises(LabelError, match="num_classes"):  # what the damage looked like before
        unchecked[3]


def test_verify_reads_travels_with_the_store(tmp_path, backend):
    dst, images, _ = _store(tmp_path, backend)
    off = open_store(dst, verify_reads=False)
    assert pickle.loads(pickle.dumps(off)).verify_reads is False
    on = pickle.loads(pickle.dumps(open_store(dst)))
    assert on.verify_reads is True
    assert off.with_verify_reads(True).verify_reads and not off.verify_reads
    assert off.with_verify_reads(None) is off
    _flip(dst, backend, "images", 0)
    with pytest.raises(CorruptChunkError, match="[Cc]hunk 0 of 'images'"):
        on.read([0])  # reopened in the "worker" with checks on
    off.read([0])
    with pytest.raises(CorruptChunkError):
        on.read_chunk("images", 0)


def test_checked_once_per_process_and_again_when_the_file_changes(tmp_path, backend, monkeypatch):
    import os

    from streamseg.store import integrity

    dst, images, _ = _store(tmp_path, backend)
    store = open_store(dst)
    calls = []
    for fn in ("row_checksums", "buffer_checksum"):
        real = getattr(integrity, fn)
        monkeypatch.setattr(integrity, fn, lambda *a, _real=real, _fn=fn: calls.append(_fn) or _real(*a))
    store.read(np.arange(8))
    assert calls
    calls.clear()
    np.testing.assert_array_equal(store.read(np.arange(8))[0], images[:8])
    assert calls == []  # bytes already checked by this process cost nothing
    _flip(dst, backend, "images", 5)  # an edit in place ...
    changed = dst / ("images/c/1/0/0/0" if backend == "zarr" else "images.npy")
    os.utime(changed, ns=(1, 1))  # ... which changes the file's modification time
    with pytest.raises(CorruptChunkError, match=r"[Cc]hunk 1 of 'images' \(samples 4-7\)"):
        store.read([5])


def test_store_without_read_checksums_is_checked_with_its_crc32s(tmp_path, backend):
    """A store written before read checksums existed: each chunk crc32-checked once per process."""
    dst, images, _ = _store(tmp_path, backend, compressor="lz4")
    meta = json.loads((dst / "manifest.json").read_text())
    for key in ("read_checksums", "files"):
        del meta[key]
    (dst / "manifest.json").write_text(json.dumps(meta))
    (dst / "read_checksums.npy").unlink()
    store = open_store(dst)
    np.testing.assert_array_equal(store.read(np.arange(23))[0], images)
    assert "older" in store_info(dst)["read_checks"]
    _flip(dst, backend, "images", 21)
    with pytest.raises(CorruptChunkError, match=r"Chunk 5 of 'images' \(samples 20-22\)"):
        open_store(dst).read([21])


def test_blocks64_sees_every_single_byte_change():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 4096 * 2 + 1000, dtype=np.uint8)  # two whole blocks and a tail
    base = buffer_checksum(data.tobytes())
    for pos in range(0, data.size, 7):
        changed = data.copy()
        changed[pos] ^= np.uint8(1 << (pos % 8))
        assert buffer_checksum(changed.tobytes()) != base, pos
    assert buffer_checksum(data.tobytes() + b"\0") != base  # a longer (zero-padded) file differs too
    swapped = np.concatenate([data[4096:8192], data[:4096], data[8192:]])
    assert buffer_checksum(swapped.tobytes()) != base  # moved blocks
    rows = rng.integers(0, 256, (5, 4096 + 13), dtype=np.uint8)
    assert row_checksums(rows).tolist() == [buffer_checksum(r.tobytes()) for r in rows]


def test_undecodable_chunk_names_its_samples(tmp_path):
    dst, _, _ = _store(tmp_path, "zarr", compressor="lz4")
    chunk = dst / "images" / "c" / "0" / "0" / "0" / "0"
    chunk.write_bytes(b"garbage" * 10)
    store = open_store(dst, verify_reads=False)
    with pytest.raises(CorruptChunkError,
                       match=rf"Chunk 0 of 'images' \(samples 0-3\) in {dst} cannot be decoded"):
        store.read([1])
    chunk.unlink()
    with pytest.raises(CorruptChunkError, match=r"Chunk 0 of 'images' \(samples 0-3\) .* is missing"):
        store.read([1])


# ---------------------------------------------------------------------------- item 5: metadata files
def test_manifest_records_every_metadata_file(tmp_path, backend):
    dst, _, _ = _store(tmp_path, backend)
    files = json.loads((dst / "manifest.json").read_text())["files"]
    expected = (["zarr.json", "images/zarr.json", "masks/zarr.json"] if backend == "zarr"
                else ["images.npy", "masks.npy"]) + ["sources.txt", "read_checksums.npy"]
    assert sorted(files) == sorted(expected)
    for rel, rec in files.items():
        assert rec["size"] == (dst / rel).stat().st_size
    if backend == "memmap":
        assert files["images.npy"]["header_size"] == 128
    assert verify_store(dst, progress=False) == []
    assert store_info(dst)["warnings"] == []


def _damage(dst: Path, case: str) -> str:
    """Damage the store; return the file the reports must name."""
    if case == "garbage zarr.json":
        (dst / "images" / "zarr.json").write_text("{ not json")
        return "images/zarr.json"
    if case == "edited shape":
        meta = json.loads((dst / "masks" / "zarr.json").read_text())
        meta["shape"][0] = 20
        (dst / "masks" / "zarr.json").write_text(json.dumps(meta))
        return "masks/zarr.json"
    if case == "deleted masks/":
        shutil.rmtree(dst / "masks")
        return "masks/"
    if case == "garbage group zarr.json":
        (dst / "zarr.json").write_bytes(b"\x00\x01")
        return "zarr.json"
    if case == "truncated masks.npy":
        with open(dst / "masks.npy", "r+b") as fh:
            fh.truncate(128 + 3 * 16 * 20)
        return "masks.npy"
    if case == "deleted masks.npy":
        (dst / "masks.npy").unlink()
        return "masks.npy"
    if case == "garbage npy header":
        with open(dst / "images.npy", "r+b") as fh:
            fh.seek(20)
            fh.write(b"@@@@")
        return "images.npy"
    if case == "deleted sources.txt":
        (dst / "sources.txt").unlink()
        return "sources.txt"
    if case == "truncated sources.txt":
        text = (dst / "sources.txt").read_text().splitlines()
        (dst / "sources.txt").write_text("\n".join(text[:10]) + "\n")
        return "sources.txt"
    raise AssertionError(case)


_ZARR_CASES = ["garbage zarr.json", "edited shape", "deleted masks/", "garbage group zarr.json",
               "deleted sources.txt", "truncated sources.txt"]
_MEMMAP_CASES = ["truncated masks.npy", "deleted masks.npy", "garbage npy header", "deleted sources.txt",
                 "truncated sources.txt"]


@pytest.mark.parametrize("backend, case", [("zarr", c) for c in _ZARR_CASES] + [("memmap", c) for c in _MEMMAP_CASES])
def test_damaged_metadata_is_named_by_verify_info_and_open(tmp_path, capsys, backend, case):
    dst, _, _ = _store(tmp_path, backend)
    named = _damage(dst, case)
    # verify: one entry (line) per problem naming the file, never a traceback
    found = verify_store(dst, progress=False)
    assert any(d["chunk"] is None and named in d["problem"] for d in found), found
    assert cli_main(["verify", str(dst), "--quiet"]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and "all files and chunks intact" not in out
    assert any(named in line for line in out.splitlines())
    assert len(out.splitlines()) == len(found) and all(line.startswith(f"{dst}: ") for line in out.splitlines())
    # info: warns, and still describes the store
    info = store_info(dst)
    assert info["count"] == 23 and any(named in w for w in info["warnings"])
    assert f"warning      {info['warnings'][0]}" in format_info(info)
    assert cli_main(["info", str(dst)]) == 0
    assert "warning" in capsys.readouterr().out
    # open_store refuses, naming the file and what to do
    with pytest.raises(CorruptStoreError) as refused:
        open_store(dst).names  # noqa: B018 - sources.txt is compared when the names are read, too
    assert named.rstrip("/") in str(refused.value) and "re-convert" in str(refused.value)


def test_truncated_npy_chunks_are_listed(tmp_path):
    dst, _, _ = _store(tmp_path, "memmap")
    _damage(dst, "truncated masks.npy")
    found = verify_store(dst, progress=False)
    chunks = [d["chunk"] for d in found if d["chunk"] is not None]
    assert chunks == [0, 1, 2, 3, 4, 5] and all("truncated" in d["problem"] for d in found if d["chunk"] is not None)
    assert describe_problem(found[-1]).startswith("masks chunk 5 (samples 20-22, 20, 21, 22...): truncated")


def test_store_without_file_records_still_opens_and_checks_its_names(tmp_path, backend):
    dst, _, _ = _store(tmp_path, backend)
    meta = json.loads((dst / "manifest.json").read_text())
    del meta["files"]
    (dst / "manifest.json").write_text(json.dumps(meta))
    store = open_store(dst)
    assert len(store.names) == 23
    assert any("older streamseg" in w for w in store_info(dst)["warnings"])
    _damage(dst, "truncated sources.txt")
    store = open_store(dst)  # nothing recorded to compare on open ...
    with pytest.raises(CorruptStoreError, match="sources.txt lists 10 names for 23 samples"):
        store.names  # noqa: B018 - ... but the names no longer shrink silently
    assert any("sources.txt lists 10 names" in d["problem"] for d in verify_store(dst, progress=False))


# ---------------------------------------------------------------------------- issue 11: wrapped labels
def test_from_arrays_scans_small_masks_for_labels():
    from streamseg import SegmentationDataset

    images = np.zeros((6, 8, 8, 1), np.uint8)
    masks = np.zeros((6, 8, 8), np.uint8)
    masks[4, 2:5, 2:5] = 3
    store = Store.from_arrays(images, masks)
    assert store.meta["label_values"] == [0, 3]
    ds = SegmentationDataset(store, 6, shuffle=False, workers=0)
    assert ds.num_classes == 4
    assert int(ds[0][1].max()) == 3  # before: num_classes 2 and a LabelError at the first batch
    assert Store.from_arrays(images, masks.astype(bool)).meta["label_values"] == [0, 1]


def test_large_wrapped_masks_need_num_classes(monkeypatch):
    from streamseg import SegmentationDataset
    from streamseg.store import wrapped

    monkeypatch.setattr(wrapped, "_LABEL_SCAN_BYTES", 100)
    store = Store.from_arrays(np.zeros((6, 8, 8, 1), np.uint8), np.full((6, 8, 8), 3, np.uint8))
    assert "label_values" not in store.meta
    with pytest.raises(OptionError, match="num_classes is needed.*Received: num_classes=None"):
        SegmentationDataset(store, 2, workers=0)
    assert SegmentationDataset(store, 2, num_classes=4, workers=0).num_classes == 4
    SegmentationDataset(store, 2, mask_mode="binary", workers=0)
