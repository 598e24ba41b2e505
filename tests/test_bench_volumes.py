"""``streamseg bench`` on a ``--layout volumes`` store: PatchDataset throughput, stall, memory; option refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamseg.cli import build_parser, main


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from streamseg import convert
    from streamseg.io.sources import SynthSource
    from streamseg.io.synth_volumes import write_synth_volumes
    from streamseg.store.converter import convert_source

    root = tmp_path_factory.mktemp("bench_volumes")
    write_synth_volumes(root / "src", 3, shape=(32, 32, 16), seed=1, progress=False)
    convert(root / "src", root / "vol", layout="volumes", chunk_shape=(16, 16, 16), progress=False)
    convert_source(SynthSource(8, size=(16, 16), classes=3), root / "flat", chunk_samples=4, progress=False)
    return {"volumes": root / "vol", "flat": root / "flat"}


def _bench(store: Path, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "bench.json"
    rc = main(["bench", str(store), "--steps", "3", "--warmup", "1", "--step-ms", "5", "--json", str(out), *extra])
    assert rc == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_bench_volume_store_measures_patches(stores, tmp_path, capsys):
    r = _bench(stores["volumes"], tmp_path, "--patch-size", "16", "16", "8", "--samples-per-volume", "2",
               "--workers", "1")
    assert r["model"] == "simulated" and r["steps"] == 3 and r["batch_size"] == 2  # default: 2 patches
    assert r["patches_per_s"] > 0 and r["patches_per_s"] == r["samples_per_s"]
    assert r["samples_per_s"] == pytest.approx(r["batches_per_s"] * 2)
    assert r["batches_per_epoch"] == 3  # 3 cases x 2 patches / 2
    assert 0.0 <= r["stall_fraction"] <= r["overhead_fraction"] <= 1.0 and r["floor_s"] >= r["compute_s"]
    for key in ("main_uss", "main_rss", "main_rss_anon", "main_pss", "private", "tree_pss", "tree_anon_pss"):
        assert isinstance(r["memory"][key], int) and r["memory"][key] > 0, key
    assert r["memory"]["workers_pss"] > 0  # one worker process
    s = r["store"]
    assert s["layout"] == "volumes" and s["count"] == 3 and s["case_shapes"] == [[32, 32, 16]]
    assert s["chunk_shape"] == [16, 16, 16] and s["raw_bytes"] == 3 * 32 * 32 * 16 * 3 and s["disk_bytes"] > 0
    o = r["options"]
    assert o["patch_size"] == [16, 16, 8] and o["samples_per_volume"] == 2 and o["normalize"] == "ct"
    assert o["patches_per_epoch"] == 6 and o["shuffle"] == "uniform" and o["workers"] == 1
    text = capsys.readouterr().out
    assert "patches/s" in text and "PatchDataset: batch 2 patches of 16x16x8" in text
    assert "volumes: 3 cases of 32x32x16 voxels" in text and "input stall" in text


@pytest.mark.slow
def test_bench_volume_store_with_the_3d_unet(stores, tmp_path):
    r = _bench(stores["volumes"], tmp_path, "--model", "unet", "--patch-size", "16", "16", "8", "--workers", "0",
               "--augment", "none", "--shuffle", "none")
    assert r["model"] == "unet3d" and r["compute_source"].startswith("measured") and r["compute_s"] > 0
    assert r["patches_per_s"] > 0 and r["options"]["samples_per_volume"] == 4  # the default
    assert r["options"]["shuffle"] == "none" and r["options"]["augment"] == "none"


@pytest.mark.parametrize("which, args, message", [
    ("flat", ["--patch-size", "16", "16", "8"], "--patch-size applies to volume stores"),
    ("flat", ["--samples-per-volume", "2"], "--samples-per-volume applies to volume stores"),
    ("volumes", ["--patch-size", "0", "16", "8"], "Received: --patch-size 0 16 8"),
    ("volumes", ["--samples-per-volume", "0"], "Received: --samples-per-volume 0"),
    ("volumes", ["--model", "unet", "--patch-size", "18", "16", "8"], "divisible by 4"),
    ("volumes", ["--augment", "heavy"], "does not fit 3D patches"),
])
def test_bench_refuses_options_that_do_not_fit_the_store(stores, capsys, which, args, message):
    assert main(["bench", str(stores[which]), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Received:" in err and len(err.strip().splitlines()) == 1


def test_memory_cap_child_gets_the_patch_options(stores):
    from streamseg.bench.command import _child_argv
    from streamseg.bench.patches import resolve_store_options

    args = build_parser().parse_args(["bench", str(stores["volumes"]), "--patch-size", "16", "16", "8"])
    assert resolve_store_options(args) is True
    argv = _child_argv(args, "out.json")
    at = argv.index("--patch-size")
    assert argv[at:at + 6] == ["--patch-size", "16", "16", "8", "--samples-per-volume", "4"]
    assert argv[argv.index("--batch-size") + 1] == "2"
    flat = build_parser().parse_args(["bench", str(stores["flat"])])
    assert resolve_store_options(flat) is False and flat.batch_size == 32
    assert "--patch-size" not in _child_argv(flat, "out.json")
