"""The broker stops and comes back (same data) while publishing and consuming: every
publish either succeeds or raises PublishError, nothing acknowledged is lost, the same
bus carries on, and its health reports the broker away (within its timeout) and back."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

import keybus
from keybus.testing import LeakChecker
from tests.conftest import Backend, unique
from tests.helpers import eventually, reordered_after_redelivery
from tests.kafka.conftest import kafka_sh

pytestmark = pytest.mark.slow


async def test_broker_restart_loses_nothing_acknowledged_and_bus_recovers(
    no_leaks: LeakChecker, backend: Backend
) -> None:
    topic = backend.topic("restart")
    handled: dict[str, list[int]] = defaultdict(list)
    acknowledged: dict[str, set[int]] = defaultdict(set)
    failures: list[keybus.PublishError] = []
    stop = asyncio.Event()

    async def handler(envelope: keybus.Envelope) -> None:
        handled[envelope.aggregate_id].append(envelope.event_version)

    async def produce(bus: keybus.EventBus, aggregate: str) -> None:
        version = 0
        while not stop.is_set():
            version += 1
            envelope = keybus.Envelope(
                aggregate_id=aggregate, event_type="E", event_version=version, payload={}
            )
            try:
                await bus.publish_envelope(topic, envelope)
            except keybus.PublishError as exc:  # anything else fails the test
                failures.append(exc)
            else:
                acknowledged[aggregate].add(version)
            await asyncio.sleep(0.01)

    def acked() -> int:
        return sum(map(len, acknowledged.values()))

    def all_acked_handled() -> bool:
        return all(versions <= set(handled[a]) for a, versions in acknowledged.items())

    async with (
        keybus.connect(backend.url) as publisher,
        keybus.connect(backend.url, group=unique("restart-g")) as consumer,
    ):
        await publisher.ensure_topic(topic, keybus.TopicConfig(partitions=3))
        await consumer.subscribe_envelope(topic, handler)
        producers = [asyncio.create_task(produce(publisher, f"agg-{i}")) for i in range(10)]
        try:
            await eventually(lambda: sum(map(len, handled.values())) >= 200, what="traffic")
            assert (await consumer.health(timeout=5.0)).ok
            await kafka_sh("stop")
            at_stop = acked()
            # The broker away: health says so within its timeout, and raises nothing.
            began = asyncio.get_running_loop().time()
            health = await consumer.health(timeout=1.0)
            assert asyncio.get_running_loop().time() - began < 1.0 + 0.5
            assert not health.ok
            assert not health.checks["broker"].ok, health.checks["broker"]
            await kafka_sh("start")

            async def healthy() -> bool:
                return (await consumer.health(timeout=1.0)).ok

            await eventually(healthy, timeout=60, what="health ok again after the restart")
            # Publishing and consuming resume on the same buses.
            await eventually(lambda: acked() >= at_stop + 200, timeout=90, what="publishes")
            stop.set()
            await asyncio.wait_for(asyncio.gather(*producers), 60)
            await eventually(all_acked_handled, timeout=90, what="every acknowledged envelope")
        finally:
            stop.set()
            for task in producers:
                task.cancel()
            await asyncio.gather(*producers, return_exceptions=True)
            await kafka_sh("start")  # idempotent: a failure above must not leave it down
        assert reordered_after_redelivery(handled) == {}, "out of order"
        print(f"restart: {acked()} acknowledged, {len(failures)} PublishError")
