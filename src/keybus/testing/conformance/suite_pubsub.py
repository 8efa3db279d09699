"""Conformance: publish/subscribe, ordering and concurrency, consumer groups."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import defaultdict
from collections.abc import Awaitable, Callable

import pytest

import keybus
from keybus.testing.conformance.backend import Backend
from keybus.testing.conformance.fixtures import BackendFixtures, BusFactory
from keybus.testing.conformance.helpers import (
    Collected,
    eventually,
    order_violations,
    reordered_after_redelivery,
)

__all__ = ["PubSubSuite"]


class PubSubSuite(BackendFixtures):
    async def test_raw_message_arrives_with_key_and_headers(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        bus = await open_bus()
        topic = backend.topic()
        got = Collected()
        await bus.subscribe(topic, got)
        await bus.publish(topic, b"hello", key="k-1", headers={"a": "1", "b": b"\x00\xff"})
        await eventually(lambda: len(got) == 1, what="one message")
        message = got[0]
        assert message.topic == topic
        assert message.value == b"hello"
        assert message.key == "k-1"
        assert message.headers["a"] == b"1"
        assert message.headers["b"] == b"\x00\xff"

    async def test_envelope_round_trips_and_carries_headers(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        bus = await open_bus()
        topic = backend.topic()
        envelopes, raw = Collected(), Collected()
        await bus.subscribe_envelope(topic, envelopes)
        other = await open_bus()  # a second group sees the same record raw
        await other.subscribe(topic, raw)
        sent = keybus.Envelope(
            aggregate_id="order-42",
            event_type="OrderCreated",
            event_version=3,
            payload={"amount": 12.5, "items": [1, 2]},
            trace_id="trace-1",
            correlation_id="corr-1",
            tenant_id=7,
        )
        await bus.publish_envelope(topic, sent)
        await eventually(lambda: len(envelopes) == 1 and len(raw) == 1, what="envelope twice")
        assert envelopes[0] == sent
        message = raw[0]
        assert message.key == "order-42"
        assert message.headers["X-Event-ID"] == sent.event_id.encode()
        assert message.headers["X-Aggregate-ID"] == b"order-42"
        assert message.headers["X-Event-Type"] == b"OrderCreated"
        assert message.headers["X-Event-Version"] == b"3"
        assert message.headers["X-Trace-ID"] == b"trace-1"
        assert message.headers["X-Correlation-ID"] == b"corr-1"

    async def test_a_key_lands_on_the_partition_the_features_declare(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        """Placement is part of the contract (services in other languages publish to
        the same topics): every key on the partition ``Features.partition_for`` says."""
        bus = await open_bus()
        topic = backend.topic()
        await bus.ensure_topic(topic, keybus.TopicConfig(partitions=4))
        partitions = backend.features.topic_partitions(4)
        got = Collected()
        await bus.subscribe(topic, got)
        chosen = [backend.key_on(partition, partitions) for partition in range(partitions)]
        keys = [*chosen, *(f"order-{i}" for i in range(40))]
        for key in keys:
            await bus.publish(topic, b"x", key=key)
        await eventually(lambda: len(got) == len(keys), what=f"{len(keys)} messages")
        placed = {message.key: message.partition for message in got}
        assert placed == {key: backend.features.partition_for(key, partitions) for key in keys}
        assert [placed[key] for key in chosen] == list(range(partitions))

    async def test_per_key_order_holds_under_random_handler_delays(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        bus = await open_bus()
        topic = backend.topic()
        keys, versions = 60, 15
        seen: dict[str, list[int]] = defaultdict(list)
        rng = random.Random(7)

        async def handler(envelope: keybus.Envelope) -> None:
            await asyncio.sleep(rng.random() * 0.003)
            seen[envelope.aggregate_id].append(envelope.event_version)

        sub = await bus.subscribe_envelope(topic, handler, max_concurrency=32)

        async def publish_aggregate(i: int) -> None:
            for v in range(1, versions + 1):
                await bus.publish_envelope(
                    topic,
                    keybus.Envelope(
                        aggregate_id=f"agg-{i}", event_type="E", event_version=v, payload={"v": v}
                    ),
                )

        await asyncio.gather(*(publish_aggregate(i) for i in range(keys)))
        total = keys * versions
        await eventually(lambda: sum(map(len, seen.values())) >= total, what=f"{total} envelopes")
        assert order_violations(seen) == 0
        assert all(seen[f"agg-{i}"] == list(range(1, versions + 1)) for i in range(keys))
        assert sub.peak_concurrency > 1, "different aggregates must run concurrently"

    async def test_an_envelope_without_a_key_is_ordered_by_its_aggregate_id(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        """What a Go service's NATS publish (and its raw Kafka ``Publish``) looks like: the
        envelope JSON with no record key. An envelope subscription orders it by the
        aggregate id, and ``Delivery.key`` says so; one partition keeps the broker order."""
        bus = await open_bus()
        topic = backend.topic()
        await bus.ensure_topic(topic, keybus.TopicConfig(partitions=1))
        aggregates, versions = 8, 10
        for v in range(1, versions + 1):  # all stored before anyone reads: one burst
            for i in range(aggregates):
                event = keybus.Envelope(
                    aggregate_id=f"agg-{i}", event_type="E", event_version=v, payload={}
                )
                await bus.publish(topic, event.to_bytes())
        seen: dict[str, list[int]] = defaultdict(list)
        keys: set[tuple[str | None, str]] = set()
        rng = random.Random(11)

        async def handler(envelope: keybus.Envelope) -> None:
            keys.add((keybus.current_delivery().key, envelope.aggregate_id))
            await asyncio.sleep(rng.random() * 0.003)  # unordered handling would show
            seen[envelope.aggregate_id].append(envelope.event_version)

        sub = await bus.subscribe_envelope(topic, handler, max_concurrency=16)
        total = aggregates * versions
        await eventually(lambda: sum(map(len, seen.values())) >= total, what=f"{total} envelopes")
        assert all(seen[f"agg-{i}"] == list(range(1, versions + 1)) for i in range(aggregates))
        assert keys == {(f"agg-{i}", f"agg-{i}") for i in range(aggregates)}
        assert sub.peak_concurrency > 1, "different aggregates must run concurrently"

    async def test_max_concurrency_bounds_parallel_handlers(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        bus = await open_bus()
        topic = backend.topic()
        running = peak = done = 0
        # Handlers leave one at a time, when the test says so: the bound is reached and
        # held by construction, not by hoping that timed handlers overlap.
        release = asyncio.Semaphore(0)

        async def handler(message: keybus.Message) -> None:
            nonlocal running, peak, done
            running += 1
            peak = max(peak, running)
            await release.acquire()
            running -= 1
            done += 1

        await bus.subscribe(topic, handler, max_concurrency=4)
        await asyncio.gather(*(bus.publish(topic, b"x", key=f"k{i}") for i in range(40)))
        for finished in range(40):

            def settled(n: int = finished) -> bool:
                return done == n and running == min(4, 40 - n)

            await eventually(
                settled, what=f"{min(4, 40 - finished)} handlers running after {finished} handled"
            )
            release.release()
        await eventually(lambda: done == 40, what="40 handled")
        assert peak == 4

    async def test_slow_aggregate_does_not_stall_others(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        bus = await open_bus()
        topic = backend.topic()
        release = asyncio.Event()
        handled: list[str] = []

        async def handler(message: keybus.Message) -> None:
            if message.key == "stuck":
                await release.wait()
            handled.append(message.key or "")

        await bus.subscribe(topic, handler, max_concurrency=8)
        await bus.publish(topic, b"first", key="stuck")
        await bus.publish(topic, b"second", key="stuck")
        for i in range(100):
            await bus.publish(topic, b"x", key=f"other-{i}")
        # Every other aggregate completes while "stuck" is still blocked.
        await eventually(lambda: len(handled) == 100, what="the 100 other aggregates")
        assert "stuck" not in handled
        release.set()
        await eventually(lambda: handled.count("stuck") == 2, what="the stuck aggregate")

    async def test_a_stuck_handler_bounds_what_waits_uncommitted_behind_it(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        """Messages handled behind a stuck one of their partition cannot be committed;
        the subscription holds at most ``max_uncommitted`` of them, then stops taking
        more."""
        bus = await open_bus()
        topic = backend.topic()
        await bus.ensure_topic(topic, keybus.TopicConfig(partitions=1))
        release = asyncio.Event()

        async def handler(message: keybus.Message) -> None:
            if message.key == "stuck":
                await release.wait()

        sub = await bus.subscribe(topic, handler, max_in_flight=10, max_uncommitted=50)
        await bus.publish(topic, b"first", key="stuck")
        await asyncio.gather(*(bus.publish(topic, b"x", key=f"k{i}") for i in range(200)))
        await eventually(lambda: sub.stats().handled == 49, what="49 handled behind the stuck one")
        assert sub.stats().delivered == 50, "taken in beyond max_uncommitted"
        assert sub.stats().committed == 0
        release.set()
        await eventually(lambda: sub.stats().handled == 201, what="everything once released")

    async def test_unkeyed_messages_are_handled_concurrently(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        bus = await open_bus()
        topic = backend.topic()
        gate = asyncio.Event()
        entered = 0

        async def handler(message: keybus.Message) -> None:
            nonlocal entered
            entered += 1
            await gate.wait()

        sub = await bus.subscribe(topic, handler, max_concurrency=16)
        for _ in range(10):
            await bus.publish(topic, b"no-key")
        # All ten are inside the handler at once: none waits for another.
        await eventually(lambda: entered == 10, what="10 concurrent handlers")
        gate.set()
        await eventually(lambda: sub.stats().handled == 10, what="10 handled")

    async def test_message_published_after_subscribe_returns_is_delivered(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        publisher = await open_bus()
        topic = backend.topic()
        await publisher.ensure_topic(topic)
        for round_ in range(3):
            consumer = await open_bus(group=f"fresh-{round_}")
            got = Collected()
            await consumer.subscribe(topic, got)
            marker = f"after-{round_}".encode()
            await publisher.publish(topic, marker)

            def arrived(got: Collected = got, marker: bytes = marker) -> bool:
                return marker in got.values()

            await eventually(arrived, what=f"{marker!r}")

    async def test_unsubscribe_stops_delivery(self, open_bus: BusFactory, backend: Backend) -> None:
        bus = await open_bus()
        topic = backend.topic()
        got = Collected()
        sub = await bus.subscribe(topic, got)
        await bus.publish(topic, b"one")
        await eventually(lambda: got.values() == [b"one"], what="first message")
        await sub.unsubscribe()
        await sub.unsubscribe()  # idempotent
        assert sub not in bus.subscriptions
        # A witness subscription in another group proves the later message really went out.
        witness = Collected()
        observer = await open_bus()
        await observer.subscribe(topic, witness)
        await bus.publish(topic, b"two")
        await eventually(lambda: b"two" in witness.values(), what="the witness to see 'two'")
        assert got.values() == [b"one"]

    async def test_consumer_groups_share_work_and_separate_groups_each_get_all(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        backend.require("consumer_groups")
        publisher = await open_bus()
        topic = backend.topic()
        await publisher.ensure_topic(topic, keybus.TopicConfig(partitions=4))
        counts: dict[str, list[str]] = defaultdict(list)

        def recorder(name: str) -> Callable[[keybus.Message], Awaitable[None]]:
            async def handler(message: keybus.Message) -> None:
                counts[name].append(message.key or "")

            return handler

        a1 = await open_bus(group="shared")
        a2 = await open_bus(group="shared")
        solo = await open_bus(group="solo")
        await a1.subscribe(topic, recorder("a1"))
        await a2.subscribe(topic, recorder("a2"))
        await solo.subscribe(topic, recorder("solo"))
        n = 200
        await asyncio.gather(*(publisher.publish(topic, b"m", key=f"key-{i}") for i in range(n)))
        await eventually(
            lambda: len(counts["a1"]) + len(counts["a2"]) >= n and len(counts["solo"]) >= n,
            what="both groups to receive everything",
        )
        shared = counts["a1"] + counts["a2"]
        assert sorted(shared) == sorted(f"key-{i}" for i in range(n)), "each message once"
        if backend.features.single_active_member:
            assert not (counts["a1"] and counts["a2"]), "one active member at a time"
        else:
            assert counts["a1"], "both members of the group took a share"
            assert counts["a2"], "both members of the group took a share"
        assert sorted(counts["solo"]) == sorted(f"key-{i}" for i in range(n))
        assert not set(counts["a1"]) & set(counts["a2"]), "a key belongs to one member"

    @pytest.mark.parametrize("count", [1, 50])
    async def test_publish_after_close_raises_bus_closed(
        self, open_bus: BusFactory, backend: Backend, count: int
    ) -> None:
        bus = await open_bus()
        topic = backend.topic()
        for _ in range(count):
            await bus.publish(topic, b"x")
        await bus.close()
        await bus.close()  # idempotent
        with pytest.raises(keybus.BusClosedError):
            await bus.publish(topic, b"late")
        with pytest.raises(keybus.BusClosedError):
            await bus.publish_envelope(
                topic,
                keybus.Envelope(aggregate_id="a", event_type="E", event_version=1, payload=1),
            )

        async def handler(message: keybus.Message) -> None:
            return None

        with pytest.raises(keybus.BusClosedError):
            await bus.subscribe(topic, handler)

    @pytest.mark.parametrize("max_in_flight", [None, 8], ids=["default-window", "tiny-window"])
    async def test_member_joining_mid_stream_loses_nothing_and_never_overlaps_a_key(
        self, open_bus: BusFactory, backend: Backend, max_in_flight: int | None
    ) -> None:
        backend.require("consumer_groups", "rebalance")
        publisher = await open_bus()
        topic = backend.topic()
        await publisher.ensure_topic(topic, keybus.TopicConfig(partitions=4))
        spans: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
        handled: dict[str, set[int]] = defaultdict(set)
        order: dict[str, list[int]] = defaultdict(list)
        loop = asyncio.get_running_loop()

        def member(name: str) -> Callable[[keybus.Envelope], Awaitable[None]]:
            async def handler(envelope: keybus.Envelope) -> None:
                started = loop.time()
                await asyncio.sleep(0.002)
                handled[envelope.aggregate_id].add(envelope.event_version)
                order[envelope.aggregate_id].append(envelope.event_version)
                spans[envelope.aggregate_id].append((started, loop.time(), name))

            return handler

        first = await open_bus(group="rebalance")
        await first.subscribe_envelope(topic, member("first"), max_in_flight=max_in_flight)
        versions = 40
        last: dict[int, int] = {}
        stream_deadline = loop.time() + backend.features.handover_timeout

        def second_took_over() -> bool:
            return any(name == "second" for s in spans.values() for _, _, name in s)

        async def produce(i: int) -> None:
            # At least `versions` envelopes, and on until the joining member has taken
            # over (a broker's group rebalance can outlast a short stream).
            v = 0
            while v < versions or (not second_took_over() and loop.time() < stream_deadline):
                v += 1
                await publisher.publish_envelope(
                    topic,
                    keybus.Envelope(
                        aggregate_id=f"agg-{i}", event_type="E", event_version=v, payload={}
                    ),
                )
                last[i] = v
                await asyncio.sleep(0.001)

        producers = asyncio.gather(*(produce(i) for i in range(16)))
        await eventually(lambda: sum(map(len, handled.values())) > 100, what="first member busy")
        second = await open_bus(group="rebalance")
        # rebalance mid-stream
        await second.subscribe_envelope(topic, member("second"), max_in_flight=max_in_flight)
        if backend.features.single_active_member:
            await first.close()  # hand over mid-stream (the second member is a standby)
        await producers
        await eventually(
            lambda: all(handled[f"agg-{i}"] == set(range(1, last[i] + 1)) for i in range(16)),
            timeout=backend.features.handover_timeout,
            what="every envelope handled",
        )
        names = {name for key_spans in spans.values() for _, _, name in key_spans}
        assert names == {"first", "second"}, "the joining member took over some partitions"
        assert reordered_after_redelivery(order) == {}, "redelivery may repeat, not reorder"
        for key, key_spans in spans.items():
            key_spans.sort()
            for (_, end, a), (start, _, b) in itertools.pairwise(key_spans):
                assert start >= end, f"{key} handled by {a} and {b} at once"
