"""Self-fencing in the core: a partition whose ownership was not renewed in time starts
no more work — its queued messages are dropped (left uncommitted, for the next owner),
its running handlers cancelled, and the consumer told. Driven on the memory backend with
a consumer that, like a NATS lease or a Kafka session, owns partitions only for a while.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from typing import ClassVar

import keybus
from keybus.partitioning import Partition
from keybus.testing import LeakChecker
from keybus.transports.base import Consumer, Sink
from keybus.transports.memory import MemoryConsumer, MemoryTransport
from tests.helpers import eventually, key_on

LEASE = 0.3


class _LeasedConsumer(MemoryConsumer):
    renewing = True

    def _assign(self, partition: int, offset: int, fence: int) -> None:
        self._positions[partition] = offset
        self._fences[partition] = fence
        self._sink.assign([(self._topic.name, partition)], valid_until=time.monotonic() + LEASE)
        self._wake.set()

    def lapsed(self, partitions: Collection[Partition]) -> None:
        LeasedMemory.lapsed.extend(partitions)
        for _, p in partitions:  # stop feeding them (a real transport re-takes or resigns)
            self._positions.pop(p, None)


class LeasedMemory(MemoryTransport):
    lapsed: ClassVar[list[Partition]] = []
    sinks: ClassVar[list[Sink]] = []

    def consumer(self, topic: str, group: str, sink: Sink) -> Consumer:
        self.sinks.append(sink)
        return _LeasedConsumer(self._live().topic(topic), group, sink)


keybus.register_transport("leasedmemory", LeasedMemory)


async def test_queued_work_of_a_lapsed_partition_never_starts(no_leaks: LeakChecker) -> None:
    LeasedMemory.lapsed.clear()
    started: list[bytes] = []
    release = asyncio.Event()
    key = key_on(0, 1)
    async with keybus.connect("leasedmemory://lapse", group="g") as bus:
        await bus.ensure_topic("t", keybus.TopicConfig(partitions=1))

        async def handler(m: keybus.Message) -> None:
            started.append(m.value)
            if m.value == b"1":
                await release.wait()  # a stall: the lease runs out meanwhile

        sub = await bus.subscribe("t", handler)
        for i in (1, 2, 3):
            await bus.publish("t", str(i).encode(), key=key)
        await eventually(lambda: started == [b"1"], what="the first handler running")
        await asyncio.sleep(LEASE)  # the stall outlasts the lease: that is the scenario
        release.set()
        await eventually(lambda: LeasedMemory.lapsed == [("t", 0)], what="the lapse reported")
        await eventually(lambda: sub.in_flight == 0, what="the partition's work released")
        assert started == [b"1"], "queued work of the lapsed partition must not start"
        # The first one ran (it started while the partition was ours) and may be committed;
        # nothing after it is: the queued two stay for the partition's next owner.
        assert sub.stats().handled == 1
        assert sub.stats().committed <= 1


async def test_renewed_ownership_keeps_work_flowing(no_leaks: LeakChecker) -> None:
    LeasedMemory.lapsed.clear()
    LeasedMemory.sinks.clear()
    seen: list[bytes] = []
    async with keybus.connect("leasedmemory://renew", group="g") as bus:
        await bus.ensure_topic("t", keybus.TopicConfig(partitions=1))
        sub = await bus.subscribe("t", lambda m: seen.append(m.value))
        sink = LeasedMemory.sinks[-1]
        for i in range(5):
            sink.renew([("t", 0)], time.monotonic() + LEASE)  # proof of ownership
            await bus.publish("t", str(i).encode())
            await eventually(lambda i=i: len(seen) == i + 1, what=f"message {i}")
            await asyncio.sleep(LEASE / 2)  # half a lease between renewals
        assert LeasedMemory.lapsed == []
        assert sub.stats().handled == 5


async def test_a_lapse_cancels_the_partitions_other_running_handlers(
    no_leaks: LeakChecker,
) -> None:
    LeasedMemory.lapsed.clear()
    cancelled = asyncio.Event()
    running: set[str] = set()
    a, b = key_on(0, 1), next(k for k in ("x1", "x2", "x3", "x4") if k != key_on(0, 1))
    async with keybus.connect("leasedmemory://cancel", group="g") as bus:
        await bus.ensure_topic("t", keybus.TopicConfig(partitions=1))

        async def handler(m: keybus.Message) -> None:
            running.add(m.value.decode())
            try:
                if m.value == b"stuck":
                    await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        await bus.subscribe("t", handler)
        await bus.publish("t", b"stuck", key=a)
        await eventually(lambda: "stuck" in running, what="the stuck handler")
        await asyncio.sleep(LEASE)  # past the lease
        await bus.publish("t", b"late", key=b)  # starting it finds the lapse
        await asyncio.wait_for(cancelled.wait(), 5)
        assert "late" not in running
