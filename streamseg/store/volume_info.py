"""``streamseg info`` for stores converted from medical volumes: cases, geometry, intensities, labels.

The manifest of a volume store keeps the source's description under ``params.source``
(``kind == "volumes"``), with one record per case (see
:meth:`streamseg.io.volume_source.VolumeSliceSource.describe`).  :func:`volume_summary` boils
that down to what ``info`` shows (and ``info --json`` puts under ``"volumes"``);
:func:`volume_lines` formats it in the style of :func:`streamseg.store.inspect.format_info`.
May import: :mod:`streamseg.errors`.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

__all__ = ["volume_summary", "volume_lines"]


def _range(values: list[float]) -> list[float] | None:
    return [min(values), max(values)] if values else None


def _channel_range(cases: list[dict[str, Any]], part: str, lo_key: str, hi_key: str) -> list[list[float]]:
    """Per channel ``[lowest lo_key, highest hi_key]`` over the cases (None where no case has one)."""
    channels = max((len(c["intensity"][part][lo_key]) for c in cases), default=0)
    out = []
    for ch in range(channels):
        lows = [c["intensity"][part][lo_key][ch] for c in cases
                if c["intensity"][part][lo_key][ch] is not None]
        highs = [c["intensity"][part][hi_key][ch] for c in cases
                 if c["intensity"][part][hi_key][ch] is not None]
        out.append([min(lows) if lows else None, max(highs) if highs else None])
    return out


def volume_summary(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """Summary of the volumes a store was converted from; None for any other store.

    Parameters
    ----------
    manifest : dict
        The store's manifest (``Store.meta``).

    Returns
    -------
    dict or None
        JSON-serialisable: ``cases``, ``slices`` (stored, of ``total``), ``axis``, ``context``,
        ``skip_empty``, ``shape`` and ``spacing`` (per RAS axis ``[min, max]``),
        ``orientations`` on disk (code -> cases), ``intensity`` (per channel: ``overall``
        ``[min, max]``, ``overall_p`` and ``foreground_p`` ``[lowest p0.5, highest p99.5]``
        over the cases, and the pooled ``foreground`` statistics when recorded), ``dtype``
        of the stored images, ``labels`` (original value -> voxels over all cases) and
        ``label_table`` (stored label k -> original value, when remapped).
    """
    src = (manifest.get("params") or {}).get("source") or {}
    if src.get("kind") != "volumes":
        return None
    cases = list(src.get("cases") or manifest.get("cases") or [])
    labels: Counter[int] = Counter()
    for case in cases:
        for value, voxels in case.get("labels", {}).items():
            labels[int(value)] += int(voxels)
    axes = range(3)
    summary: dict[str, Any] = {
        "cases": len(cases),
        "slices": sum(int(c.get("selected", 0)) for c in cases),
        "total_slices": sum(int(c.get("slices", 0)) for c in cases),
        "layout": manifest.get("layout", "slices"),
        "axis": src.get("axis"),
        "context": src.get("context", 0),
        "skip_empty": bool(src.get("skip_empty")),
        "keep_empty": src.get("keep_empty", 0.0),
        "shape": [_range([c["shape"][a] for c in cases]) for a in axes],
        "spacing": [_range([c["spacing"][a] for c in cases]) for a in axes],
        "orientations": dict(sorted(Counter(c.get("orientation", "?") for c in cases).items())),
        "dtype": src.get("image_dtype"),
        "intensity": {
            "overall": _channel_range(cases, "overall", "min", "max"),
            "overall_p": _channel_range(cases, "overall", "p0_5", "p99_5"),
            "foreground_p": _channel_range(cases, "foreground", "p0_5", "p99_5"),
        },
        "labels": {str(v): labels[v] for v in sorted(labels)},
        "label_table": src.get("label_table"),
        "images_dir": src.get("images_dir"),
    }
    pooled = src.get("foreground_intensity")
    if pooled:
        summary["intensity"]["foreground"] = {k: pooled[k] for k in ("p0_5", "p99_5", "mean", "std")
                                              if k in pooled}
    return summary


def _num(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.4g}"


def _span(r: list[float] | None, unit: str = "") -> str:
    if r is None:
        return "n/a"
    return f"{_num(r[0])}{unit}" if r[0] == r[1] else f"{_num(r[0])}..{_num(r[1])}{unit}"


def volume_lines(summary: dict[str, Any]) -> list[str]:
    """Lines for :func:`volume_summary`'s result, aligned like ``format_info``'s."""
    channels = len(summary["intensity"]["overall"])
    def per(key: str) -> str:  # channels separated by "; "
        return "; ".join(_span(r) for r in summary["intensity"][key])

    hu = " (HU, if CT)" if summary.get("dtype") == "int16" else ""
    kept = f"{summary['slices']} of {summary['total_slices']} slices"
    if summary["skip_empty"]:
        kept += f" (empty ones skipped, {summary['keep_empty']:.0%} kept)"
    ctx = summary["context"]
    lines = [
        f"volumes      {summary['cases']} cases from {summary.get('images_dir')}",
        f"slicing      {summary['axis']}, {kept}"
        + (f", context {ctx} ({2 * ctx + 1} slices x {channels} channel(s) per sample)" if ctx else ""),
    ]
    if summary.get("layout") == "volumes":
        lines = lines[:1]
    lines += [
        f"case shape   {' x '.join(_span(r) for r in summary['shape'])} voxels (RAS)",
        f"spacing      {' x '.join(_span(r) for r in summary['spacing'])} mm",
        "on disk      " + ", ".join(f"{k} ({n})" for k, n in summary["orientations"].items()),
        f"intensity    {per('overall')}{hu}; 0.5-99.5%: {per('overall_p')}",
        f"foreground   0.5-99.5%: {per('foreground_p')}",
    ]
    pooled = summary["intensity"].get("foreground")
    if pooled and pooled.get("mean"):
        lines[-1] += "; pooled mean " + ", ".join(_num(m) for m in pooled["mean"]) + \
            " std " + ", ".join(_num(s) for s in pooled["std"])
    total = sum(summary["labels"].values()) or 1
    lines.append("vol labels   " + ", ".join(f"{k}: {v} voxels ({v / total:.2%})"
                                             for k, v in summary["labels"].items()))
    table = summary.get("label_table")
    if table:
        lines.append("label table  " + ", ".join(f"{k}<-{v}" for k, v in enumerate(table))
                     + " (stored <- original)")
    return lines
