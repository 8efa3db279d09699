"""Each command as a subprocess (``python -m keybus``) against the real brokers: tail
shows what is published after it started, publish -> tail round trips envelopes, topics
are created, described, listed and deleted, lag shows a held group, health tells a live
broker from an unreachable one. Skipped for a broker not in ``KEYBUS_BACKENDS``."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import pytest_asyncio

import keybus
from keybus.testing import LeakChecker
from tests.conftest import Backend, backend_fixture, enabled_backends
from tests.helpers import eventually, unused_port

BROKERS = [name for name in ("kafka", "nats") if name in enabled_backends()]
if not BROKERS:
    pytest.skip("no broker in KEYBUS_BACKENDS", allow_module_level=True)

COMMAND_TIMEOUT = 60.0  # a whole command, connect to exit
STOP_BOUND = 15.0  # a signalled command, signal to exit


@pytest_asyncio.fixture(params=BROKERS)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    async for value in backend_fixture(request.param):
        yield value


async def keybus_cli(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
    """Run ``keybus ARGS`` to its end: (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "keybus", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(
            process.communicate(stdin.encode() if stdin else b""), COMMAND_TIMEOUT
        )
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@dataclass
class Running:
    """A command left running (tail), its output collected as it comes."""

    process: asyncio.subprocess.Process
    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    async def start(cls, *args: str, stdin: bool = False) -> Running:
        """``stdin``: a pipe the test writes to (and keeps open), else none."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "keybus", *args,
            stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        running = cls(process)
        assert process.stdout is not None
        assert process.stderr is not None
        running.readers = [
            asyncio.create_task(_collect(process.stdout, running.out)),
            asyncio.create_task(_collect(process.stderr, running.err)),
        ]
        return running

    async def until_following(self) -> str:
        """Once tail says it follows (it subscribed): the group it reads in."""
        await eventually(
            lambda: (
                any("following" in line for line in self.err) or self.process.returncode is not None
            ),
            timeout=COMMAND_TIMEOUT,
            what="tail to follow",
        )
        text = " ".join(self.err)
        assert "following" in text, text
        return text.split(" in group ", 1)[1].split()[0]

    async def records(self, count: int) -> list[dict[str, object]]:
        await eventually(lambda: len(self.out) >= count, timeout=COMMAND_TIMEOUT,
                         what=f"{count} records")  # fmt: skip
        return [json.loads(line) for line in self.out[:count]]

    async def exit_code(self, timeout: float = COMMAND_TIMEOUT) -> int:
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout)
        finally:
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
            await asyncio.gather(*self.readers)
        return code


async def _collect(stream: asyncio.StreamReader, lines: list[str]) -> None:
    while line := await stream.readline():
        lines.append(line.decode().rstrip("\n"))


async def make_topic(backend: Backend, partitions: int = 3) -> str:
    topic = backend.topic("cli")
    code, _out, err = await keybus_cli(
        "topics", backend.url, "create", topic, "--partitions", str(partitions)
    )
    assert code == 0, err
    return topic


async def kafka_groups(url: str) -> set[str]:
    """The consumer groups the Kafka broker knows."""
    from confluent_kafka.admin import AdminClient

    def ask() -> set[str]:
        admin = AdminClient({"bootstrap.servers": url.split("://", 1)[1]})
        listed = admin.list_consumer_groups(request_timeout=10).result()
        return {g.group_id for g in listed.valid}

    return await asyncio.to_thread(ask)


async def drop_kafka_group(url: str, group: str) -> None:
    """Delete a named group's committed offsets (a test leaves nothing behind; on NATS
    the group's durables go with the topic's stream)."""
    from confluent_kafka.admin import AdminClient

    def drop() -> None:
        admin = AdminClient({"bootstrap.servers": url.split("://", 1)[1]})
        admin.delete_consumer_groups([group], request_timeout=10)[group].result()

    await asyncio.to_thread(drop)


async def test_tail_shows_an_envelope_published_after_it_started(backend: Backend) -> None:
    topic = await make_topic(backend)
    code, _, err = await keybus_cli("publish", backend.url, topic, "--key", "old", "before")
    assert code == 0, err
    tail = await Running.start("tail", backend.url, topic, "--envelope", "--json", "--max", "1")
    group = await tail.until_following()
    code, out, err = await keybus_cli(
        "publish", backend.url, topic, "--envelope", "--aggregate-id", "order-7",
        "--type", "OrderPlaced", "--version", "3", "--header", "origin=cli-test",
        '{"total": 12.5}',
    )  # fmt: skip
    assert code == 0, err
    assert "acknowledged" in out
    [record] = await tail.records(1)
    assert await tail.exit_code() == 0, tail.err
    assert record["topic"] == topic
    assert record["key"] == "order-7", "the record published before tail started is not shown"
    assert record["envelope"] == {
        **record["envelope"],  # type: ignore[dict-item]
        "aggregate_id": "order-7",
        "event_type": "OrderPlaced",
        "event_version": 3,
        "payload": {"total": 12.5},
    }
    assert record["headers"]["origin"] == "cli-test"  # type: ignore[index]
    assert record["headers"]["X-Event-Version"] == "3"  # type: ignore[index]
    if backend.name == "kafka":
        assert group.startswith("keybus-anon-")
        assert group not in await kafka_groups(backend.url), "the private group was dropped"


async def test_tail_last_and_from_beginning_then_pretty_output(backend: Backend) -> None:
    topic = await make_topic(backend, partitions=1)
    lines = "\n".join(f'{{"n": {n}}}' for n in range(1, 6))
    code, _, err = await keybus_cli(
        "publish", backend.url, topic, "--envelope", "--aggregate-id", "a", "--type", "T",
        stdin=lines,
    )  # fmt: skip
    assert code == 0, err
    code, out, err = await keybus_cli(
        "tail", backend.url, topic, "--envelope", "--json", "--last", "2", "--max", "2"
    )
    assert code == 0, err
    shown = [json.loads(line)["envelope"]["payload"]["n"] for line in out.splitlines()]
    assert shown == [4, 5]
    code, out, err = await keybus_cli(
        "tail", backend.url, topic, "--envelope", "--from-beginning", "--max", "5"
    )
    assert code == 0, err
    assert "event_type = T" in out
    assert out.count(f"{topic} [0]") == 5
    assert '"n": 1' in out
    assert '"n": 5' in out


async def test_tail_exits_0_on_sigterm_and_sigint(backend: Backend) -> None:
    topic = await make_topic(backend)
    for number in (signal.SIGTERM, signal.SIGINT):
        tail = await Running.start("tail", backend.url, topic)
        await tail.until_following()
        tail.process.send_signal(number)
        assert await tail.exit_code() == 0, tail.err
        assert not any("Traceback" in line for line in tail.err)


async def test_publish_from_an_open_stdin_stops_promptly_on_sigint(backend: Backend) -> None:
    """The input stays open (a producer upstream still running): Ctrl-C ends the
    command at once, with what it read published, instead of waiting for a next line."""
    topic = await make_topic(backend)
    publish = await Running.start("publish", backend.url, topic, "--key", "k", "--json", stdin=True)
    assert publish.process.stdin is not None
    try:
        publish.process.stdin.write(b"one\ntwo\n")
        await publish.process.stdin.drain()
        acked = await publish.records(2)
        assert [row["bytes"] for row in acked] == [3, 3]
        publish.process.send_signal(signal.SIGINT)
        began = time.monotonic()
        # (the bus's close on a healthy broker takes well under a second; the bound
        # leaves room for a loaded machine, a blocked read would never end)
        assert await publish.exit_code(timeout=STOP_BOUND) == 130, publish.err
        took = time.monotonic() - began
    finally:
        publish.process.stdin.close()
    assert took < STOP_BOUND
    assert not any("Traceback" in line for line in publish.err), publish.err
    code, out, err = await keybus_cli(
        "tail", backend.url, topic, "--from-beginning", "--max", "2", "--json"
    )
    assert code == 0, err
    assert sorted(json.loads(line)["value"] for line in out.splitlines()) == ["one", "two"]


async def test_topics_create_describe_list_delete(backend: Backend) -> None:
    topic = backend.topic("cli-topics")
    code, out, err = await keybus_cli(
        "topics", backend.url, "create", topic, "--partitions", "4", "--json"
    )
    assert code == 0, err
    assert json.loads(out) == {"topic": topic, "partitions": 4, "created": True}
    code, out, err = await keybus_cli("topics", backend.url, "describe", topic, "--json")
    assert code == 0, err
    described = json.loads(out)
    assert described["partitions"] == 4
    assert [row["records"] for row in described["detail"]] == [0, 0, 0, 0]
    code, out, err = await keybus_cli("topics", backend.url, "list", "--json")
    assert code == 0, err
    listed = json.loads(out)["topics"]
    assert topic in listed
    assert not [name for name in listed if name.startswith("__") or name.startswith("KV_")]
    code, out, err = await keybus_cli("topics", backend.url, "delete", topic)
    assert code == 0, err
    code, out, err = await keybus_cli("topics", backend.url, "describe", topic)
    assert code == 1
    assert "no such topic" in err
    assert "Traceback" not in err
    code, out, err = await keybus_cli("topics", backend.url, "list", "--json")
    assert topic not in json.loads(out)["topics"]


async def test_lag_of_a_held_group_then_of_one_that_caught_up(backend: Backend) -> None:
    topic = await make_topic(backend)
    group = f"cli-held-{unused_port()}"
    lines = "\n".join(f"record {n}" for n in range(6))
    code, _, err = await keybus_cli("publish", backend.url, topic, "--key", "k", stdin=lines + "\n")
    assert code == 0, err
    code, out, err = await keybus_cli(
        "lag", backend.url, "--group", group, "--topic", topic, "--json"
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["total"] == 6, "a group that consumed nothing lags by every record"
    assert {row["committed"] for row in report["partitions"]} == {None}
    code, out, err = await keybus_cli("lag", backend.url, "--group", group, "--topic", topic)
    assert code == 0, err
    assert "6 records behind" in out
    try:
        await _consume_and_catch_up(backend, topic, group)
    finally:
        if backend.name == "kafka":
            await drop_kafka_group(backend.url, group)


async def _consume_and_catch_up(backend: Backend, topic: str, group: str) -> None:
    # A member of the group reads and commits all six.
    code, out, err = await keybus_cli(
        "tail", backend.url, topic, "--group", group, "--max", "6", "--json"
    )
    assert code == 0, err
    assert len(out.splitlines()) == 6

    async def caught_up() -> bool:
        code, out, _ = await keybus_cli("lag", backend.url, "--group", group, "--json")
        return code == 0 and json.loads(out)["total"] == 0 and bool(json.loads(out)["partitions"])

    # Without --topic: the topics where the group committed.
    await eventually(caught_up, timeout=COMMAND_TIMEOUT, what="the group to show no lag")


async def test_lag_watch_refreshes_until_sigint(backend: Backend) -> None:
    topic = await make_topic(backend)
    watch = await Running.start(
        "lag", backend.url, "--group", "cli-watch", "--topic", topic, "--watch", "0.2",
        "--json",
    )  # fmt: skip
    await watch.records(1)
    code, _, err = await keybus_cli("publish", backend.url, topic, "--key", "k", "one")
    assert code == 0, err

    def saw_one() -> bool:
        return any(json.loads(line)["total"] == 1 for line in watch.out)

    await eventually(saw_one, timeout=COMMAND_TIMEOUT, what="a refresh showing the record")
    watch.process.send_signal(signal.SIGINT)
    assert await watch.exit_code() == 0, watch.err


async def test_health_ok_on_a_live_broker_and_exit_1_on_an_unreachable_one(
    backend: Backend,
) -> None:
    code, out, err = await keybus_cli("health", backend.url, "--json")
    assert code == 0, err
    assert json.loads(out)["ok"] is True
    assert backend.unreachable_url is not None
    scheme, rest = backend.unreachable_url.split("://", 1)
    # (Kafka takes a user and password in the URL with a SASL mechanism only.)
    query = "?sasl=PLAIN" if scheme == "kafka" else ""
    secret_url = f"{scheme}://someone:hunter2@{rest}{query}"
    began = time.monotonic()
    code, out, err = await keybus_cli("health", secret_url, "--connect-timeout", "2")
    took = time.monotonic() - began
    assert code == 1
    assert "NOT healthy" in out
    assert "hunter2" not in out + err, "credentials are redacted"
    assert took < 2 + 8, f"bounded by the connect timeout (took {took:.1f} s)"


async def test_errors_are_one_red_line_not_a_traceback(backend: Backend) -> None:
    code, _out, err = await keybus_cli("publish", backend.url, "cli-no-such-topic", "x")
    assert code == 1
    assert "no such topic" in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


async def test_list_topics_of_the_transport(backend: Backend, no_leaks: LeakChecker) -> None:
    async with keybus.connect(backend.url) as bus:
        topic = backend.topic("cli-listed")
        await bus.ensure_topic(topic)
        assert topic in await bus.list_topics()
        await bus.delete_topic(topic)
        assert topic not in await bus.list_topics()
