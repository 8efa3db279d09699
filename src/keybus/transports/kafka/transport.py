"""KafkaTransport: connect, publish, consumer(), close — the wiring of the package's
parts (admin client, loop-served producer, one group consumer per bus and group)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaException

from keybus.deadline import TRANSPORT_CLOSE_BUDGET, Deadline
from keybus.errors import PublishError
from keybus.groups import is_anonymous
from keybus.message import Message
from keybus.topics import PartitionPosition, TopicConfig, TopicInfo
from keybus.transports.base import Consumer, Sink, Transport
from keybus.transports.kafka.admin import KafkaAdmin
from keybus.transports.kafka.config import KafkaSettings
from keybus.transports.kafka.errors import closed, translate
from keybus.transports.kafka.group_consumer import GroupConsumer
from keybus.transports.kafka.producer import KafkaProducer
from keybus.transports.kafka.reader import read_topic
from keybus.transports.kafka.topic_feed import KafkaConsumer

__all__ = ["KafkaTransport"]

# close_budget: librdkafka holds a consumer's close, and no deadline of ours can cut it
# short, while an asynchronous commit is outstanding as the broker goes away: one that
# found no coordinator fails a session timeout after it was made, one sent to the
# coordinator as it went away fails when its request times out (socket.timeout.ms), each
# found by a scan librdkafka runs once a second. The close waits for it (returning earlier
# would leave the consumer thread and librdkafka's native threads running after close()),
# so the budget covers the longer of the two plus this much for that scan, the leave and
# the thread's end.
_CLOSE_MARGIN = 2.5
# The least time left in a close worth spending on deleting private groups' offsets,
# and the most it may take (a few ms when the broker answers; against a gone broker the
# close must not wait long for what only tidies up).
_DELETE_MIN = 0.2
_DELETE_TIMEOUT = 1.0


class KafkaTransport(Transport):
    """``kafka://[user:password@]host:port[,host:port][?sasl=MECHANISM]``; options: see
    :class:`~keybus.transports.kafka.config.KafkaSettings` (an unknown one is a
    ``TypeError``)."""

    def __init__(self, url: str, **options: Any) -> None:
        self._settings = KafkaSettings(url=url, **options)
        self.url = self._settings.url  # credentials masked: shown in reprs, logs, errors
        held = max(self._settings.session_timeout, self._settings.request_timeout)
        self.close_budget = max(TRANSPORT_CLOSE_BUDGET, held + _CLOSE_MARGIN)
        self._admin = KafkaAdmin(self.url, self._settings.admin, self._settings.probe_timeout)
        self._producer: KafkaProducer | None = None
        self._groups: dict[str, list[GroupConsumer]] = {}
        self._shared: list[GroupConsumer] = []  # every group consumer whose thread may run
        self._private: set[str] = set()  # anonymous groups this transport consumed in
        self._closed = False

    # -- connect / admin -------------------------------------------------------------

    async def connect(self, deadline: Deadline) -> None:
        await self._admin.connect(deadline)

    async def ensure_topic(self, topic: str, config: TopicConfig) -> None:
        await self._admin.ensure_topic(topic, config)

    async def describe_topic(self, topic: str) -> TopicInfo:
        return await self._admin.describe_topic(topic)

    async def delete_topic(self, topic: str) -> None:
        await self._admin.delete_topic(topic)

    async def list_topics(self, deadline: Deadline) -> list[str]:
        return await self._admin.list_topics(deadline)

    async def positions(
        self, topic: str, group: str, deadline: Deadline
    ) -> list[PartitionPosition]:
        return await self._admin.positions(topic, group, deadline)

    async def ping(self, deadline: Deadline) -> float:
        return await self._admin.ping(deadline)

    can_read_topics = True
    compacts_topics = True  # cleanup.policy=compact

    async def read_topic(self, topic: str, deadline: Deadline) -> list[Message]:
        if self._closed:
            raise closed(self.url)
        return await read_topic(self._settings.consumer, topic, deadline)

    @property
    def pending_publishes(self) -> int:
        return self._producer.pending if self._producer is not None else 0

    # -- publish ---------------------------------------------------------------------

    async def publish(
        self, topic: str, value: bytes, key: str | None, headers: Mapping[str, bytes]
    ) -> None:
        await self.send(topic, value, key, headers)

    def send(
        self, topic: str, value: bytes, key: str | None, headers: Mapping[str, bytes]
    ) -> Awaitable[None]:
        producer = self._producer or self._new_producer(topic)
        try:  # not contextlib.suppress: a Python-level context manager per publish
            return producer.send(topic, value, key, headers)
        except BufferError:  # librdkafka's queue is full: wait for room, boundedly
            return self._send_when_room(producer, topic, value, key, headers)

    async def send_many(
        self, topic: str, records: Sequence[tuple[bytes, str | None, Mapping[str, bytes]]]
    ) -> list[PublishError | None]:
        producer = self._producer or self._new_producer(topic)
        return await producer.send_many(topic, records)

    def _new_producer(self, topic: str) -> KafkaProducer:
        if self._closed:
            raise closed(self.url)
        try:
            producer = KafkaProducer(self._settings.producer, asyncio.get_running_loop(), self.url)
        except (KafkaException, TypeError, ValueError) as exc:  # e.g. a bad setting
            raise translate(
                exc, "publish", topic, context="cannot create the Kafka producer"
            ) from exc
        self._producer = producer
        return producer

    @staticmethod
    async def _send_when_room(
        producer: KafkaProducer,
        topic: str,
        value: bytes,
        key: str | None,
        headers: Mapping[str, bytes],
    ) -> None:
        await (await producer.send_when_room(topic, value, key, headers))

    # -- consume ---------------------------------------------------------------------

    def consumer(self, topic: str, group: str, sink: Sink) -> Consumer:
        if self._closed:
            raise closed(self.url)
        if is_anonymous(group):
            self._private.add(group)
        members = self._groups.setdefault(group, [])
        # One shared consumer per group for every topic; a second subscription to the same
        # topic in the same group is a second member, like another process would be. So is
        # a member whose previous subscription to the topic is not yet out of librdkafka's
        # subscription or still holds its partitions (an unsubscribe gave up waiting for
        # the release): there the removal and the re-add would reach librdkafka as one
        # unchanged subscribe() - no revoke, no assignment for the new subscription, and
        # the old one's partitions fetched for a subscription that owns none of them.
        for shared in members:
            if not shared.closing and topic not in shared.facades and not shared.detaching(topic):
                break
        else:
            shared = GroupConsumer(self._settings, group, self._forget)
            members.append(shared)
            self._shared.append(shared)
        return KafkaConsumer(shared, topic, sink)

    def _forget(self, shared: GroupConsumer) -> None:
        # Called as a group consumer begins to close: no new subscription joins it.
        self._shared = [s for s in self._shared if not s.finished or s is shared]
        members = self._groups.get(shared.group)
        if members and shared in members:
            members.remove(shared)
            if not members:
                del self._groups[shared.group]

    # -- close -----------------------------------------------------------------------

    async def close(self, deadline: Deadline) -> None:
        if self._closed:
            return
        self._closed = True
        # Also those already shutting down (forgotten by their group): a thread that
        # outlives its subscription's close deadline is waited for here.
        shared = [s for s in self._shared if not s.finished]
        self._shared.clear()
        self._groups.clear()
        producer, self._producer = self._producer, None
        # Side by side, each sized from this close's deadline: the consumer threads wait
        # until shortly before it, the producer splits it between flush, purge and destroy
        # — within the default budget: the rest of ours is for librdkafka's hold on a
        # consumer's close (above), and publishes a gone broker never acknowledges would
        # wait out a share of it for nothing.
        await asyncio.gather(
            *(s.shutdown(deadline) for s in shared),
            *([producer.close(deadline.within(TRANSPORT_CLOSE_BUDGET))] if producer else []),
        )
        # Nobody can rejoin a private group: drop its committed offsets, which the broker
        # would otherwise keep for offsets.retention.minutes (a week by default). Only
        # with time left: a close against a gone broker must not wait for this.
        private, self._private = self._private, set()
        if private and deadline.remaining() > _DELETE_MIN:
            within = deadline.within(_DELETE_TIMEOUT)
            await asyncio.gather(*(self._admin.delete_group(g, within) for g in private))
        self._admin.close()
