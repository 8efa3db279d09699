"""Rich tables for scenario results, side by side when several backends ran."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

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
