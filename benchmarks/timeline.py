"""Timeline of input production during ``model.fit``: when each worker is busy, when the
training loop computes, and how long each step waits for its batch (issue 14's stall target).

Usage::

    python benchmarks/timeline.py --backend memmap --workers 2 --share 0.8 --epochs 3 \\
        --out benchmarks/results/timeline_memmap.json --plot benchmarks/results/timeline_memmap.png

First the pipeline's capacity is measured (``fit`` with no compute per step); then a simulated
accelerator spends ``1 / (share * capacity)`` per step (sleeping, GIL released, like a GPU) and
the timeline is recorded:

- workers: ``time.monotonic()`` (system-wide on Linux) before and after every
  ``BatchProducer.produce`` call, per worker process (a wrapper sent to the workers);
- consumer: the start and end of every simulated compute step (inside the train step's
  ``tf.numpy_function``); the gap between the end of one step and the start of the next is
  the training loop's time between steps (waiting for the batch, plus Keras's own work).

Over the timed steps (the first ``--warmup`` steps are left out: workers starting),
``overhead = 1 - compute / wall`` counts every gap between steps, Keras's own included;
``stall`` compares with the same fit on one batch already in memory
(``tf.data.Dataset.from_tensors``, same steps and epochs), as ``streamseg bench`` does: the share
of the time the loop waits for its input beyond what the loop itself takes, where the loop's own
time is compute plus the floor runs' median gap per step within an epoch (the median over
``--floor-runs`` runs, default 3, of each run's median: one run's moved by 0.5 ms between runs)
and their smallest gap at an epoch boundary, so that one slow step of the floor run does not
hide a stall (``stall_first_floor``: against the first floor run alone, the measure before
``--floor-runs``);
``stall_within_epochs`` is the part of it inside epochs (gaps at epoch boundaries left out);
``stall_vs_floor_wall = 1 - floor_wall / wall`` is ``streamseg bench``'s plain ratio.  Gaps are split
into those at epoch boundaries and the others, and every gap's excess over the floor's median
gap into ``excess_by_cause``: ``late`` while the step's batch was still being produced (its
worker span ended after the gap began), ``delivery`` when it was ready in its slot and the main
process had not handed it over yet.  ``main_cpu_ms_per_step`` is the main process's CPU time
(all threads: Keras, TensorFlow, the hand-over) per step, for the run and the floor;
``steal_share`` (and ``floor_steal_share``) the share of the cores' time the hypervisor took
during each fit (``/proc/stat``), a neighbour's noise that stalls the loop too.  With
``--beside-load`` the floor loop runs once more beside as many CPU-burning processes as
workers, each busy the share of the time the workers were (random periods of 10-30 ms): ``floor_beside_load.stall``,
by the same formula against the quiet floor, is what contention for the cores alone costs a
loop with no input to wait for.  Needs matplotlib for ``--plot`` (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

__all__ = ["TimedProducer", "run", "main"]


class TimedProducer:
    """Wraps a BatchProducer; each process appends ``start end epoch first_index`` lines to its
    own file in ``folder`` (one write per batch, after the batch: no effect on its timing)."""

    def __init__(self, inner: Any, folder: str) -> None:
        self.inner, self.folder = inner, folder

    def setup_process(self) -> None:
        # the producer's process-wide settings (OpenCV sequential in workers that fill the
        # cores): without this forward every worker ran OpenCV's own pool, a second busy thread
        fn = getattr(self.inner, "setup_process", None)
        if fn is not None:
            fn()

    def setup(self) -> None:
        self.inner.setup()

    def describe(self, task: Any, shown: int = 4) -> str:
        return self.inner.describe(task, shown)

    def produce(self, task: Any, out: dict[str, np.ndarray]) -> int:
        t0 = time.monotonic()
        n = self.inner.produce(task, out)
        t1 = time.monotonic()
        with open(os.path.join(self.folder, f"w{os.getpid()}.txt"), "a") as fh:
            fh.write(f"{t0:.6f} {t1:.6f} {int(task[0])} {int(np.asarray(task[1])[0])}\n")
        return n


def _model(step_s: float, log: list[tuple[float, float]]) -> Any:
    import keras
    import tensorflow as tf

    def compute(x: np.ndarray) -> np.float32:
        t0 = time.monotonic()
        if step_s > 0:
            time.sleep(step_s)
        log.append((t0, time.monotonic()))
        return np.float32(0.0)

    class Simulated(keras.Model):
        def call(self, inputs: Any) -> Any:
            return inputs

        def train_step(self, data: Any) -> dict[str, Any]:
            loss = tf.numpy_function(compute, [tf.reshape(data[0], [-1])[:1]], tf.float32, stateful=True)
            return {"loss": loss}

    model = Simulated()
    model.compile()
    return model


def floor_run(store: str, *, step_s: float, epochs: int, batch_size: int, dtype: str, **_: Any) -> dict[str, Any]:
    """The same fit on one batch already in memory (``tf.data.Dataset.from_tensors``, as many
    batches per epoch): the loop's own time between steps, with no input to wait for."""
    import tensorflow as tf
    from streamseg import SegmentationDataset

    ds = SegmentationDataset(store, batch_size, workers=0, drop_remainder=True, dtype=dtype)
    x, y = ds[0]
    n = len(ds)
    cached = tf.data.Dataset.from_tensors((x, y)).repeat(n)
    steps: list[tuple[float, float]] = []
    model = _model(step_s, steps)
    c0, s0, t0 = _cpu(), _steal(), time.monotonic()
    model.fit(cached, epochs=epochs, verbose=0)
    t1 = time.monotonic()
    return {"t0": t0, "t1": t1, "steps": steps, "busy": {}, "batches_per_epoch": n,
            "main_cpu_ms_per_step": 1e3 * (_cpu() - c0) / (epochs * n),
            "steal_share": steal_share(_steal() - s0, t1 - t0)}


def _cpu() -> float:
    """CPU seconds of this process (all its threads, not its children)."""
    return sum(os.times()[:2])


def _steal() -> float:
    """CPU seconds the hypervisor took from this VM's CPUs so far (``steal`` of ``/proc/stat``;
    0 where there is none): a noisy neighbour, not our pipeline, so runs report it beside the stall."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def steal_share(steal_s: float, wall_s: float) -> float:
    """Steal seconds as a share of the CPU time the VM's cores had over ``wall_s``."""
    return steal_s / ((os.cpu_count() or 1) * wall_s) if wall_s > 0 else 0.0


def run(store: str, *, workers: int, step_s: float, epochs: int, batch_size: int, augment: str,
        dtype: str, priority: str) -> dict[str, Any]:
    """One fit of ``epochs`` epochs with ``step_s`` of compute per step; returns the timeline."""
    from streamseg import SegmentationDataset

    ds = SegmentationDataset(store, batch_size, augment=augment, shuffle="window", workers=workers,
                             use_multiprocessing=True, drop_remainder=True, dtype=dtype,
                             worker_priority=priority)
    with tempfile.TemporaryDirectory(prefix="streamseg-timeline-") as folder:
        ds._feeder.producer = TimedProducer(ds._feeder.producer, folder)
        steps: list[tuple[float, float]] = []
        model = _model(step_s, steps)
        c0, s0, t0 = _cpu(), _steal(), time.monotonic()
        model.fit(ds, epochs=epochs, verbose=0, callbacks=[ds.epoch_callback()])
        t1, c1, s1 = time.monotonic(), _cpu(), _steal()
        ds.close()
        # which batch of its epoch each span made (by its first sample): step k of the fit takes
        # batch k % n of epoch k // n
        first = {(e, int(ds.batch_indices(i, e)[0])): i for e in range(epochs) for i in range(len(ds))}
        busy = {}
        for i, path in enumerate(sorted(Path(folder).glob("w*.txt"))):
            rows = [line.split() for line in path.read_text().splitlines()]
            busy[f"worker {i + 1}"] = [(float(a), float(b), int(e), first.get((int(e), int(f)), -1))
                                       for a, b, e, f in rows]
    return {"t0": t0, "t1": t1, "steps": steps, "busy": busy, "batches_per_epoch": len(ds),
            "main_cpu_ms_per_step": 1e3 * (c1 - c0) / (epochs * len(ds)), "steal_share": steal_share(s1 - s0, t1 - t0)}


def analyse(tl: dict[str, Any], warmup: int) -> dict[str, Any]:
    steps, per_epoch = tl["steps"], tl["batches_per_epoch"]
    timed = steps[warmup:]
    wall = timed[-1][1] - timed[0][0]
    compute = sum(b - a for a, b in timed)
    gaps = [(steps[i + 1][0] - steps[i][1], (i + 1) % per_epoch == 0) for i in range(warmup, len(steps) - 1)]
    inner = [g for g, edge in gaps if not edge]
    edges = [g for g, edge in gaps if edge]
    lo, hi = timed[0][0], timed[-1][1]
    work = {name: sum(max(0.0, min(b, hi) - max(a, lo)) for a, b, *_ in spans) / wall
            for name, spans in tl["busy"].items()}
    return {"timed_steps": len(timed), "wall_s": wall, "compute_s": compute, "overhead": 1.0 - compute / wall,
            "gap_ms_median": 1e3 * float(np.median(inner)) if inner else None,
            "gap_ms_p95": 1e3 * float(np.percentile(inner, 95)) if inner else None,
            "gap_ms_max": 1e3 * max(inner) if inner else None,
            "gap_s_inner_total": float(sum(inner)), "epoch_edge_gaps_ms": [1e3 * g for g in edges],
            "worker_busy_share": work, "main_cpu_ms_per_step": tl.get("main_cpu_ms_per_step"),
            "steal_share": tl.get("steal_share")}


def combine_floors(floors: list[dict[str, Any]]) -> dict[str, Any]:
    """One floor from several runs of the cached-data loop: the median of their median gaps
    (the loop's own time per gap moved by 0.5 ms between single runs, 1.1-2.1 ms, and every
    stall figure with it), every run's epoch-boundary gaps (:func:`stall_against` takes the
    smallest), and the median of their wall times and CPU per step."""
    if len(floors) == 1:
        return floors[0]
    return {"gap_ms_median": float(np.median([f["gap_ms_median"] for f in floors])),
            "epoch_edge_gaps_ms": [g for f in floors for g in f["epoch_edge_gaps_ms"]],
            "wall_s": float(np.median([f["wall_s"] for f in floors])),
            "main_cpu_ms_per_step": float(np.median([f["main_cpu_ms_per_step"] for f in floors])),
            "steal_share": float(np.mean([f["steal_share"] for f in floors])),
            "gap_ms_medians": [f["gap_ms_median"] for f in floors]}


def stall_against(res: dict[str, Any], floor: dict[str, Any]) -> float:
    """Share of ``res``'s wall time beyond its compute and the loop's own time per gap.

    Robust to one slow step of the floor run (a 0.9 s pause was seen in one): the loop's own
    time per gap is the floor's median gap, within an epoch, and its smallest at a boundary.
    """
    edge = float(min(floor["epoch_edge_gaps_ms"])) / 1e3 if floor["epoch_edge_gaps_ms"] else 0.0
    n_edges = len(res["epoch_edge_gaps_ms"])
    n_inner = res["timed_steps"] - 1 - n_edges
    own = res["compute_s"] + n_inner * floor["gap_ms_median"] / 1e3 + n_edges * edge
    return max(0.0, 1.0 - own / res["wall_s"])


def stall_within_epochs(res: dict[str, Any], floor: dict[str, Any]) -> float:
    """The part of :func:`stall_against` that lies inside epochs: the gaps between steps of
    one epoch beyond the floor's median gap, as a share of ``res``'s wall time.

    Epoch boundaries left out: the floor's own loop (``from_tensors``) sometimes waits ~1.2 s
    for the first batch of its second epoch, on a quiet machine too, which would otherwise
    count as the contention of a run beside CPU hogs.
    """
    n_inner = res["timed_steps"] - 1 - len(res["epoch_edge_gaps_ms"])
    own = n_inner * floor["gap_ms_median"] / 1e3
    return max(0.0, (res["gap_s_inner_total"] - own) / res["wall_s"])


def _hog(duty: float, stop: Any, seed: int, ready: Any, cpu: int | None = None) -> None:
    """Burn one core ``duty`` of the time until ``stop`` is set, in periods of 10-30 ms drawn
    at random (a fixed period would keep the hogs in step with each other and beat against
    the consumer's step); confined to ``cpu`` when given."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    rng = np.random.default_rng(seed)
    ready.set()
    while not stop.is_set():
        period = rng.uniform(0.01, 0.03)
        end = time.monotonic() + duty * period
        while time.monotonic() < end:
            pass
        time.sleep(max(0.0, (1.0 - duty) * period))


def beside_hogs(hogs: int, duty: float, fn: Any, *args: Any, cpus: list[int] | None = None, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` while ``hogs`` processes each keep a core ``duty`` busy (hog ``k``
    confined to ``cpus[k]`` when ``cpus`` is given)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    ready = [ctx.Event() for _ in range(hogs)]
    procs = [ctx.Process(target=_hog, args=(duty, stop, seed, ready[seed], cpus[seed] if cpus else None),
                         daemon=True) for seed in range(hogs)]
    for proc in procs:
        proc.start()
    for event in ready:  # a spawned hog imports this module first: a CPU burst of its own
        event.wait(60)
    time.sleep(0.5)
    try:
        return fn(*args, **kwargs)
    finally:
        stop.set()
        for proc in procs:
            proc.join(5)


def split_late(tl: dict[str, Any], warmup: int, own_gap_s: float) -> dict[str, float]:
    """Split the wait beyond ``own_gap_s`` per step into the part where the step's batch was
    still being produced when the gap began (``late``) and the rest (``delivery``: the batch
    was ready in its slot, the main process had not handed it over yet), as shares of wall."""
    steps, n = tl["steps"], tl["batches_per_epoch"]
    ready = {(e, i): b for spans in tl["busy"].values() for a, b, e, *rest in spans for i in rest}
    late = delivery = 0.0
    for k in range(warmup + 1, len(steps)):
        excess = steps[k][0] - steps[k - 1][1] - own_gap_s
        done = ready.get(divmod(k, n))
        if excess <= 0 or done is None:
            continue
        behind = min(excess, max(0.0, done - steps[k - 1][1]))
        late += behind
        delivery += excess - behind
    wall = steps[-1][1] - steps[warmup][0]
    return {"late": late / wall, "delivery": delivery / wall}


def plot(tl: dict[str, Any], res: dict[str, Any], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = tl["steps"][0][0]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(12, 5.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    rows = list(tl["busy"]) + ["training loop (compute)"]
    colours = ["tab:blue", "tab:orange", "tab:purple", "tab:brown"]
    for r, name in enumerate(rows):
        spans = tl["steps"] if name.startswith("training") else tl["busy"][name]
        ax.broken_barh([(a - t0, b - a) for a, b, *_ in spans], (r - 0.4, 0.8),
                       facecolors="tab:green" if name.startswith("training") else colours[r % len(colours)])
    ax.set_yticks(range(len(rows)), rows)
    ax.set_title(title)
    per_epoch = tl["batches_per_epoch"]
    for i in range(per_epoch, len(tl["steps"]), per_epoch):
        for a in (ax, ax2):
            a.axvline(tl["steps"][i][0] - t0, color="grey", lw=0.8, ls=":")
    xs = [tl["steps"][i + 1][0] - t0 for i in range(len(tl["steps"]) - 1)]
    ys = [1e3 * (tl["steps"][i + 1][0] - tl["steps"][i][1]) for i in range(len(tl["steps"]) - 1)]
    ax2.plot(xs, ys, ".", ms=3, color="tab:red")
    ax2.set_ylabel("gap before step (ms)")
    ax2.set_xlabel("seconds (dotted: epoch boundaries)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default=None, help="store path (default: synthetic data of --backend)")
    p.add_argument("--backend", choices=["zarr", "memmap"], default="memmap")
    p.add_argument("--data", default=str(ROOT / "bench_data"))
    p.add_argument("--count", type=int, default=512)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--share", type=float, default=0.8, help="share of the measured capacity the consumer asks for")
    p.add_argument("--capacity", type=float, default=None, help="batches/s (default: measured first)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=4, help="first steps left out of the figures")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--augment", default="standard")
    p.add_argument("--dtype", choices=["float32", "uint8"], default="float32")
    p.add_argument("--worker-priority", choices=["normal", "low", "idle"], default="normal")
    p.add_argument("--beside-load", action="store_true",
                   help="also run the cached-data loop beside --workers CPU hogs as busy as the workers were")
    p.add_argument("--floor-runs", type=int, default=3,
                   help="runs of the cached-data loop; the stall is against the median of their median gaps")
    p.add_argument("--out", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--replot", default=None, help="redraw --plot from this --out JSON, measure nothing")
    args = p.parse_args(argv)
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        plot(saved["timeline"], saved["result"], args.plot or args.replot[:-5] + ".png", title(saved["result"]))
        return 0
    store = args.store
    if store is None:
        from compare import prepare_stores

        store = prepare_stores(args.data, args.count, formats=(args.backend,))[args.backend]
    common = dict(workers=args.workers, epochs=args.epochs, batch_size=args.batch_size, augment=args.augment,
                  dtype=args.dtype, priority=args.worker_priority)
    capacity = args.capacity
    if capacity is None:
        cap = analyse(run(store, step_s=0.0, **common), args.warmup)
        capacity = cap["timed_steps"] / cap["wall_s"]
    step_s = 1.0 / (args.share * capacity)
    tl = run(store, step_s=step_s, **common)
    res = analyse(tl, args.warmup)
    floors = [analyse(floor_run(store, step_s=step_s, **common), args.warmup) for _ in range(args.floor_runs)]
    floor = combine_floors(floors)
    res["stall_first_floor"] = stall_against(res, floors[0])  # one floor run, as before --floor-runs
    res["floor_gap_ms_medians"] = [f["gap_ms_median"] for f in floors]
    res["floor_wall_s"] = floor["wall_s"]
    res["floor_gap_ms_median"] = floor["gap_ms_median"]
    res["floor_epoch_edge_gaps_ms"] = floor["epoch_edge_gaps_ms"]
    res["stall_vs_floor_wall"] = max(0.0, 1.0 - floor["wall_s"] / res["wall_s"])
    res["stall"] = stall_against(res, floor)
    edge = float(min(floor["epoch_edge_gaps_ms"])) / 1e3 if floor["epoch_edge_gaps_ms"] else 0.0
    res["stall_within_epochs"] = stall_within_epochs(res, floor)
    res["stall_at_epoch_edges"] = sum(max(0.0, g / 1e3 - edge) for g in res["epoch_edge_gaps_ms"]) / res["wall_s"]
    if args.beside_load:
        # the same cached-data loop beside as many CPU hogs as workers, each as busy as the
        # workers were: what the cores' contention alone costs the loop, with no input at all
        duty = float(np.mean(list(res["worker_busy_share"].values()))) if res["worker_busy_share"] else 0.0
        loaded = analyse(beside_hogs(args.workers, duty, floor_run, store, step_s=step_s, **common), args.warmup)
        res["floor_beside_load"] = {"hogs": args.workers, "duty": duty, "stall": stall_against(loaded, floor),
                              "stall_within_epochs": stall_within_epochs(loaded, floor),
                              "epoch_edge_gaps_ms": loaded["epoch_edge_gaps_ms"],
                              "steal_share": loaded["steal_share"],
                              "gap_ms_median": loaded["gap_ms_median"], "gap_ms_p95": loaded["gap_ms_p95"]}
    # every gap beyond the floor's median (epoch boundaries included), by whether the batch was late
    res["excess_by_cause"] = split_late(tl, args.warmup, floor["gap_ms_median"] / 1e3)
    res["floor_main_cpu_ms_per_step"] = floor["main_cpu_ms_per_step"]
    res["floor_steal_share"] = floor["steal_share"]
    res.update({**vars(args), "store": store, "capacity_batches_per_s": capacity, "step_ms": 1e3 * step_s})
    print(json.dumps({k: v for k, v in res.items() if k != "epoch_edge_gaps_ms"}, indent=1))
    print("epoch-boundary gaps (ms):", ", ".join(f"{g:.1f}" for g in res["epoch_edge_gaps_ms"]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"result": res, "timeline": tl}, indent=1))
    if args.plot:
        plot(tl, res, args.plot, title(res))
    return 0


def title(res: dict[str, Any]) -> str:
    """Plot title: the setting on one line, the stall figures on the next."""
    return (f"{res['workers']} {res['worker_priority']} workers, consumer at {res['share']:.0%} of capacity "
            f"({res['capacity_batches_per_s'] * res['batch_size']:.0f} samples/s), {res['backend']} {res['dtype']}\n"
            f"stall {res['stall']:.3f} ({res['stall_at_epoch_edges']:.3f} at epoch boundaries); median gap "
            f"{res['gap_ms_median']:.1f} ms, same loop on cached data {res['floor_gap_ms_median']:.1f} ms")


if __name__ == "__main__":
    raise SystemExit(main())
