"""The command line: exit codes, one-line errors, no TensorFlow for convert/info/verify."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from streamseg.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    code = ("import sys\nfrom streamseg.cli import main\nrc = main(sys.argv[1:])\n"
            "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'\nsys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.getcwd()}, timeout=120)


def test_synth_convert_info_verify(tmp_path):
    src, dst = tmp_path / "scans", tmp_path / "scans.zarr"
    r = run_cli("synth", str(src), "--count", "12", "--size", "32", "40", "--classes", "4", "--quiet")
    assert r.returncode == 0, r.stderr
    assert len(list((src / "images").iterdir())) == 12
    r = run_cli("convert", str(src), str(dst), "--workers", "2", "--chunk-samples", "5")
    assert r.returncode == 0, r.stderr
    assert "convert" in r.stderr  # plain progress lines when not a terminal
    r = run_cli("info", str(dst), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["count"] == 12 and info["image_shape"] == [12, 32, 40, 3] and info["num_chunks"] == 3
    assert set(info["labels"]) <= {"0", "1", "2", "3"}
    r = run_cli("info", str(dst))
    assert "samples      12" in r.stdout and "compression" in r.stdout
    r = run_cli("verify", str(dst), "--quiet")
    assert r.returncode == 0 and "intact" in r.stdout


def test_synth_straight_into_store(tmp_path):
    assert main(["synth", str(tmp_path / "m"), "--to", "memmap", "--count", "7", "--size", "16", "16",
                 "--quiet"]) == 0
    from streamseg import open_store

    store = open_store(tmp_path / "m")
    assert len(store) == 7 and store.backend == "memmap" and store.names[0] == "case_000000"


@pytest.mark.parametrize("args, message", [
    (["convert", "{tmp}/nope", "{tmp}/out"], "does not exist"),
    (["info", "{tmp}/nope"], "No store at"),
    (["convert", "--images", "{tmp}/a.npy", "{tmp}/out"], "both images= and masks="),
])
def test_errors_are_one_line_with_exit_2(tmp_path, args, message):
    r = run_cli(*[a.format(tmp=tmp_path) for a in args])
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_verify_reports_damage_with_exit_1(tmp_path):
    assert main(["synth", str(tmp_path / "z"), "--to", "zarr", "--count", "6", "--size", "16", "16",
                 "--chunk-samples", "2", "--quiet"]) == 0
    chunk = tmp_path / "z" / "masks" / "c" / "1" / "0" / "0" / "0"
    chunk.write_bytes(b"not blosc")
    r = run_cli("verify", str(tmp_path / "z"), "--quiet")
    assert r.returncode == 1
    assert "masks chunk 1 (samples 2-3, case_000002" in r.stdout
