#!/usr/bin/env bash
# Regenerate every figure of benchmarks/RESULTS.md, in the order of its sections.
#
#   tools/run_benchmarks.sh            # all sections (hours on a 2-core machine, ~40 GB of bench_data/)
#   tools/run_benchmarks.sh 3 5        # only sections 3 and 5
#
# Raw outputs go to benchmarks/results/ (the files RESULTS.md quotes); synthetic data to bench_data/
# (git-ignored, reused when present).  Run it on an otherwise idle machine, from an activated virtual
# environment with the project installed (pip install -e ".[test,bench]"); then copy the new figures,
# with the commit they were made at, into benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
R=benchmarks/results
D=bench_data
STORE=$D/synth_n1024_256px_c3_seed0/store.zarr
mkdir -p "$R" "$D"
SECTIONS="${*:-}"
want() { [ -z "$SECTIONS" ] || [[ " $SECTIONS " == *" $1 "* ]]; }
say() { printf '\n=== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }
synth() { [ -e "$1" ] || python -m streamseg.cli synth "$@"; }

if want 1; then
  say "1. conversion"
  synth $D/png_1000 --count 1000 --size 256 256
  synth $D/png_10000 --count 10000 --size 256 256
  python benchmarks/bench_convert.py --data $D --counts 1000 10000 --workers 1 2 --out $R/convert.json
fi
if want 2; then
  say "2. micro-benchmarks"
  python -m pytest benchmarks/test_micro.py --benchmark-only --benchmark-json $R/micro.json
fi
if want 3; then
  say "3. one-run comparison with peers (also builds $STORE)"
  python benchmarks/compare.py --out $R/compare.json --count 1024 --workers 1 2 --warmup 4 --steps 60 \
      --step-ms 0 40
fi
if want 4; then
  say "4. memory against dataset size; 16 GiB cold under a 4 GiB cap"
  synth $D/scale_4096.memmap --to memmap --count 4096 --size 256 256 --workers 2
  synth $D/scale_16384.memmap --to memmap --count 16384 --size 256 256 --workers 2
  synth $D/scale_65536.memmap --to memmap --count 65536 --size 256 256 --workers 2
  python benchmarks/scaling.py --stores $D/scale_4096.memmap $D/scale_16384.memmap $D/scale_65536.memmap \
      --steps 200 --cap-last 4G --out $R/scaling.json
  python -m streamseg.cli bench $D/scale_65536.memmap --steps 200 --warmup 10 --step-ms 20 --workers 2 \
      --augment standard --memory-cap 4G --json $R/scale_16g_cold_cap4g.json
fi
if want 5; then
  say "5. input stall against consumer demand"
  synth "$STORE" --count 1024 --size 256 256 --classes 3 --to zarr  # the store section 3 builds
  python benchmarks/stall.py $STORE --workers 1 --share 0.5 0.8 --repeat 2 --steps 150 --out $R/stall_w1.json
  python benchmarks/stall.py $STORE --workers 2 --share 0.5 0.8 --repeat 3 --steps 150 --out $R/stall.json
  python benchmarks/stall.py $STORE --workers 2 --share 0.5 0.8 --repeat 3 --steps 150 \
      --worker-priority idle --out $R/stall_idle.json
  python benchmarks/stall.py $STORE --workers 2 --share 0.5 0.8 --repeat 3 --steps 150 \
      --worker-priority low --out $R/stall_low.json
  python benchmarks/bridge_floor.py --step-ms 26.27 --epochs 6
  synth $D/exit96.zarr --count 96 --size 256 256 --classes 3 --to zarr
  python benchmarks/exit_stress.py $D/exit96.zarr --workers 2 --runs 50 --busy 2
fi
if want 6; then
  say "6. worker start methods"
  python benchmarks/start_methods.py $STORE
fi
if want 7; then
  say "7. hot-path capacity (compare with the previous commit by running this on both checkouts)"
  for mode in "" "--threads"; do
    python -m streamseg.cli bench $STORE --step-ms 0 --steps 60 --warmup 4 --workers 2 --augment standard \
        $mode --json $R/capacity${mode:+_threads}.json
  done
fi
if want 13; then
  say "13. issue 14: peers, efficiency, zarr vs memmap, stall timeline"
  python benchmarks/compare.py --count 2048 --workers 2 --step-ms 0 --steps 90 --warmup 6 --rounds 3 \
      --pipelines tfdata_map_batch_memmap tfdata_map_sample_memmap streamseg_zarr streamseg_memmap \
      streamseg_zarr_uint8 streamseg_memmap_uint8 --out $R/compare_issue14_n2048.json
  for backend in memmap zarr; do for dtype in float32 uint8; do
    python benchmarks/efficiency.py --backend $backend --workers 2 --batches 96 --rounds 3 --passes 3 \
        --dtype $dtype --out $R/efficiency_${backend}_${dtype}.json
  done; done
  python benchmarks/backends_ab.py --count 512 --rounds 5 --batches 96 --out $R/backends_ab_float32.json
  for r in 0 1 2; do for backend in memmap zarr; do
    python benchmarks/timeline.py --backend $backend --count 2048 --epochs 3 --share 0.8 \
        --out $R/timeline_${backend}_normal_r$r.json --plot $R/timeline_${backend}_normal_r$r.png
  done; done
fi
say "done; copy the figures into benchmarks/RESULTS.md"
