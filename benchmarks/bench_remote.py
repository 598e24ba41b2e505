"""Reading a store from S3-compatible object storage: samples/s with and without the chunk cache,
against the same store on local disk.

Builds a synthetic zarr store on local disk, uploads it to an S3 server, then reads epochs of
shuffled batches (``Store.read``, one process: the raw reading a worker does) from

* ``local``: the store on local disk;
* ``s3 no cache``: the S3 store with a cache bound of one batch, so every epoch fetches every
  chunk again (each batch's missing chunks of both arrays in one concurrent round of requests);
* ``s3 cache``: the S3 store with a cache holding it all: epoch 1 fetches, later epochs read
  local disk.

By default the server is moto's, started here on 127.0.0.1 (a Python server: far slower per
request than S3 or MinIO, so read the ``s3`` rows as a lower bound); ``--endpoint`` and
``--bucket`` use a running one (credentials from the environment)::

    python benchmarks/bench_remote.py                       # 512 x 128x128x3, chunks of 8, 2 epochs
    python benchmarks/bench_remote.py --count 2048 --epochs 3 --out remote.json
    python benchmarks/bench_remote.py --endpoint http://localhost:9000 --bucket bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from streamseg import open_store
from streamseg.io.sources import SynthSource
from streamseg.store.converter import convert_source
from streamseg.store.remote_fs import RemoteLocation
from streamseg.store.remote_upload import upload_store


def _epoch_rates(store: Any, epochs: int, batch: int, seed: int) -> list[float]:
    """Samples/s of each epoch of shuffled batches."""
    rates = []
    n = len(store)
    for e in range(epochs):
        order = np.random.default_rng(seed + e).permutation(n)
        t0 = time.perf_counter()
        for a in range(0, n - batch + 1, batch):
            store.read(order[a : a + batch])
        rates.append((n // batch) * batch / (time.perf_counter() - t0))
    return rates


def _start_moto() -> tuple[Any, str]:
    """moto's server in a process of its own (in this one it would share our GIL)."""
    import socket
    import subprocess
    import sys
    import urllib.request

    for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(k, v)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"moto's server did not start on port {port}") from None
            time.sleep(0.2)
    return proc, endpoint


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    server = None
    try:
        endpoint = args.endpoint
        if endpoint is None:
            server, endpoint = _start_moto()
        options = {"endpoint_url": endpoint}
        bucket = args.bucket or "bench-remote"
        url = f"s3://{bucket}/bench-{args.count}-{args.size}.zarr"
        local = convert_source(SynthSource(args.count, size=(args.size, args.size), classes=3), root / "local.zarr",
                               chunk_samples=args.chunk_samples, progress=False)
        loc = RemoteLocation(url, options)
        if args.bucket is None:
            loc.fs.mkdir(bucket)
        t0 = time.perf_counter()
        upload_store(local.path, loc, progress=False)
        upload_s = time.perf_counter() - t0
        chunk_bytes = sum(p.stat().st_size for p in local.path.rglob("*") if p.is_file() and "/c/" in p.as_posix())
        per_batch = 2 * chunk_bytes * args.batch // max(1, args.count) + 1  # about one batch of chunks
        rows: list[dict[str, Any]] = []
        for mode, store in (
            ("local", open_store(local.path)),
            ("s3 no cache", open_store(url, storage_options=options, cache_dir=root / "tiny", cache_bytes=per_batch)),
            ("s3 cache", open_store(url, storage_options=options, cache_dir=root / "cache",
                                    cache_bytes=4 * chunk_bytes + 2**20)),
        ):
            for e, rate in enumerate(_epoch_rates(store, args.epochs, args.batch, args.seed), 1):
                rows.append({"mode": mode, "epoch": e, "samples_per_s": rate})
        return {"count": args.count, "size": args.size, "chunk_samples": args.chunk_samples, "batch": args.batch,
                "chunk_files_bytes": chunk_bytes, "upload_s": upload_s,
                "server": "moto (local process)" if server is not None else endpoint, "rows": rows}
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=512, help="samples (default 512)")
    p.add_argument("--size", type=int, default=128, help="image side (default 128)")
    p.add_argument("--chunk-samples", type=int, default=8, help="samples per chunk (default 8)")
    p.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per mode (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--endpoint", default=None, help="a running S3 server (default: start moto here)")
    p.add_argument("--bucket", default=None, help="an existing bucket on --endpoint")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    res = run(args)
    print(f"{res['count']} samples of {res['size']}x{res['size']}x3 uint8, chunks of {res['chunk_samples']}, "
          f"batch {res['batch']}; {res['chunk_files_bytes'] / 2**20:.1f} MiB of chunk files, uploaded in "
          f"{res['upload_s']:.2f} s to {res['server']}")
    print(f"{'mode':<14}{'epoch':>6}{'samples/s':>12}")
    for r in res["rows"]:
        print(f"{r['mode']:<14}{r['epoch']:>6}{r['samples_per_s']:>12.0f}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
