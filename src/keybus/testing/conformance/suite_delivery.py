"""Conformance: a handler can see the delivery it is handling (``current_delivery()``),
and every delivery carries its partition's ownership fence, which grows when the
partition changes owner."""

from __future__ import annotations

from collections import defaultdict

import pytest

import keybus
from keybus.testing.conformance.backend import Backend
from keybus.testing.conformance.fixtures import BackendFixtures, BusFactory
from keybus.testing.conformance.helpers import Collected, eventually

__all__ = ["DeliverySuite"]


class DeliverySuite(BackendFixtures):
    async def test_current_delivery_names_the_message_and_its_attempt(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        bus = await open_bus()
        topic = backend.topic()
        seen: list[tuple[str, int, int, str | None, int, int, bytes]] = []

        async def handler(message: keybus.Message) -> None:
            delivery = keybus.current_delivery()
            seen.append(
                (
                    delivery.topic,
                    delivery.partition,
                    delivery.offset,
                    delivery.key,
                    delivery.attempt,
                    delivery.fence,
                    delivery.message.value,
                )
            )
            assert delivery.message is message
            if message.value == b"flaky" and delivery.attempt < 3:
                raise RuntimeError("not yet")

        await bus.subscribe(topic, handler, retry_backoff=0.0)
        await bus.publish(topic, b"plain", key="k1")
        await bus.publish(topic, b"flaky", key="k2")
        await eventually(lambda: len(seen) == 4, what="four attempts")
        plain = [s for s in seen if s[6] == b"plain"]
        flaky = [s for s in seen if s[6] == b"flaky"]
        assert [s[4] for s in plain] == [1]
        assert [s[4] for s in flaky] == [1, 2, 3], "attempt counts up over retries"
        assert {s[0] for s in seen} == {topic}
        assert plain[0][3] == "k1"
        assert flaky[0][3] == "k2"
        assert len({s[1:3] for s in flaky}) == 1, "one message, one position"
        with pytest.raises(LookupError):
            keybus.current_delivery()  # not inside a handler

    async def test_the_fence_grows_when_a_partition_changes_owner(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        backend.require("consumer_groups", "rebalance", "fences")
        topic = backend.topic()
        group = f"g-{topic}"
        publisher = await open_bus()
        await publisher.ensure_topic(topic, keybus.TopicConfig(partitions=2))
        fences: dict[str, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))

        def note(member: str) -> Collected:
            class Noting(Collected):
                async def __call__(self, item: keybus.Message) -> None:
                    fences[member][item.partition].add(item.fence)
                    self.append(item)

            return Noting()

        first, second = note("first"), note("second")
        a = await open_bus(group=group)
        await a.subscribe(topic, first)
        partitions = backend.features.topic_partitions(2)
        keys = [backend.key_on(p, partitions) for p in range(partitions)]
        for key in keys:
            await publisher.publish(topic, b"before", key=key)
        await eventually(lambda: len(first) == len(keys), what="the first member's messages")
        b = await open_bus(group=group)
        await b.subscribe(topic, second)  # one partition moves to the second member
        if backend.features.single_active_member:
            await a.close()  # (the second member is a standby until the first leaves)
        for i in range(20):
            for key in keys:
                await publisher.publish(topic, f"after {i}".encode(), key=key)
        await eventually(
            lambda: len(first) + len(second) >= 21 * len(keys),
            timeout=backend.features.handover_timeout,
        )
        moved = set(fences["second"])
        assert moved, "a partition moved to the second member"
        for partition in moved:
            before = max(fences["first"][partition], default=0)
            assert min(fences["second"][partition]) > before, (partition, fences)
