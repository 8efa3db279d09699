"""Conformance: handler middleware runs inside the key's lane around each attempt; what
it raises is the handler's failure, what it swallows is a success."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import defaultdict

import keybus
from keybus.testing.conformance.backend import Backend
from keybus.testing.conformance.fixtures import BackendFixtures, BusFactory
from keybus.testing.conformance.helpers import (
    Collected,
    envelope,
    eventually,
    order_violations,
    watch_dead_letters,
)

__all__ = ["MiddlewareSuite"]


def tag(name: str, trail: list[str]) -> keybus.Middleware:
    """A middleware that notes ``name`` in ``trail`` on the way in and on the way out."""

    async def middleware(call_next: keybus.CallNext, delivery: keybus.Delivery) -> None:
        trail.append(f"{name} in")
        try:
            await call_next(delivery)
        finally:
            trail.append(f"{name} out")

    return middleware


class MiddlewareSuite(BackendFixtures):
    async def test_a_middleware_that_awaits_runs_inside_the_lane_so_key_order_holds(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        bus = await open_bus()
        topic = backend.topic()
        keys, versions = 20, 10
        rng = random.Random(11)
        loop = asyncio.get_running_loop()
        seen: dict[str, list[int]] = defaultdict(list)
        spans: dict[str, list[tuple[float, float]]] = defaultdict(list)

        async def slow_around(call_next: keybus.CallNext, delivery: keybus.Delivery) -> None:
            started = loop.time()
            await asyncio.sleep(rng.random() * 0.003)  # before the handler...
            await call_next(delivery)
            await asyncio.sleep(rng.random() * 0.003)  # ...and after it
            spans[delivery.key or ""].append((started, loop.time()))

        async def handler(envelope: keybus.Envelope) -> None:
            seen[envelope.aggregate_id].append(envelope.event_version)

        sub = await bus.subscribe_envelope(
            topic, handler, max_concurrency=16, middleware=[slow_around]
        )
        for v in range(1, versions + 1):
            await asyncio.gather(
                *(bus.publish_envelope(topic, envelope(f"agg-{i}", v)) for i in range(keys))
            )
        total = keys * versions
        await eventually(lambda: sum(map(len, spans.values())) == total, what=f"{total} handled")
        assert order_violations(seen) == 0
        assert all(seen[f"agg-{i}"] == list(range(1, versions + 1)) for i in range(keys))
        for key, key_spans in spans.items():
            for (_, end), (start, _) in itertools.pairwise(sorted(key_spans)):
                assert start >= end, f"two attempts of {key} overlapped in the middleware"
        assert sub.peak_concurrency > 1, "different keys still run concurrently"

    async def test_a_middleware_sees_each_attempt_of_a_retried_message(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        bus = await open_bus()
        topic = backend.topic()
        letters = await watch_dead_letters(open_bus, topic)
        attempts: list[tuple[int, int]] = []  # (event version, attempt)

        async def note_attempt(call_next: keybus.CallNext, delivery: keybus.Delivery) -> None:
            assert delivery.topic == topic
            attempts.append((delivery.payload.event_version, delivery.attempt))
            await call_next(delivery)

        async def handler(envelope: keybus.Envelope) -> None:
            if envelope.event_version == 2:
                raise RuntimeError("version 2 fails")

        await bus.subscribe_envelope(
            topic, handler, max_attempts=3, retry_backoff=0.01, middleware=[note_attempt]
        )
        for v in (1, 2, 3):
            await bus.publish_envelope(topic, envelope("agg", v))
        await eventually(lambda: len(letters) == 1 and (3, 1) in attempts, what="v3 and a DLQ")
        assert attempts == [(1, 1), (2, 1), (2, 2), (2, 3), (3, 1)]
        assert letters[0].headers["X-Attempts"] == b"3"

    async def test_bus_middleware_wraps_the_subscriptions_own_first_outermost(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        trail: list[str] = []
        bus = await open_bus(middleware=[tag("bus-1", trail), tag("bus-2", trail)])
        topic = backend.topic()

        async def handler(message: keybus.Message) -> None:
            trail.append("handler")

        middleware = [tag("sub-1", trail), tag("sub-2", trail)]
        await bus.subscribe(topic, handler, middleware=middleware)
        await bus.publish(topic, b"x", key="k")
        await eventually(lambda: len(trail) == 9, what="one attempt through four middleware")
        assert trail == [
            "bus-1 in",
            "bus-2 in",
            "sub-1 in",
            "sub-2 in",
            "handler",
            "sub-2 out",
            "sub-1 out",
            "bus-2 out",
            "bus-1 out",
        ]

    async def test_a_middleware_that_raises_is_retried_then_dead_lettered(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        bus = await open_bus()
        topic = backend.topic()
        letters = await watch_dead_letters(open_bus, topic)
        handled = Collected()

        async def refuse(call_next: keybus.CallNext, delivery: keybus.Delivery) -> None:
            if delivery.message.value == b"refused":
                raise PermissionError("middleware refused it")
            await call_next(delivery)

        sub = await bus.subscribe(
            topic, handled, max_attempts=2, retry_backoff=0.01, middleware=[refuse]
        )
        await bus.publish(topic, b"refused", key="k")
        await bus.publish(topic, b"next", key="k")
        await eventually(lambda: len(letters) == 1 and len(handled) == 1, what="DLQ + next")
        assert handled.values() == [b"next"], "the handler never saw the refused message"
        letter = letters[0]
        assert letter.value == b"refused"
        assert letter.headers["X-Error"] == b"PermissionError: middleware refused it"
        assert letter.headers["X-Attempts"] == b"2"
        assert sub.stats().retries == 1
        assert sub.stats().dead_lettered == 1

    async def test_a_middleware_that_swallows_the_handlers_error_makes_it_a_success(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        bus = await open_bus(group="forgiving")
        topic = backend.topic()
        await bus.ensure_topic(topic, keybus.TopicConfig(partitions=1))
        swallowed: list[BaseException] = []

        async def forgive(call_next: keybus.CallNext, delivery: keybus.Delivery) -> None:
            try:
                await call_next(delivery)
            except Exception as exc:
                swallowed.append(exc)

        async def handler(message: keybus.Message) -> None:
            if message.value == b"bad":
                raise RuntimeError("the handler failed")

        sub = await bus.subscribe(topic, handler, middleware=[forgive])
        await bus.publish(topic, b"bad", key="k")
        await bus.publish(topic, b"good", key="k")
        await eventually(lambda: sub.stats().handled == 2, what="both counted as handled")
        assert [str(exc) for exc in swallowed] == ["the handler failed"]
        assert sub.stats().retries == 0
        assert sub.stats().dead_lettered == 0
        await eventually(lambda: sub.stats().committed >= 1, what="a commit past both")
        if not backend.features.restart_resumes:
            return
        # Committed: a successor in the group starts after both, at the next message.
        await bus.close()
        successor = await open_bus(group="forgiving")
        got = Collected()
        await successor.subscribe(topic, got)
        publisher = await open_bus()
        await publisher.publish(topic, b"marker", key="k")
        await eventually(
            lambda: b"marker" in got.values(),
            timeout=backend.features.handover_timeout,
            what="the successor to get the next message",
        )
        assert got.values() == [b"marker"]
