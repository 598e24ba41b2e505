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


@linux
def test_sampler_takes_no_full_sample_while_held(monkeypatch):
    """Between hold_full and release_full only cheap samples are taken (a timed stretch pays
    no page-table walks); release_full takes one at once."""
    import streamseg.bench.memory as memory

    kinds = []
    real = memory.memory_snapshot

    def spy(proc=None, rollups=None, full=True):
        kinds.append(full)
        return real(proc, rollups, full=full)

    monkeypatch.setattr(memory, "memory_snapshot", spy)
    sampler = MemorySampler(interval=0.005, full_every=2).start()
    assert kinds == [True]  # start: one full sample
    sampler.hold_full()
    held_from = len(kinds) + 1  # a sample decided just before the hold may still be on its way
    while len(kinds) < held_from + 10:
        time.sleep(0.005)
    held = kinds[held_from:held_from + 10]
    sampler.release_full()
    released_at = len(kinds)
    while len(kinds) < released_at + 6:
        time.sleep(0.005)
    out = sampler.stop()
    assert held == [False] * 10, held
    assert True in kinds[released_at - 1:released_at + 6]  # release_full's own, and periodic ones again
    assert out["full_samples"] == sum(kinds) and out["samples"] == len(kinds)
