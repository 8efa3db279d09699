"""Races between a rebalance and intake or close on the memory backend, driven
deterministically (its rebalance takes the same core path as Kafka's): no stale batch
delivered after a revoke and re-assign, and no partition left unowned or unfetched when
a bounded close cuts a group change short."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

import keybus
from keybus.testing import LeakChecker
from keybus.transports.memory import MemoryBroker
from tests.helpers import eventually, key_on

# Keys on partition 0 and 1 of a 2-partition topic.
P0, P1 = key_on(0, 2), key_on(1, 2)


def held_on_slow(
    entered: asyncio.Event, release: asyncio.Event, handled: list[bytes]
) -> Callable[[keybus.Message], Awaitable[None]]:
    """A handler that records every value; on b"slow" it first sets ``entered`` and
    waits for ``release``."""

    async def handler(m: keybus.Message) -> None:
        if m.value == b"slow":
            entered.set()
            await release.wait()
        handled.append(m.value)

    return handler


async def test_a_batch_held_by_backpressure_is_not_delivered_after_revoke_and_reassign(
    no_leaks: LeakChecker,
) -> None:
    log: list[tuple[str, str]] = []
    release_a = asyncio.Event()
    b_entered = asyncio.Event()
    async with keybus.connect("memory://stale") as pub:
        await pub.ensure_topic("t", keybus.TopicConfig(partitions=2))

        async def a_handler(m: keybus.Message) -> None:
            if m.value == b"P0a":
                await release_a.wait()
            log.append(("A", m.value.decode()))

        async def b_handler(m: keybus.Message) -> None:
            b_entered.set()
            await asyncio.Event().wait()  # B is stuck on K1, then closed

        await pub.publish("t", b"P0a", key=P0)
        await pub.publish("t", b"K1", key=P1)
        a = await keybus.connect("memory://stale", group="g")
        sub = await a.subscribe("t", a_handler, max_concurrency=1, max_in_flight=3)
        await eventually(lambda: sub.in_flight == 2, what="P0a running, K1 queued")
        for value, key in ((b"P0b", P0), (b"P0c", P0), (b"K2", P1), (b"K3", P1)):
            await pub.publish("t", value, key=key)
        # A's fetcher now holds [P0c, K2, K3] waiting for room.
        await eventually(lambda: sub.in_flight == 3, what="A's window full")
        b = await keybus.connect("memory://stale", group="g")
        await b.subscribe("t", b_handler)  # A loses partition 1; B takes it at offset 0
        await asyncio.wait_for(b_entered.wait(), 10)
        await b.close(timeout=0.1)  # K1 unfinished: partition 1 returns to A at offset 0
        release_a.set()
        await eventually(lambda: len([v for _, v in log if v.startswith("K")]) >= 3)
        await a.close()
    assert [v for _, v in log if v.startswith("K")] == ["K1", "K2", "K3"]


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
    b_handler = held_on_slow(b_entered, release, handled)

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
    release = asyncio.Event()
    a_entered = asyncio.Event()
    handled: list[bytes] = []
    a_handler = held_on_slow(a_entered, release, handled)

    async with (
        keybus.connect("memory://close-join") as pub,
        keybus.connect("memory://close-join", group="g") as a,
    ):
        await pub.ensure_topic("t", keybus.TopicConfig(partitions=2))
        await a.subscribe("t", a_handler, revoke_timeout=60)
        await pub.publish("t", b"slow", key=P1)
        await asyncio.wait_for(a_entered.wait(), 10)
        b = await keybus.connect("memory://close-join", group="g")
        joining = asyncio.create_task(b.subscribe("t", lambda m: None))
        group = MemoryBroker.named("close-join").topics["t"].groups["g"]
        await eventually(lambda: len(group.members) == 2, what="B joining")
        await b.close(timeout=0.1)
        release.set()
        with pytest.raises(keybus.BusClosedError):
            await joining
        await pub.publish("t", b"p0", key=P0)
        await pub.publish("t", b"p1", key=P1)
        await eventually(
            lambda: {b"slow", b"p0", b"p1"} <= set(handled), timeout=5, what="A has both again"
        )
