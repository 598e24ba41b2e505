"""Tables and the plot of a ``compare.py`` run: ratios against the best peer, the per-run table,
the per-pipeline summary (best peer and best same-backend peer, min/median/max over rounds).

Split from ``compare.py`` (which runs the pipelines) so each stays one concept.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

__all__ = ["augment_kind", "summarise", "summary_rows", "summary_table", "run_table", "text_table",
           "markdown_table", "plot"]


def augment_kind(name: str) -> str:
    """Which augmentation code pipeline ``name`` runs (a key of :func:`augment_costs`)."""
    if name.startswith("streamseg"):
        return "streamseg_uint8" if name.endswith("_uint8") else "streamseg"
    return {"seed_article": "legacy", "tfdata_tfrecord": "tf"}.get(name, "cv2")


def summarise(runs: list[dict[str, Any]], peers_names: tuple[str, ...]) -> None:
    """Add ``vs_best_peer`` and ``vs_zarr_baseline`` (samples/s ratios) to every successful run."""
    for run in runs:
        if run["status"] != "ok":
            continue
        same = [r for r in runs if r["status"] == "ok" and r["step_ms"] == run["step_ms"]
                and r["workers"] == run["workers"] and r.get("round", 0) == run.get("round", 0)]
        best = max((r for r in same if r["pipeline"] in peers_names), key=lambda r: r["samples_per_s"], default=None)
        base = next((r for r in same if r["pipeline"] == "zarr_per_sample"), None)
        run["best_peer"] = best["pipeline"] if best else None
        run["vs_best_peer"] = run["samples_per_s"] / best["samples_per_s"] if best else None
        run["vs_zarr_baseline"] = run["samples_per_s"] / base["samples_per_s"] if base else None


def summary_rows(runs: list[dict[str, Any]], peers_names: tuple[str, ...], backends: dict[str, str]
                 ) -> list[dict[str, Any]]:
    """Per streamseg pipeline, workers and consumer speed: the best peer and the best same-backend peer.

    The best peer has the highest median samples/s over the rounds; its ratio is streamseg /
    that peer within each round, given as ``[min, median, max]`` over the rounds.
    """
    rates: dict[tuple[str, int, float], dict[int, float]] = {}
    for r in runs:
        if r["status"] == "ok":
            rates.setdefault((r["pipeline"], r["workers"], r["step_ms"]), {})[r.get("round", 0)] = r["samples_per_s"]
    out = []
    for (name, workers, step_ms), own in rates.items():
        if not name.startswith("streamseg"):
            continue
        row: dict[str, Any] = {"pipeline": name, "workers": workers, "step_ms": step_ms,
                               "samples_per_s": statistics.median(own.values()), "rounds": len(own)}
        same = tuple(p for p in peers_names if backends.get(p) == backends.get(name))
        for key, pool in (("best_peer", peers_names), ("best_same_backend", same)):
            cand = {p: rates[(p, workers, step_ms)] for p in pool if (p, workers, step_ms) in rates}
            best = max(cand, key=lambda p: statistics.median(cand[p].values()), default=None)
            ratios = sorted(own[k] / cand[best][k] for k in own if best and k in cand[best])
            row[key] = None if best is None else {
                "pipeline": best, "samples_per_s": statistics.median(cand[best].values()),
                "ratio_min_median_max": [ratios[0], statistics.median(ratios), ratios[-1]] if ratios else None}
        out.append(row)
    return out


def summary_table(rows: list[dict[str, Any]]) -> list[list[str]]:
    table = [["streamseg", "workers", "step ms", "samples/s (median)", "best peer", "peer samples/s",
              "streamseg/peer min/med/max", "best same-backend peer", "peer samples/s", "streamseg/peer min/med/max"]]
    for r in rows:
        cells = [r["pipeline"], str(r["workers"]), f"{r['step_ms']:g}", f"{r['samples_per_s']:.1f}"]
        for key in ("best_peer", "best_same_backend"):
            b = r[key]
            q = b["ratio_min_median_max"] if b else None
            cells += [b["pipeline"], f"{b['samples_per_s']:.1f}", "/".join(f"{v:.2f}" for v in q) + "x"] if q \
                else ["-", "-", "-"]
        table.append(cells)
    return table


def run_table(runs: list[dict[str, Any]], aug_ms: dict[str, float] | None = None) -> list[list[str]]:
    def num(v: Any, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    aug_ms = aug_ms or {}
    rows = [["pipeline", "round", "workers", "step ms", "samples/s", "aug ms/sample (1 thread)", "stall",
             "USS+PSS MiB", "anon PSS MiB", "vs best peer", "vs zarr baseline", "status"]]
    for r in runs:
        ok = r["status"] == "ok"
        mem = r.get("memory", {})
        kind = augment_kind(r["pipeline"])
        rows.append([r["pipeline"], str(r.get("round", 0)), str(r["workers"]), f"{r['step_ms']:g}",
                     num(r.get("samples_per_s"), ".1f") if ok else "-",
                     num(aug_ms.get(kind), ".2f") + f" ({kind})",
                     num(r.get("stall_fraction"), ".2f") if ok and r["step_ms"] > 0 else "-",
                     num(mem.get("private", 0) / 2**20, ".0f") if ok else "-",
                     num(mem.get("tree_anon_pss", 0) / 2**20, ".0f") if ok else "-",
                     num(r.get("vs_best_peer"), ".2f") + ("x" if r.get("vs_best_peer") else ""),
                     num(r.get("vs_zarr_baseline"), ".2f") + ("x" if r.get("vs_zarr_baseline") else ""),
                     ("ok" + (f" ({r['exit_note']})" if r.get("exit_note") else "")) if ok
                     else (r.get("reason") or r.get("error") or r["status"])[:90]])
    return rows


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows[1:]])


def plot(runs: list[dict[str, Any]], labels: dict[str, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speeds = sorted({r["step_ms"] for r in runs})
    fig, axes = plt.subplots(1, len(speeds), figsize=(6.5 * len(speeds), 4.5), squeeze=False)
    for ax, speed in zip(axes[0], speeds):
        for name in dict.fromkeys(r["pipeline"] for r in runs):
            by_w: dict[int, list[float]] = {}
            for r in runs:
                if r["pipeline"] == name and r["step_ms"] == speed and r["status"] == "ok":
                    by_w.setdefault(r["workers"], []).append(r["samples_per_s"])
            pts = sorted((w, statistics.median(v)) for w, v in by_w.items())  # median over rounds
            failed = [r for r in runs if r["pipeline"] == name and r["step_ms"] == speed and r["status"] != "ok"]
            label = labels.get(name, name) + (f" ({failed[0]['status']})" if failed else "")
            style = "-o" if name.startswith("streamseg") else "--s"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        ax.set_title(f"consumer: simulated accelerator, {speed:g} ms/batch" if speed else "raw pipeline capacity "
                     "(step 0 ms)")
        ax.set_xlabel("workers")
        ax.set_ylabel("samples/s")
        ax.set_xticks(sorted({r["workers"] for r in runs}))
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
