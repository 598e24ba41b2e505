"""Stores in object storage: convert to s3:// (moto), read back, datasets and fit with worker
processes, the chunk cache, redaction of secrets, interrupted uploads, one-line errors."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from _s3 import free_port, s3, s3_server  # noqa: F401 - s3 is a fixture
from streamseg import SegmentationDataset, convert, open_store
from streamseg.errors import (CorruptChunkError, IncompleteStoreError, OptionError, StoreExistsError,
                              StoreNotFoundError, StreamsegError)
from streamseg.store import remote_upload
from streamseg.store.remote import RemoteStore
from streamseg.store.remote_fs import RemoteLocation, RemoteStoreError, parse_storage_options, redact_options, scrub

SECRET = "SuperSecretValue-123"
KEY_ID = "AKIAEXAMPLEKEYID"


@pytest.fixture(scope="module")
def pair(tmp_path_factory, s3):
    """The same 40 synthetic 64x64 pairs converted locally and into a bucket (chunks of 4)."""
    from streamseg.io.synth import write_synth_folder

    root = tmp_path_factory.mktemp("remote")
    src = write_synth_folder(root / "src", 40, size=(64, 64), classes=3, seed=5, progress=False)
    local = convert(src, root / "local.zarr", chunk_samples=4, progress=False)
    url = f"s3://{s3.bucket()}/data.zarr"
    made = convert(src, url, chunk_samples=4, progress=False, storage_options=s3.options(),
                   staging=root / "staging")
    assert isinstance(made, RemoteStore)
    assert not (root / "staging").exists() or not any((root / "staging").iterdir())  # staged copy removed
    return {"src": src, "local": local, "url": url, "root": root}


def _open(s3, pair, **kw):
    return open_store(pair["url"], storage_options=s3.options(), **kw)


def test_remote_store_reads_like_the_local_one(s3, pair, tmp_path):
    local = pair["local"]
    remote = _open(s3, pair, cache_dir=tmp_path / "cache")
    assert len(remote) == 40 and remote.backend == "zarr" and remote.url == pair["url"]
    order = np.random.default_rng(0).permutation(40)
    for got, want in zip(remote.read(order), local.read(order)):
        np.testing.assert_array_equal(got, want)
    assert remote.names == local.names
    for key in ("count", "image_shape", "labels", "image_mean", "image_std", "checksums", "read_checksums", "files"):
        assert remote.meta[key] == local.meta[key], key
    np.testing.assert_array_equal(remote.images[5:11], local.read(np.arange(5, 11))[0])
    np.testing.assert_array_equal(remote.masks[[3, 1]], local.read([3, 1])[1])
    np.testing.assert_array_equal(remote.images[7, :2, :3], local.read([7])[0][0, :2, :3])
    np.testing.assert_array_equal(remote.read_chunk("masks", 9), local.read_chunk("masks", 9))
    # the mirror is an ordinary store: the local reader opens it
    np.testing.assert_array_equal(open_store(remote.path).read([0, 39])[0], local.read([0, 39])[0])


def test_file_url_goes_through_fsspec(pair, tmp_path):
    store = open_store("file://" + str(pair["local"].path), cache_dir=tmp_path / "c")
    assert isinstance(store, RemoteStore)
    np.testing.assert_array_equal(store.read([2, 30])[1], pair["local"].read([2, 30])[1])
    made = convert(pair["src"], "file://" + str(tmp_path / "up.zarr"), chunk_samples=8, progress=False,
                   staging=tmp_path / "staging")
    np.testing.assert_array_equal(made.read([0, 39])[0], pair["local"].read([0, 39])[0])
    assert open_store(tmp_path / "up.zarr").meta["chunk_samples"] == 8  # an ordinary local store too


def _epoch(ds):
    with ds:
        return [(x.copy(), y.copy()) for x, y in ds]


@pytest.mark.slow
def test_dataset_with_worker_processes_after_a_parent_read(s3, pair, tmp_path):
    """The parent reads (its file system is live) before the workers fork; they make their own."""
    remote = _open(s3, pair, cache_dir=tmp_path / "cache")
    remote.read([0, 21])  # the parent used the store before forking
    opts = dict(batch_size=8, augment="standard", seed=3)
    got = _epoch(SegmentationDataset(remote, workers=2, use_multiprocessing=True, **opts))
    want = _epoch(SegmentationDataset(pair["local"], **opts))
    assert len(got) == len(want) == 5
    for (gx, gy), (wx, wy) in zip(got, want):
        np.testing.assert_array_equal(gx, wx)
        np.testing.assert_array_equal(gy, wy)
    remote.read([39])  # and the parent still reads afterwards


@pytest.mark.slow
def test_dataset_with_spawned_workers_and_a_bare_url(s3, pair, monkeypatch):
    """A URL alone (endpoint and credentials from the environment); the store pickled to spawn."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    ds = SegmentationDataset(pair["url"], 16, shuffle=False, workers=2, use_multiprocessing=True,
                             start_method="spawn")
    assert isinstance(ds.store, RemoteStore)
    got = _epoch(ds)
    want = _epoch(SegmentationDataset(pair["local"], 16, shuffle=False))
    for (gx, gy), (wx, wy) in zip(got, want):
        np.testing.assert_array_equal(gx, wx)
        np.testing.assert_array_equal(gy, wy)


@pytest.mark.slow
def test_fit_with_worker_processes(s3, pair, tmp_path):
    from streamseg.models import small_unet

    remote = _open(s3, pair, cache_dir=tmp_path / "cache")
    ds = SegmentationDataset(remote, 8, augment="light", workers=2, use_multiprocessing=True, keep_alive=0.5)
    model = small_unet((64, 64, 3), ds.num_classes, base_filters=4)
    with ds:
        history = model.fit(ds, epochs=1, steps_per_epoch=3, verbose=0)
    assert len(history.history["loss"]) == 1 and np.isfinite(history.history["loss"]).all()


def test_pickled_store_reuses_the_mirror_or_syncs_again(s3, pair, tmp_path):
    remote = _open(s3, pair, cache_dir=tmp_path / "cache")
    remote.read(np.arange(8))
    copy = pickle.loads(pickle.dumps(remote))
    assert copy.path == remote.path and repr(copy) == repr(remote)
    np.testing.assert_array_equal(copy.read([1, 6])[0], pair["local"].read([1, 6])[0])
    blob = pickle.dumps(remote)
    shutil.rmtree(remote.path)  # e.g. unpickled on another machine: the mirror is fetched again
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again.read([33])[1], pair["local"].read([33])[1])


def test_second_pass_reads_from_the_cache_with_the_server_gone(pair, tmp_path):
    with s3_server() as own:
        url = f"s3://{own.bucket('gone')}/d.zarr"
        convert(pair["src"], url, chunk_samples=4, progress=False, storage_options=own.options(),
                staging=tmp_path / "staging")
        quick = own.options(config_kwargs={"retries": {"max_attempts": 1}})
        store = open_store(url, storage_options=quick, cache_dir=tmp_path / "cache")
        first = store.read(np.arange(40))
        own.stop()
        second = store.read(np.arange(40)[::-1])  # every chunk from local disk, no server
        for a, b in zip(first, second):
            np.testing.assert_array_equal(a[::-1], b)
        assert store.names == pair["local"].names
        ds = SegmentationDataset(store, 8, shuffle=False, workers=2, use_multiprocessing=True)
        got = _epoch(ds)  # worker processes too read every chunk from the cache
        np.testing.assert_array_equal(np.concatenate([y for _, y in got]), first[1])
        store.cache.drop(["images/c/3/0/0/0"])
        with pytest.raises(RemoteStoreError) as err:  # a chunk not cached needs the server: one line
            store.read([12])
    assert "\n" not in str(err.value) and "Could not read s3://" in str(err.value)


def test_cache_stays_under_its_bound(s3, pair, tmp_path):
    chunk = max(os.path.getsize(p) for p in Path(pair["local"].path, "images", "c").rglob("0"))
    bound = 6 * chunk
    store = _open(s3, pair, cache_dir=tmp_path / "cache", cache_bytes=bound)
    local = pair["local"]
    for rep in range(2):
        for a in range(0, 40, 4):  # one chunk (images + masks) per read
            got = store.read(np.arange(a, a + 4))
            np.testing.assert_array_equal(got[0], local.read(np.arange(a, a + 4))[0])
            assert store.cache.chunk_bytes() <= bound
    assert 0 < store.cache.chunk_bytes()
    with pytest.raises(OptionError, match="cache_bytes"):
        _open(s3, pair, cache_bytes=0)


@pytest.mark.slow
def test_worker_processes_share_a_small_cache(s3, pair, tmp_path):
    chunk = max(os.path.getsize(p) for p in Path(pair["local"].path, "images", "c").rglob("0"))
    bound = 10 * chunk
    store = _open(s3, pair, cache_dir=tmp_path / "cache", cache_bytes=bound)
    for _ in range(2):
        got = _epoch(SegmentationDataset(store, 8, shuffle=False, workers=2, use_multiprocessing=True))
        want = _epoch(SegmentationDataset(pair["local"], 8, shuffle=False))
        for (gx, gy), (wx, wy) in zip(got, want):
            np.testing.assert_array_equal(gx, wx)
            np.testing.assert_array_equal(gy, wy)
        assert 0 < store.cache.chunk_bytes() <= bound


def test_chunk_evicted_between_fetch_and_read_is_fetched_again(s3, pair, tmp_path, monkeypatch):
    store = _open(s3, pair, cache_dir=tmp_path / "cache")
    store.read([0])
    (store.path / "images" / "c" / "0" / "0" / "0" / "0").unlink()  # another process evicted it
    real, calls = store.cache.missing, []

    def found_once(rels):  # ... just after this process found it present
        calls.append(rels)
        return [] if len(calls) == 1 else real(rels)

    monkeypatch.setattr(store.cache, "missing", found_once)
    np.testing.assert_array_equal(store.read([1])[0], pair["local"].read([1])[0])
    assert len(calls) == 2 and (store.path / "images" / "c" / "0" / "0" / "0" / "0").exists()


def test_damaged_cached_chunk_is_fetched_again(s3, pair, tmp_path):
    store = _open(s3, pair, cache_dir=tmp_path / "cache")
    store.read([5])
    path = store.path / "images" / "c" / "1" / "0" / "0" / "0"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    fresh = _open(s3, pair, cache_dir=tmp_path / "cache")  # another process, checking afresh
    np.testing.assert_array_equal(fresh.read([5])[0], pair["local"].read([5])[0])


def test_remote_memmap_refused_in_one_line(pair, tmp_path, s3):
    mm = convert(pair["src"], tmp_path / "m.memmap", format="memmap", progress=False)
    with pytest.raises(OptionError) as err:
        open_store("file://" + str(mm.path))
    assert "--format zarr" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(OptionError, match="--format zarr"):
        convert(pair["src"], f"s3://{s3.bucket()}/m", format="memmap", storage_options=s3.options())


def test_url_only_options_refused_for_local_paths(pair, tmp_path):
    with pytest.raises(OptionError, match="URL"):
        open_store(pair["local"].path, cache_dir=tmp_path)
    with pytest.raises(OptionError, match="URL destination"):
        convert(pair["src"], tmp_path / "x.zarr", storage_options={"anon": True}, progress=False)


def test_missing_store_and_existing_destination(s3, pair):
    with pytest.raises(StoreNotFoundError, match="No store at s3://"):
        open_store(f"s3://{s3.bucket()}/nothing.zarr", storage_options=s3.options())
    with pytest.raises(StoreExistsError, match="--overwrite"):
        convert(pair["src"], pair["url"], storage_options=s3.options(), progress=False)
    url = f"s3://{s3.bucket()}/typo.zarr"
    with pytest.raises(StreamsegError):  # a source that is not there: nothing is left at the URL
        convert(pair["root"] / "no-such-folder", url, storage_options=s3.options(), progress=False)
    assert RemoteLocation(url, s3.options()).sizes() == {}


def test_redaction_in_repr_messages_and_options(s3, pair, tmp_path):
    opts = s3.options(key=KEY_ID, secret=SECRET, client_kwargs={"aws_session_token": SECRET, "region_name": "x1"})
    shown = redact_options(opts)
    assert shown["endpoint_url"] == s3.endpoint and shown["client_kwargs"]["region_name"] == "x1"
    assert shown["key"] == shown["secret"] == shown["client_kwargs"]["aws_session_token"] == "***"
    loc = RemoteLocation(pair["url"], opts)
    assert SECRET not in repr(loc) and KEY_ID not in repr(loc)
    assert SECRET not in scrub(f"failed with {SECRET} and {KEY_ID}", opts) and KEY_ID not in scrub(KEY_ID, opts)
    assert scrub("s3://AKIA:pw@bucket/x") == "s3://***@bucket/x"
    store = open_store(pair["url"], storage_options=opts, cache_dir=tmp_path / "c")  # moto takes any keys
    text = repr(store) + str(store.storage_options) + str(pickle.loads(pickle.dumps(store)))
    assert SECRET not in text and KEY_ID not in text
    bad = dict(opts, endpoint_url=f"http://127.0.0.1:{free_port()}", config_kwargs={"retries": {"max_attempts": 1}})
    with pytest.raises(RemoteStoreError) as err:
        open_store(pair["url"], storage_options=bad)
    assert SECRET not in str(err.value) and KEY_ID not in str(err.value) and "'secret': '***'" in str(err.value)
    with pytest.raises(OptionError) as err:
        open_store(pair["url"], storage_options=dict(opts, no_such_option=SECRET))
    assert SECRET not in str(err.value)
    parsed = parse_storage_options(["endpoint_url=http://h:1", "anon=false", "secret=123456",
                                    "config_kwargs.max_pool_connections=64"])
    assert parsed == {"endpoint_url": "http://h:1", "anon": False, "secret": "123456",
                      "config_kwargs": {"max_pool_connections": 64}}
    with pytest.raises(OptionError) as err:
        parse_storage_options([f"secret{SECRET}"])
    assert SECRET not in str(err.value)


def _run_cli(argv, capsys):
    from streamseg.cli import main

    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_errors_are_one_line_without_secrets(s3, pair, capsys, tmp_path):
    secrets = ["--storage-option", f"key={KEY_ID}", "--storage-option", f"secret={SECRET}"]
    unreachable = ["--storage-option", f"endpoint_url=http://127.0.0.1:{free_port()}",
                   "--storage-option", 'config_kwargs={"retries": {"max_attempts": 1}}']
    cases = [
        ["convert", str(pair["src"]), "s3://no-such-bucket-here/x.zarr", "--quiet",
         "--storage-option", f"endpoint_url={s3.endpoint}", *secrets, "--staging", str(tmp_path / "st")],
        ["convert", str(pair["src"]), "s3://bucket/x.zarr", "--quiet", *unreachable, *secrets],
        ["info", "s3://no-such-bucket-here/x.zarr", "--storage-option", f"endpoint_url={s3.endpoint}", *secrets],
        ["info", pair["url"], *unreachable, *secrets],
    ]
    for argv in cases:
        rc, out, err = _run_cli(argv, capsys)
        assert rc == 2, (argv, err)
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert SECRET not in err + out and KEY_ID not in err + out, err
        assert err.startswith(f"streamseg {argv[0]}: error: ")
    assert not (tmp_path / "st").exists() or not any((tmp_path / "st").iterdir())  # nothing converted
    rc, out, err = _run_cli(["info", pair["url"], "--storage-option", f"endpoint_url={s3.endpoint}"], capsys)
    assert rc == 0 and pair["url"] in out and "40" in out


def test_interrupted_upload_is_refused_then_resumed(s3, pair, tmp_path, monkeypatch, capsys):
    url = f"s3://{s3.bucket()}/cut.zarr"
    real = remote_upload.upload_files
    sent: list[str] = []

    def flaky(loc, pairs):
        real(loc, pairs[:5])
        raise OSError("connection reset by peer")

    def counting(loc, pairs):
        sent.extend(rel for _, rel in pairs)
        real(loc, pairs)

    monkeypatch.setattr(remote_upload, "upload_files", flaky)
    with pytest.raises(StreamsegError):
        convert(pair["src"], url, chunk_samples=4, storage_options=s3.options(), staging=tmp_path / "st",
                progress=False)
    with pytest.raises(IncompleteStoreError, match="--resume") as err:
        open_store(url, storage_options=s3.options())
    assert "\n" not in str(err.value)
    with pytest.raises(StoreExistsError, match="--resume"):
        convert(pair["src"], url, chunk_samples=4, storage_options=s3.options(), staging=tmp_path / "st",
                progress=False)
    monkeypatch.setattr(remote_upload, "upload_files", counting)
    rc, _, err_text = _run_cli(["convert", str(pair["src"]), url, "--chunk-samples", "4", "--resume", "--quiet",
                                "--staging", str(tmp_path / "st"), "--storage-option",
                                f"endpoint_url={s3.endpoint}"], capsys)
    assert rc == 0, err_text
    total = len([p for p in Path(pair["local"].path).rglob("*") if p.is_file() and p.name != "manifest.json"])
    assert len(sent) == total - 5 and "manifest.json" not in sent  # only what was missing
    store = open_store(url, storage_options=s3.options())
    for got, want in zip(store.read(np.arange(40)), pair["local"].read(np.arange(40))):
        np.testing.assert_array_equal(got, want)
    assert not any((tmp_path / "st").iterdir())  # the staged store is gone


def _copy(s3, pair, name):
    """A server-side copy of the remote store (no conversion)."""
    url = f"s3://{s3.bucket()}/{name}"
    fs = RemoteLocation(url, s3.options()).fs
    fs.copy(pair["url"][len("s3://"):], url[len("s3://"):], recursive=True)
    return url


def test_overwrite_replaces_a_remote_store(s3, pair, tmp_path):
    url = _copy(s3, pair, "ow.zarr")
    again = convert(pair["src"], url, chunk_samples=8, storage_options=s3.options(), progress=False,
                    overwrite=True, staging=tmp_path)
    assert again.meta["chunk_samples"] == 8 and again.num_chunks == 5
    np.testing.assert_array_equal(again.read([39])[0], pair["local"].read([39])[0])
    assert "images/c/9/0/0/0" not in RemoteLocation(url, s3.options()).sizes()  # old chunks deleted


def test_corrupt_remote_chunk_is_reported_against_the_url(s3, pair, tmp_path, capsys):
    url = _copy(s3, pair, "bad.zarr")
    loc = RemoteLocation(url, s3.options())
    raw = bytearray(loc.fs.cat_file(loc.path("images/c/2/0/0/0")))
    raw[len(raw) // 2] ^= 0xFF
    loc.pipe("images/c/2/0/0/0", bytes(raw))
    store = open_store(url, storage_options=s3.options(), cache_dir=tmp_path / "c")
    with pytest.raises(CorruptChunkError) as err:
        store.read([9])
    assert "Chunk 2 of 'images' (samples 8-11)" in str(err.value) and url in str(err.value)
    assert str(store.path) not in str(err.value)
    loc.remove(["masks/c/4/0/0/0"])
    with pytest.raises(CorruptChunkError, match="is missing"):
        store.read([17])
    rc, out, _ = _run_cli(["verify", url, "--quiet", "--storage-option", f"endpoint_url={s3.endpoint}"], capsys)
    assert rc == 1
    assert "images chunk 2 (samples 8-11" in out and "masks chunk 4 (samples 16-19" in out and "missing" in out
    assert out.count("\n") == 2 and str(store.path) not in out
    rc, out, _ = _run_cli(["verify", pair["url"], "--quiet", "--storage-option", f"endpoint_url={s3.endpoint}"],
                          capsys)
    assert rc == 0 and "all files and chunks intact" in out
