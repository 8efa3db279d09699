"""``keybus topics``: list, describe, create and delete topics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from keybus.bus import EventBus
from keybus.cli import common
from keybus.errors import TopicError
from keybus.topics import TopicConfig

__all__ = ["topics"]

ACTIONS = ("list", "describe", "create", "delete")


def topics(
    url: str | None = common.URL,
    action: str | None = typer.Argument(
        None,
        metavar="ACTION",
        help="list (the default), describe, create or delete.",
        show_default=False,
    ),
    topic: str | None = typer.Argument(
        None, metavar="TOPIC", help="The topic (describe, create, delete).", show_default=False
    ),
    partitions: int | None = typer.Option(
        None, "--partitions", min=1, help="create: the partition count (required)."
    ),
    replication: int = typer.Option(1, "--replication", min=1, help="create: the replicas."),
    retention: float | None = typer.Option(
        None, "--retention", min=0.001, help="create: seconds records are kept (backend's default)."
    ),
    as_json: bool = common.JSON,
    config: Path | None = common.CONFIG,
    connect_timeout: float = common.CONNECT_TIMEOUT,
) -> None:
    """List the topics, or describe, create or delete one. list hides the backend's own
    (Kafka's __consumer_offsets, NATS key-value buckets; on NATS it lists the topics of
    keybus's stream layout)."""
    where, (chosen, name) = common.target(url, config, connect_timeout, action, topic)
    chosen = chosen or "list"
    if chosen not in ACTIONS:
        raise typer.BadParameter(f"{chosen!r}: use {', '.join(ACTIONS)}", param_hint="ACTION")
    if chosen == "list" and name is not None:
        raise typer.BadParameter(f"list takes no topic (got {name!r})")
    if chosen != "list" and name is None:
        raise typer.BadParameter(f"{chosen} needs a topic", param_hint="TOPIC")
    if chosen == "create" and partitions is None:
        raise typer.BadParameter("create needs --partitions", param_hint="--partitions")
    if chosen != "create" and (partitions is not None or retention is not None):
        raise typer.BadParameter("--partitions and --retention go with create")
    settings = None
    if chosen == "create":
        assert partitions is not None
        settings = TopicConfig(
            partitions=partitions, replication_factor=replication, retention_seconds=retention
        )

    async def act(stop: asyncio.Event) -> int:
        async with common.open_bus(where) as bus:
            if chosen == "list":
                return await _list(bus, as_json)
            assert name is not None
            if chosen == "describe":
                return await _describe(bus, name, as_json)
            if chosen == "create":
                assert settings is not None
                return await _create(bus, where, name, settings, as_json)
            return await _delete(bus, name, as_json)

    common.run(where, act)


async def _list(bus: EventBus, as_json: bool) -> int:
    names = await bus.list_topics()
    if as_json:
        common.emit_json({"topics": names})
    else:
        for name in names:
            common.console.print(escape(name))
    return 0


async def _describe(bus: EventBus, topic: str, as_json: bool) -> int:
    info = await bus.describe_topic(topic)
    # The bus's own group is a fresh private one: its lag is what each partition holds.
    lag = await bus.lag(topic)
    rows = [{"partition": p.partition, "end": p.end, "records": p.lag} for p in lag.partitions]
    if as_json:
        common.emit_json({"topic": info.name, "partitions": info.partitions, "detail": rows})
        return 0
    table = Table(title=f"{info.name}: {info.partitions} partition(s)")
    for column in ("partition", "end", "records"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(str(row[c]) for c in ("partition", "end", "records")))
    common.console.print(table)
    return 0


async def _exists(bus: EventBus, topic: str) -> int | None:
    try:
        return (await bus.describe_topic(topic)).partitions
    except TopicError:
        return None


async def _create(
    bus: EventBus, where: common.Target, topic: str, settings: TopicConfig, as_json: bool
) -> int:
    # ensure_topic keeps an existing topic as it is: say so rather than claim it created.
    existing = await _exists(bus, topic)
    if existing is not None:
        raise TopicError(topic, "create", f"it exists already ({existing} partitions)")
    await bus.ensure_topic(topic, settings)
    info = await bus.describe_topic(topic)
    if as_json:
        common.emit_json({"topic": info.name, "partitions": info.partitions, "created": True})
    else:
        common.console.print(f"created {escape(info.name)} ({info.partitions} partitions)")
    return 0


async def _delete(bus: EventBus, topic: str, as_json: bool) -> int:
    if await _exists(bus, topic) is None:
        raise TopicError(topic, "delete", "no such topic")
    await bus.delete_topic(topic)
    if as_json:
        common.emit_json({"topic": topic, "deleted": True})
    else:
        common.console.print(f"deleted {escape(topic)}")
    return 0
