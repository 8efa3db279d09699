"""One subscription's view of its group's shared consumer: the Consumer the core sees.

The consumer thread hands each fetched batch of the topic to :meth:`KafkaConsumer.push`
(queued on the loop); the facade's feeder task moves the batches into the core's
``sink.deliver``, which waits under backpressure. A revoke runs here too, on the loop,
while the thread's rebalance callback waits for it.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Collection

from keybus._aio import cancel_and_wait, start_feeder, wait_event
from keybus.deadline import Deadline
from keybus.errors import KeybusError
from keybus.message import Message
from keybus.partitioning import Partition
from keybus.transports.base import Consumer, Sink
from keybus.transports.kafka.errors import translate
from keybus.transports.kafka.group_consumer import BACKLOG_DRAINED, GroupConsumer

__all__ = ["KafkaConsumer"]


class KafkaConsumer(Consumer):
    """One subscription's view of its group's shared consumer: feeds one topic to one
    sink, in offset order per partition. Everything here runs on the loop; the thread
    only writes ``pushed`` (see :class:`~keybus.transports.kafka.group_consumer.Feed`)."""

    def __init__(self, shared: GroupConsumer, topic: str, sink: Sink) -> None:
        self._shared = shared
        self.topic = topic
        self._sink = sink
        self.revoke_timeout = sink.revoke_timeout
        self.owned: set[int] = set()  # partitions the core was told about
        # Records handed over by the thread and not yet accepted by the core: each counter
        # has one writer (pushed: the thread, taken: the loop), so no update is lost.
        self.pushed = 0
        self.taken = 0
        self.stopped = False
        self.seq = 0
        self.rebalanced = asyncio.Event()
        self.released = asyncio.Event()
        self.join_refused: KeybusError | None = None
        self._has_partitions = asyncio.Event()
        self._queue: collections.deque[list[Message]] = collections.deque()
        self._wake = asyncio.Event()
        self._feeder: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        self._feeder = start_feeder(self._feed(), f"keybus-kafka-feed:{self.topic}")
        self.seq = self._shared.attach(self)
        settings = self._shared.settings
        deadline = Deadline.after(settings.assign_timeout)
        if not await wait_event(self.rebalanced, deadline):
            raise translate(
                f"no partition assignment within {settings.assign_timeout:g} s",
                "subscribe",
                self.topic,
                group=self._shared.group,
            )
        if self.join_refused is not None:  # e.g. the group's members are sarama's (range)
            raise self.join_refused
        if not self.owned and not settings.eager:
            # Cooperative rebalancing hands a joining member its partitions in a second
            # round; a member may also rightly get none (more members than partitions).
            # (Eager rebalancing hands out the whole assignment in one round.)
            await wait_event(self._has_partitions, deadline.within(settings.join_settle))

    @property
    def assigned(self) -> list[Partition]:
        return [(self.topic, p) for p in sorted(self.owned)]

    @property
    def backlog(self) -> int:
        return self.pushed - self.taken

    # -- called on the loop by the group consumer -------------------------------------

    def assign(self, partitions: list[int], valid_until: float) -> None:
        self.owned.update(partitions)
        self.released.clear()
        self._has_partitions.set()
        self._sink.assign([(self.topic, p) for p in partitions], valid_until=valid_until)

    def renew(self, valid_until: float) -> None:
        if self.owned and not self.stopped:
            self._sink.renew([(self.topic, p) for p in self.owned], valid_until)

    def retake(self, partitions: list[int], valid_until: float) -> None:
        """The thread re-took these partitions after their ownership lapsed, sought back
        to their done prefix: records of them still queued here were fetched before the
        seek (the core would take them out of order), so they go."""
        if self.stopped:
            return
        self._drop_queued(set(partitions))
        owned = [p for p in partitions if p in self.owned]
        if owned:
            self._sink.assign([(self.topic, p) for p in owned], valid_until=valid_until)

    def _drop_queued(self, partitions: set[int]) -> None:
        """Records of ``partitions`` not yet handed to the core never will be."""
        kept: collections.deque[list[Message]] = collections.deque()
        for chunk in self._queue:
            rest = [m for m in chunk if m.partition not in partitions]
            self.taken += len(chunk) - len(rest)
            if rest:
                kept.append(rest)
        self._queue = kept

    def push(self, messages: list[Message]) -> None:
        if self.stopped:
            self.taken += len(messages)
            return
        self._queue.append(messages)
        self._wake.set()

    async def revoke(self, partitions: list[int], deadline: Deadline) -> None:
        revoked = set(partitions)
        self._drop_queued(revoked)
        try:
            await self._sink.revoke([(self.topic, p) for p in partitions], deadline)
        finally:
            # Even if the core's revoke failed or was cut short: nothing the core reports
            # for these partitions from now on may be committed by this member.
            self.owned.difference_update(revoked)
        # A batch the core is still taking in may hold records of these partitions. No need
        # to wait for it: the core skips them, now and after a re-assignment too (a record
        # is taken only if its partition's assignment is no newer than the deliver call).
        # Waiting here held the rebalance callback while intake was parked on a full
        # window behind some other partition's stuck handler.
        if not self.owned:
            self._has_partitions.clear()

    async def _feed(self) -> None:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            chunk = self._queue.popleft()
            try:
                await self._sink.deliver(chunk)
            finally:
                self.taken += len(chunk)
                shared = self._shared
                if shared.holding and self.pushed - self.taken <= BACKLOG_DRAINED:
                    shared.drained.set()

    # -- Consumer interface -----------------------------------------------------------

    def lapsed(self, partitions: Collection[Partition]) -> None:
        self._drop_queued({p for _, p in partitions})
        self._shared.note_lapsed(self.topic, [p for _, p in partitions])

    def commit(self, message: Message) -> None:
        partition = message.partition
        if partition in self.owned:
            self._shared.record_commit(self.topic, partition, message.offset + 1)
        # else: no longer ours; the new owner redoes it (at-least-once)

    async def flush(self, deadline: Deadline) -> None:
        await self._shared.flush(deadline)

    async def stop(self, deadline: Deadline) -> None:
        # Nothing to wait for: the feeder does no I/O, so its cancellation is immediate.
        if self.stopped:
            return
        self.stopped = True  # the thread pauses our partitions and drops late records
        feeder, self._feeder = self._feeder, None
        if feeder is not None:
            # Cutting a batch short is safe: the core only commits a prefix of what it
            # took, and nothing after the cut is taken any more.
            await cancel_and_wait(feeder)
        for chunk in self._queue:
            self.taken += len(chunk)
        self._queue.clear()

    async def close(self, deadline: Deadline) -> None:
        await self.stop(deadline)
        if self._closed:
            return
        self._closed = True
        await self._shared.detach(self, deadline)
