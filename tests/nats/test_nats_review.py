"""NATS: findings of the transport review (lease expiry during a long revoke, ...)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

import keybus
from keybus._aio import cancel_and_wait
from keybus.transports.nats_group import GroupMember
from tests.conftest import Backend, BusFactory
from tests.helpers import Collected, eventually, key_on
from tests.nats.proxy import NatsProxy
from tests.nats.test_nats_recovery import consumers


class TwoMembers:
    """What the two members of a hand-over see: member A's handlers hold until their
    key's ``release`` is set (or they are cancelled); B records what it handles, and any
    key it got while A's handler of that key still ran."""

    def __init__(self) -> None:
        self.k0, self.k1 = key_on(0, 2), key_on(1, 2)
        self.release = {self.k0: asyncio.Event(), self.k1: asyncio.Event()}
        self.running_in_a: set[str] = set()
        self.overlaps: list[str] = []
        self.handled_by_b: list[str] = []

    async def handler_a(self, message: keybus.Message) -> None:
        assert message.key is not None
        self.running_in_a.add(message.key)
        try:
            await self.release[message.key].wait()
        finally:
            self.running_in_a.discard(message.key)

    async def handler_b(self, message: keybus.Message) -> None:
        assert message.key is not None
        if message.key in self.running_in_a:
            self.overlaps.append(message.key)
        self.handled_by_b.append(message.key)


@contextlib.asynccontextmanager
async def a_revoking_partition_1(
    nats_proxy: NatsProxy, open_bus: BusFactory, topic: str, group: str
) -> AsyncIterator[tuple[TwoMembers, asyncio.Task[keybus.Subscription]]]:
    """Member A (through the proxy) owns both partitions of ``topic`` with a handler
    running on each; member B joins, and A is revoking partition 1, waiting for its
    handler. Yields the members' record and B's pending subscribe."""
    members = TwoMembers()
    ttl, beat = 3.0, 0.5
    admin = await open_bus()
    await admin.ensure_topic(topic, keybus.TopicConfig(partitions=2))
    bus_a = await keybus.connect(nats_proxy.url, group=group, lease_ttl=ttl, heartbeat=beat)
    joining: asyncio.Task[keybus.Subscription] | None = None
    try:
        sub_a = await bus_a.subscribe(topic, members.handler_a)
        member_a = sub_a._consumer
        assert isinstance(member_a, GroupMember)
        await admin.publish(topic, b"0", key=members.k0)
        await admin.publish(topic, b"1", key=members.k1)
        await eventually(
            lambda: members.running_in_a == {members.k0, members.k1}, what="A's handlers run"
        )
        bus_b = await open_bus(group=group, lease_ttl=ttl, heartbeat=beat)
        joining = asyncio.create_task(bus_b.subscribe(topic, members.handler_b))
        # A stops pulling partition 1 and waits in the core's revoke for its handler.
        await eventually(
            lambda: 1 in member_a._parts and member_a._parts[1].task is None,
            what="A revoking partition 1",
        )
        yield members, joining
    finally:
        nats_proxy.blackhole = False
        await cancel_and_wait(joining)  # done already unless the test failed first
        await bus_a.close(timeout=0.5)


@pytest.mark.slow
async def test_a_lease_running_out_during_a_long_revoke_stops_every_handler_first(
    nats_proxy: NatsProxy, open_bus: BusFactory, backend: Backend
) -> None:
    """Member A gives partition 1 up to a joining member B and waits (revoke_timeout,
    10 s) for its handler there, which hangs; A's handler of partition 0 hangs too. Then
    A's server goes silent: A cannot renew, and once its lease is out B takes both
    partitions and handles their messages again. A must have cancelled its handlers
    before that (its lease ends a heartbeat before the server's), not keep running them
    next to B until the revoke's own timeout."""
    topic = backend.topic("leaserevoke")
    async with a_revoking_partition_1(nats_proxy, open_bus, topic, "lr") as (m, joining):
        nats_proxy.blackhole = True  # A's last renewal happened before now
        await joining
        await eventually(
            lambda: {m.k0, m.k1} <= set(m.handled_by_b), what="B handles both keys", timeout=20
        )
        assert m.overlaps == [], f"A still ran handlers of {m.overlaps} while B handled them"


async def test_a_consumer_deleted_under_a_member_is_re_taken_not_polled_in_a_tight_loop(
    open_bus: BusFactory, backend: Backend
) -> None:
    """The topic is deleted (and with it every consumer) under a live subscription, then
    created again. The server answers the pending pull with 409 Consumer Deleted and
    every new one with 503 No Responders: the member must not re-request at once forever
    (thousands of requests a second, and the partition never flows again) but re-take
    the partition, so a message published to the new stream is handled."""
    topic = backend.topic("deleted")
    admin = await open_bus()
    await admin.ensure_topic(topic, keybus.TopicConfig(partitions=1))
    bus = await open_bus(group="deleted", heartbeat=0.3, lease_ttl=1.5)
    seen = Collected()

    await bus.subscribe(topic, seen)
    nc = bus._transport._nc  # type: ignore[attr-defined]
    pulls = 0
    publish = nc.publish

    async def counting(subject: str, *args: Any, **kwargs: Any) -> None:
        nonlocal pulls
        if subject.startswith("$JS.API.CONSUMER.MSG.NEXT."):
            pulls += 1
        await publish(subject, *args, **kwargs)

    nc.publish = counting
    started = time.monotonic()
    await admin.delete_topic(topic)
    await admin.ensure_topic(topic, keybus.TopicConfig(partitions=1))
    await admin.publish(topic, b"after", key="k")
    await eventually(lambda: seen.values() == [b"after"], what="the message on the new stream")
    took = time.monotonic() - started
    assert pulls < 50 + 20 * took, f"{pulls} pull requests in {took:.1f} s"


@pytest.mark.slow
async def test_a_hand_over_ack_to_a_silent_server_does_not_outlast_the_lease(
    nats_proxy: NatsProxy, open_bus: BusFactory, backend: Backend
) -> None:
    """Member A hands partition 1 over to a joining member B; its handler there finishes
    just after A's server went silent, so A's synchronous hand-over ack waits for a
    reply that never comes. That wait must end with A's lease (and A then revoke what it
    still holds), not after api_timeout (5 s) while B already took over partition 0,
    whose handler in A still runs."""
    topic = backend.topic("ackrevoke")
    async with a_revoking_partition_1(nats_proxy, open_bus, topic, "ar") as (m, joining):
        nats_proxy.blackhole = True  # A's last renewal happened before now
        m.release[m.k1].set()  # the revoke ends; A acks partition 1 and hears nothing back
        await joining
        await eventually(lambda: m.k0 in m.handled_by_b, what="B handles k0", timeout=20)
        assert m.overlaps == [], f"A still ran handlers of {m.overlaps} while B handled them"


async def test_an_anonymous_member_closed_while_taking_a_partition_leaves_no_durable(
    open_bus: BusFactory, backend: Backend
) -> None:
    """A bus without group= is closed while its member creates a partition's consumer
    and the create's reply is late: the server created the durable, the member's take
    is cancelled. Its close must delete that durable too (nobody can ever name an
    anonymous group again to clean it up)."""
    topic = backend.topic("anontake")
    admin = await open_bus()
    await admin.ensure_topic(topic, keybus.TopicConfig(partitions=1))
    bus = await open_bus()
    js = bus._transport._js  # type: ignore[attr-defined]
    add_consumer = js.add_consumer
    created: list[str] = []

    async def late_reply(*args: Any, **kwargs: Any) -> Any:
        info = await add_consumer(*args, **kwargs)
        created.append(info.name)
        await asyncio.Event().wait()  # the reply never comes in time

    js.add_consumer = late_reply

    async def handler(message: keybus.Message) -> None:
        pass

    subscribing = asyncio.create_task(bus.subscribe(topic, handler))
    await eventually(lambda: bool(created), what="the durable created on the server")
    await bus.close(timeout=0.5)
    with contextlib.suppress(keybus.KeybusError):
        await subscribing
    left = [c.name for c in await consumers(backend.url, topic)]
    assert left == [], f"durables left behind: {left}"
