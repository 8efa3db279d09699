"""Races around revoke, re-assign and close, driven deterministically on the memory
backend (its rebalance goes through the same core path as Kafka's)."""

from __future__ import annotations

import asyncio

import keybus
from keybus.deadline import Deadline
from keybus.testing import LeakChecker
from keybus.transports.memory import MemoryBroker
from tests.helpers import eventually, key_on

# Keys on partition 0 and 1 of a 2-partition topic.
P0, P1 = key_on(0, 2), key_on(1, 2)


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


async def test_revoke_timeout_cancels_the_old_handler_so_members_never_overlap(
    no_leaks: LeakChecker,
) -> None:
    loop = asyncio.get_running_loop()
    events: list[tuple[str, str, float]] = []
    async with keybus.connect("memory://revoke") as pub:
        await pub.ensure_topic("t", keybus.TopicConfig(partitions=2))

        def handler_for(name: str):  # type: ignore[no-untyped-def]
            async def handler(m: keybus.Message) -> None:
                events.append((name, f"start {m.value.decode()}", loop.time()))
                try:
                    if name == "A" and m.value == b"v1":
                        await asyncio.Event().wait()  # stuck
                finally:
                    events.append((name, f"end {m.value.decode()}", loop.time()))

            return handler

        a = await keybus.connect("memory://revoke", group="g")
        await a.subscribe("t", handler_for("A"), revoke_timeout=0.2)
        await pub.publish("t", b"v1", key=P1)
        await pub.publish("t", b"v2", key=P1)
        await eventually(lambda: ("A", "start v1") in [(n, e) for n, e, _ in events])
        b = await keybus.connect("memory://revoke", group="g")
        await b.subscribe("t", handler_for("B"))  # partition 1 moves to B
        await eventually(lambda: ("B", "end v2") in [(n, e) for n, e, _ in events])
        a_end = next(t for n, e, t in events if (n, e) == ("A", "end v1"))
        b_start = next(t for n, e, t in events if (n, e) == ("B", "start v1"))
        assert a_end <= b_start, "A's handler was cancelled before B took the key over"
        await b.close()
        await a.close()


async def test_a_handler_ignoring_cancellation_takes_no_more_work_after_close(
    no_leaks: LeakChecker,
) -> None:
    after_close: list[bytes] = []
    closing = False
    entered, release, unwound = asyncio.Event(), asyncio.Event(), asyncio.Event()
    bus = await keybus.connect("memory://swallow", group="g")

    async def handler(m: keybus.Message) -> None:
        if closing:
            after_close.append(m.value)
        if m.value == b"slow":
            entered.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                await release.wait()  # "finishing up", ignoring the cancel, past close()
                unwound.set()

    await bus.subscribe("t", handler, max_concurrency=1)
    await bus.publish("t", b"slow", key="k0")
    for i in range(5):
        await bus.publish("t", b"queued-%d" % i, key=f"k{i + 1}")
    await asyncio.wait_for(entered.wait(), 10)
    closing = True
    await bus.close(timeout=0.1)
    # The premise: the handler outlives close() (its worker still runs).
    assert [t for t in asyncio.all_tasks() if "worker" in t.get_name()]
    release.set()
    await asyncio.wait_for(unwound.wait(), 5)
    # The stubborn worker ends now; it must not have picked up more on the way.
    await eventually(lambda: not [t for t in asyncio.all_tasks() if "worker" in t.get_name()])
    assert after_close == []


async def test_groups_of_closed_anonymous_buses_do_not_pin_the_log(
    no_leaks: LeakChecker,
) -> None:
    async with (
        keybus.connect("memory://anon") as pub,
        keybus.connect("memory://anon", group="live") as live,
    ):
        await pub.ensure_topic("t", keybus.TopicConfig(partitions=1))
        for _ in range(5):
            async with keybus.connect("memory://anon") as passer_by:
                await passer_by.subscribe("t", lambda m: None)
        handled = 0

        def count(m: keybus.Message) -> None:
            nonlocal handled
            handled += 1

        await live.subscribe("t", count)
        for i in range(12_000):
            await pub.publish("t", b"x", key=str(i))
        await eventually(lambda: handled == 12_000, what="12000 handled")
        topic = MemoryBroker.named("anon").topics["t"]
        await eventually(lambda: len(topic.logs[0].records) < 8192, what="the log trimmed")
        assert set(topic.groups) == {"live"}


async def test_lost_partitions_cancel_running_handlers_without_waiting(
    no_leaks: LeakChecker,
) -> None:
    cancelled = asyncio.Event()
    entered = asyncio.Event()
    async with keybus.connect("memory://lost", group="g") as bus:

        async def stuck(m: keybus.Message) -> None:
            entered.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        sub = await bus.subscribe("t", stuck, revoke_timeout=60)
        await bus.publish("t", b"x", key="k")
        await asyncio.wait_for(entered.wait(), 10)
        partitions = [("t", p) for p in range(3)]
        # What a transport does when its session or lease expired: no 60 s wait.
        await asyncio.wait_for(sub._engine.revoke(partitions, Deadline.passed()), 5)
        assert cancelled.is_set()
        assert sub.in_flight == 0
