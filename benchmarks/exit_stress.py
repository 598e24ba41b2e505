"""Does a script exit cleanly with a tf.data iterator left mid-epoch?  Run it many times.

Usage::

    python benchmarks/exit_stress.py STORE --workers 2 --runs 50 --busy 2

Each run is a fresh interpreter that makes a dataset, takes two batches from
``ds.to_tf_dataset()`` and exits while tf.data's prefetch thread is producing the next one
(the situation of ``tests/test_training.py::test_interpreter_exits_with_a_tf_iterator_left_mid_epoch``).
``--busy N`` keeps N busy-loop processes competing for the cores meanwhile.  Prints the
count of each outcome: ``ok``, ``rc=N`` (negative: killed by that signal), ``hung`` (no exit
within ``--timeout`` s).  Set ``PYTHONFAULTHANDLER=1`` to see where a crashing run was.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys

CHILD = """
import sys
from streamseg import SegmentationDataset
w = int(sys.argv[2])
ds = SegmentationDataset(sys.argv[1], 32, augment="heavy", num_classes=3, workers=w, use_multiprocessing=w > 0)
it = iter(ds.to_tf_dataset())
next(it)
next(it)
print("left mid-epoch", flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--busy", type=int, default=0, help="busy-loop processes to run meanwhile")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--show", type=int, default=4000, help="characters of a failed run's stderr to print")
    args = ap.parse_args()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    outcomes: collections.Counter = collections.Counter()
    try:
        for k in range(args.runs):
            try:
                out = subprocess.run([sys.executable, "-c", CHILD, args.store, str(args.workers)],
                                     capture_output=True, text=True, timeout=args.timeout)
                what = "ok" if out.returncode == 0 and "left mid-epoch" in out.stdout else f"rc={out.returncode}"
                if what != "ok" and args.show:  # with PYTHONFAULTHANDLER=1: every thread's stack
                    print(out.stderr[-args.show:], flush=True)
            except subprocess.TimeoutExpired:
                what = "hung"
            outcomes[what] += 1
            print(f"run {k + 1}: {what}", flush=True)
    finally:
        for proc in busy:
            proc.kill()
    print(dict(outcomes))


if __name__ == "__main__":
    main()
