"""Memory figures: private memory told apart from file-backed pages."""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest

from streamseg.bench.memory import MemorySampler, memory_snapshot, smaps_rollup

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@linux
def test_snapshot_counts_private_and_file_backed_pages_apart(tmp_path):
    path = tmp_path / "big.npy"
    np.save(path, np.ones((32, 2**18), np.uint8))  # 8 MiB on disk
    before = memory_snapshot()
    mapped = np.load(path, mmap_mode="r")
    assert int(mapped.sum()) == 32 * 2**18  # touch every page of the file
    private = np.ones(2**23, np.uint8)  # 8 MiB of anonymous memory
    after = memory_snapshot()
    assert after["rss_file"] - before["rss_file"] >= 6 * 2**20
    assert after["rss_anon"] - before["rss_anon"] >= 6 * 2**20
    assert after["uss"] - before["uss"] >= 6 * 2**20  # the private bytes; the file pages may add
    assert 0 < after["uss"] <= after["rss"]
    rollup = smaps_rollup(os.getpid())
    assert rollup["Rss"] >= rollup["Pss"] > 0
    del mapped, private


@linux
def test_light_snapshot_and_sampler_peaks():
    light = memory_snapshot(full=False)
    assert set(light) == {"rss", "rss_anon", "rss_file"} and light["rss"] >= light["rss_anon"] > 0
    with MemorySampler(interval=0.01, full_every=3) as sampler:
        block = np.ones(2**24, np.uint8)  # 16 MiB while sampling
        while sampler.samples < 8:
            time.sleep(0.005)
        del block
    out = sampler.stop()
    assert out["samples"] >= 8
    assert out["peak"]["uss"] > 0 and out["peak"]["rss_anon"] >= 16 * 2**20
    assert smaps_rollup(-1) == {}  # no such process: empty, no exception
