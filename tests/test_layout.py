"""tools/check_layout.py: the package's rooms import only rooms below them."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "check_layout.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("check_layout", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_package_is_layered():
    proc = subprocess.run([sys.executable, str(TOOL)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("module,line,culprit", [
    ("store/reader.py", "from ..pipeline.dataset import SegmentationDataset", "room 'store' (rank 2) imports streamseg.pipeline.dataset"),
    ("io/sources.py", "    from streamseg.store import open_store", "room 'io' (rank 1) imports streamseg.store"),
    ("parallel/pool.py", "import streamseg.pipeline.batches", "room 'parallel' (rank 1) imports streamseg.pipeline.batches"),
    ("parallel/feeder.py", "from ..io import sources", "room 'parallel' (rank 1) imports streamseg.io"),  # a peer
    ("errors.py", "from . import progress", "room 'errors' (rank 0) imports streamseg.progress"),
])
def test_an_upward_import_fails(tmp_path, module, line, culprit):
    tree = tmp_path / "streamseg"
    shutil.copytree(ROOT / "streamseg", tree, ignore=shutil.ignore_patterns("__pycache__"))
    path = tree / module
    path.write_text(path.read_text() + f"\n\ndef _bad():\n{line if line.startswith(' ') else '    ' + line}\n")
    proc = subprocess.run([sys.executable, str(TOOL), str(tree)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert culprit in proc.stdout and f"{module}:" in proc.stdout, proc.stdout


def test_a_module_outside_every_room_is_reported(tmp_path):
    tree = tmp_path / "streamseg"
    shutil.copytree(ROOT / "streamseg", tree, ignore=shutil.ignore_patterns("__pycache__"))
    (tree / "stray.py").write_text("x = 1\n")
    problems = _load_tool().check(tree)
    assert problems == [f"{tree / 'stray.py'}: module is in no known room 'stray'; add it to RANKS in {TOOL}"]


def test_own_room_and_lower_rooms_are_allowed(tmp_path):
    tree = tmp_path / "streamseg"
    shutil.copytree(ROOT / "streamseg", tree, ignore=shutil.ignore_patterns("__pycache__"))
    path = tree / "pipeline" / "augment.py"
    path.write_text(path.read_text() + "\nfrom .batches import BatchOptions\nfrom ..store import open_store\n")
    assert _load_tool().check(tree) == []
