"""Lifecycle races on the memory backend: a group change cut short by a bounded close,
a close racing a subscribe that waits on a rebalance, and handlers that publish while
their bus drains."""

from __future__ import annotations

import asyncio

import pytest

import keybus
from keybus.testing import LeakChecker
from keybus.transports.memory import MemoryBroker
from tests.helpers import Collected, eventually, key_on


async def test_a_leave_cut_short_by_the_bounded_close_still_hands_every_partition_on(
    no_leaks: LeakChecker,
) -> None:
    """A leaves a group of three; the rebalance revokes a partition from B, whose handler
    outlasts A's bounded consumer close (2 s). The rebalance must still complete: before,
    its cancellation left A's partition with no owner and B's revoked partition owned by
    B but fetched by nobody — both stalled until the next join or leave."""
    keys = [key_on(p, 3) for p in range(3)]
    release = asyncio.Event()
    b_entered = asyncio.Event()
    handled: list[bytes] = []

    async def b_handler(m: keybus.Message) -> None:
        if m.value == b"slow":
            b_entered.set()
            await release.wait()
        handled.append(m.value)

    async def record(m: keybus.Message) -> None:
        handled.append(m.value)

    async with (
        keybus.connect("memory://cut-leave") as pub,
        keybus.connect("memory://cut-leave", group="g") as a,
        keybus.connect("memory://cut-leave", group="g") as b,
        keybus.connect("memory://cut-leave", group="g") as c,
    ):
        await pub.ensure_topic("t", keybus.TopicConfig(partitions=3))
        await a.subscribe("t", record)
        await b.subscribe("t", b_handler, revoke_timeout=60)
        await c.subscribe("t", record)  # now A owns 0, B owns 1, C owns 2
        await pub.publish("t", b"slow", key=keys[1])
        await asyncio.wait_for(b_entered.wait(), 10)
        await a.close()  # B must give partition 1 to C: its revoke waits for "slow"
        release.set()
        for p, key in enumerate(keys):
            await pub.publish("t", b"after-%d" % p, key=key)
        await eventually(
            lambda: {b"after-0", b"after-1", b"after-2"} <= set(handled),
            timeout=5,
            what="every partition handled after the leave",
        )


async def test_close_while_subscribe_waits_on_a_rebalance_leaks_nothing_and_stalls_nothing(
    no_leaks: LeakChecker,
) -> None:
    """B's subscribe waits while A's revoke waits for A's running handler; B is closed
    meanwhile. Before, the join finished after B's close: B's feeder task was started on
    a closed bus (leaked) and B stayed owner of the partition, which A never got back."""
    p0, p1 = key_on(0, 2), key_on(1, 2)
    release = asyncio.Event()
    a_entered = asyncio.Event()
    handled: list[bytes] = []

    async def a_handler(m: keybus.Message) -> None:
        if m.value == b"slow":
            a_entered.set()
            await release.wait()
        handled.append(m.value)

    async with (
        keybus.connect("memory://close-join") as pub,
        keybus.connect("memory://close-join", group="g") as a,
    ):
        await pub.ensure_topic("t", keybus.TopicConfig(partitions=2))
        await a.subscribe("t", a_handler, revoke_timeout=60)
        await pub.publish("t", b"slow", key=p1)
        await asyncio.wait_for(a_entered.wait(), 10)
        b = await keybus.connect("memory://close-join", group="g")
        joining = asyncio.create_task(b.subscribe("t", lambda m: None))
        group = MemoryBroker.named("close-join").topics["t"].groups["g"]
        await eventually(lambda: len(group.members) == 2, what="B joining")
        await b.close(timeout=0.1)
        release.set()
        with pytest.raises(keybus.BusClosedError):
            await joining
        await pub.publish("t", b"p0", key=p0)
        await pub.publish("t", b"p1", key=p1)
        await eventually(
            lambda: {b"slow", b"p0", b"p1"} <= set(handled), timeout=5, what="A has both again"
        )


async def test_a_handler_publishing_while_its_bus_drains_is_not_dead_lettered(
    no_leaks: LeakChecker,
) -> None:
    """close() lets in-flight handlers finish: one that publishes (a follow-up event) must
    be able to. Before, its publish raised BusClosedError, the handler was retried and
    the message dead-lettered and committed — a good message lost to a graceful close."""
    entered, go = asyncio.Event(), asyncio.Event()
    outcome: list[str] = []
    async with (
        keybus.connect("memory://drain-publish") as watcher,
        keybus.connect("memory://drain-publish", group="g") as bus,
    ):
        letters = Collected()
        await watcher.subscribe("t.dlq", letters)
        follow_ups = Collected()
        await watcher.subscribe("follow-ups", follow_ups)

        async def handler(m: keybus.Message) -> None:
            entered.set()
            await go.wait()
            await bus.publish("follow-ups", b"after " + m.value)
            await bus.publish("t", b"again")  # its own topic
            outcome.append("published")

        await bus.subscribe("t", handler, retry_backoff=0.01)
        await bus.publish("t", b"work", key="k")
        await asyncio.wait_for(entered.wait(), 10)
        closing = asyncio.create_task(bus.close(timeout=5))
        await eventually(lambda: bus.closed, what="close started")
        go.set()
        await asyncio.wait_for(closing, 10)
        assert outcome == ["published"]
        await eventually(lambda: follow_ups.values() == [b"after work"], what="follow-up")
        assert letters == []


async def _stuck_subscription(bus: keybus.EventBus) -> keybus.Subscription:
    entered = asyncio.Event()

    async def stuck(m: keybus.Message) -> None:
        entered.set()
        await asyncio.Event().wait()

    sub = await bus.subscribe("t", stuck)
    await bus.publish("t", b"x", key="k")
    await asyncio.wait_for(entered.wait(), 10)
    return sub


async def test_close_is_bounded_by_its_own_timeout_while_an_unsubscribe_drains(
    no_leaks: LeakChecker,
) -> None:
    """close(timeout) returns within its timeout plus a small constant, even when an
    unsubscribe with a longer timeout is already draining the subscription: before, the
    close waited for the unsubscribe's own deadline."""
    async with keybus.connect("memory://close-vs-unsub", group="g") as bus:
        sub = await _stuck_subscription(bus)
        unsubscribing = asyncio.create_task(sub.unsubscribe(timeout=60))
        await eventually(lambda: sub.closed, what="unsubscribe started")
        await asyncio.wait_for(bus.close(timeout=0.1), 4)
        await asyncio.wait_for(unsubscribing, 1)


async def test_a_second_close_with_a_shorter_timeout_is_bounded_by_it(
    no_leaks: LeakChecker,
) -> None:
    async with keybus.connect("memory://close-twice", group="g") as bus:
        await _stuck_subscription(bus)
        first = asyncio.create_task(bus.close(timeout=60))
        await eventually(lambda: bus.closed, what="first close started")
        await asyncio.wait_for(bus.close(timeout=0.1), 4)
        await asyncio.wait_for(first, 1)


async def test_argument_errors_are_clear_and_typed(no_leaks: LeakChecker) -> None:
    async with keybus.connect("memory://review-args") as bus:
        with pytest.raises(TypeError, match="headers must be a mapping"):
            await bus.publish("t", b"x", headers=[("h", "v")])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="topic must be a str"):
            await bus.subscribe(123, lambda m: None)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="invalid subscribe option"):
            await bus.subscribe("t", lambda m: None, max_attempts="3")
        with pytest.raises(ValueError, match="dead_letter_topic must differ"):
            await bus.subscribe("t", lambda m: None, dead_letter_topic="t")
        assert not bus.subscriptions
