"""The transport interface: what a backend must do, and nothing more.

A transport only moves bytes and positions. Ordering, concurrency, retries, dead letters,
done-tracking and bounded close live in the core (``keybus.engine`` and friends), written
once and shared by every backend. This module depends on the core's types, never the
reverse: the core imports nothing from ``keybus.transports``.

Positions: every delivered :class:`~keybus.message.Message` carries ``(topic, partition)``
and a monotonically increasing ``offset`` within it. The core tells the consumer, per
partition, the last message of the contiguous prefix that is done (handled or
dead-lettered); the transport makes that durable (Kafka: commit ``offset + 1``; NATS:
ack-all up to that message; memory: the group's committed offset).

Time: every bounded operation is given the :class:`~keybus.deadline.Deadline` it must
meet, and a transport sizes its internal waits from it (see ``keybus.deadline`` for the
close-time budget). The core still cuts a step off at its deadline, so a transport that
overruns loses its cleanup rather than stalls a close.

Errors: a transport raises only :mod:`keybus.errors` types, translated at its boundary
from its client library's (``transports/<backend>/errors.py``), so the same event raises
the same type on every backend; the conformance kit checks it.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Collection, Mapping, Sequence
from typing import Protocol

from keybus.deadline import TRANSPORT_CLOSE_BUDGET, Deadline
from keybus.errors import PublishError, error_for
from keybus.message import Message
from keybus.partitioning import Partition
from keybus.topics import PartitionPosition, TopicConfig, TopicInfo

__all__ = ["Consumer", "Sink", "Transport"]


class Sink(Protocol):
    """The core side of one subscription, driven by its consumer."""

    @property
    def revoke_timeout(self) -> float:
        """How long a revoke may wait for the partition's running handlers (seconds):
        a transport's deadline for :meth:`revoke` is at most this far away."""

    def assign(self, partitions: Collection[Partition], *, valid_until: float = ...) -> None:
        """The consumer now owns these partitions; their messages may be delivered.

        ``valid_until`` (``time.monotonic()``; default: for good, until revoked) is how
        long the ownership is known to hold: a backend whose ownership can lapse without
        a revoke (a lease, a session) passes it and extends it with :meth:`renew` each
        time it has *proof* that it still owns them (a lease renewed, a session shown
        alive). No message of a partition starts after its moment; the core then gives
        the partition up as lost and calls :meth:`Consumer.lapsed`."""

    def renew(self, partitions: Collection[Partition], valid_until: float) -> None:
        """Ownership of these (assigned) partitions is known to hold until
        ``valid_until`` (``time.monotonic()``)."""

    async def deliver(self, messages: Sequence[Message]) -> None:
        """Take messages in broker order; returns when accepted (waits under backpressure).

        Messages of partitions not currently assigned are dropped.
        """

    async def revoke(self, partitions: Collection[Partition], deadline: Deadline) -> None:
        """The consumer is losing these partitions: drop their queued messages, wait until
        ``deadline`` for their running handlers — cancelling those still running then,
        and giving them ``ABANDON_GRACE`` to unwind — and report their done prefix via
        :meth:`Consumer.commit` before returning. The consumer flushes commits after.

        A lost partition (session or lease expired: it may already be another member's)
        is revoked with ``Deadline.passed()``: its handlers are cancelled at once."""


class Consumer(abc.ABC):
    """One subscription's feed of messages from one topic for one group."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Join the group and begin fetching. Returns once partitions are assigned, so a
        message published after ``start`` returns is delivered to this consumer or to
        another member of its group. Failure: :class:`~keybus.errors.SubscribeError`."""

    @abc.abstractmethod
    def commit(self, message: Message) -> None:
        """``message`` ends the contiguous done prefix of its partition. Must not block;
        the transport may batch and make it durable later (at the latest in ``flush``)."""

    def lapsed(self, partitions: Collection[Partition]) -> None:
        """The core gave these partitions up because their ownership was not renewed in
        time (see :meth:`Sink.assign`): it dropped their queued messages, cancelled their
        running handlers and commits nothing more for them. The consumer stops feeding
        them and either gives them up or re-takes them from the committed position
        (assigning them anew). Must not block. The default, for consumers that never
        pass an ownership deadline, does nothing."""
        return None

    @abc.abstractmethod
    async def flush(self, deadline: Deadline) -> None:
        """Make every commit reported so far durable, by ``deadline``."""

    @abc.abstractmethod
    async def stop(self, deadline: Deadline) -> None:
        """Stop fetching (idempotent). Messages already delivered stay with the core."""

    @abc.abstractmethod
    async def close(self, deadline: Deadline) -> None:
        """Leave the group and release everything this consumer started (idempotent), by
        ``deadline``. Called after :meth:`stop` and after the core reported its last
        commits."""


class Transport(abc.ABC):
    """A connection to one backend."""

    url: str
    # How long the bus lets :meth:`close` take (after the subscriptions stopped). A
    # transport whose client library may hold a close longer says so here.
    close_budget: float = TRANSPORT_CLOSE_BUDGET
    # Whether :meth:`read_topic` works: parked keys then survive restarts and move with
    # their partition, and a replay reads their dead letters back.
    can_read_topics: bool = False
    # Whether a topic created with TopicConfig(compacted=True) keeps (eventually) only
    # the last record of each key: a store of per-key state written often (the version
    # guard's) then stays bounded. Without it the core keeps such state in memory only.
    compacts_topics: bool = False

    @abc.abstractmethod
    async def connect(self, deadline: Deadline) -> None:
        """Connect by ``deadline`` or raise :class:`~keybus.errors.ConnectError`."""

    @abc.abstractmethod
    async def publish(
        self, topic: str, value: bytes, key: str | None, headers: Mapping[str, bytes]
    ) -> None:
        """Send one record; return once the broker acknowledged it. Concurrent calls are
        batched underneath. Failure: :class:`~keybus.errors.PublishError`; after
        :meth:`close`: :class:`~keybus.errors.BusClosedError`."""

    def send(
        self, topic: str, value: bytes, key: str | None, headers: Mapping[str, bytes]
    ) -> Awaitable[None]:
        """:meth:`publish` as an awaitable the bus awaits at once. A transport whose
        client hands out a future per record may return that future itself: one
        coroutine frame less to create and resume on the hottest path."""
        return self.publish(topic, value, key, headers)

    async def send_many(
        self, topic: str, records: Sequence[tuple[bytes, str | None, Mapping[str, bytes]]]
    ) -> list[PublishError | None]:
        """Send ``records`` ``(value, key, headers)`` together; return when each was
        acknowledged or refused: ``None`` or its :class:`~keybus.errors.PublishError`,
        index-aligned. Records of one key keep their order. The default: every
        :meth:`send` in flight at once; a transport with a cheaper batch path (one report
        for the batch instead of one future per record) overrides it. After
        :meth:`close`: :class:`~keybus.errors.BusClosedError`."""
        errors: list[PublishError | None] = [None] * len(records)
        waits: list[Awaitable[None]] = []
        where: list[int] = []
        for index, (value, key, headers) in enumerate(records):
            try:
                waits.append(self.send(topic, value, key, headers))
            except PublishError as exc:  # refused before it left (too large, say)
                errors[index] = exc
            else:
                where.append(index)
        results = await asyncio.gather(*waits, return_exceptions=True)
        for index, result in zip(where, results, strict=True):
            if isinstance(result, PublishError):
                errors[index] = result
            elif isinstance(result, BaseException):
                raise result  # BusClosedError (closed meanwhile), or a bug
        return errors

    @abc.abstractmethod
    async def ensure_topic(self, topic: str, config: TopicConfig) -> None:
        """Create the topic if it does not exist (idempotent). Failure:
        :class:`~keybus.errors.TopicError`."""

    @abc.abstractmethod
    async def describe_topic(self, topic: str) -> TopicInfo:
        """The topic as the backend has it; :class:`~keybus.errors.TopicError` if it does
        not exist or cannot be described."""

    @abc.abstractmethod
    async def delete_topic(self, topic: str) -> None:
        """Delete the topic and its data if it exists (idempotent). Failure:
        :class:`~keybus.errors.TopicError`."""

    async def list_topics(self, deadline: Deadline) -> list[str]:
        """The names of the topics the backend holds, sorted, its internal ones (Kafka's
        ``__consumer_offsets``, NATS key-value buckets) left out, by ``deadline``.
        Failure: :class:`~keybus.errors.TopicError`. The default: the transport cannot
        list its topics."""
        raise error_for("list", "", "this transport cannot list its topics")

    async def positions(
        self, topic: str, group: str, deadline: Deadline
    ) -> list[PartitionPosition]:
        """Where ``group`` stands in each partition of ``topic`` (committed, end, lag), by
        ``deadline``; read-only: any group, consumed by this bus or not. Failure:
        :class:`~keybus.errors.TopicError`. The default: the transport cannot tell."""
        raise error_for("describe", topic, "this transport reports no positions", group=group)

    async def read_topic(self, topic: str, deadline: Deadline) -> list[Message]:
        """Every retained record of ``topic`` as it stands now, each partition's in
        offset order (partitions one after the other), by ``deadline``; outside any
        group, moving no position. A missing topic reads as empty. The core reads its
        parked-keys store and the dead letters to replay with it (``keybus.parking``).
        Failure: :class:`~keybus.errors.TopicError`. The default: the transport cannot
        read a topic back (parked state then lives only as long as its subscription)."""
        raise error_for("describe", topic, "this transport cannot read a topic back")

    @property
    def pending_publishes(self) -> int:
        """Records handed to the client library and not yet acknowledged (health)."""
        return 0

    async def ping(self, deadline: Deadline) -> float:
        """A round trip to the broker, in seconds, by ``deadline`` (for ``bus.health()``).
        Failure: :class:`~keybus.errors.ConnectError`. The default: no broker to reach."""
        return 0.0

    @abc.abstractmethod
    def consumer(self, topic: str, group: str, sink: Sink) -> Consumer:
        """A consumer of ``topic`` in ``group`` that feeds ``sink`` (not yet started)."""

    @abc.abstractmethod
    async def close(self, deadline: Deadline) -> None:
        """Flush publishes and release every task, thread, socket and fd (idempotent),
        by ``deadline``. Consumers have been closed before this is called."""
