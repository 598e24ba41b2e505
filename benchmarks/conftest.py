"""Fixtures for the pytest-benchmark micro-benchmarks (not part of the CI test run)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

COUNT = int(os.environ.get("STREAMSEG_BENCH_COUNT", "640"))


@pytest.fixture(scope="session")
def stores(tmp_path_factory):
    """The same synthetic 256x256x3 set as a zarr and a memmap store."""
    from streamseg.store.converter import convert_source
    from streamseg.io.sources import SynthSource

    root = tmp_path_factory.mktemp("micro")
    source = SynthSource(COUNT, size=(256, 256), classes=3)
    return {fmt: convert_source(source, root / fmt, format=fmt, workers=2, progress=False)
            for fmt in ("zarr", "memmap")}
