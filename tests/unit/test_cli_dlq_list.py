"""``keybus dlq``: the parked keys read from the broker's store and the exit-code
contract (0 listed, 3 parked with --fail-if-parked or still parked after a request, 4 no
member answered, 1 a connection failure through the CLI's common error path)."""

from __future__ import annotations

import asyncio
import json

from typer.testing import CliRunner

import keybus
from keybus.cli.app import app
from keybus.cli.dlq import PARKED, TIMED_OUT
from keybus.parking import Parked, encode, store_key
from keybus.testing.leaks import LeakChecker
from keybus.transports.memory import MemoryBroker
from tests.helpers import unused_port


async def _park(url: str) -> None:
    async with keybus.connect(url) as bus:
        state = Parked(0, 3, "e-3", "RuntimeError: cannot apply", 0.0, count=2)
        await bus.publish("t.dlq.parked", encode(state), key=store_key("g", "order-1"))
        await bus.publish("t.dlq.parked", encode(state), key=store_key("other", "order-2"))


def test_dlq_list_shows_the_parked_keys_of_the_group(no_leaks: LeakChecker) -> None:
    broker = MemoryBroker.named("cli-dlq")  # held: the broker outlives the setup's bus
    asyncio.run(_park("memory://cli-dlq"))
    runner = CliRunner()
    result = runner.invoke(app, ["dlq", "list", "memory://cli-dlq", "t", "--group", "g"])
    assert result.exit_code == 0, result.output
    assert "order-1" in result.output
    assert "t/0/3" in result.output
    assert "order-2" not in result.output
    flagged = ["dlq", "list", "memory://cli-dlq", "t", "--group", "g", "--fail-if-parked"]
    result = runner.invoke(app, flagged)
    assert result.exit_code == PARKED, result.output
    assert "order-1" in result.output
    as_json = runner.invoke(app, ["dlq", "list", "memory://cli-dlq", "t", "--group", "g", "--json"])
    assert as_json.exit_code == 0, as_json.output
    [row] = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert (row["key"], row["count"], row["first_failure"]) == ("order-1", 2, "t/0/3")
    empty = runner.invoke(
        app, ["dlq", "list", "memory://cli-dlq", "t", "--group", "none", "--fail-if-parked"]
    )
    assert empty.exit_code == 0, empty.output
    assert "no parked keys" in empty.output
    stored = sum(len(log.records) for log in broker.topics["t.dlq.parked"].logs)
    assert stored == 2, "the store is only read"


def test_dlq_list_of_an_unreachable_broker_fails_through_the_common_path(
    no_leaks: LeakChecker,
) -> None:
    url = f"nats://127.0.0.1:{unused_port()}"
    result = CliRunner().invoke(
        app, ["dlq", "list", url, "t", "--group", "g", "--connect-timeout", "1"]
    )
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("keybus: "), result.stderr
    assert "Traceback" not in result.output


def test_dlq_replay_without_a_serving_member_exits_4_and_of_an_unparked_key_0(
    no_leaks: LeakChecker,
) -> None:
    broker = MemoryBroker.named("cli-dlq-replay")
    asyncio.run(_park("memory://cli-dlq-replay"))
    runner = CliRunner()
    base = ["memory://cli-dlq-replay", "t", "--group", "g", "--timeout", "1"]
    result = runner.invoke(app, ["dlq", "replay", *base, "--key", "order-1"])
    assert result.exit_code == TIMED_OUT, result.output
    assert "still parked" in result.stderr
    assert "no member of group 'g' answered" in result.stderr
    result = runner.invoke(app, ["dlq", "discard", *base, "--key", "order-9"])
    assert result.exit_code == 0, result.output
    assert "order-9 is not parked" in result.stdout
    stored = sum(len(log.records) for log in broker.topics["t.dlq.parked"].logs)
    assert stored == 3, "one request written (unanswered); none for a key not parked"
