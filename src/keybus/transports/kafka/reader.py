"""``Transport.read_topic`` on Kafka: a topic read from its first retained offset to its
high watermark as it stood when the read began, outside any group (``assign()``, no
join, no commit), in a thread of its own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from confluent_kafka import Consumer as _RdConsumer
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from keybus.deadline import Deadline
from keybus.message import Message
from keybus.transports.kafka.config import guarded
from keybus.transports.kafka.errors import translate
from keybus.transports.kafka.headers import RecordHeaders
from keybus.transports.kafka.threads import OwnedThread

__all__ = ["read_topic"]

_POLL = 0.1
_BATCH = 500


async def read_topic(consumer: Mapping[str, Any], topic: str, deadline: Deadline) -> list[Message]:
    """Every retained record of ``topic`` (partition after partition, each in offset
    order); empty if the topic does not exist."""
    found: list[Message] = []
    failure: list[BaseException] = []
    timeout = max(0.1, deadline.remaining())

    def run() -> None:
        try:
            found.extend(_read(consumer, topic, time.monotonic() + timeout))
        except BaseException as exc:  # reported on the loop
            failure.append(exc)

    thread = OwnedThread(run, f"keybus-kafka-reader:{topic}", asyncio.get_running_loop())
    thread.start()
    if not await thread.join(deadline):
        raise translate("no answer in time", "describe", topic)
    if failure:
        exc = failure[0]
        if isinstance(exc, KafkaException):
            raise translate(exc, "describe", topic) from exc
        raise exc
    return found


def _read(settings: Mapping[str, Any], topic: str, until: float) -> list[Message]:
    config = {
        **guarded(settings),
        # Never joined nor committed (assign() only): the id is librdkafka's requirement.
        "group.id": "keybus-reader",
        "enable.auto.commit": False,
        "enable.partition.eof": False,
    }
    rd = _RdConsumer(config)
    try:
        meta = rd.list_topics(topic, timeout=max(0.1, until - time.monotonic()))
        described = meta.topics.get(topic)
        if described is None or described.error is not None:
            return []  # no such topic: nothing parked, nothing dead-lettered
        ends: dict[int, int] = {}
        starts: list[TopicPartition] = []
        for p in sorted(described.partitions):
            low, high = rd.get_watermark_offsets(
                TopicPartition(topic, p), timeout=max(0.1, until - time.monotonic())
            )
            if high > low:
                ends[p] = high
                starts.append(TopicPartition(topic, p, low))
        by_partition: dict[int, list[Message]] = {p: [] for p in ends}
        if starts:
            rd.assign(starts)
        while ends:
            if time.monotonic() > until:
                raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "read not finished"))
            for record in rd.consume(_BATCH, _POLL):
                error = record.error()
                if error is not None:
                    raise KafkaException(error)
                p, offset = record.partition(), record.offset()
                if p is None or offset is None or p not in ends or offset >= ends[p]:
                    continue
                kind, stamp = record.timestamp()
                by_partition[p].append(
                    Message(
                        topic,
                        record.value() or b"",
                        _key(record.key()),
                        RecordHeaders(record),  # (safe with any header name, read lazily)
                        p,
                        offset,
                        stamp / 1000.0 if kind else None,
                    )
                )
            for position in rd.position([TopicPartition(topic, p) for p in list(ends)]):
                if position.offset >= ends[position.partition]:
                    del ends[position.partition]
        return [m for p in sorted(by_partition) for m in by_partition[p]]
    finally:
        rd.close()


def _key(raw: bytes | str | None) -> str | None:
    if raw is None or isinstance(raw, str):
        return raw
    return raw.decode("utf-8", "replace")
