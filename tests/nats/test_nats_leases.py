"""NATS: a partition has one owner at a time. A member never runs a partition's handlers
past its lease — not when it cannot renew, not while a hand-over's revoke waits for a
stuck handler, not while its hand-over ack waits for a silent server — so no key is ever
handled by two members at once."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

import keybus
from keybus._aio import cancel_and_wait
from keybus.testing import LeakChecker
from tests.conftest import Backend, BusFactory
from tests.helpers import eventually, key_on
from tests.nats.proxy import NatsProxy

TTL, BEAT = 3.0, 0.5  # member A's lease: renewed every BEAT, gone TTL after the last renewal


@dataclass
class TwoMembers:
    """What the two members of a hand-over see: member A's handlers hold until their
    key's ``release`` is set (or they are cancelled); B records what it handles, and any
    key it got while A's handler of that key still ran."""

    k0: str = key_on(0, 2)
    k1: str = key_on(1, 2)
    release: dict[str, asyncio.Event] = field(default_factory=dict)
    running_in_a: set[str] = field(default_factory=set)
    cancelled_in_a: set[str] = field(default_factory=set)
    overlaps: list[str] = field(default_factory=list)
    handled_by_b: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.release = {self.k0: asyncio.Event(), self.k1: asyncio.Event()}

    async def handler_a(self, message: keybus.Message) -> None:
        assert message.key is not None
        self.running_in_a.add(message.key)
        try:
            await self.release[message.key].wait()
        except asyncio.CancelledError:
            self.cancelled_in_a.add(message.key)
            raise
        finally:
            self.running_in_a.discard(message.key)

    async def handler_b(self, message: keybus.Message) -> None:
        assert message.key is not None
        if message.key in self.running_in_a:
            self.overlaps.append(message.key)
        self.handled_by_b.append(message.key)


@contextlib.asynccontextmanager
async def a_revoking_partition_1(
    open_bus: BusFactory,
    backend: Backend,
    group: str,
    proxy: NatsProxy | None = None,
    **subscribe: float,
) -> AsyncIterator[tuple[TwoMembers, asyncio.Task[keybus.Subscription]]]:
    """Member A (through ``proxy`` if given) owns both partitions of a topic with a
    handler running on each; member B joins, and A is revoking partition 1, waiting for
    its handler. Yields the members' record and B's pending subscribe."""
    members = TwoMembers()
    topic = backend.topic(group)
    admin = await open_bus()
    await admin.ensure_topic(topic, keybus.TopicConfig(partitions=2))
    url = proxy.url if proxy is not None else backend.url
    bus_a = await keybus.connect(url, group=group, lease_ttl=TTL, heartbeat=BEAT)
    joining: asyncio.Task[keybus.Subscription] | None = None
    try:
        sub_a = await bus_a.subscribe(topic, members.handler_a, **subscribe)
        await admin.publish(topic, b"0", key=members.k0)
        await admin.publish(topic, b"1", key=members.k1)
        await admin.publish(topic, b"1 again", key=members.k1)  # queued behind the first
        await eventually(
            lambda: members.running_in_a == {members.k0, members.k1} and sub_a.in_flight == 3,
            what="A's handlers run",
        )
        bus_b = await open_bus(group=group, lease_ttl=TTL, heartbeat=BEAT)
        joining = asyncio.create_task(bus_b.subscribe(topic, members.handler_b))
        # A's revoke of partition 1 drops the message queued there, then waits for the
        # handler running there.
        await eventually(lambda: sub_a.stats().dropped == 1, what="A revoking partition 1")
        assert members.running_in_a == {members.k0, members.k1}
        yield members, joining
    finally:
        if proxy is not None:
            proxy.blackhole = False
        await cancel_and_wait(joining)  # done already unless the test failed first
        await bus_a.close(timeout=0.5)


@pytest.mark.slow
async def test_a_member_that_cannot_renew_revokes_before_its_lease_expires(
    nats_proxy: NatsProxy, backend: Backend, no_leaks: LeakChecker
) -> None:
    """A's server goes silent: A cannot renew, and must cancel every handler it runs
    before its lease can have expired on the server (others may take over then)."""
    topic = backend.topic("renew")
    ttl = 1.5
    k0, k1 = key_on(0, 2), key_on(1, 2)
    running: set[str] = set()
    cancelled: set[str] = set()

    async def handler(message: keybus.Message) -> None:
        assert message.key is not None
        running.add(message.key)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.add(message.key)
            raise

    async with keybus.connect(nats_proxy.url, group="renew", lease_ttl=ttl, heartbeat=0.3) as bus:
        await bus.ensure_topic(topic, keybus.TopicConfig(partitions=2))
        await bus.subscribe(topic, handler)
        await bus.publish(topic, b"0", key=k0)
        await bus.publish(topic, b"1", key=k1)
        await eventually(lambda: running == {k0, k1}, what="a handler on each partition")
        nats_proxy.blackhole = True  # our last renewal happened before now
        await eventually(lambda: cancelled == {k0, k1}, what="the self-revoke", timeout=ttl)
        started = time.monotonic()
    assert time.monotonic() - started < 3.0, "close with a silent server is bounded"
    nats_proxy.blackhole = False


async def test_a_hand_over_revoke_never_waits_past_the_lease(
    open_bus: BusFactory, backend: Backend
) -> None:
    """A gives partition 1 up to a joining member B while its handler there hangs, with a
    revoke_timeout far beyond A's lease: A's revoke must stop waiting (cancel the
    handler) by the end of its lease, and B take the partition then — not after the
    revoke_timeout."""
    async with a_revoking_partition_1(open_bus, backend, "rl", revoke_timeout=60.0) as (
        m,
        joining,
    ):
        started = time.monotonic()
        await joining
        await eventually(lambda: m.k1 in m.handled_by_b, what="B handles k1", timeout=20)
        assert time.monotonic() - started < TTL + 2.0, "the revoke waited past the lease"
        assert m.cancelled_in_a == {m.k1}, "A's k1 handler was cancelled, k0's runs on"
        assert m.overlaps == []


@pytest.mark.slow
async def test_a_lease_running_out_during_a_long_revoke_stops_every_handler_first(
    nats_proxy: NatsProxy, open_bus: BusFactory, backend: Backend
) -> None:
    """Member A gives partition 1 up to a joining member B and waits for its handler
    there, which hangs; A's handler of partition 0 hangs too. Then A's server goes silent:
    A cannot renew, and once its lease is out B takes both partitions and handles their
    messages again. A must have cancelled both handlers before that (its lease ends a
    heartbeat before the server's), not keep running the one of partition 0 next to B."""
    async with a_revoking_partition_1(open_bus, backend, "lr", nats_proxy) as (m, joining):
        nats_proxy.blackhole = True  # A's last renewal happened before now
        await joining
        await eventually(
            lambda: {m.k0, m.k1} <= set(m.handled_by_b), what="B handles both keys", timeout=20
        )
        assert m.overlaps == [], f"A still ran handlers of {m.overlaps} while B handled them"


@pytest.mark.slow
async def test_a_hand_over_ack_to_a_silent_server_does_not_outlast_the_lease(
    nats_proxy: NatsProxy, open_bus: BusFactory, backend: Backend
) -> None:
    """Member A hands partition 1 over to a joining member B; its handler there finishes
    just after A's server went silent, so A's synchronous hand-over ack waits for a
    reply that never comes. That wait must end with A's lease (and A then revoke what it
    still holds), not after api_timeout (5 s) while B already took over partition 0,
    whose handler in A still runs."""
    async with a_revoking_partition_1(open_bus, backend, "ar", nats_proxy) as (m, joining):
        nats_proxy.blackhole = True  # A's last renewal happened before now
        m.release[m.k1].set()  # the revoke ends; A acks partition 1 and hears nothing back
        await joining
        await eventually(lambda: m.k0 in m.handled_by_b, what="B handles k0", timeout=20)
        assert m.overlaps == [], f"A still ran handlers of {m.overlaps} while B handled them"
