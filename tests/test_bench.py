"""``streamseg bench`` and :func:`streamseg.bench.measure.measure_fit`: fields, definitions, memory cap."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from streamseg import OptionError
from streamseg.bench.measure import cgroup_v2_prepare, measure_fit, parse_size
from streamseg.cli import main

pytestmark = pytest.mark.slow


def gpu_present() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount() > 0
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return False


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    from streamseg.store.converter import convert_source
    from streamseg.io.sources import SynthSource

    dst = tmp_path_factory.mktemp("bench") / "tiny.zarr"
    convert_source(SynthSource(24, size=(32, 32), classes=3), dst, chunk_samples=4, progress=False)
    return dst


def bench_json(store: Path, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "bench.json"
    rc = main(["bench", str(store), "--steps", "3", "--warmup", "1", "--step-ms", "5", "--batch-size", "4",
               "--json", str(out), *extra])
    assert rc == 0
    return json.loads(out.read_text())


def check_common(r: dict, steps: int = 3, batch: int = 4) -> None:
    assert r["steps"] == steps and r["batch_size"] == batch
    assert r["samples_per_s"] > 0 and r["batches_per_s"] > 0 and r["wall_s"] > 0
    assert r["samples_per_s"] == pytest.approx(r["batches_per_s"] * batch)
    assert 0.0 <= r["stall_fraction"] <= 1.0 and 0.0 <= r["overhead_fraction"] <= 1.0
    assert 0.0 <= r["cpu_percent"] <= 100.0
    mem = r["memory"]
    for key in ("main_uss", "main_rss", "main_rss_anon", "main_rss_file", "main_pss", "private", "tree_pss",
                "tree_anon_pss"):
        assert isinstance(mem[key], int) and mem[key] > 0, key
    assert isinstance(mem["workers_pss"], int) and mem["workers_pss"] >= 0
    assert mem["private"] >= mem["main_uss"]
    if not gpu_present():
        for key in ("gpu_util_percent", "gpu_memory_peak_bytes", "gpu_name", "gpu_count"):
            assert r[key] == "n/a", key


def test_bench_cli_json_fields(tiny_store, tmp_path, capsys):
    r = bench_json(tiny_store, tmp_path, "--workers", "1")
    check_common(r)
    # compute of the simulated accelerator is steps * step_ms by construction, not measured
    assert r["model"] == "simulated" and r["compute_s"] == 3 * 5.0 / 1000.0
    assert r["overhead_fraction"] == pytest.approx(max(0.0, 1.0 - r["compute_s"] / r["wall_s"]))
    # the input stall is measured against the same loop fed from memory, which takes at least
    # the simulated compute
    assert r["compute_s"] <= r["floor_s"]
    assert r["stall_fraction"] == pytest.approx(max(0.0, 1.0 - r["floor_s"] / r["wall_s"]))
    assert r["stall_fraction"] <= r["overhead_fraction"]
    assert r["memory"]["workers_pss"] > 0  # one worker process, alive at the last sample
    assert r["store"]["count"] == 24 and r["store"]["disk_bytes"] > 0 and r["store"]["raw_bytes"] == 24 * 32 * 32 * 4
    assert r["machine"]["ram_total_bytes"] > r["store"]["raw_bytes"]
    assert r["options"] == {"augment": "standard", "workers": 1, "threads": False, "shuffle": "window",
                            "backend": "zarr", "worker_priority": "normal"}
    text = capsys.readouterr().out
    assert "samples/s" in text and "input stall" in text and "memory peak" in text
    assert "24 x (32, 32, 3)" in text  # samples x one sample's shape


def test_bench_threads_and_memory_cap_report(tiny_store, tmp_path):
    r = bench_json(tiny_store, tmp_path, "--workers", "2", "--threads", "--augment", "none",
                   "--shuffle", "uniform", "--memory-cap", "2G")
    check_common(r)
    cap = r["memory_cap"]
    assert cap["requested"] == "2G" and cap["requested_bytes"] == 2 * 2**30
    assert isinstance(cap["applied"], bool)
    if not cap["applied"]:  # the reason is given, and the run still happened (uncapped)
        assert cap["why_not"] and cap["how"] is None
    assert cap["smaller_than_dataset"] is False


def test_bench_rejects_bad_options(tiny_store, capsys):
    assert main(["bench", str(tiny_store), "--steps", "0"]) == 2
    assert "Received:" in capsys.readouterr().err
    assert main(["bench", str(tiny_store), "--memory-cap", "lots"]) == 2
    assert "Received: 'lots'" in capsys.readouterr().err
    assert main(["bench", str(tiny_store), "--threads", "--worker-priority", "idle"]) == 2
    err = capsys.readouterr().err
    assert "worker processes only" in err and len(err.strip().splitlines()) == 1


def test_measure_fit_same_harness_for_tf_data_and_pydataset():
    import keras
    import tensorflow as tf

    x = np.random.default_rng(0).random((12, 16, 16, 3), dtype=np.float32)
    y = np.zeros((12, 16, 16, 1), np.int32)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)  # 3 batches: needs a second epoch
    r = measure_fit(ds, step_ms=1.0, steps=4, warmup=1)
    check_common(r, steps=4)
    assert r["batches_per_epoch"] == 3 and r["compute_s"] == 4 * 1.0 / 1000.0
    assert r["memory"]["full_samples"] >= 3  # start, right after the timed steps, stop

    class Plain(keras.utils.PyDataset):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int):
            return x[4 * i : 4 * i + 4], y[4 * i : 4 * i + 4]

    r = measure_fit(Plain(), step_ms=0.0, steps=2, warmup=0, finish_epoch=False)  # batch size from batch 0
    check_common(r, steps=2)
    assert r["stall_fraction"] == r["overhead_fraction"] == 1.0  # no compute: every second is the pipeline's
    assert r["floor_s"] is None

    with pytest.raises(OptionError, match="Received: steps=0"):
        measure_fit(Plain(), steps=0)


def test_measure_fit_unet_uses_measured_compute():
    import tensorflow as tf

    x = np.random.default_rng(1).random((8, 16, 16, 3), dtype=np.float32)
    y = np.random.default_rng(2).integers(0, 3, (8, 16, 16, 1)).astype(np.int32)
    r = measure_fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(4), model="unet", steps=2, warmup=1,
                    num_classes=3)
    check_common(r, steps=2)
    assert r["model"] == "unet" and r["step_ms"] is None and r["compute_s"] > 0
    assert r["compute_source"].startswith("measured")


def test_parse_size():
    assert parse_size("2G") == parse_size("2GiB") == parse_size("2 gb") == 2 * 2**30
    assert parse_size("512M") == 512 * 2**20 and parse_size("1.5g") == 3 * 2**29 and parse_size(4096) == 4096
    for bad in ("", "0", "-1G", "2X", "G"):
        with pytest.raises(OptionError, match="Received"):
            parse_size(bad)


def test_cgroup_v2_prepare_on_a_fake_hierarchy(tmp_path):
    base = tmp_path / "cg" / "user.slice"
    base.mkdir(parents=True)
    (base / "cgroup.controllers").write_text("cpu io pids\n")
    (base / "cgroup.subtree_control").write_text("")
    group, why = cgroup_v2_prepare(2**30, mount=tmp_path / "cg", own="/user.slice")
    assert group is None and "no memory controller" in why
    (base / "cgroup.controllers").write_text("cpu io memory pids\n")
    group, why = cgroup_v2_prepare(2**30, mount=tmp_path / "cg", own="/user.slice")
    assert why == "" and group is not None and group.parent == base
    assert (group / "memory.max").read_text() == str(2**30)
    assert (base / "cgroup.subtree_control").read_text() == "+memory"
    group, why = cgroup_v2_prepare(2**30, mount=tmp_path / "nothing", own="/")
    assert group is None and why


def test_memory_cap_child_joins_the_prepared_cgroup(tiny_store, tmp_path, monkeypatch):
    """The capped path end to end, on a stand-in cgroup folder (the limit itself is the kernel's job)."""
    import streamseg.bench.memcap as memcap

    group = tmp_path / "fake-cgroup"
    group.mkdir()
    monkeypatch.setattr(memcap, "cgroup_v2_prepare", lambda limit: (group, ""))
    r = bench_json(tiny_store, tmp_path, "--workers", "0", "--memory-cap", "3G")
    cap = r["memory_cap"]
    assert cap["applied"] is True and cap["how"].startswith("cgroup v2") and cap["requested_bytes"] == 3 * 2**30
    assert cap["outcome"] == "completed under the cap" and cap["exit_status"] == 0
    assert int((group / "cgroup.procs").read_text()) > 0  # the measuring child wrote itself there
    check_common(r)


@pytest.fixture
def timeline(monkeypatch):
    """benchmarks/timeline.py, loaded as a module.  It puts benchmarks/ first on sys.path (its
    conftest.py would then shadow the tests' own for every later import, Dask workers'
    included): restored after the test."""
    import importlib.util

    monkeypatch.setattr(sys, "path", list(sys.path))
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "timeline.py"
    spec = importlib.util.spec_from_file_location("_timeline_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_timeline_wrapper_runs_the_producers_process_setup(tmp_path, timeline):
    """benchmarks/timeline.py times the workers through a wrapper; the worker calls the
    wrapper's setup_process and setup (as for the dataset's own producer), so OpenCV runs as the
    dataset runs it.  Without the forward, timeline runs measured OpenCV's thread pool instead."""
    from streamseg.parallel.workers import _process_setup

    calls = []

    class Inner:
        def setup_process(self):
            calls.append("process")

        def setup(self):
            calls.append("setup")

    _process_setup(timeline.TimedProducer(Inner(), str(tmp_path)))()  # as a worker process runs it
    assert calls == ["process", "setup"]


def test_timeline_stall_within_epochs_leaves_the_epoch_boundaries_out(timeline):
    """10 steps of 10 ms compute over 2 epochs of 5: 8 gaps inside epochs of 3 ms each, and
    one 1.2 s gap at the boundary.  Against a floor whose median gap is 2 ms, the wait inside
    epochs is 8 x 1 ms; the whole stall counts the boundary's pause beyond the floor's own."""
    steps, t = [], 0.0
    for k in range(10):
        steps.append((t, t + 0.010))
        t += 0.010 + (1.2 if k == 4 else 0.003)
    res = timeline.analyse({"steps": steps, "batches_per_epoch": 5, "busy": {}}, 0)
    floor = {"gap_ms_median": 2.0, "epoch_edge_gaps_ms": [5.0]}
    assert res["timed_steps"] == 10 and res["epoch_edge_gaps_ms"] == pytest.approx([1200.0])
    assert timeline.stall_within_epochs(res, floor) == pytest.approx(8 * 0.001 / res["wall_s"])
    assert timeline.stall_against(res, floor) == pytest.approx(
        (8 * 0.001 + 1.2 - 0.005) / res["wall_s"])


def test_timeline_floor_of_several_runs_is_their_median_gap_and_smallest_boundary(timeline):
    """Three cached-loop runs with median gaps 1.2, 1.9 and 1.8 ms: the loop's own time per gap
    is 1.8 ms (not the fast outlier), the boundary allowance the smallest of all runs' edges;
    one run is used as it is."""
    runs = [{"gap_ms_median": g, "epoch_edge_gaps_ms": e, "wall_s": w, "main_cpu_ms_per_step": c, "steal_share": 0.0}
            for g, e, w, c in [(1.2, [4.0, 9.0], 3.0, 1.6), (1.9, [5.0], 3.2, 2.3), (1.8, [3.5, 6.0], 3.1, 2.0)]]
    floor = timeline.combine_floors(runs)
    assert floor["gap_ms_median"] == pytest.approx(1.8)
    assert sorted(floor["epoch_edge_gaps_ms"]) == [3.5, 4.0, 5.0, 6.0, 9.0]
    assert floor["wall_s"] == pytest.approx(3.1) and floor["main_cpu_ms_per_step"] == pytest.approx(2.0)
    assert timeline.combine_floors(runs[:1]) is runs[0]
    steps = [(0.01 * k + 0.003 * k, 0.01 * k + 0.003 * k + 0.01) for k in range(6)]  # 3 ms gaps, one epoch
    res = timeline.analyse({"steps": steps, "batches_per_epoch": 6, "busy": {}}, 0)
    assert timeline.stall_within_epochs(res, floor) == pytest.approx(5 * 0.0012 / res["wall_s"])


def test_pagecache_warm_and_evict_cover_every_file_of_a_store(tmp_path, monkeypatch):
    """benchmarks/pagecache.py (compare.py warms each run's store with it): every file under a
    folder is read once, nested folders included, and evict touches the same bytes."""
    import importlib.util

    monkeypatch.setattr(sys, "path", list(sys.path))
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "pagecache.py"
    spec = importlib.util.spec_from_file_location("_pagecache_under_test", path)
    pagecache = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pagecache)
    store = tmp_path / "store.zarr"
    (store / "images" / "c" / "0").mkdir(parents=True)
    (store / "zarr.json").write_bytes(b"{}")
    (store / "images" / "c" / "0" / "0").write_bytes(bytes(range(256)) * 40000)  # > one 4 MiB block
    (store / "images" / "c" / "0" / "1").write_bytes(b"x" * 7)
    single = tmp_path / "one.bin"
    single.write_bytes(b"abc")
    expected = 2 + 256 * 40000 + 7 + 3
    assert [p.name for p in pagecache.files_under([str(store)])] == ["0", "1", "zarr.json"]
    assert pagecache.warm([str(store), str(single)])["bytes"] == expected
    assert pagecache.evict([str(store), str(single)])["bytes"] == expected
    assert pagecache.warm([str(tmp_path / "missing")])["bytes"] == 0


def test_ab_paired_ratios_pair_variants_within_each_round(monkeypatch):
    """benchmarks/ab.py: a / b only within a round where both ran; failed runs and other groups
    are left out; min / median / max over the rounds."""
    import importlib.util

    monkeypatch.setattr(sys, "path", list(sys.path))
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ab.py"
    spec = importlib.util.spec_from_file_location("_ab_under_test", path)
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    rows = [{"round": 0, "g": "x", "v": "a", "rate": 30.0}, {"round": 0, "g": "x", "v": "b", "rate": 10.0},
            {"round": 1, "g": "x", "v": "b", "rate": 20.0}, {"round": 1, "g": "x", "v": "a", "rate": 20.0},
            {"round": 2, "g": "x", "v": "a", "rate": None}, {"round": 2, "g": "x", "v": "b", "rate": 5.0},
            {"round": 3, "g": "x", "v": "b", "rate": 10.0}, {"round": 3, "g": "x", "v": "a", "rate": 15.0},
            {"round": 0, "g": "y", "v": "a", "rate": 1.0}]
    got = ab.paired_ratios(rows, ["x", "y"], lambda r: r["g"], lambda r: r["v"], "a", "b", value="rate")
    assert got == {"x": {"ratios": [3.0, 1.0, 1.5], "min_median_max": [1.0, 1.5, 3.0]}}
