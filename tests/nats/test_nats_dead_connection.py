"""NATS: a connection nats-py closed for good is never left "open and dead". The
transport notices (nats-py's closed callback), connects a new client and carries on —
publishes wait for it, subscriptions resume at their committed positions — or, if no new
client can be connected in time, it reports itself failed and every later call raises a
``ConnectError`` naming the cause.

nats-py is made to close its connection for good the real way, by a server ``-ERR``: the
TCP proxy slips a protocol line the server does not know into the client's connection,
the server answers ``-ERR 'Unknown Protocol Operation'`` and closes it, and nats-py then
closes the connection without reconnecting — as it does after ``-ERR 'Maximum Payload
Violation'`` for an oversized message (which ``tests/nats/test_nats_sizes.py`` shows
keybus never sends; sent raw, the server's reset of a connection with a megabyte still
unread can swallow the ``-ERR``, and nats-py merely reconnects, so it is no reliable
trigger)."""

from __future__ import annotations

import asyncio
import time

import pytest
from nats.aio.client import Client as NatsClient

import keybus
from keybus.testing import LeakChecker
from tests.conftest import Backend
from tests.helpers import Collected, eventually
from tests.nats.proxy import NatsProxy


def client_of(bus: keybus.EventBus) -> NatsClient:
    client: NatsClient = bus._transport._conn._nc  # type: ignore[attr-defined]
    return client


async def kill_for_good(client: NatsClient, proxy: NatsProxy) -> None:
    """Have nats-py close ``client`` (connected through ``proxy``) for good."""
    await proxy.inject(b"KEYBUS-TEST-UNKNOWN-OP\r\n")
    await eventually(lambda: client.is_closed, what="nats-py closing the connection for good")


async def test_a_connection_closed_for_good_is_replaced_and_consumption_resumes_in_order(
    nats_proxy: NatsProxy, backend: Backend, no_leaks: LeakChecker
) -> None:
    """After the kill, the same bus publishes (the first publish waits for the new
    client) and its subscription resumes at the committed position: v1..v10 of one key,
    nothing lost, nothing out of order. Before, the bus stayed "open" with a dead client:
    every publish raised ConnectionClosedError and consumption stopped for good."""
    topic = backend.topic("replaced")
    got = Collected()

    def seen() -> list[int]:
        return [int(value) for value in got.values()]

    async with keybus.connect(nats_proxy.url, group="replaced", heartbeat=0.2) as bus:
        await bus.ensure_topic(topic, keybus.TopicConfig(partitions=1))
        await bus.subscribe(topic, got)
        for version in (1, 2, 3, 4, 5):
            await bus.publish(topic, b"%d" % version, key="k")
        await eventually(lambda: seen() == [1, 2, 3, 4, 5], what="v1..v5")
        old = client_of(bus)
        await kill_for_good(old, nats_proxy)
        for version in (6, 7, 8, 9, 10):
            await bus.publish(topic, b"%d" % version, key="k")
        await eventually(lambda: 10 in seen(), what="v10 after the replacement", timeout=15)
        assert list(dict.fromkeys(seen())) == list(range(1, 11)), f"out of order: {seen()}"
        transport = bus._transport  # type: ignore[attr-defined]
        assert transport.replacements == 1
        assert transport.failure is None
        assert client_of(bus) is not old
        assert not bus.closed


@pytest.mark.slow
async def test_publishes_wait_while_the_connection_is_being_replaced(
    nats_proxy: NatsProxy, backend: Backend, no_leaks: LeakChecker
) -> None:
    """The server cannot be reached for a moment after the kill: a publish made then
    waits for the new client (bounded by publish_timeout) and succeeds, instead of
    failing on the dead one."""
    async with keybus.connect(nats_proxy.url, publish_timeout=10.0) as bus:
        topic = backend.topic("waiting")
        await bus.ensure_topic(topic)
        nats_proxy.refuse = True
        await kill_for_good(client_of(bus), nats_proxy)
        publishing = asyncio.create_task(bus.publish(topic, b"waited"))
        await eventually(lambda: nats_proxy.refused >= 2, what="replacement attempts refused")
        assert not publishing.done(), "the publish waits for the new client"
        nats_proxy.refuse = False
        await asyncio.wait_for(publishing, 10)
        assert bus._transport.replacements == 1  # type: ignore[attr-defined]


@pytest.mark.slow
async def test_a_connection_that_cannot_be_replaced_fails_every_call_loudly(
    nats_proxy: NatsProxy, backend: Backend, no_leaks: LeakChecker
) -> None:
    """No new client can connect within replace_timeout: the transport reports itself
    failed (``failure``), and every later call raises a ConnectError that names the
    cause — never a bus that looks open while nothing works. Close is still bounded and
    leaves nothing behind."""
    bus = await keybus.connect(nats_proxy.url, group="failed", replace_timeout=1.0)
    try:
        topic = backend.topic("failed")
        await bus.ensure_topic(topic)

        async def ignore(message: keybus.Message) -> None:
            pass

        await bus.subscribe(topic, ignore)
        nats_proxy.refuse = True
        await kill_for_good(client_of(bus), nats_proxy)
        transport = bus._transport  # type: ignore[attr-defined]
        await eventually(lambda: transport.failure is not None, what="failed", timeout=10)
        calls = [
            lambda: bus.publish(topic, b"x"),
            lambda: bus.ensure_topic(topic + "-new"),  # (the bus remembers what it ensured)
            lambda: bus.describe_topic(topic),
            lambda: bus.subscribe(topic + "-2", ignore),
        ]
        for call in calls:
            with pytest.raises(keybus.ConnectError) as raised:
                await call()
            assert "unknown protocol operation" in raised.value.reason.lower()
            assert "could not be replaced within 1 s" in raised.value.reason
    finally:
        started = time.monotonic()
        await bus.close(timeout=0.5)
        assert time.monotonic() - started < 5.0
        nats_proxy.refuse = False
