"""The report's charts, drawn by matplotlib (no pyplot, no global backend): each as SVG
markup to inline in ``report.html`` and as a PNG next to it (for the README)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from keybus.bench.format import series
from keybus.bench.resources import KINDS

__all__ = ["CHARTS", "draw", "write_charts"]

Summary = Sequence[Mapping[str, Any]]

CHARTS = {
    "throughput": "End-to-end throughput per level and backend (median, bars: min-max)",
    "latency": "Latency, publish call → handler start: p50, p95, p99, max (median over repeats)",
    "overhead": "keybus throughput / raw client throughput, paired run by run (1.0 = raw)",
    "resources": "Resources before the run, at its peak, and after close() returned",
}
_PALETTE = {
    "memory": "#7f7f7f",
    "kafka": "#1f77b4",
    "kafka raw": "#aec7e8",
    "nats": "#2ca02c",
    "nats raw": "#98df8a",
}
_WHEN_COLORS = {"before": "#bdbdbd", "peak": "#ff7f0e", "after": "#2ca02c"}
_THOUSANDS = FuncFormatter(lambda value, _: f"{value:,.0f}")


def _color(name: str) -> str:
    return _PALETTE.get(name, "#9467bd")


def _series(summary: Summary) -> list[str]:
    return list(dict.fromkeys(series(e["backend"], e["client"]) for e in summary))


def _levels(summary: Summary) -> list[str]:
    return list(dict.fromkeys(e["level"] for e in summary))


def _lookup(summary: Summary) -> dict[tuple[str, str], Mapping[str, Any]]:
    return {(e["level"], series(e["backend"], e["client"])): e for e in summary}


def _grouped_bars(
    ax: Any,
    levels: list[str],
    names: list[str],
    value: Any,
) -> None:
    """Bars per level (x) and series; ``value(level, name)`` -> spread or None."""
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs, heights, low, high = [], [], [], []
        for x, level in enumerate(levels):
            spread = value(level, name)
            if not spread or spread.get("median") is None:
                continue
            xs.append(x + (i - (len(names) - 1) / 2) * width)
            heights.append(spread["median"])
            low.append(spread["median"] - spread["min"])
            high.append(spread["max"] - spread["median"])
        if xs:
            ax.bar(xs, heights, width, label=name, color=_color(name), yerr=[low, high], capsize=2)
    ax.set_xticks(range(len(levels)), levels)
    ax.grid(axis="y", alpha=0.3)


def _throughput(summary: Summary) -> Figure:
    fig = Figure(figsize=(9, 4.2), layout="constrained")
    ax = fig.add_subplot()
    table = _lookup(summary)
    _grouped_bars(
        ax,
        _levels(summary),
        _series(summary),
        lambda level, name: table.get((level, name), {}).get("throughput"),
    )
    ax.set_ylabel("messages / s (first publish → last handled)")
    ax.yaxis.set_major_formatter(_THOUSANDS)
    fig.legend(loc="outside lower center", ncols=5, fontsize="small")
    fig.suptitle(CHARTS["throughput"], fontsize="medium")
    return fig


def _latency(summary: Summary) -> Figure:
    fig = Figure(figsize=(10, 6), layout="constrained")
    table = _lookup(summary)
    levels, names = _levels(summary), _series(summary)
    for i, p in enumerate(("p50", "p95", "p99", "max")):
        ax = fig.add_subplot(2, 2, i + 1)
        _grouped_bars(
            ax,
            levels,
            names,
            lambda level, name, p=p: table.get((level, name), {}).get("latency_ms", {}).get(p),
        )
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.set_title(p, fontsize="medium")
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=5, fontsize="small")
    fig.suptitle(CHARTS["latency"], fontsize="medium")
    return fig


def _overhead(summary: Summary) -> Figure | None:
    entries = [e for e in summary if e.get("overhead_vs_raw")]
    if not entries:
        return None
    fig = Figure(figsize=(9, 4), layout="constrained")
    ax = fig.add_subplot()
    table = {(e["level"], e["backend"]): e["overhead_vs_raw"] for e in entries}
    brokers = list(dict.fromkeys(e["backend"] for e in entries))
    _grouped_bars(ax, _levels(entries), brokers, lambda level, b: table.get((level, b)))
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label="raw client = 1.0")
    ax.set_ylabel("keybus / raw (throughput)")
    fig.legend(loc="outside lower center", ncols=3, fontsize="small")
    fig.suptitle(CHARTS["overhead"], fontsize="medium")
    return fig


def _resources(summary: Summary) -> Figure:
    """At the largest level (the most pressure): before / peak / after per series."""
    largest = max(summary, key=lambda e: e["messages"])["level"]
    entries = [e for e in summary if e["level"] == largest]
    names = [series(e["backend"], e["client"]) for e in entries]
    kinds = [*KINDS, "rss_mb"]
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    width = 0.27
    for i, kind in enumerate(kinds):
        ax = fig.add_subplot(1, len(kinds), i + 1)
        for j, when in enumerate(("before", "peak", "after")):
            heights = [
                (e["rss_mb"][when]["median"] if kind == "rss_mb" else e["resources"][kind][when])
                or 0
                for e in entries
            ]
            xs = [x + (j - 1) * width for x in range(len(entries))]
            ax.bar(xs, heights, width, color=_WHEN_COLORS[when], label=when)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize="small")
        ax.set_title("RSS (MB)" if kind == "rss_mb" else kind.replace("_", " "), fontsize="small")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize="small")
    fig.suptitle(f"{CHARTS['resources']} (level {largest})", fontsize="medium")
    return fig


def draw(summary: Summary) -> dict[str, Figure]:
    """The charts this summary has data for, by name."""
    figures: dict[str, Figure | None] = {
        "throughput": _throughput(summary),
        "latency": _latency(summary),
        "overhead": _overhead(summary),
        "resources": _resources(summary),
    }
    return {name: fig for name, fig in figures.items() if fig is not None}


def _svg(fig: Figure) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # no XML declaration or doctype inside HTML


def write_charts(summary: Summary, out: Path) -> dict[str, str]:
    """Write ``<name>.png`` into ``out``; return each chart's inline SVG by name."""
    svgs = {}
    for name, fig in draw(summary).items():
        fig.savefig(out / f"{name}.png", format="png", dpi=110)
        svgs[name] = _svg(fig)
    return svgs
