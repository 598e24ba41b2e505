"""Conversion on a Dask cluster (``convert(..., dask=...)``, ``streamseg convert --dask``).

One LocalCluster (2 processes on 127.0.0.1) serves the module through its tcp:// address; the
killed-client test starts its own ``local:2`` clusters.  Every store is compared with one serial
conversion of the same synthetic source: the whole manifest, and every chunk file's crc32.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import psutil
import pytest

from conftest import write_pairs
from streamseg import IncompleteStoreError, OptionError, StoreNotFoundError, UnreadableFileError, convert, open_store
from streamseg.cli import main
from streamseg.store import dask_run

pytestmark = pytest.mark.slow

COUNT, SIDE, CHUNK = 240, 64, 16  # 15 chunks
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A synthetic source as .npy arrays, and its serial conversion."""
    from streamseg.io.synth import synth_sample

    root = tmp_path_factory.mktemp("dask_data")
    pairs = [synth_sample(i, size=(SIDE, SIDE), classes=3) for i in range(COUNT)]
    np.save(root / "x.npy", np.stack([p[0] for p in pairs]))
    np.save(root / "y.npy", np.stack([p[1] for p in pairs]))
    convert(images=root / "x.npy", masks=root / "y.npy", dst=root / "serial", chunk_samples=CHUNK, progress=False)
    return {"x": root / "x.npy", "y": root / "y.npy", "serial": root / "serial"}


@pytest.fixture(scope="module")
def scheduler() -> str:
    """The tcp:// address of a 2-process LocalCluster on 127.0.0.1."""
    from distributed import LocalCluster

    environ = dict(os.environ)  # the nannies set OMP_NUM_THREADS and more here: not for later tests
    try:
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address="127.0.0.1:0") as cluster:
            yield cluster.scheduler_address
    finally:
        os.environ.clear()
        os.environ.update(environ)


def _chunk_crcs(store: Path) -> dict[str, int]:
    files = sorted(p for name in ("images", "masks") for p in (store / name / "c").rglob("*") if p.is_file())
    return {str(p.relative_to(store)): zlib.crc32(p.read_bytes()) for p in files}


def assert_same_store(got: Path, want: Path) -> None:
    """Same manifest (no timing or host fields in it) and byte-identical chunk files."""
    a, b = json.loads((got / "manifest.json").read_text()), json.loads((want / "manifest.json").read_text())
    assert a["checksums"] == b["checksums"]
    assert a == b
    crcs = _chunk_crcs(got)
    assert len(crcs) == 2 * (-(-COUNT // CHUNK)) and crcs == _chunk_crcs(want)
    assert open_store(got).names == open_store(want).names


def _convert(data: dict[str, Path], dst: Path, dask: str, **options) -> None:
    options.setdefault("progress", False)
    convert(images=data["x"], masks=data["y"], dst=dst, chunk_samples=CHUNK, dask=dask, **options)


def test_cluster_store_equals_serial(data, scheduler, tmp_path, capsys):
    _convert(data, tmp_path / "dask", scheduler, progress="plain")
    assert_same_store(tmp_path / "dask", data["serial"])
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 5 and lines[-1].startswith(f"convert -> dask: {COUNT}/{COUNT} pairs (100%")


def _die_once(marker: Path, k: int, task):
    """Runs in a Dask worker: the first time chunk 3 comes, this worker process dies."""
    if k == 3 and not marker.exists():
        marker.write_text(str(os.getpid()))
        os._exit(1)
    return dask_run._run_chunk(k, task)  # the worker's own module is not patched


def test_worker_killed_mid_conversion_gives_same_store(data, scheduler, tmp_path, monkeypatch):
    marker = tmp_path / "died"
    monkeypatch.setattr(dask_run, "_run_chunk", functools.partial(_die_once, marker))
    _convert(data, tmp_path / "dask", scheduler)
    assert marker.exists()  # a worker process did die while writing chunk 3
    assert_same_store(tmp_path / "dask", data["serial"])


def test_bad_input_on_a_worker_is_the_serial_error(scheduler, tmp_path):
    from conftest import index_encoded

    images, masks = index_encoded(12)
    src = write_pairs(tmp_path / "src", images, masks)
    (src / "images" / "s0009.png").write_bytes(b"not a png")
    with pytest.raises(UnreadableFileError, match="s0009"):
        convert(src, tmp_path / "dst", chunk_samples=4, progress=False, dask=scheduler)
    with pytest.raises(IncompleteStoreError):
        open_store(tmp_path / "dst")


_KILLED_CLIENT = """
import sys, time
import streamseg.store.dask_run as d

def slow(k, task):  # pickled by value; runs in the cluster's workers
    from streamseg.store.dask_run import _run_chunk
    time.sleep(0.4)
    return _run_chunk(k, task)

d._run_chunk = slow
from streamseg import convert
convert(images=sys.argv[1], masks=sys.argv[2], dst=sys.argv[3], chunk_samples=int(sys.argv[4]), progress=False,
        dask="local:2")
"""


def test_client_killed_then_resume_gives_same_store(data, tmp_path):
    dst = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_CLIENT, str(data["x"]), str(data["y"]), str(dst),
                             str(CHUNK)], cwd=ROOT, stderr=subprocess.DEVNULL)
    progress = dst / "_progress.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if progress.exists() and len(progress.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    workers = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [json.loads(line)["chunk"] for line in progress.read_text().splitlines()]
    assert 3 <= len(done) < -(-COUNT // CHUNK) and len(workers) >= 2
    _, alive = psutil.wait_procs(workers, timeout=30)  # the cluster's workers end with their client
    assert alive == []
    with pytest.raises(IncompleteStoreError, match="--resume"):
        open_store(dst)
    kept = {k: (dst / "images" / "c" / str(k) / "0" / "0" / "0").stat().st_ino for k in done}
    environ = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_", "PYTHONHASHSEED")}
    _convert(data, dst, "local:2", resume=True)
    assert {k: os.environ.get(k) for k in environ} == environ  # what the nannies set here is put back
    assert_same_store(dst, data["serial"])
    assert {k: (dst / "images" / "c" / str(k) / "0" / "0" / "0").stat().st_ino for k in done} == kept  # not redone


@pytest.mark.parametrize("extra, expected", [
    (["--dask", "nonsense"], "--dask must be tcp://HOST:PORT"),
    (["--dask", "local:0"], "1 to 1024 worker processes"),
    (["--dask", "tcp://127.0.0.1:1"], "Cannot reach the Dask scheduler tcp://127.0.0.1:1 within 1 s"),
    (["--dask", "local:2", "--workers", "2"], "drop --workers"),
    (["--dask", "local:2", "--layout", "volumes"], "not --layout volumes"),
])
def test_cli_refuses_bad_dask_in_one_line(data, tmp_path, capsys, monkeypatch, extra, expected):
    monkeypatch.setattr(dask_run, "CONNECT_TIMEOUT_S", 1.0)
    dst = tmp_path / "dst"
    rc = main(["convert", "--images", str(data["x"]), "--masks", str(data["y"]), str(dst), "--quiet", *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("streamseg convert: error: ") and expected in err
    assert "Traceback" not in err and "Received: " in err
    assert not dst.exists()
    with pytest.raises(StoreNotFoundError):
        open_store(dst)


def test_parse_scheduler():
    assert dask_run.parse_scheduler("local:3") == ("local", 3)
    assert dask_run.parse_scheduler("tcp://10.0.0.5:8786") == ("tcp", "tcp://10.0.0.5:8786")
    assert dask_run.parse_scheduler("tcp://node-1.cluster:8786") == ("tcp", "tcp://node-1.cluster:8786")
    for bad in ("tcp://host", "tcp://host:0", "tcp://host:99999", "local:", "local:-1", "8786", "", None, 2):
        with pytest.raises(OptionError, match="Received"):
            dask_run.parse_scheduler(bad)


def test_worker_that_cannot_see_the_destination_says_so(tmp_path):
    from streamseg.store.converter import _ChunkTask
    from streamseg.store.writer import ChunkSink
    from streamseg import DestinationError

    task = _ChunkTask(None, ChunkSink(tmp_path / "not-here", {}), {})
    err = dask_run._run_chunk(0, task)
    assert isinstance(err, DestinationError) and "every worker sees" in str(err) and "not-here" in str(err)
