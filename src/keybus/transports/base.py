"""The transport interface: what a backend must do, and nothing more.

A transport only moves bytes and positions. Ordering, concurrency, retries, dead letters,
done-tracking and bounded close live in the core (``keybus.subscription`` and friends),
written once and shared by every backend.

Positions: every delivered :class:`~keybus.message.Message` carries ``(topic, partition)``
and a monotonically increasing ``offset`` within it. The core tells the consumer, per
partition, the last message of the contiguous prefix that is done (handled or
dead-lettered); the transport makes that durable (Kafka: commit ``offset + 1``; NATS:
ack-all up to that message; memory: the group's committed offset).
"""

from __future__ import annotations

import abc
import asyncio
import logging
import zlib
from collections.abc import Awaitable, Collection, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from keybus.message import Message

__all__ = [
    "ANONYMOUS_GROUP_PREFIX",
    "Consumer",
    "LazyHeaders",
    "Partition",
    "Sink",
    "TopicConfig",
    "Transport",
    "cancel_and_wait",
    "log_failure",
    "partition_for",
    "start_feeder",
]

log = logging.getLogger("keybus")

Partition = tuple[str, int]
"""A stream of strictly ordered positions: ``(topic, partition)``."""

ANONYMOUS_GROUP_PREFIX = "keybus-anon-"
"""Groups of buses made without ``group=``: private to one bus, so a transport may drop
their state (offsets, durables) once their last member leaves."""


def partition_for(key: str | None, partitions: int, round_robin: Iterator[int]) -> int:
    """The partition of a record: a hash of its key (so one key stays on one partition
    and in order), round-robin without a key. Keys with lone surrogates hash too."""
    if partitions <= 1:
        return 0
    if key is None:
        return next(round_robin) % partitions
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % partitions


def start_feeder(body: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """Start a consumer's feed loop: the task that moves records, already in memory, into
    :meth:`Sink.deliver`. It does no I/O, so only a keybus bug can end it — and then the
    subscription would stall without a word until close. Say so at once, by name. (NATS
    pull tasks, which do talk to the server, are restarted instead.)"""
    task = asyncio.get_running_loop().create_task(body, name=name)
    task.add_done_callback(_report_crash)
    return task


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel ``tasks`` (all of them first) and wait until they have ended. Only their
    own cancellation is absorbed: a cancellation of the *caller* while it waits still
    propagates, where ``with suppress(CancelledError): await task`` would swallow it and
    let the caller run on (e.g. a close that was itself cancelled would keep closing) —
    and since every task was cancelled before the wait, none is left running then."""
    owned = [task for task in tasks if task is not None]
    pending = [task for task in owned if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
    for task in owned:
        if not task.cancelled() and task.exception() is not None:  # retrieved: logged once
            log.debug("keybus: %s ended with %r", task.get_name(), task.exception())


def log_failure(task: asyncio.Task[Any]) -> None:
    """A done-callback for an owned task that should not fail: say so if it did."""
    if not task.cancelled() and task.exception() is not None:
        log.error("keybus: %s failed", task.get_name(), exc_info=task.exception())


def _report_crash(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    exc = task.exception()  # retrieved here, so asyncio does not repeat it at collection
    if exc is not None:
        log.error(
            "keybus: %s crashed; its subscription takes no more messages until it is "
            "reopened (uncommitted ones are redelivered then)",
            task.get_name(),
            exc_info=exc,
        )


class LazyHeaders(Mapping[str, bytes]):
    """A delivered record's headers as a read-only mapping, converted on first use.

    Converting every record's headers as it arrives costs 1.5-3 µs a record, and most
    subscriptions (every envelope subscription) never read them. A transport subclasses
    this with :meth:`_load`, which builds the dict from ``self._source`` and never raises.
    """

    __slots__ = ("_dict", "_source")

    def __init__(self, source: Any) -> None:
        self._source: Any = source
        self._dict: dict[str, bytes] | None = None

    @abc.abstractmethod
    def _load(self) -> dict[str, bytes]:
        """The headers of ``self._source`` (called once)."""

    def _headers(self) -> dict[str, bytes]:
        headers = self._dict
        if headers is None:
            headers = self._dict = self._load()
            self._source = None
        return headers

    def __getitem__(self, name: str) -> bytes:
        return self._headers()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._headers())

    def __len__(self) -> int:
        return len(self._headers())

    def __contains__(self, name: object) -> bool:
        return name in self._headers()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LazyHeaders):
            other = other._headers()
        return self._headers() == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self._headers())


@dataclass(frozen=True, slots=True)
class TopicConfig:
    """How a topic (Kafka topic, JetStream stream, memory log) is created.

    ``ephemeral`` topics trade durability for speed: short retention on Kafka, memory
    storage on NATS. ``retention_seconds=None`` keeps the backend's default.
    """

    partitions: int = 3
    replication_factor: int = 1
    retention_seconds: float | None = None
    compression: str | None = None
    ephemeral: bool = False


class Sink(Protocol):
    """The core side of one subscription, called by its consumer."""

    def assign(self, partitions: Collection[Partition]) -> None:
        """The consumer now owns these partitions; their messages may be delivered."""

    async def deliver(self, messages: Sequence[Message]) -> None:
        """Take messages in broker order; returns when accepted (waits under backpressure).

        Messages of partitions not currently assigned are dropped.
        """

    async def revoke(self, partitions: Collection[Partition], *, lost: bool = False) -> None:
        """The consumer is losing these partitions: drop their queued messages, wait
        (bounded by the subscription's ``revoke_timeout``) for their running handlers —
        cancelling those still running then — and report their done prefix via
        :meth:`Consumer.commit` before returning. The consumer flushes commits after.

        ``lost=True``: the partitions may already belong to another member (session or
        lease expired): running handlers are cancelled at once, without waiting."""


class Consumer(abc.ABC):
    """One subscription's feed of messages from one topic for one group."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Join the group and begin fetching. Returns once partitions are assigned, so a
        message published after ``start`` returns is delivered to this consumer or to
        another member of its group."""

    @abc.abstractmethod
    def commit(self, message: Message) -> None:
        """``message`` ends the contiguous done prefix of its partition. Must not block;
        the transport may batch and make it durable later (at the latest in ``flush``)."""

    @abc.abstractmethod
    async def flush(self) -> None:
        """Make every commit reported so far durable."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop fetching (idempotent). Messages already delivered stay with the core."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Leave the group and release everything this consumer started (idempotent).
        Called after :meth:`stop` and after the core reported its last commits."""


class Transport(abc.ABC):
    """A connection to one backend."""

    url: str
    # How long the bus lets :meth:`close` take (after the subscriptions stopped). A
    # transport whose client library may hold a close longer says so here.
    close_budget: float = 5.0

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect within a bounded time or raise :class:`~keybus.errors.ConnectError`."""

    @abc.abstractmethod
    async def publish(
        self, topic: str, value: bytes, key: str | None, headers: Mapping[str, bytes]
    ) -> None:
        """Send one record; return once the broker acknowledged it. Concurrent calls are
        batched underneath. Failure: :class:`~keybus.errors.PublishError`."""

    def send(
        self, topic: str, value: bytes, key: str | None, headers: Mapping[str, bytes]
    ) -> Awaitable[None]:
        """:meth:`publish` as an awaitable the bus awaits at once. A transport whose
        client hands out a future per record may return that future itself: one
        coroutine frame less to create and resume on the hottest path."""
        return self.publish(topic, value, key, headers)

    @abc.abstractmethod
    async def ensure_topic(self, topic: str, config: TopicConfig) -> None:
        """Create the topic if it does not exist (idempotent)."""

    @abc.abstractmethod
    async def delete_topic(self, topic: str) -> None:
        """Delete the topic and its data if it exists (idempotent)."""

    @abc.abstractmethod
    def consumer(self, topic: str, group: str, sink: Sink) -> Consumer:
        """A consumer of ``topic`` in ``group`` that feeds ``sink`` (not yet started)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush publishes and release every task, thread, socket and fd (idempotent).
        Consumers have been closed before this is called."""
