"""NATS: close is bounded — by the deadline it is given — even with a server that does
not answer, and leaves nothing behind: no task, socket or fd in the process, no durable
consumer of an anonymous group on the server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest
from nats.js import JetStreamContext

import keybus
from keybus.deadline import Deadline
from keybus.testing import LeakChecker
from keybus.topics import TopicConfig
from keybus.transports.nats import NatsTransport
from tests.conftest import Backend, BusFactory
from tests.helpers import Collected, eventually
from tests.nats.proxy import NatsProxy
from tests.nats.server import consumers, holding


async def _ignore(message: keybus.Message) -> None:
    pass


@pytest.mark.slow
async def test_close_with_unacknowledged_publishes_is_bounded_and_leaves_nothing(
    nats_proxy: NatsProxy, open_bus: BusFactory, backend: Backend
) -> None:
    topic = backend.topic("closepub")
    admin = await open_bus()
    await admin.ensure_topic(topic)
    bus = await keybus.connect(nats_proxy.url)
    try:
        await bus.publish(topic, b"warm-up")
        nats_proxy.blackhole = True
        publishes = [asyncio.create_task(bus.publish(topic, b"x")) for _ in range(3)]
        # Stored on the server, their PubAcks black-holed: all three wait for their acks.
        await eventually(holding(backend.url, topic, 4), what="3 publishes in flight")
    finally:
        started = time.monotonic()
        await bus.close(timeout=0.5)
        took = time.monotonic() - started
    assert took < 3.0, f"close took {took:.2f} s"
    results = await asyncio.gather(*publishes, return_exceptions=True)
    assert all(isinstance(r, keybus.PublishError) for r in results), results
    # no_leaks: the client's tasks and socket are gone


@pytest.mark.slow
async def test_close_of_a_group_member_with_a_silent_server_is_bounded_and_leaves_nothing(
    nats_proxy: NatsProxy, open_bus: BusFactory, backend: Backend
) -> None:
    topic = backend.topic("closegroup")
    bus = await keybus.connect(nats_proxy.url, group="closegroup")
    try:
        await bus.subscribe(topic, _ignore)
        await bus.publish(topic, b"one", key="k")
        nats_proxy.blackhole = True
    finally:
        started = time.monotonic()
        await bus.close(timeout=0.5)
        took = time.monotonic() - started
    assert took < 3.0, f"close took {took:.2f} s"
    # no_leaks: no keybus-nats-* task, no client task, no socket


@pytest.mark.slow
async def test_transport_close_with_a_silent_server_meets_its_deadline(
    nats_proxy: NatsProxy, no_leaks: LeakChecker, backend: Backend
) -> None:
    """The transport sizes its close from the deadline it is given (not from the core's
    usual 5 s): with publishes waiting for PubAcks that never come and a client whose
    close hangs, a 1 s deadline is met, and nothing is left behind."""
    topic = backend.topic("deadline")
    transport = NatsTransport(nats_proxy.url)
    await transport.connect(Deadline.after(5))
    try:
        await transport.ensure_topic(topic, TopicConfig())
        nats_proxy.blackhole = True
        publishes = [
            asyncio.create_task(transport.publish(topic, b"x", None, {})) for _ in range(3)
        ]
        await eventually(holding(backend.url, topic, 3), what="3 publishes in flight")
    finally:
        started = time.monotonic()
        await transport.close(Deadline.after(1.0))
        took = time.monotonic() - started
    assert took < 1.0, f"close took {took:.2f} s"
    results = await asyncio.gather(*publishes, return_exceptions=True)
    assert all(isinstance(r, keybus.PublishError) for r in results), results


async def test_an_anonymous_member_closed_while_taking_a_partition_leaves_no_durable(
    open_bus: BusFactory, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bus without group= is closed while its member creates a partition's consumer
    and the create's reply is late: the server created the durable, the member's take
    is cancelled. Its close must delete that durable too (nobody can ever name an
    anonymous group again to clean it up)."""
    topic = backend.topic("anontake")
    admin = await open_bus()
    await admin.ensure_topic(topic, keybus.TopicConfig(partitions=1))
    add_consumer = JetStreamContext.add_consumer
    created: list[str] = []

    async def late_reply(self: JetStreamContext, *args: Any, **kwargs: Any) -> Any:
        info = await add_consumer(self, *args, **kwargs)
        created.append(info.name)
        await asyncio.Event().wait()  # the reply never comes in time

    monkeypatch.setattr(JetStreamContext, "add_consumer", late_reply)
    bus = await open_bus()
    subscribing = asyncio.create_task(bus.subscribe(topic, _ignore))
    await eventually(lambda: bool(created), what="the durable created on the server")
    await bus.close(timeout=0.5)
    with contextlib.suppress(keybus.KeybusError):
        await subscribing
    left = [c.name for c in await consumers(backend.url, topic)]
    assert left == [], f"durables left behind: {left}"


async def test_open_close_cycles_leave_no_tasks_sockets_or_server_consumers(
    backend: Backend,
) -> None:
    topic = backend.topic("cycles")
    async with LeakChecker(timeout=10):
        async with keybus.connect(backend.url) as admin:
            await admin.ensure_topic(topic)
        for cycle in range(20):
            async with keybus.connect(backend.url) as bus:  # anonymous group each time
                got = Collected()
                await bus.subscribe(topic, got)
                await bus.publish(topic, f"c{cycle}".encode())
                value = f"c{cycle}".encode()
                await eventually(lambda got=got, v=value: v in got.values(), what="it")
        assert await consumers(backend.url, topic) == [], (
            "anonymous groups remove their durables when they leave"
        )
