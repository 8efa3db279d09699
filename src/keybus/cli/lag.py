"""``keybus lag``: where a consumer group stands, per partition: committed, end, lag.

The group's topics come from ``--topic`` (repeatable). Without it every topic the
backend lists is asked about and those where the group committed anything are shown:
a group that never committed (one that consumed nothing yet) shows only with
``--topic``.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import typer
from rich.live import Live
from rich.table import Table

from keybus.bus import EventBus
from keybus.cli import common
from keybus.lag import PartitionLag

__all__ = ["lag"]

_ASKED_AT_ONCE = 8  # topics asked about concurrently when listing them all


# (a module-level default: a list-typed option's default call would be a mutable one)
_TOPICS = typer.Option(
    None, "--topic", help="A topic (repeat for more; default: every topic G committed in)."
)


def lag(
    url: str | None = common.URL,
    group: str = typer.Option(..., "--group", help="The consumer group."),
    topic: list[str] | None = _TOPICS,
    watch: float = typer.Option(
        0, "--watch", min=0, help="Refresh every S seconds until Ctrl-C (0: once)."
    ),
    as_json: bool = common.JSON,
    config: Path | None = common.CONFIG,
    connect_timeout: float = common.CONNECT_TIMEOUT,
) -> None:
    """A consumer group's lag per partition: its committed position, the partition's end
    and the records it has not committed."""
    where, _ = common.target(url, config, connect_timeout)

    async def show(stop: asyncio.Event) -> int:
        async with common.open_bus(where) as bus:
            if not watch:
                _print(await _rows(bus, group, topic or []), group, as_json)
                return 0
            with Live(console=common.console, auto_refresh=False, transient=False) as live:
                while not stop.is_set():
                    rows = await _rows(bus, group, topic or [])
                    if as_json:
                        _print(rows, group, True)
                    else:
                        live.update(_table(rows, group), refresh=True)
                    # Until the next refresh, or at once on Ctrl-C.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), watch)
        return 0

    common.run(where, show, follows=bool(watch))


async def _rows(bus: EventBus, group: str, topics: list[str]) -> list[PartitionLag]:
    if topics:
        found = await asyncio.gather(*(bus.lag(t, group) for t in topics))
        return [row for lag in found for row in lag.partitions]
    gate = asyncio.Semaphore(_ASKED_AT_ONCE)

    async def ask(name: str) -> list[PartitionLag]:
        async with gate:
            rows = (await bus.lag(name, group)).partitions
        return list(rows) if any(r.committed is not None for r in rows) else []

    found_all = await asyncio.gather(*(ask(name) for name in await bus.list_topics()))
    return [row for rows in found_all for row in rows]


def _row_json(row: PartitionLag) -> dict[str, Any]:
    return {
        "topic": row.topic,
        "partition": row.partition,
        "committed": row.committed,
        "end": row.end,
        "lag": row.lag,
    }


def _print(rows: list[PartitionLag], group: str, as_json: bool) -> None:
    if as_json:
        total = sum(r.lag for r in rows)
        partitions = [_row_json(r) for r in rows]
        common.emit_json({"group": group, "total": total, "partitions": partitions})
    else:
        common.console.print(_table(rows, group))


def _table(rows: list[PartitionLag], group: str) -> Table:
    table = Table(title=f"group {group}: {sum(r.lag for r in rows)} records behind")
    table.add_column("topic")
    for column in ("partition", "committed", "end", "lag"):
        table.add_column(column, justify="right")
    for row in rows:
        committed = "-" if row.committed is None else str(row.committed)
        style = "red" if row.lag else None
        table.add_row(
            row.topic, str(row.partition), committed, str(row.end), str(row.lag), style=style
        )
    return table
