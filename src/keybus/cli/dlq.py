"""``keybus dlq list``: the parked keys of a topic (``on_dead_letter="park"``), read from
the broker's parked-keys store, for an operator or a monitoring job.

A replay is not here: it hands the parked messages to the subscription's handler, which
lives in the service (``bus.replay_parked`` there)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

import keybus
from keybus.parking import ParkedKey

__all__ = ["dlq"]

dlq = typer.Typer(
    add_completion=False, help="Parked keys (subscriptions with on_dead_letter=park)."
)
console = Console()


async def _parked(
    url: str, topic: str, group: str, dead_letter_topic: str | None
) -> list[ParkedKey]:
    async with keybus.connect(url, group=group) as bus:
        return await bus.parked(topic, group=group, dead_letter_topic=dead_letter_topic)


@dlq.command("list")
def list_parked(
    url: Annotated[str, typer.Argument(help="The backend URL (kafka://, nats://, memory://).")],
    topic: Annotated[str, typer.Argument(help="The subscribed topic.")],
    group: Annotated[str, typer.Option(help="The subscription's group.")],
    dead_letter_topic: Annotated[
        str, typer.Option(help="The subscription's dead-letter topic (default: TOPIC.dlq).")
    ] = "",
) -> None:
    """List the parked keys of TOPIC in GROUP: count, first failure, age, reason. Exit
    code 0 when none is parked, 1 when some are (for a monitoring job)."""
    rows = asyncio.run(_parked(url, topic, group, dead_letter_topic or None))
    if not rows:
        console.print(f"no parked keys in {topic} ({group})")
        return
    table = Table(title=f"parked keys of {topic} ({group})")
    for column in ("key", "parked", "first failure", "event id", "age (s)", "reason"):
        table.add_column(column)
    for row in sorted(rows, key=lambda r: r.since):
        table.add_row(
            row.key,
            str(row.count),
            row.first_failure,
            row.event_id or "",
            f"{row.age:.0f}",
            row.reason,
        )
    console.print(table)
    raise typer.Exit(1)
