"""librdkafka's failures raise the keybus error the other backends raise for the same
event, with librdkafka's error name and text in the reason and its exception chained."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaException

import keybus
from keybus.deadline import Deadline
from keybus.testing import LeakChecker
from keybus.transports.kafka import KafkaTransport
from tests.conftest import Backend, unique
from tests.helpers import Collected


async def test_a_topic_the_broker_refuses_to_create_is_a_topic_error(
    no_leaks: LeakChecker, backend: Backend
) -> None:
    topic = backend.topic("rf")
    async with keybus.connect(backend.url) as bus:
        # One broker: a replication factor of 3 cannot be met.
        with pytest.raises(keybus.TopicError, match="INVALID_REPLICATION_FACTOR") as info:
            await bus.ensure_topic(topic, keybus.TopicConfig(replication_factor=3))
    assert (info.value.topic, info.value.action) == (topic, "create")
    assert isinstance(info.value.__cause__, KafkaException)


async def test_every_call_on_a_closed_transport_is_bus_closed(
    no_leaks: LeakChecker, backend: Backend
) -> None:
    # The transport itself, not the bus: the bus refuses these before they reach it.
    transport = KafkaTransport(backend.url)
    await transport.connect(Deadline.after(10.0))
    topic = backend.topic("closed")
    await transport.publish(topic, b"x", None, {})  # the producer exists before the close
    await transport.close(Deadline.after(transport.close_budget))
    with pytest.raises(keybus.BusClosedError):
        await transport.publish(topic, b"late", None, {})
    with pytest.raises(keybus.BusClosedError):
        transport.consumer(topic, "g", Collected())  # type: ignore[arg-type]
    with pytest.raises(keybus.BusClosedError):
        await transport.ensure_topic(topic, keybus.TopicConfig())
    with pytest.raises(keybus.BusClosedError):
        await transport.describe_topic(topic)
    with pytest.raises(keybus.BusClosedError):
        await transport.delete_topic(topic)
    fresh = KafkaTransport(backend.url)  # closed before its first publish
    await fresh.close(Deadline.after(fresh.close_budget))
    with pytest.raises(keybus.BusClosedError):
        await fresh.publish(topic, b"late", None, {})


async def test_no_assignment_within_assign_timeout_is_a_subscribe_error(
    no_leaks: LeakChecker, backend: Backend
) -> None:
    topic, group = backend.topic("slow-join"), unique("slow-join-g")
    async with keybus.connect(backend.url, group=group, assign_timeout=0.01) as bus:
        await bus.ensure_topic(topic)
        # No group join completes within 10 ms.
        with pytest.raises(keybus.SubscribeError, match="no partition assignment") as info:
            await bus.subscribe(topic, Collected())
        assert (info.value.topic, info.value.group) == (topic, group)
        assert not bus.subscriptions


async def test_bad_librdkafka_settings_raise_the_error_of_the_call_that_needs_them(
    no_leaks: LeakChecker, backend: Backend
) -> None:
    topic = backend.topic("cfg")
    async with keybus.connect(backend.url, producer_config={"linger.ms": "soon"}) as bus:
        with pytest.raises(keybus.PublishError, match="cannot create the Kafka producer"):
            await bus.publish(topic, b"x")
    group = unique("cfg-g")
    async with keybus.connect(
        backend.url, group=group, consumer_config={"fetch.wait.max.ms": "soon"}
    ) as bus:
        with pytest.raises(keybus.SubscribeError, match="cannot create the Kafka consumer") as info:
            await bus.subscribe(topic, Collected())
        assert (info.value.topic, info.value.group) == (topic, group)
        assert isinstance(info.value.__cause__, KafkaException)
