"""``keybus dlq list``: the parked keys read from the broker's store."""

from __future__ import annotations

import asyncio

from typer.testing import CliRunner

import keybus
from keybus.cli.app import app
from keybus.parking import Parked, encode, store_key
from keybus.testing.leaks import LeakChecker
from keybus.transports.memory import MemoryBroker


async def _park(url: str) -> None:
    async with keybus.connect(url) as bus:
        state = Parked(0, 3, "e-3", "RuntimeError: cannot apply", 0.0, count=2)
        await bus.publish("t.dlq.parked", encode(state), key=store_key("g", "order-1"))
        await bus.publish("t.dlq.parked", encode(state), key=store_key("other", "order-2"))


def test_dlq_list_shows_the_parked_keys_of_the_group_and_exits_1(no_leaks: LeakChecker) -> None:
    broker = MemoryBroker.named("cli-dlq")  # held: the broker outlives the setup's bus
    asyncio.run(_park("memory://cli-dlq"))
    runner = CliRunner()
    result = runner.invoke(app, ["dlq", "list", "memory://cli-dlq", "t", "--group", "g"])
    assert result.exit_code == 1, result.output
    assert "order-1" in result.output
    assert "t/0/3" in result.output
    assert "order-2" not in result.output
    empty = runner.invoke(app, ["dlq", "list", "memory://cli-dlq", "t", "--group", "none"])
    assert empty.exit_code == 0, empty.output
    assert "no parked keys" in empty.output
    stored = sum(len(log.records) for log in broker.topics["t.dlq.parked"].logs)
    assert stored == 2, "the store is only read"
