"""``keybus bench``: the Kafka-vs-NATS comparison done honestly (registered by app.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import shlex
import webbrowser
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from keybus.bench.environment import environment, load_average
from keybus.bench.format import number, series
from keybus.bench.levels import LEVELS, Level, resolve_levels
from keybus.bench.output import write_outputs
from keybus.bench.report import summary_table
from keybus.bench.results import Row, summarize
from keybus.bench.session import BACKENDS, Side, choose_sides, run_all
from keybus.bench.stats import Tracker

__all__ = ["bench"]

console = Console()
DEFAULT_LEVELS = "low,medium,high,extreme"
DEFAULT_OUT = "bench-results"


def _names(text: str, allowed: tuple[str, ...] | list[str], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise typer.BadParameter(f"unknown {what} {', '.join(unknown)}: use {', '.join(allowed)}")
    return names


class _Display:
    """The live progress: one line for the run under way (published and handled of
    expected), a printed line for each run that ended. Refreshed by the run's sampler, so
    it has no thread of its own, and it redraws one line, not the whole log."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.current: tuple[str, str, str, int] | None = None
        self.task: TaskID | None = None
        self.label = ""

    def tick(self, side: Side, level: Level, repeat: int, tracker: Tracker) -> None:
        key = (level.name, side.backend, side.client, repeat)
        if key != self.current:
            self.current = key
            self.label = f"{level.name} {series(side.backend, side.client)}"
            self.label += " (warm-up)" if repeat == 0 else f" #{repeat}"
            self.task = self.progress.add_task(self.label, total=tracker.expected, status="")
        assert self.task is not None
        self.progress.update(
            self.task,
            completed=tracker.completed,
            status=f"published {tracker.published_count:,}  handled {tracker.completed:,}",
        )
        self.progress.refresh()

    def done(self, row: Row) -> None:
        if self.task is None:
            return
        if row.ok:
            status = f"[green]ok[/green] {number(row.throughput)} msg/s"
        else:
            status = f"[red]FAILED[/red] {row.error or 'resources left after close'}"
        self.progress.remove_task(self.task)
        self.progress.console.print(f"{self.label}: {row.delivered:,}/{row.messages:,} {status}")
        self.progress.refresh()
        self.current = self.task = None


def _command(options: dict[str, object]) -> str:
    """The command line that reproduces this run (options at their default left out)."""
    words = ["keybus", "bench"]
    for name, value in options.items():
        if value is True:
            words.append(name)
        elif value not in (None, False, "", 0) and not (name == "--repeat" and value == 1):
            words += [name, str(value)]
    return shlex.join(words)


def bench(
    backends: str = typer.Option(
        ",".join(BACKENDS),
        help="Comma-separated: memory, kafka, nats. A broker that does not answer is skipped "
        "(KEYBUS_KAFKA_URL / KEYBUS_NATS_URL point elsewhere).",
    ),
    levels: str = typer.Option(
        "",
        help=f"Comma-separated: {', '.join(LEVELS)} (default: {DEFAULT_LEVELS}, or only the "
        "custom level when --messages is given).",
    ),
    messages: int | None = typer.Option(None, min=1, help="Adds a custom level of N messages."),
    aggregates: int | None = typer.Option(
        None,
        min=1,
        help="Aggregates (publishers) for every level; default messages/10 in 50..1000.",
    ),
    topics: int | None = typer.Option(None, min=1, help="Topics for every level (default 5)."),
    partitions: int | None = typer.Option(
        None, min=1, help="Partitions per topic for every level (default 3)."
    ),
    payload_bytes: int | None = typer.Option(
        None, min=0, help="Payload padding per envelope for every level (default 100)."
    ),
    handler_ms: float | None = typer.Option(
        None, min=0, help="Time each handler call takes, for every level (default 0)."
    ),
    raw: bool = typer.Option(
        False, "--raw", help="Add raw confluent-kafka / nats-py doing the same work, no bus."
    ),
    repeat: int = typer.Option(1, min=1, help="Runs per level and side; medians with min-max."),
    out: str = typer.Option(DEFAULT_OUT, help="Where results.json, report.html go."),
    open_report: bool = typer.Option(False, "--open", help="Open report.html when done."),
    timeout: float = typer.Option(
        0, min=0, help="Bound per run in s (0: 60 + 2 per 1,000 messages); past it, it fails."
    ),
    warmup: bool = typer.Option(True, help="One small unrecorded run per side first."),
) -> None:
    """Compare Kafka, NATS JetStream and memory on the Go SDK's levels (and beyond): real
    timestamps, latency percentiles, losses / duplicates / order violations, resources
    after close(). Writes results.json and a self-contained report.html (with PNG charts);
    exits non-zero if any run was not ok."""
    try:
        chosen = resolve_levels(
            _names(levels or ("" if messages else DEFAULT_LEVELS), list(LEVELS), "level"),
            messages=messages,
            aggregates=aggregates,
            topics=topics,
            partitions=partitions,
            payload_bytes=payload_bytes,
            handler_ms=handler_ms,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    names = _names(backends, BACKENDS, "backend")
    if not chosen or not names:
        raise typer.BadParameter("nothing to run: give at least one level and one backend")
    command = _command(
        {
            "--backends": backends,
            "--levels": levels,
            "--messages": messages,
            "--aggregates": aggregates,
            "--topics": topics,
            "--partitions": partitions,
            "--payload-bytes": payload_bytes,
            "--handler-ms": handler_ms,
            "--raw": raw,
            "--repeat": repeat,
            "--out": out,
            "--timeout": timeout,
            "--no-warmup": not warmup,
        }
    )
    started = dt.datetime.now(dt.UTC)
    rows, env = asyncio.run(_bench(chosen, names, raw, repeat, timeout, warmup))
    env["load_average_end"] = load_average()
    meta = {
        "tool": "keybus bench",
        "command": command,
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "levels": [dataclasses.asdict(level) for level in chosen],
        "repeat": repeat,
    }
    summary = summarize(rows)
    console.print(summary_table(summary, "keybus bench (medians, min-max below them)"))
    paths = write_outputs(Path(out), rows, env, meta)
    console.print(f"results: {paths['json']}\nreport:  {paths['html']}")
    failed = [row for row in rows if not row.ok]
    for row in failed:
        console.print(
            f"[red]FAILED[/red] {row.level} {series(row.backend, row.client)} #{row.repeat}: "
            f"{row.error or ''} lost {row.lost}, order violations {row.order_violations}"
        )
        if row.leftover_report:
            console.print(row.leftover_report, markup=False)
    if open_report:
        webbrowser.open(paths["html"].resolve().as_uri())
    if failed:
        raise typer.Exit(1)


async def _bench(
    levels: list[Level],
    backends: list[str],
    raw: bool,
    repeat: int,
    timeout: float,
    warmup: bool,
) -> tuple[list[Row], dict[str, Any]]:
    sides = await choose_sides(
        backends, raw, lambda line: console.print(f"[yellow]{line}[/yellow]")
    )
    env = await environment({side.backend: side.url for side in sides})
    console.print(
        f"[bold]keybus bench[/bold]: {', '.join(level.name for level in levels)} on "
        f"{', '.join(dict.fromkeys(series(s.backend, s.client) for s in sides))}, "
        f"{repeat} repeat(s); {env['cpu_count']} CPUs, load {env['load_average_start']}"
    )
    with Progress(
        TextColumn("{task.description}", style="bold"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,}"),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        auto_refresh=False,
    ) as progress:
        display = _Display(progress)
        rows = await run_all(
            levels,
            sides,
            repeat=repeat,
            timeout=timeout or None,
            warmup=warmup,
            progress=display.tick,
            finished=display.done,
        )
    return rows, env
