"""``streamseg bench``: how well does an input pipeline feed ``model.fit``?

:func:`measure_fit` runs ``model.fit`` on any dataset Keras accepts (a SegmentationDataset, any
``keras.utils.PyDataset``, a ``tf.data.Dataset``) with one consumer, and measures the steps after
a warm-up, from the end of the last warm-up step to the end of the last measured step:

- **throughput**: samples/s and batches/s;
- **input stall**: the share of that wall time the loop spends waiting for its data, i.e. beyond
  what the same loop takes when its batches are already in memory.  With the *simulated
  accelerator* (a model whose train step sleeps ``step_ms`` per batch, releasing the GIL like a
  GPU, so a pipeline can be judged without one) the same fit is first run on one cached batch
  (``tf.data.Dataset.from_tensors``, same batches per epoch, same warm-up and steps): its wall time
  ``floor_s`` is the step time plus Keras' own per-step and per-epoch overhead (about 2 ms per
  step on a 2-core machine), and ``stall = 1 - floor_s / wall``.  ``overhead_fraction =
  1 - steps * step_ms / wall`` counts Keras' overhead too.  With a real model (the small U-Net, or
  yours), compute is measured first by fitting the same model on one cached in-memory batch
  (same loop, same callback, median of up to 20 steps) and ``stall = overhead_fraction =
  1 - compute / wall``.  Clipped to [0, 1].  With ``step_ms=0`` both are 1 by definition:
  samples/s is then the pipeline's raw capacity;
- **memory** peaks through the run (:class:`streamseg.bench.memory.MemorySampler`; USS and PSS,
  which walk every process's page tables, outside the timed steps and right after them, RSS,
  RssAnon and RssFile throughout): main USS, RssAnon
  and RssFile (file-backed pages such as memory-mapped store files, which the kernel can drop)
  apart, the workers' summed PSS, ``private`` = main USS + workers' PSS, ``tree_pss`` = main PSS
  + workers' PSS, and ``tree_anon_pss`` = Pss_Anon + Pss_Shmem summed over main and workers, i.e.
  memory that is neither file-backed nor double-counted after ``fork`` (main USS alone drops
  after a fork, because pages shared copy-on-write with workers are no longer unique);
- **CPU** utilisation of the machine, and **GPU** utilisation and (device-wide) memory used
  through NVML when a GPU is there, else the string ``"n/a"``.

``streamseg bench STORE`` (:mod:`.command`) wraps this for a store (a volume store: :mod:`.patches`),
optionally in a child process under a memory cap (cgroup v2 or ``systemd-run``), reported as
applied or not with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time
from typing import Any

import numpy as np
import psutil

from ..errors import OptionError, truncate
from .memcap import cgroup_v2_prepare
from .memory import MemorySampler, memory_snapshot

__all__ = ["measure_fit", "simulated_accelerator", "parse_size", "cgroup_v2_prepare"]

_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
          "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40, "TIB": 2**40}
_CALIBRATION_STEPS = 20
NA = "n/a"


def parse_size(text: str | int) -> int:
    """Bytes from ``"2G"``, ``"512M"``, ``"1.5GiB"`` or a plain number (binary units)."""
    raw = str(text).strip().upper().replace(" ", "")
    num = raw.rstrip("KMGTIB")
    try:
        value = float(num) * _UNITS[raw[len(num):]]
    except (ValueError, KeyError):
        value = -1.0
    if not 0 < value < float("inf"):
        raise OptionError(f"Expected a memory size like 2G, 512M or 1.5GiB. Received: {truncate(text)}")
    return int(value)


def _mib(n: Any) -> str:
    return f"{n / 2**20:.0f} MiB" if isinstance(n, (int, float)) else str(n)


# ---------------------------------------------------------------------------------- consumers
def simulated_accelerator(step_ms: float) -> Any:
    """A compiled Keras model whose train step spends ``step_ms`` per batch (sleeping).

    The sleep runs in a ``tf.numpy_function`` that depends on one element of the images and
    masks, so each step waits for its batch; sleeping releases the GIL like a GPU would.
    """
    import keras
    import tensorflow as tf

    seconds = float(step_ms) / 1000.0
    switch = {"on": True}  # measure_fit turns the sleep off for the unmeasured end of the last epoch

    def _sleep(x: np.ndarray, y: np.ndarray) -> np.float32:
        if seconds > 0 and switch["on"]:
            time.sleep(seconds)
        return np.float32(0.0)

    class SimulatedAccelerator(keras.Model):
        def call(self, inputs: Any) -> Any:
            return inputs

        def train_step(self, data: Any) -> dict[str, Any]:
            x, y = data[0], data[1]
            loss = tf.numpy_function(_sleep, [tf.reshape(x, [-1])[:1], tf.reshape(y, [-1])[:1]],
                                     tf.float32, stateful=True)
            return {"loss": loss}

    model = SimulatedAccelerator(name="simulated_accelerator")
    model.compile()
    model.sleep_switch = switch
    return model


def _timer_callback(warmup: int, steps: int, stop: bool, sampler: MemorySampler | None = None) -> Any:
    import keras

    class StepTimer(keras.callbacks.Callback):
        """Timestamps the steps after the warm-up; turns the simulated compute off after them.

        With ``sampler``, the memory sampler takes only cheap samples during the timed steps and
        a full one (page-table walks of every process) right after them.
        """

        def __init__(self) -> None:
            super().__init__()
            self.done, self.t0, self.times, self.cpu = 0, None, [], []

        def _mark(self) -> float:
            if sampler is not None:
                sampler.hold_full()
            self.cpu.append(psutil.cpu_times())
            return time.perf_counter()

        def on_train_begin(self, logs: Any = None) -> None:
            self.t0 = self._mark() if warmup == 0 else None

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if logs:  # wait for the step itself (asynchronous devices)
                np.asarray(next(iter(logs.values())))
            self.done += 1
            if self.done == warmup:
                self.t0 = self._mark()
            elif warmup < self.done <= warmup + steps:
                self.times.append(time.perf_counter())
            if self.done == warmup + steps:
                self.cpu.append(psutil.cpu_times())
                if sampler is not None:
                    sampler.release_full()
                getattr(self.model, "sleep_switch", {})["on"] = False
                self.model.stop_training = stop

    return StepTimer()


def _num_batches(dataset: Any) -> int | None:
    import tensorflow as tf

    if isinstance(dataset, tf.data.Dataset):
        card = int(dataset.cardinality())
        return card if card > 0 else None
    n = getattr(dataset, "num_batches", None)
    if n is None and hasattr(dataset, "__len__"):
        n = len(dataset)
    return int(n) if n is not None else None


def _first_batch(dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow as tf

    if isinstance(dataset, tf.data.Dataset):
        batch = next(iter(dataset.take(1)))
    else:
        batch = dataset[0] if hasattr(dataset, "__getitem__") else next(iter(dataset))
    return np.asarray(batch[0]), np.asarray(batch[1])


def _cached_batch(dataset: Any, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A batch to keep in memory: zeros shaped from a SegmentationDataset's spec (reading one
    would start its workers and use its epoch), else a copy of the dataset's first batch."""
    spec = getattr(dataset, "element_spec", None)
    if callable(spec):
        return tuple(np.zeros((batch_size,) + tuple(t.shape[1:]), t.dtype.as_numpy_dtype) for t in spec())
    x, y = _first_batch(dataset)
    return np.array(x), np.array(y)


def _infer_batch_size(dataset: Any) -> int | None:
    b = getattr(dataset, "batch_size", None)
    if isinstance(b, (int, np.integer)) and b > 0:
        return int(b)
    spec = getattr(dataset, "element_spec", None)  # tf.data: static batch dimension, if any
    dim = spec[0].shape[0] if spec is not None and not callable(spec) else None
    return int(dim) if dim is not None else None


class _TreeSampler(MemorySampler):
    """MemorySampler that also keeps peaks of whole-tree sums (main process + workers)."""

    def _take(self, full: bool = True) -> None:
        if not full:
            super()._take(full=False)
            return
        rollups: dict[int, dict[str, int]] = {}
        snap = memory_snapshot(self._proc, rollups)
        main = rollups.get(self._proc.pid, {})
        anon = sum(r.get("Pss_Anon", 0) + r.get("Pss_Shmem", 0) for r in rollups.values())
        snap.update(pss=main.get("Pss", 0), private=snap["uss"] + snap["children_pss"],
                    tree_pss=main.get("Pss", 0) + snap["children_pss"], tree_anon_pss=anon)
        self._record(snap, True)


class _GpuSampler(threading.Thread):
    """Samples GPU utilisation and memory through NVML; every figure is "n/a" without a GPU."""

    def __init__(self, interval: float = 0.25) -> None:
        super().__init__(daemon=True, name="streamseg-gpu")
        self.interval, self.why, self.util, self.mem = interval, "", [], []
        self.halt = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml, count = pynvml, pynvml.nvmlDeviceGetCount()
            if count == 0:
                raise RuntimeError("NVML sees no GPU")
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            name = pynvml.nvmlDeviceGetName(self.handles[0])
            self.name = name.decode() if isinstance(name, bytes) else str(name)
        except Exception as exc:  # no library, no driver, no device: say so, invent nothing
            self.handles, self.why = [], f"{type(exc).__name__}: {exc}".strip()

    def run(self) -> None:
        while True:
            try:  # a transient NVML error loses one sample, not the run
                self.util.append([int(self.nvml.nvmlDeviceGetUtilizationRates(h).gpu) for h in self.handles])
                self.mem.append([int(self.nvml.nvmlDeviceGetMemoryInfo(h).used) for h in self.handles])
            except Exception:
                pass
            if self.halt.wait(self.interval):
                return

    def begin(self) -> "_GpuSampler":
        if self.handles:
            self.start()
        return self

    def finish(self) -> dict[str, Any]:
        if not self.handles or not self.is_alive():
            return {"gpu_util_percent": NA, "gpu_memory_peak_bytes": NA, "gpu_name": NA, "gpu_count": NA,
                    "gpu_note": f"no GPU figures: {self.why or 'NVML unavailable'}"}
        self.halt.set()
        self.join()
        with contextlib.suppress(Exception):
            self.nvml.nvmlShutdown()
        if not self.util:
            return {"gpu_util_percent": NA, "gpu_memory_peak_bytes": NA, "gpu_name": self.name,
                    "gpu_count": len(self.handles), "gpu_note": "NVML returned no sample"}
        means = np.mean(np.array(self.util, float), axis=0)
        best = int(np.argmax(means))
        return {"gpu_util_percent": float(means[best]), "gpu_memory_peak_bytes": int(max(m[best] for m in self.mem)),
                "gpu_name": self.name, "gpu_count": len(self.handles),
                "gpu_note": f"busiest of {len(self.handles)} device(s), {len(self.util)} NVML samples"}


# ---------------------------------------------------------------------------------- measurement
def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise OptionError(f"{name} must be an integer >= {low}. Received: {name}={truncate(value)}")
    return int(value)


def _run_fit(model: Any, dataset: Any, warmup: int, steps: int, n_batches: int | None,
             finish_epoch: bool = True, sampler: MemorySampler | None = None) -> Any:
    """Fit until ``warmup + steps`` steps are timed, then stop, or with ``finish_epoch`` let the
    last epoch end untimed (the simulated accelerator no longer sleeps then)."""
    timer = _timer_callback(warmup, steps, stop=not finish_epoch, sampler=sampler)
    total = warmup + steps
    if n_batches:
        model.fit(dataset, epochs=-(-total // n_batches), shuffle=False, verbose=0, callbacks=[timer])
    else:  # unknown length: one epoch of exactly the steps needed
        model.fit(dataset, epochs=1, steps_per_epoch=total, shuffle=False, verbose=0, callbacks=[timer])
    if hasattr(model, "sleep_switch"):
        model.sleep_switch["on"] = True
    if timer.done < total or timer.t0 is None:
        raise OptionError(f"The dataset ran out after {timer.done} of {total} steps; give a longer or "
                          f"repeating dataset, or fewer steps. Received: warmup={warmup}, steps={steps}")
    return timer


def measure_fit(dataset: Any, *, model: Any = "simulated", step_ms: float = 20.0, steps: int = 50,
                warmup: int = 5, batch_size: int | None = None, input_shape: tuple[int, int, int] | None = None,
                num_classes: int | None = None, mask_mode: str = "sparse", sample_interval: float = 0.5,
                finish_epoch: bool | None = None) -> dict[str, Any]:
    """Measure ``model.fit`` on ``dataset`` after a warm-up (see the module docstring).

    Parameters
    ----------
    dataset : SegmentationDataset, keras.utils.PyDataset or tf.data.Dataset
        Yields ``(images, masks)`` batches.  A dataset of known length is fitted epoch after
        epoch (boundaries included, as in training) until ``warmup + steps`` steps are timed.
    model : {"simulated", "unet"} or keras.Model
        ``"simulated"``: :func:`simulated_accelerator` (``step_ms`` per batch).  ``"unet"``:
        :func:`streamseg.models.small_unet`.  A compiled ``keras.Model`` is used as given.
    step_ms : float
        Simulated accelerator time per batch (``>= 0``).
    steps, warmup : int
        Measured steps and steps before measuring.
    batch_size : int, optional
        Samples per batch (default: the dataset's ``batch_size``, its static batch dimension,
        or the size of its first batch).
    input_shape, num_classes, mask_mode
        For the U-Net (default: from a SegmentationDataset, or from the first batch).
    sample_interval : float
        Seconds between memory samples (RSS figures; USS and PSS every fourth sample).
    finish_epoch : bool, optional
        Let the last epoch run to its end, untimed, instead of stopping after the measured
        steps.  An iterator abandoned mid-epoch can hang when it is destroyed while its threads
        are inside a Python generator (``tf.data.Dataset.from_generator`` with prefetching or
        parallel interleave), possibly only at interpreter exit.  Default: True for the
        simulated accelerator (the rest costs no compute) and for ``tf.data`` datasets.

    Returns
    -------
    dict
        ``samples_per_s``, ``batches_per_s``, ``stall_fraction``, ``overhead_fraction``,
        ``wall_s``, ``compute_s``, ``floor_s`` (simulated accelerator: wall time on cached data),
        ``compute_source``, ``step_ms_p50``/``p95``/``max``, ``cpu_percent``, ``memory`` (peak
        bytes), GPU fields (``"n/a"`` without a GPU) and the settings.
    """
    import tensorflow as tf

    steps, warmup = _check_int("steps", steps, 1), _check_int("warmup", warmup, 0)
    if isinstance(step_ms, bool) or not isinstance(step_ms, (int, float)) or not 0 <= step_ms < 1e7:
        raise OptionError(f"step_ms must be a number >= 0. Received: step_ms={truncate(step_ms)}")
    batch_size = batch_size or _infer_batch_size(dataset) or len(_first_batch(dataset)[0])
    n_batches = _num_batches(dataset)
    compute_s: float | None = None
    if isinstance(model, str) and model == "simulated":
        keras_model, kind = simulated_accelerator(step_ms), "simulated"
        compute_s = steps * float(step_ms) / 1000.0
    elif isinstance(model, str) and model == "unet":
        from ..models import small_unet

        x, y = batch = tuple(np.array(a) for a in _first_batch(dataset))  # a copy: no slot held
        shape = input_shape or getattr(getattr(dataset, "store", None), "image_shape", None) or x.shape[1:]
        k = num_classes or getattr(dataset, "num_classes", None) or int(y.max()) + 1
        keras_model, kind = small_unet(tuple(shape), int(k), mask_mode=mask_mode), "unet"
    elif hasattr(model, "fit"):
        keras_model, kind = model, "custom"
    else:
        raise OptionError(f"model must be 'simulated', 'unet' or a compiled keras.Model. Received: {truncate(model)}")
    calibration = floor_s = None
    if kind == "simulated" and step_ms > 0:  # the same loop fed from memory: Keras' own overhead
        x, y = _cached_batch(dataset, batch_size)
        cached = tf.data.Dataset.from_tensors((x, y))
        cached = cached.repeat(n_batches) if n_batches else cached.repeat()
        floor = _run_fit(keras_model, cached, warmup, steps, n_batches, finish_epoch=True)
        floor_s = floor.times[-1] - floor.t0
    if compute_s is None:  # measured compute: the same fit loop on one cached in-memory batch
        x, y = batch if kind == "unet" else tuple(np.array(a) for a in _first_batch(dataset))
        cal_steps = min(steps, _CALIBRATION_STEPS)
        cached = tf.data.Dataset.from_tensors((x, y)).repeat()
        cal = _run_fit(keras_model, cached, max(2, warmup), cal_steps, None, finish_epoch=False)
        calibration = float(np.median(np.diff([cal.t0] + cal.times)))  # robust to a stray slow step
        compute_s = calibration * steps
    if finish_epoch is None:
        finish_epoch = kind == "simulated" or isinstance(dataset, tf.data.Dataset)
    gpu, sampler = _GpuSampler().begin(), _TreeSampler(sample_interval, full_every=4).start()
    try:
        timer = _run_fit(keras_model, dataset, warmup, steps, n_batches, bool(finish_epoch), sampler)
    finally:
        mem, gpu_out = sampler.stop(), gpu.finish()
    wall = timer.times[-1] - timer.t0
    steps_s = np.diff(np.array([timer.t0] + timer.times)) * 1000.0
    c0, c1 = timer.cpu[0], timer.cpu[-1]
    delta = {k: getattr(c1, k) - getattr(c0, k) for k in c1._fields if not k.startswith("guest")}  # guest is in user
    total_cpu, idle = sum(delta.values()), delta["idle"] + delta.get("iowait", 0.0)
    peak = mem["peak"]
    names = {"main_uss": "uss", "main_rss": "rss", "main_rss_anon": "rss_anon", "main_rss_file": "rss_file",
             "main_pss": "pss", "workers_pss": "children_pss", "workers": "children", "private": "private",
             "tree_pss": "tree_pss", "tree_anon_pss": "tree_anon_pss"}
    return {
        "model": kind, "step_ms": float(step_ms) if kind == "simulated" else None,
        "warmup": warmup, "steps": steps, "batch_size": int(batch_size), "batches_per_epoch": n_batches,
        "wall_s": wall, "compute_s": compute_s,
        "compute_source": "nominal: steps * step_ms" if kind == "simulated"
        else f"measured: fit on one cached batch, median {calibration * 1000.0:.2f} ms/step",
        "samples_per_s": steps * batch_size / wall, "batches_per_s": steps / wall,
        "stall_fraction": float(min(1.0, max(0.0, 1.0 - (floor_s if floor_s is not None else compute_s) / wall))),
        "overhead_fraction": float(min(1.0, max(0.0, 1.0 - compute_s / wall))),
        "floor_s": floor_s,
        "step_ms_p50": float(np.percentile(steps_s, 50)), "step_ms_p95": float(np.percentile(steps_s, 95)),
        "step_ms_max": float(steps_s.max()),
        "cpu_percent": min(100.0, max(0.0, 100.0 * (total_cpu - idle) / total_cpu)) if total_cpu > 0 else 0.0,
        "cpu_count": psutil.cpu_count() or 1,
        "memory": {**{k: int(peak.get(v, 0)) for k, v in names.items()}, "samples": mem["samples"],
                   "full_samples": mem["full_samples"]},
        **gpu_out,
    }


def _priority(args: argparse.Namespace) -> str:
    """The ``--worker-priority`` of parsed ``streamseg bench`` arguments (default normal)."""
    return str(getattr(args, "worker_priority", "normal"))
