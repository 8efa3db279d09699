"""The in-memory backend: a small partitioned log with consumer groups, in one process.

It behaves like a tiny Kafka, on purpose: topics have partitions (a record's partition is
a hash of its key), groups keep committed offsets, members of a group split the
partitions and rebalance when one joins or leaves — revoking through the core exactly as
the Kafka transport does. So the core's ordering, commit and revoke logic is exercised
here first, with no broker.

``memory://NAME`` buses with the same NAME in one process share one broker, which lives
as long as some bus uses it.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from itertools import count

from keybus._aio import cancel_and_wait, log_failure, start_feeder
from keybus.deadline import Deadline
from keybus.dedupe import check_window, duplicate, event_id
from keybus.errors import BusClosedError, ConnectError, PublishError, TopicError
from keybus.groups import is_anonymous
from keybus.message import Message
from keybus.partitioning import Partition, assign_partitions, partition_for
from keybus.topics import PartitionPosition, TopicConfig, TopicInfo
from keybus.transports.base import Consumer, Sink, Transport

__all__ = ["MemoryBroker", "MemoryTransport"]

_FETCH_BATCH = 256
_TRIM_EVERY = 4096  # drop a partition's committed prefix once this much has piled up
_YIELD_EVERY = 64  # a publish loop lets consumers run this often (brokers ack async)


class _Log:
    __slots__ = ("base", "records")

    def __init__(self) -> None:
        # (value, key, headers, offset, timestamp): the message itself is made per
        # delivery, since each group's copy carries its own ownership fence.
        self.records: list[tuple[bytes, str | None, Mapping[str, bytes], int, float]] = []
        self.base = 0  # offset of records[0]; grows as committed records are trimmed

    @property
    def end(self) -> int:
        return self.base + len(self.records)


class _Group:
    def __init__(self, topic: _Topic) -> None:
        self.topic = topic
        # A new group starts at the earliest retained record, so nothing published
        # before its first member joined is missed.
        self.committed = [log.base for log in topic.logs]
        self.members: list[MemoryConsumer] = []
        self.owner: dict[int, MemoryConsumer] = {}
        # Per partition, how many times it was assigned: the fence its messages carry.
        self.fences = [0] * len(topic.logs)
        self.lock = asyncio.Lock()
        self._changes: set[asyncio.Task[None]] = set()

    async def change(
        self, *, join: MemoryConsumer | None = None, leave: MemoryConsumer | None = None
    ) -> None:
        """Add or remove a member and rebalance, in a task of the group's own. A
        rebalance may wait for another member's revoke (its running handlers, up to that
        member's revoke_timeout); a caller that stops waiting (a close bounded to 2 s, a
        cancelled subscribe) must not cut it half-way, which left a partition with no
        owner, or owned by a member that no longer fetched it, until the next change."""
        task = asyncio.get_running_loop().create_task(
            self._change(join, leave), name=f"keybus-memory-rebalance:{self.topic.name}"
        )
        self._changes.add(task)
        task.add_done_callback(self._changed)
        await asyncio.shield(task)

    def _changed(self, task: asyncio.Task[None]) -> None:
        self._changes.discard(task)
        log_failure(task)

    async def _change(self, join: MemoryConsumer | None, leave: MemoryConsumer | None) -> None:
        async with self.lock:
            if join is not None:
                self.members.append(join)
            if leave is not None and leave in self.members:
                self.members.remove(leave)
                leave._positions.clear()
            await self.rebalance()
            # Nobody can rejoin a private group: drop it, or its offsets would pin the
            # topic's records forever (trimming waits for every group).
            if (
                leave is not None
                and not self.members
                and is_anonymous(leave._group_name)
                and self.topic.groups.get(leave._group_name) is self
            ):
                del self.topic.groups[leave._group_name]

    async def rebalance(self) -> None:
        """Give each partition to one member (round-robin in join order). Partitions that
        move are revoked from the old owner (through its core) before the new one gets
        them, so no partition is ever processed by two members at once."""
        members = self.members
        desired = assign_partitions(members, len(self.topic.logs))
        for member in list({id(m): m for m in self.owner.values()}.values()):
            lost = {p for p, m in self.owner.items() if m is member and desired.get(p) is not m}
            if lost and member in members:
                await member._revoke(lost)
            for p in lost:
                del self.owner[p]
        for p, member in desired.items():
            if p not in self.owner:
                self.owner[p] = member
                self.fences[p] += 1
                member._assign(p, self.committed[p], self.fences[p])


class _Recent:
    """The event ids published to one topic within a de-duplication window, each with
    the monotonic time its window ends. Bounded by the window: expired ids leave from the
    front (ids enter in time order), so it holds what was published in the last
    ``dedupe_window`` seconds (the longest window of the buses publishing, if they
    differ)."""

    __slots__ = ("_until",)

    def __init__(self) -> None:
        self._until: OrderedDict[bytes, float] = OrderedDict()

    def admit(self, event: bytes, window: float) -> bool:
        """Record ``event`` for ``window`` seconds; False if it is still recorded."""
        now = time.monotonic()
        until = self._until
        while until and next(iter(until.values())) <= now:
            until.popitem(last=False)
        if until.get(event, 0.0) > now:
            return False
        until[event] = now + window
        until.move_to_end(event)
        return True


class _Topic:
    def __init__(self, name: str, config: TopicConfig) -> None:
        self.name = name
        self.config = config
        self.logs = [_Log() for _ in range(max(1, config.partitions))]
        self.groups: dict[str, _Group] = {}
        self.recent: _Recent | None = None  # made by the first de-duplicating publish
        self._round_robin = count()

    def append(self, value: bytes, key: str | None, headers: Mapping[str, bytes]) -> None:
        p = partition_for(key, len(self.logs), self._round_robin)
        log = self.logs[p]
        records = log.records
        offset = log.base + len(records)
        records.append((value, key, headers, offset, time.time()))
        for group in self.groups.values():
            owner = group.owner.get(p)
            if owner is not None and not owner._wake.is_set():
                owner._wake.set()

    def committed(self, partition: int, offset: int) -> None:
        log = self.logs[partition]
        if offset - log.base < _TRIM_EVERY:
            return
        floor = min(g.committed[partition] for g in self.groups.values())
        if floor > log.base:
            del log.records[: floor - log.base]
            log.base = floor


class MemoryBroker:
    """The shared state of one ``memory://NAME``."""

    _registry: weakref.WeakValueDictionary[str, MemoryBroker] = weakref.WeakValueDictionary()

    def __init__(self, name: str) -> None:
        self.name = name
        self.topics: dict[str, _Topic] = {}

    @classmethod
    def named(cls, name: str) -> MemoryBroker:
        broker = cls._registry.get(name)
        if broker is None:
            broker = cls._registry[name] = cls(name)
        return broker

    def topic(self, name: str, config: TopicConfig | None = None) -> _Topic:
        topic = self.topics.get(name)
        if topic is None:
            topic = self.topics[name] = _Topic(name, config or TopicConfig())
        return topic


DEFAULT_MAX_MESSAGE_BYTES = 1_048_576
"""A record's value plus headers may not exceed this by default: NATS's default
``max_payload`` (Kafka's client refuses above 1,000,000), so a service that would hit a
broker's limit in production hits it here first."""


class MemoryTransport(Transport):
    """``memory://[NAME]``. Options: ``max_message_bytes`` (value plus header names and
    values; default 1 MiB, ``None`` for no limit): a larger publish raises a permanent
    :class:`~keybus.errors.PublishError`, as a broker would refuse it. ``dedupe_window``
    (seconds; default ``None``, off): a record whose ``X-Event-ID`` this bus, or another
    de-duplicating bus of the same NAME, published to the topic within the window is not
    stored, and its publish raises :func:`keybus.dedupe.duplicate` (dead letters are never
    de-duplicated) — as JetStream's duplicate window, see :mod:`keybus.dedupe`."""

    def __init__(self, url: str, **options: object) -> None:
        max_message_bytes = options.pop("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES)
        self._window = check_window(options.pop("dedupe_window", None))
        if options:
            raise TypeError(f"unknown options for memory://: {sorted(options)}")
        if max_message_bytes is not None and (
            type(max_message_bytes) is not int or max_message_bytes < 1
        ):
            raise ValueError("max_message_bytes must be a positive int or None")
        self._max_bytes: int | None = max_message_bytes
        self.url = url
        self._name = url.split("://", 1)[1].strip("/") if "://" in url else url
        self._broker: MemoryBroker | None = None
        self._closed = False
        self._published = 0

    async def connect(self, deadline: Deadline) -> None:
        if self._name.strip() != self._name:
            raise ConnectError(self.url, "memory broker names cannot have surrounding spaces")
        self._broker = MemoryBroker.named(self._name)

    def _live(self) -> MemoryBroker:
        if self._broker is None:
            raise self._gone()
        return self._broker

    def _gone(self) -> Exception:
        if self._closed:
            return BusClosedError(f"the memory transport {self.url} is closed")
        return ConnectError(self.url, "transport is not connected")

    async def publish(
        self, topic: str, value: bytes, key: str | None, headers: Mapping[str, bytes]
    ) -> None:
        broker = self._broker
        if broker is None:
            raise self._gone()
        limit = self._max_bytes
        if limit is not None:
            size = len(value)
            if headers:
                size += sum(map(len, headers)) + sum(map(len, headers.values()))
            if size > limit:
                raise PublishError(
                    topic,
                    f"message of {size} bytes (value and headers) exceeds the limit of "
                    f"{limit} bytes",
                    permanent=True,
                )
        log = broker.topics.get(topic) or broker.topic(topic)
        if self._window is not None:  # the only cost of de-duplication while it is off
            event = event_id(headers)
            if event is not None:
                recent = log.recent or _Recent()
                log.recent = recent
                if not recent.admit(event, self._window):
                    raise duplicate(topic)
        log.append(value, key, headers)
        self._published += 1
        if not self._published % _YIELD_EVERY:
            await asyncio.sleep(0)

    async def ensure_topic(self, topic: str, config: TopicConfig) -> None:
        self._live().topic(topic, config)

    async def describe_topic(self, topic: str) -> TopicInfo:
        known = self._live().topics.get(topic)
        if known is None:
            raise TopicError(topic, "describe", "no such topic")
        return TopicInfo(topic, len(known.logs))

    async def positions(
        self, topic: str, group: str, deadline: Deadline
    ) -> list[PartitionPosition]:
        known = self._live().topics.get(topic)
        if known is None:
            raise TopicError(topic, "describe", "no such topic")
        held = known.groups.get(group)
        out = []
        for p, log in enumerate(known.logs):
            committed = held.committed[p] if held is not None else None
            out.append(
                PartitionPosition(p, committed, log.end, log.end - max(committed or 0, log.base))
            )
        return out

    can_read_topics = True

    async def read_topic(self, topic: str, deadline: Deadline) -> list[Message]:
        known = self._live().topics.get(topic)
        if known is None:
            return []
        return [
            Message(topic, value, key, headers, p, offset, stamp)
            for p, log in enumerate(known.logs)
            for value, key, headers, offset, stamp in log.records
        ]

    async def delete_topic(self, topic: str) -> None:
        self._live().topics.pop(topic, None)

    async def list_topics(self, deadline: Deadline) -> list[str]:
        return sorted(self._live().topics)

    def consumer(self, topic: str, group: str, sink: Sink) -> Consumer:
        return MemoryConsumer(self._live().topic(topic), group, sink)

    async def close(self, deadline: Deadline) -> None:
        self._closed = True
        self._broker = None  # the broker lives on while another bus uses it


class MemoryConsumer(Consumer):
    def __init__(self, topic: _Topic, group: str, sink: Sink) -> None:
        self._topic = topic
        self._group_name = group
        self._group: _Group | None = None
        self._sink = sink
        self._positions: dict[int, int] = {}  # owned partition -> next offset to fetch
        self._fences: dict[int, int] = {}  # owned partition -> its fence
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._left = False

    async def start(self) -> None:
        group = self._topic.groups.get(self._group_name)
        if group is None:
            group = self._topic.groups[self._group_name] = _Group(self._topic)
        self._group = group
        await group.change(join=self)
        if self._stopped:
            return  # closed while joining: no feeder for a closed subscription
        self._task = start_feeder(self._fetch(), f"keybus-memory-fetch:{self._topic.name}")

    def _assign(self, partition: int, offset: int, fence: int) -> None:
        self._positions[partition] = offset
        self._fences[partition] = fence
        self._sink.assign([(self._topic.name, partition)])
        self._wake.set()

    async def _revoke(self, partitions: set[int]) -> None:
        for p in partitions:
            self._positions.pop(p, None)
        deadline = Deadline.after(self._sink.revoke_timeout)
        await self._sink.revoke([(self._topic.name, p) for p in partitions], deadline)

    async def _fetch(self) -> None:
        logs = self._topic.logs
        name = self._topic.name
        while True:
            batch: list[Message] = []
            for p, position in list(self._positions.items()):
                log = logs[p]
                start = max(position, log.base)
                if start < log.end:
                    chunk = log.records[start - log.base : start - log.base + _FETCH_BATCH]
                    self._positions[p] = start + len(chunk)
                    fence = self._fences[p]
                    batch.extend(
                        [
                            Message(name, value, key, headers, p, offset, stamp, None, fence)
                            for value, key, headers, offset, stamp in chunk
                        ]
                    )
            if batch:
                await self._sink.deliver(batch)
            else:
                self._wake.clear()
                await self._wake.wait()

    def commit(self, message: Message) -> None:
        group = self._group
        if group is None or group.owner.get(message.partition) is not self:
            return  # no longer ours: the new owner redoes it (at-least-once)
        offset = message.offset + 1
        if offset > group.committed[message.partition]:
            group.committed[message.partition] = offset
            self._topic.committed(message.partition, offset)

    async def flush(self, deadline: Deadline) -> None:
        return None  # commits are applied at once

    async def stop(self, deadline: Deadline) -> None:
        self._stopped = True
        task, self._task = self._task, None
        await cancel_and_wait(task)  # a feeder does no I/O: it ends at once

    async def close(self, deadline: Deadline) -> None:
        await self.stop(deadline)
        group = self._group
        if group is None or self._left:
            return
        self._left = True
        await group.change(leave=self)

    @property
    def assigned(self) -> list[Partition]:
        return [(self._topic.name, p) for p in sorted(self._positions)]
