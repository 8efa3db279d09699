"""Rich tables: scenario results side by side (``keybus demo``), and ``keybus bench``'s
summary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import JustifyMethod
from rich.table import Table

from keybus.bench.format import leftovers, number, series, spread_text, verdict
from keybus.bench.scenario import ScenarioResult


def _resources(result: ScenarioResult, name: str) -> str:
    before = result.resources_before.get(name, 0)
    peak = result.resources_peak.get(name, 0)
    after = result.resources_after.get(name, 0)
    return f"{before} → {peak} → {after}"


def results_table(results: Sequence[ScenarioResult], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("measure", style="bold")
    for result in results:
        table.add_column(result.url, justify="right")

    def row(label: str, *cells: str) -> None:
        table.add_row(label, *cells)

    row("delivered / expected", *(f"{r.delivered} / {r.messages}" for r in results))
    row("order violations", *(str(r.order_violations) for r in results))
    row("duplicates", *(str(r.duplicates) for r in results))
    row("lost", *(str(r.lost) for r in results))
    row("retried in place / dead-lettered", *(f"{r.retries} / {r.dead_lettered}" for r in results))
    row("topics x aggregates", *(f"{r.topics} x {r.aggregates}" for r in results))
    row("throughput (msg/s)", *(f"{r.throughput:,.0f}" for r in results))
    row("first publish → last delivery", *(f"{r.seconds:.3f} s" for r in results))
    for q in (0.5, 0.95, 0.99):
        row(f"latency p{round(q * 100)} (ms)", *(f"{r.latency(q):.2f}" for r in results))
    for name in ("tasks", "threads", "native_threads", "fds"):
        row(f"{name} before → peak → after close", *(_resources(r, name) for r in results))
    row(
        "verdict",
        *("[green]ok[/green]" if r.ok else "[red]FAILED[/red]" for r in results),
    )
    return table


def summary_table(summary: Sequence[Mapping[str, Any]], title: str) -> Table:
    """``keybus bench``'s summary: one line per level x backend (x client); medians over
    the repeats, min-max under them (the HTML report has every figure)."""
    table = Table(title=title, title_justify="left", caption=_CAPTION, caption_justify="left")
    for name, justify in _COLUMNS:
        table.add_column(name, justify=justify, overflow="fold")
    for entry in summary:
        latency = entry["latency_ms"]
        rss = entry["rss_mb"]
        ok = entry["ok"]
        overhead = entry["overhead_vs_raw"]
        table.add_row(
            entry["level"],
            series(entry["backend"], entry["client"]),
            f"[green]{verdict(entry)}[/green]" if ok else f"[red]{verdict(entry)}[/red]",
            f"{entry['lost']}/{entry['duplicates']}/{entry['order_violations']}",
            spread_text(entry["publish_rate"], newline=True),
            spread_text(entry["throughput"], newline=True),
            "/".join(number(latency[p]["median"], 1) for p in ("p50", "p95", "p99", "max")),
            spread_text(entry["cpu_s_per_1k"], 3, newline=True),
            "/".join(number(rss[w]["median"], 0) for w in ("before", "peak", "after")),
            leftovers(entry["leftovers"]),
            spread_text(overhead, 2, newline=True) if overhead else "",
        )
    return table


_COLUMNS: list[tuple[str, JustifyMethod]] = [
    ("level", "left"),
    ("side", "left"),
    ("verdict", "left"),
    ("lost/dup/order", "right"),
    ("publish msg/s", "right"),
    ("e2e msg/s", "right"),
    ("latency ms p50/p95/p99/max", "right"),
    ("CPU s/1k", "right"),
    ("RSS MB before/peak/after", "right"),
    ("left after close", "right"),
    ("keybus/raw", "right"),
]
_CAPTION = (
    "publish = messages / (last ack - first publish); e2e = messages / (last handled - first "
    "publish); latency = publish call -> handler start; left after close = tasks, threads, "
    "native threads, fds the run left behind after close() returned."
)
