"""`convert` never loses data and never reports false success (issue 10, items 1, 2, 3 and 6).

Overwrite never deletes a source or anything that is not a store; one writer per destination
(lock); every planned chunk is checked on disk before the completion flag; workers die with
their parent; unwritable destinations, huge sizes and closed pipes end with one line (or
quietly), never a traceback.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from conftest import index_encoded, write_pairs
from streamseg import IncompleteStoreError, StoreExistsError, StoreNotFoundError, convert, open_store
from streamseg.cli import main
from streamseg.store.inspect import verify_store
from streamseg.store.lock import LOCK_NAME, DestinationLock

ENV = {**os.environ, "PYTHONPATH": os.getcwd()}
CLI = [sys.executable, "-m", "streamseg.cli"]


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the SHA-256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_main(capsys, *args: str) -> tuple[int, list[str]]:
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err.strip().splitlines()


def one_line_error(lines: list[str], command: str = "convert") -> str:
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"streamseg {command}: error: ") and "Traceback" not in lines[0]
    return lines[0]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    images, masks = index_encoded(6, h=8, w=10)
    return write_pairs(tmp_path / "src", images, masks)


# -- item 1: --overwrite never deletes the source or the user's files ---------------------------


def test_overwrite_refuses_a_store_holding_its_source(tmp_path, capsys):
    # the case: `convert data.zarr/raw data.zarr --overwrite` deleted the images first
    data = tmp_path / "data.zarr"
    images, masks = index_encoded(4, h=8, w=10)
    write_pairs(data / "raw", images, masks)
    (data / "manifest.json").write_text(json.dumps({"complete": True}))  # an old store was here
    before = tree_digest(data)
    rc, err = run_main(capsys, "convert", data / "raw", data, "--overwrite", "--quiet")
    assert rc == 2
    assert "holds the source" in one_line_error(err)
    assert tree_digest(data) == before  # byte for byte, and nothing added


def test_overwrite_refuses_a_store_inside_its_source(tmp_path, src, capsys):
    assert main(["convert", str(src), str(src / "store.zarr"), "--quiet"]) == 0
    before = tree_digest(src)
    rc, err = run_main(capsys, "convert", src, src / "store.zarr", "--overwrite", "--quiet")
    assert rc == 2 and "lies inside the source" in one_line_error(err)
    assert tree_digest(src) == before


def test_overwrite_refuses_a_store_holding_array_sources(tmp_path, capsys):
    images, masks = index_encoded(5)
    dst = tmp_path / "store"
    assert main(["synth", str(dst), "--to", "zarr", "--count", "3", "--size", "8", "8", "--quiet"]) == 0
    np.save(dst / "x.npy", images)
    np.save(dst / "y.npy", masks)
    before = tree_digest(dst)
    rc, err = run_main(capsys, "convert", "--images", dst / "x.npy", "--masks", dst / "y.npy", dst,
                       "--overwrite", "--quiet")
    assert rc == 2 and "holds the source" in one_line_error(err)
    assert tree_digest(dst) == before


@pytest.mark.parametrize("extra", ["notes.txt", "images/annotations.csv", "masks/c/0/README"])
def test_overwrite_refuses_a_store_with_foreign_files(tmp_path, src, capsys, extra):
    dst = tmp_path / "dst"
    convert(src, dst, chunk_samples=2, progress=False)
    (dst / extra).write_text("the user's")
    before = tree_digest(dst)
    rc, err = run_main(capsys, "convert", src, dst, "--overwrite", "--quiet")
    assert rc == 2
    line = one_line_error(err)
    assert "does not write" in line and Path(extra).name in line
    assert tree_digest(dst) == before


def test_overwrite_replaces_a_real_store_and_leaves_no_lock(tmp_path, src, backend):
    dst = tmp_path / "dst"
    convert(src, dst, format=backend, chunk_samples=2, progress=False)
    (dst / LOCK_NAME).write_text("999999\n")  # left behind by a killed conversion: not a lock any more
    store = convert(src, dst, format=backend, chunk_samples=4, overwrite=True, progress=False)
    assert store.chunk_samples == 4 and verify_store(dst, progress=False) == []
    assert not (dst / LOCK_NAME).exists() and not (dst / "_progress.jsonl").exists()


# -- item 2: one writer per destination; nothing unverified is marked complete -------------------


def test_second_writer_is_refused_naming_the_holder(tmp_path, src):
    dst = tmp_path / "dst"
    convert(src, dst, chunk_samples=2, progress=False)
    before = tree_digest(dst)
    with DestinationLock(dst):  # this process is "the first conversion"
        for flag in ("--overwrite", "--resume"):
            r = subprocess.run([*CLI, "convert", str(src), str(dst), flag, "--quiet"], env=ENV,
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 2, r.stderr
            assert f"PID {os.getpid()}" in one_line_error(r.stderr.strip().splitlines())
    assert tree_digest(dst) == before
    assert open_store(dst).meta["complete"]


def test_lock_file_alone_is_not_a_store(tmp_path):
    dst = tmp_path / "new" / "dst"
    with DestinationLock(dst):
        assert (dst / LOCK_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(StoreNotFoundError):
            open_store(dst)
        with pytest.raises(StoreExistsError, match=f"PID {os.getpid()}"):
            DestinationLock(dst).acquire()  # a second open file description conflicts, even here
    assert not dst.exists()  # created for nothing: removed again


def test_refusal_waits_for_the_holder_to_write_its_pid(tmp_path):
    """The holder writes its PID just after it locks: a writer refused in between still names it."""
    import fcntl
    import threading

    dst = tmp_path / "dst"
    dst.mkdir()
    fd = os.open(dst / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"999999999\n")  # a killed earlier holder's PID: not alive, not named
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(StoreExistsError, match=r"\(another process\)"):
            DestinationLock(dst).acquire()

        def write_pid() -> None:
            time.sleep(0.15)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

        writer = threading.Thread(target=write_pid)
        writer.start()
        with pytest.raises(StoreExistsError, match=f"PID {os.getpid()}"):
            DestinationLock(dst).acquire()
        writer.join()
    finally:
        os.close(fd)


@pytest.mark.parametrize("damage", ["chunk_missing", "chunk_changed", "array_meta_missing", "memmap_changed"])
def test_completion_flag_needs_every_chunk_on_disk(tmp_path, src, damage, monkeypatch):
    import streamseg.store.converter as conv

    backend = "memmap" if damage == "memmap_changed" else "zarr"
    dst = tmp_path / "dst"
    real_finalize = conv.finalize_store

    def tamper_then_finalize(path, plan):  # another process changes the store before the flag
        if damage == "chunk_missing":
            (path / "images" / "c" / "1" / "0" / "0" / "0").unlink()
        elif damage == "chunk_changed":
            chunk = path / "masks" / "c" / "2" / "0" / "0" / "0"
            raw = bytearray(chunk.read_bytes())
            raw[-1] ^= 0xFF
            chunk.write_bytes(bytes(raw))
        elif damage == "array_meta_missing":
            (path / "images" / "zarr.json").unlink()
        else:
            mm = np.load(path / "images.npy", mmap_mode="r+")
            mm[5, 0, 0, 0] ^= 0xFF
            mm.flush()
            del mm
        return real_finalize(path, plan)

    monkeypatch.setattr(conv, "finalize_store", tamper_then_finalize)
    with pytest.raises(IncompleteStoreError, match="Cannot mark .* complete"):
        convert(src, dst, format=backend, chunk_samples=2, progress=False)
    assert not (dst / "manifest.json").exists()
    with pytest.raises(IncompleteStoreError):
        open_store(dst)


def _race(cmds: list[list[str]]) -> list[tuple[int, str]]:
    procs = [subprocess.Popen(c, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    return [(p.wait(timeout=120), p.stderr.read().strip()) for p in procs]


def _assert_complete_and_verified(dst: Path, n: int) -> None:
    store = open_store(dst)
    assert store.meta["complete"] and len(store) == n and store.names[0] == "s0000"
    assert verify_store(dst, progress=False) == []
    left = {p.name for p in dst.iterdir()}
    assert not left & {LOCK_NAME, "_progress.jsonl", "_plan.json"}, left


@pytest.mark.slow
def test_two_concurrent_overwrites_never_leave_a_false_store(tmp_path):
    images, masks = index_encoded(24, h=8, w=8)
    src = write_pairs(tmp_path / "src", images, masks)
    dst = tmp_path / "dst"
    cmd = [*CLI, "convert", str(src), str(dst), "--overwrite", "--quiet", "--chunk-samples", "1"]
    refusals = 0
    for _ in range(20):
        results = _race([cmd, cmd])
        for rc, err in results:
            assert rc in (0, 2), err  # never a traceback
            if rc == 2:
                assert "is being written by another streamseg conversion (PID" in one_line_error(
                    err.splitlines())
                refusals += 1
        assert any(rc == 0 for rc, _ in results)
        _assert_complete_and_verified(dst, 24)
    np.testing.assert_array_equal(open_store(dst).read(np.arange(24))[0], images)
    print(f"{refusals} of 20 races ended with a refusal")


_FAIL_AT_CHUNK_3 = """
import sys
import streamseg.store.converter as c
orig = c._ChunkTask.__call__
def fail(self, k):
    if k == 3:
        raise KeyboardInterrupt
    return orig(self, k)
c._ChunkTask.__call__ = fail
c.convert(sys.argv[1], sys.argv[2], chunk_samples=1, progress=False)
"""


@pytest.mark.slow
def test_two_concurrent_resumes(tmp_path):
    images, masks = index_encoded(10, h=8, w=8)
    src = write_pairs(tmp_path / "src", images, masks)
    dst = tmp_path / "dst"
    for _ in range(4):
        subprocess.run([sys.executable, "-c", _FAIL_AT_CHUNK_3, str(src), str(dst)], env=ENV,
                       capture_output=True, timeout=120)
        with pytest.raises(IncompleteStoreError):
            open_store(dst)
        cmd = [*CLI, "convert", str(src), str(dst), "--resume", "--quiet", "--chunk-samples", "1"]
        results = _race([cmd, cmd])
        assert sorted(rc for rc, _ in results)[0] == 0, results
        for rc, err in results:
            assert rc in (0, 2), err
            if rc == 2:
                assert ("another streamseg conversion (PID" in err or "nothing to resume" in err), err
                one_line_error(err.splitlines())
        _assert_complete_and_verified(dst, 10)
        for p in list(dst.iterdir()):  # start the next try from scratch
            subprocess.run(["rm", "-rf", str(p)], check=True)


# -- item 3: workers end with their parent ---------------------------------------------------------

_SLOW_PARALLEL = """
import sys, time
import streamseg.store.converter as c
import streamseg.store._orphans as o
if sys.argv[3] == "poll":
    o._set_pdeathsig = lambda: False  # the portable fallback: a thread watching the parent
orig = c._ChunkTask.__call__
def slow(self, k):
    rec = orig(self, k)
    time.sleep(0.3)
    return rec
c._ChunkTask.__call__ = slow
print("started", flush=True)
c.convert(sys.argv[1], sys.argv[2], chunk_samples=1, workers=2, progress=False)
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["deathsig", "poll"])
def test_workers_die_with_a_killed_parent(tmp_path, mode):
    images, masks = index_encoded(40, h=8, w=8)
    src = write_pairs(tmp_path / "src", images, masks)
    dst = tmp_path / "dst"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_PARALLEL, str(src), str(dst), mode], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        progress = dst / "_progress.jsonl"
        while time.monotonic() < deadline:
            if progress.exists() and len(progress.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(workers, timeout=20)
        assert alive == [], f"workers outlived their parent: {alive}"
        out, _ = proc.communicate(timeout=20)  # the pipes close: a caller reading them does not hang
        assert out.startswith(b"started")
    finally:
        for w in workers:
            if w.is_running():
                w.kill()
    with pytest.raises(IncompleteStoreError):
        open_store(dst)
    store = convert(src, dst, chunk_samples=1, resume=True, progress=False)  # lock released
    np.testing.assert_array_equal(store.read(np.arange(40))[0], images)


# -- item 6: unwritable destinations, huge sizes, closed pipes --------------------------------------


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_destination_is_one_line(tmp_path, src, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for dst in (ro / "dst", ro):
            rc, err = run_main(capsys, "convert", src, dst, "--quiet")
            assert rc == 2 and "Cannot write the store" in one_line_error(err)
    finally:
        ro.chmod(0o755)


def test_read_only_file_system_is_one_line(tmp_path, src, capsys, monkeypatch):
    # as on a read-only mount (which a test cannot make): every write under dst fails with EROFS
    dst = tmp_path / "dst"
    convert(src, dst, chunk_samples=2, progress=False)
    before = tree_digest(dst)
    real_open, real_mkdir = os.open, os.mkdir

    def refuse(path) -> None:
        if Path(os.path.abspath(path)).is_relative_to(dst):
            raise OSError(errno.EROFS, "Read-only file system", str(path))

    def ro_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_open(path, flags, *a, **k)

    def ro_mkdir(path, *a, **k):
        refuse(path)
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(os, "open", ro_open)
    monkeypatch.setattr(os, "mkdir", ro_mkdir)
    for args in ([], ["--overwrite"], ["--resume"]):
        target = dst if args else dst / "sub"
        rc, err = run_main(capsys, "convert", src, target, "--quiet", *args)
        assert rc == 2 and "read-only" in one_line_error(err), err
    monkeypatch.undo()
    assert tree_digest(dst) == before


def test_destination_below_a_file_is_one_line(tmp_path, src, capsys):
    (tmp_path / "afile").write_text("x")
    for dst in (tmp_path / "afile", tmp_path / "afile" / "dst"):
        rc, err = run_main(capsys, "convert", src, dst, "--quiet")
        assert rc == 2 and "file" in one_line_error(err)
    assert (tmp_path / "afile").read_text() == "x"


def test_huge_size_is_refused_before_any_work(tmp_path, src, capsys, monkeypatch):
    rc, err = run_main(capsys, "convert", src, tmp_path / "a", "--size", "100000", "100000")
    assert rc == 2 and "at most 16384" in one_line_error(err)
    for to in ("files", "zarr"):  # synth makes samples of --size itself: checked before the first
        rc, err = run_main(capsys, "synth", tmp_path / "a", "--to", to, "--size", "100000", "100000")
        assert rc == 2 and "at most 16384" in one_line_error(err, "synth")

    class Little:  # 1 GiB free: a 16000x16000 chunk does not fit
        available = 2**30

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Little())
    rc, err = run_main(capsys, "convert", src, tmp_path / "b", "--size", "16000", "16000")
    line = one_line_error(err)
    assert rc == 2 and "GiB" in line and "--chunk-samples" in line and "--workers" in line
    # the bound also holds for chunks of big source images, whatever --size
    rc, err = run_main(capsys, "convert", src, tmp_path / "c", "--chunk-samples", "3", "--workers", "2")
    assert rc == 0, err
    Little.available = 2000
    rc, err = run_main(capsys, "convert", src, tmp_path / "d", "--chunk-samples", "3")
    assert rc == 2 and "One chunk of 3 8x10x3 uint8" in one_line_error(err)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "d").exists()


def test_info_into_a_closed_pipe_exits_quietly(tmp_path):
    dst = tmp_path / "s"
    assert main(["synth", str(dst), "--to", "zarr", "--count", "3", "--size", "8", "8", "--quiet"]) == 0
    for args in (["info", str(dst)], ["info", str(dst), "--json"], ["verify", str(dst), "--quiet"]):
        read_end, write_end = os.pipe()
        os.close(read_end)  # like `| head` that has already exited
        try:
            r = subprocess.run([*CLI, *args], stdout=write_end, stderr=subprocess.PIPE, env=ENV,
                               timeout=120)
        finally:
            os.close(write_end)
        assert r.stderr == b"", r.stderr.decode()
        assert r.returncode == 141
