"""What checking reads (``verify_reads``) costs batch production.

Builds (once) a synthetic store per backend, then produces every float32 batch of an epoch
with :class:`BatchProducer` twice, once from a store opened with ``verify_reads=True`` and
once with ``False``, alternating which goes first, for several rounds (epochs).  Prints, in
milliseconds per batch, the min / median / max over rounds of the epoch means, and the
"floor": the mean over batches of each batch's fastest time over all rounds, which filters
out other processes on a shared machine best.  CPU time of this process is shown as well::

    python benchmarks/verify_cost.py                       # 1024 x 256x256x3, batch 32, window order
    python benchmarks/verify_cost.py --shuffle uniform --rounds 9
    python benchmarks/verify_cost.py --fresh               # every round a process's first epoch
    python benchmarks/verify_cost.py --legacy              # a store without read checksums

Reads are checked once per process (and file version), so by default, with the stores opened
once and a first (uncounted) round reading everything, the rounds measure the steady state:
epoch 2 onwards.  ``--fresh`` opens new stores for every round, so each round is a first
epoch, where every chunk file / sample is checked.  ``--legacy`` (implies ``--fresh``) drops
``read_checksums`` from the opened manifest, so reads are checked as for a store written
before they existed: each chunk's crc32 the first time a process reads it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from streamseg import open_store
from streamseg.io.sources import SynthSource
from streamseg.pipeline.batches import BatchOptions, BatchProducer, epoch_order
from streamseg.store.converter import convert_source


def _store_path(root: Path, fmt: str, count: int, size: tuple[int, int]) -> Path:
    path = root / f"verify_cost_{count}_{size[0]}x{size[1]}.{fmt}"
    if not (path / "manifest.json").exists():
        convert_source(SynthSource(count, size=size, classes=3), path, format=fmt, overwrite=True,
                       progress=False)
    return path


def _producer(path: Path, verify: bool, legacy: bool) -> BatchProducer:
    store = open_store(path, verify_reads=verify)
    if legacy:
        store.meta.pop("read_checksums", None)
    return BatchProducer(store, BatchOptions(num_classes=3, image_scale=np.full(3, 1 / 255, np.float32)))


def measure(path: Path, *, rounds: int, batch: int, shuffle: str, legacy: bool,
            fresh: bool) -> dict[bool, dict[str, list]]:
    """``{verify: {"wall": [[ms per batch] per round], "cpu": ...}}``."""
    producers = {v: _producer(path, v, legacy) for v in (True, False)}
    store = producers[True].store
    h, w, c = store.image_shape
    out = {"images": np.empty((batch, h, w, c), np.float32), "masks": np.empty((batch, h, w, 1), np.int32)}
    batches = len(store) // batch
    times: dict[bool, dict[str, list]] = {v: {"wall": [], "cpu": []} for v in (True, False)}
    for r in range(-1, rounds):  # round -1 warms the page cache and is not counted
        if fresh or legacy:
            producers = {v: _producer(path, v, legacy) for v in (True, False)}
        order = epoch_order(np.arange(len(store)), seed=0, epoch=r + 1, mode=shuffle,
                            chunk_samples=store.chunk_samples, window_chunks=-(-2 * batch // store.chunk_samples))
        wall: dict[bool, list[float]] = {True: [], False: []}
        cpu: dict[bool, list[float]] = {True: [], False: []}
        for b in range(batches):
            task = (r + 1, order[b * batch : (b + 1) * batch])
            for verify in ((True, False) if (r + b) % 2 == 0 else (False, True)):
                t0, c0 = time.perf_counter(), time.process_time()
                producers[verify].produce(task, out)
                wall[verify].append((time.perf_counter() - t0) * 1000)
                cpu[verify].append((time.process_time() - c0) * 1000)
        if r >= 0:
            for v in (True, False):
                times[v]["wall"].append(wall[v])
                times[v]["cpu"].append(cpu[v])
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp"), help="where the synthetic stores live")
    parser.add_argument("--count", type=int, default=1024)
    parser.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7, help="epochs timed per setting")
    parser.add_argument("--shuffle", choices=("window", "uniform", "none"), default="window")
    parser.add_argument("--formats", nargs="+", default=["zarr", "memmap"])
    parser.add_argument("--fresh", action="store_true", help="new stores every round: first epochs (see above)")
    parser.add_argument("--legacy", action="store_true", help="a store without read checksums (see above)")
    args = parser.parse_args()
    from numcodecs import blosc

    blosc.use_threads = False  # as in the dataset's workers
    print(f"# {args.count} x {args.size[0]}x{args.size[1]}x3 uint8, batch {args.batch}, shuffle {args.shuffle}, "
          f"{args.rounds} rounds, on/off alternating per batch, "
          f"{'legacy store, first epochs' if args.legacy else 'first epochs' if args.fresh else 'steady state'}")
    print(f"{'format':8} {'verify':6} {'clock':5} {'min':>7} {'median':>7} {'max':>7} {'floor':>7}   ms per batch")
    for fmt in args.formats:
        path = _store_path(args.dir, fmt, args.count, tuple(args.size))
        times = measure(path, rounds=args.rounds, batch=args.batch, shuffle=args.shuffle, legacy=args.legacy,
                        fresh=args.fresh)
        for clock in ("wall", "cpu"):
            summary = {}
            for verify in (False, True):
                per_round = [statistics.fmean(t) for t in times[verify][clock]]
                floor = statistics.fmean(np.min(np.array(times[verify][clock]), axis=0))
                summary[verify] = (statistics.median(per_round), floor)
                print(f"{fmt:8} {'on' if verify else 'off':6} {clock:5} {min(per_round):7.2f} "
                      f"{statistics.median(per_round):7.2f} {max(per_round):7.2f} {floor:7.2f}")
            med = summary[True][0] / summary[False][0] - 1
            floor = summary[True][1] / summary[False][1] - 1
            print(f"{fmt:8} overhead {clock:5}  median {med:+.1%}  floor {floor:+.1%}")


if __name__ == "__main__":
    main()
