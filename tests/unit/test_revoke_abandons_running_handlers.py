"""A revoke takes a partition's running handlers away from them: after
``revoke_timeout`` (at once when the partition was lost) they are cancelled, so two
members never handle one key at once, and an abandoned message is neither retried nor
dead-lettered — even when its handler swallows or converts the cancellation. Driven
deterministically on the memory backend (its rebalance takes the core path Kafka's does).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import keybus
from keybus.deadline import Deadline
from keybus.testing import LeakChecker
from keybus.transports.base import Consumer, Sink
from keybus.transports.memory import MemoryTransport
from tests.helpers import eventually, key_on

# Keys on partition 0 and 1 of a 2-partition topic.
P0, P1 = key_on(0, 2), key_on(1, 2)


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


class SinkRecordingMemory(MemoryTransport):
    """The memory transport, noting the core side (``Sink``) of each consumer it makes:
    the test then drives a subscription the way a transport does."""

    sinks: ClassVar[list[Sink]] = []

    def consumer(self, topic: str, group: str, sink: Sink) -> Consumer:
        self.sinks.append(sink)
        return super().consumer(topic, group, sink)


keybus.register_transport("sinkrecordingmemory", SinkRecordingMemory)


async def test_lost_partitions_cancel_running_handlers_without_waiting(
    no_leaks: LeakChecker,
) -> None:
    cancelled = asyncio.Event()
    entered = asyncio.Event()
    async with keybus.connect("sinkrecordingmemory://lost", group="g") as bus:

        async def stuck(m: keybus.Message) -> None:
            entered.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        sub = await bus.subscribe("t", stuck, revoke_timeout=60)
        [sink] = SinkRecordingMemory.sinks
        SinkRecordingMemory.sinks.clear()
        await bus.publish("t", b"x", key="k")
        await asyncio.wait_for(entered.wait(), 10)
        partitions = [("t", p) for p in range(3)]
        # What a transport does when its session or lease expired: no 60 s wait.
        await asyncio.wait_for(sink.revoke(partitions, Deadline.passed()), 5)
        assert cancelled.is_set()
        assert sub.in_flight == 0


@contextlib.asynccontextmanager
async def abandoned(
    url: str, handler: Any, entered: asyncio.Event, **options: Any
) -> AsyncIterator[tuple[keybus.EventBus, keybus.Subscription]]:
    """Member a runs ``handler`` on b"stuck" (partition 1) until ``entered``; member b
    then joins, partition 1 moves to b and a's revoke abandons the stuck handler.
    Yields (publisher, a's subscription)."""
    async with (
        keybus.connect(url) as pub,
        keybus.connect(url, group="g") as a,
        keybus.connect(url, group="g") as b,
    ):
        await pub.ensure_topic("t", keybus.TopicConfig(partitions=2))
        sub = await a.subscribe("t", handler, revoke_timeout=0.05, **options)
        await pub.publish("t", b"stuck", key=P1)
        await asyncio.wait_for(entered.wait(), 5)
        await b.subscribe("t", lambda m: None)
        yield pub, sub


async def test_a_swallowed_abandon_does_not_strand_a_later_key(no_leaks: LeakChecker) -> None:
    """The swallowed abandon left the worker's cancel request pending; a later handler
    raising its own CancelledError (an ordinary failure) then ended the worker while it
    held that key's lane, and the key never ran again."""
    seen: list[bytes] = []
    entered = asyncio.Event()

    async def a_handler(m: keybus.Message) -> None:
        if m.value == b"stuck":
            entered.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                return  # swallows the revoke's cancellation
        if m.value == b"boom":
            future = asyncio.get_running_loop().create_future()
            future.cancel()
            await future  # raises CancelledError; nobody cancelled this task
        seen.append(m.value)

    async with abandoned(
        "memory://swallowed-abandon", a_handler, entered, max_concurrency=1, max_attempts=1
    ) as (pub, sub):
        await pub.publish("t", b"boom", key=P0)  # dead-lettered (max_attempts=1)
        await pub.publish("t", b"after", key=P0)
        await eventually(lambda: b"after" in seen, what="'after' handled")
        assert sub.stats().dead_lettered == 1


async def test_an_abandoned_work_is_not_retried_or_dead_lettered(no_leaks: LeakChecker) -> None:
    """A handler that turns the revoke's CancelledError into an exception was retried
    (and would have been dead-lettered) although the partition had a new owner."""
    calls: list[str] = []
    entered = asyncio.Event()

    async def a_handler(m: keybus.Message) -> None:
        calls.append("A")
        if len(calls) > 1:
            return  # a retry (the bug) succeeds at once
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError as exc:
            raise RuntimeError("wrapped") from exc  # e.g. a library wrapping errors

    async with abandoned(
        "memory://converted-abandon", a_handler, entered, max_attempts=3, retry_backoff=0.0
    ) as (_, sub):
        # The abandoned work has unwound once its worker is no longer running it.
        await eventually(lambda: sub.running == 0, what="abandon settled")
        assert calls == ["A"]
        assert sub.stats().dead_lettered == 0
        assert sub.stats().retries == 0
