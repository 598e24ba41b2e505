"""What the start method of the worker processes costs a training script.

Usage::

    python benchmarks/start_methods.py STORE --methods fork forkserver spawn

Each method runs in a fresh interpreter that, like a training script, imports Keras first; it
creates a ``SegmentationDataset`` with 2 worker processes and times the first batch (worker
start-up included) and the next 19, twice (a second dataset in the same process, when a
forkserver is already running).  It also reports whether the workers imported TensorFlow
(under forkserver/spawn each worker imports the main script again) and their summed PSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
import keras  # like a training script
import psutil
from streamseg import SegmentationDataset

def once(store, method):
    t = time.perf_counter()
    ds = SegmentationDataset(store, 32, workers=2, use_multiprocessing=True, start_method=method,
                             augment="standard")
    ds[0]
    first = time.perf_counter() - t
    for i in range(1, 20):
        ds[i]
    rest = time.perf_counter() - t - first
    pids = ds._feeder.pool.pids
    pss = sum(psutil.Process(p).memory_full_info().pss for p in pids)
    tf = []
    for p in pids:
        maps = open(f"/proc/{p}/maps").read()
        tf.append("libtensorflow" in maps or "_pywrap_tensorflow" in maps)
    ds.close()
    return {"first_batch_s": round(first, 3), "next_19_s": round(rest, 3),
            "workers_pss_mib": round(pss / 2**20), "workers_loaded_tensorflow": tf}

if __name__ == "__main__":
    store, method = sys.argv[1], sys.argv[2]
    print(json.dumps({"method": method, "runs": [once(store, method), once(store, method)]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--methods", nargs="+", default=["fork", "forkserver", "spawn"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:  # a script file, as users run (not -c: no main to re-import)
        script = Path(tmp) / "train_like.py"
        script.write_text(CHILD)
        for method in args.methods:
            run_one(script, args.store, method)


def run_one(script: Path, store: str, method: str) -> None:
    """Run the script under one start method and print its JSON line."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, str(script), store, method], capture_output=True, text=True)
    if out.returncode != 0:
        print(f"{method}: failed: {out.stderr.strip().splitlines()[-1:]}")
        return
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = round(time.perf_counter() - t, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
