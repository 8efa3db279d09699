"""The parked-keys store on Kafka is a compacted topic (one record per key kept), while
the subscribed and dead-letter topics keep the bus's default clean-up."""

from __future__ import annotations

import asyncio

from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

import keybus
from keybus.testing import LeakChecker
from tests.conftest import Backend


def _configs(url: str, topics: list[str]) -> dict[str, dict[str, str]]:
    admin = AdminClient({"bootstrap.servers": url.split("://", 1)[1]})
    resources = [ConfigResource(ResourceType.TOPIC, topic) for topic in topics]
    found = admin.describe_configs(resources, request_timeout=10)
    return {
        resource.name: {name: entry.value for name, entry in future.result().items()}
        for resource, future in found.items()
    }


async def test_a_parking_subscription_creates_its_store_compacted(
    no_leaks: LeakChecker, backend: Backend
) -> None:
    topic = backend.topic("compacted")
    store, dead_letters = f"{topic}.dlq.parked", f"{topic}.dlq"
    backend.topics += [dead_letters, store]
    async with keybus.connect(backend.url, group=backend.topic("g")) as bus:

        async def handler(envelope: keybus.Envelope) -> None:
            pass

        await bus.subscribe_envelope(topic, handler, on_dead_letter="park")
        configs = await asyncio.to_thread(_configs, backend.url, [topic, dead_letters, store])
    assert configs[store]["cleanup.policy"] == "compact"
    assert configs[store]["segment.ms"] == str(60 * 60 * 1000)
    assert configs[topic]["cleanup.policy"] == "delete"
    assert configs[dead_letters]["cleanup.policy"] == "delete"


async def test_a_compacted_topic_with_a_retention_also_deletes(
    no_leaks: LeakChecker, backend: Backend
) -> None:
    topic = backend.topic("compacted")
    async with keybus.connect(backend.url) as bus:
        config = keybus.TopicConfig(partitions=1, compacted=True, retention_seconds=3600)
        await bus.ensure_topic(topic, config)
        configs = await asyncio.to_thread(_configs, backend.url, [topic])
    assert configs[topic]["cleanup.policy"] == "compact,delete"
    assert configs[topic]["retention.ms"] == "3600000"
