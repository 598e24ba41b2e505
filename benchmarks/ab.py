"""Per-round ratios of an alternating A/B benchmark, summarised as min / median / max.

Every A/B script here runs both variants once per round (order reversed every other round) and
reports ``a / b`` of a rate within each round, so that the machine's slow drift cancels.
"""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path
from typing import Any, Callable

__all__ = ["paired_ratios", "run_child", "report"]


def run_child(cmd: list[str], env: dict[str, str], record: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement child; its last ``RESULT {json}`` line, or ``record`` with the error."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line[-1][7:]) if line else {**record, "error": proc.stderr[-800:]}


def report(args: Any, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Print the summary; with ``args.out``, write the arguments, every run and the summary there."""
    print(json.dumps(summary))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "runs": rows, "summary": summary}, indent=1))


def paired_ratios(rows: list[dict[str, Any]], groups: list[str], group_of: Callable[[dict[str, Any]], str],
                  variant_of: Callable[[dict[str, Any]], str | None], a: str, b: str,
                  value: str = "samples_per_s") -> dict[str, dict[str, list[float]]]:
    """``{group: {"ratios": [a / b per round], "min_median_max": [...]}}`` over the rounds.

    Parameters
    ----------
    rows : list of dict
        One record per run, each with ``"round"`` and ``value``; failed runs have no value.
    groups : list of str
        The groups to summarise (a backend, a pipeline), in order.
    group_of, variant_of : callable
        The group and the variant (``a``, ``b`` or another) a record belongs to.
    a, b : str
        The variants whose ratio ``a / b`` is taken in every round where both succeeded.
    """
    out: dict[str, dict[str, list[float]]] = {}
    rounds = sorted({r["round"] for r in rows})
    for group in groups:
        ratios = []
        for k in rounds:
            got = {variant_of(x): x.get(value) for x in rows if x["round"] == k and group_of(x) == group}
            if got.get(a) and got.get(b):
                ratios.append(got[a] / got[b])
        if ratios:
            out[group] = {"ratios": ratios,
                          "min_median_max": [min(ratios), statistics.median(ratios), max(ratios)]}
    return out
