"""Kafka: a record refused for its size is a permanent ``PublishError`` raised at once,
whoever refuses it — librdkafka before sending (over the producer's ``message.max.bytes``,
the conformance kit's tests) or the broker in the delivery report (over a topic's
``max.message.bytes``, here; librdkafka does not retry that) — never after the 30 s
``message.timeout.ms``. And a dead letter the dead-letter topic refuses for its size is
written reduced: the key moves on."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

import keybus
from keybus.transports.kafka.config import bootstrap_servers
from tests.conftest import Backend, BusFactory
from tests.helpers import Collected, eventually

TOPIC_LIMIT = 2048  # the topic's max.message.bytes: a whole record batch, compressed


async def create_small_topic(backend: Backend, topic: str) -> None:
    """``topic`` with one partition and a ``max.message.bytes`` of :data:`TOPIC_LIMIT`
    (keybus's TopicConfig has no such setting: a topic someone else made)."""
    admin = AdminClient({"bootstrap.servers": bootstrap_servers(backend.url)})
    new = NewTopic(topic, 1, 1, config={"max.message.bytes": str(TOPIC_LIMIT)})
    await asyncio.to_thread(admin.create_topics([new])[topic].result, 30)


async def test_a_record_the_topic_refuses_for_its_size_is_permanent_at_once(
    open_bus: BusFactory, backend: Backend
) -> None:
    topic = backend.topic("small")
    await create_small_topic(backend, topic)
    bus = await open_bus()
    await bus.publish(topic, b"fits", key="k")
    started = time.monotonic()
    with pytest.raises(keybus.PublishError) as raised:
        await bus.publish(topic, os.urandom(2 * TOPIC_LIMIT), key="k")  # lz4 cannot shrink it
    assert time.monotonic() - started < 5.0, "refused at once, not at message.timeout.ms"
    assert raised.value.permanent
    assert "MSG_SIZE_TOO_LARGE" in raised.value.reason
    await bus.publish(topic, b"fits too", key="k")


async def test_a_dead_letter_the_dead_letter_topic_refuses_for_its_size_is_written_reduced(
    open_bus: BusFactory, backend: Backend
) -> None:
    """The record fits its own topic (the broker's default limit), its dead letter not
    the dead-letter topic's: the broker's refusal (a delivery report) is permanent, so
    the reduced form is written and the key's next record is handled."""
    topic = backend.topic("dlqsmall")
    dead_letters = f"{topic}.dlq"
    await create_small_topic(backend, dead_letters)
    letters = Collected()
    watcher = await open_bus()
    await watcher.subscribe(dead_letters, letters)
    bus = await open_bus()
    poison = os.urandom(2 * TOPIC_LIMIT)
    handled: list[bytes] = []

    async def handler(message: keybus.Message) -> None:
        if message.value == poison:
            raise RuntimeError("poison")
        handled.append(message.value)

    await bus.subscribe(topic, handler, max_attempts=1)
    await bus.publish(topic, poison, key="k")
    await bus.publish(topic, b"next", key="k")
    await eventually(lambda: handled == [b"next"] and len(letters) == 1, what="the key moving on")
    letter = letters[0]
    assert letter.value == b""
    assert letter.headers["X-Original-Size"] == str(len(poison)).encode()
    assert letter.headers["X-Truncated"].startswith(b"MSG_SIZE_TOO_LARGE")
    assert letter.headers["X-Error"] == b"RuntimeError: poison"
