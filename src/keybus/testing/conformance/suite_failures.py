"""Conformance: retries in place, dead letters, poison messages. Nothing is dropped."""

from __future__ import annotations

from collections import defaultdict

import keybus
from keybus.testing.conformance.backend import Backend
from keybus.testing.conformance.fixtures import BackendFixtures, BusFactory
from keybus.testing.conformance.helpers import (
    Collected,
    envelope,
    eventually,
    watch_dead_letters,
)

__all__ = ["FailuresSuite"]


class FailuresSuite(BackendFixtures):
    async def test_failing_handler_is_retried_in_place_then_dead_lettered_in_order(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        bus = await open_bus()
        topic = backend.topic()
        letters = await watch_dead_letters(open_bus, topic)
        calls: list[int] = []

        async def handler(envelope: keybus.Envelope) -> None:
            calls.append(envelope.event_version)
            if envelope.event_version == 2:
                raise RuntimeError("version 2 is cursed")

        sub = await bus.subscribe_envelope(topic, handler, max_attempts=3, retry_backoff=0.01)
        for v in (1, 2, 3):
            await bus.publish_envelope(topic, envelope("agg-1", v))
        await eventually(lambda: 3 in calls and len(letters) == 1, what="v3 and one dead letter")
        # v2 is tried three times before v3 runs: the aggregate waited for its retries.
        assert calls == [1, 2, 2, 2, 3]
        letter = letters[0]
        assert keybus.Envelope.from_bytes(letter.value).event_version == 2
        assert letter.key == "agg-1"
        assert letter.headers["X-Error"] == b"RuntimeError: version 2 is cursed"
        assert letter.headers["X-Original-Topic"] == topic.encode()
        assert letter.headers["X-Attempts"] == b"3"
        assert letter.headers["X-Event-Version"] == b"2", "original headers are kept"
        assert sub.stats().dead_lettered == 1
        assert sub.stats().retries == 2

    async def test_transient_failure_succeeds_on_retry_without_dead_letter(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        bus = await open_bus()
        topic = backend.topic()
        failures_left: defaultdict[str, int] = defaultdict(lambda: 2)
        handled: list[tuple[str, int]] = []

        async def handler(envelope: keybus.Envelope) -> None:
            key = f"{envelope.aggregate_id}/{envelope.event_version}"
            if failures_left[key] > 0:
                failures_left[key] -= 1
                raise ConnectionError("flaky downstream")
            handled.append((envelope.aggregate_id, envelope.event_version))

        sub = await bus.subscribe_envelope(topic, handler, max_attempts=3, retry_backoff=0.001)
        for aggregate in ("a", "b", "c"):
            for v in (1, 2, 3, 4):
                await bus.publish_envelope(topic, envelope(aggregate, v))
        await eventually(lambda: len(handled) == 12, what="12 handled after retries")
        for aggregate in ("a", "b", "c"):
            assert [v for a, v in handled if a == aggregate] == [1, 2, 3, 4]
        assert sub.stats().dead_lettered == 0
        assert sub.stats().retries == 24

    async def test_poison_message_is_dead_lettered_with_reason_and_stream_continues(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        bus = await open_bus()
        topic = backend.topic()
        letters = await watch_dead_letters(open_bus, topic)
        handled: list[int] = []

        async def handler(envelope: keybus.Envelope) -> None:
            handled.append(envelope.event_version)

        await bus.subscribe_envelope(topic, handler)
        await bus.publish_envelope(topic, envelope("agg", 1))
        await bus.publish(topic, b"{not json", key="agg")
        await bus.publish(topic, b'{"aggregate_id": "agg"}', key="agg")
        await bus.publish_envelope(topic, envelope("agg", 2))
        await eventually(lambda: handled == [1, 2] and len(letters) == 2, what="2 handled, 2 DLQ")
        reasons = sorted(letter.headers["X-Error"].decode() for letter in letters)
        assert reasons[0].startswith("EnvelopeError: envelope: not valid JSON")
        assert reasons[1].startswith("EnvelopeError: ")
        assert "is required" in reasons[1]
        assert {letter.value for letter in letters} == {b"{not json", b'{"aggregate_id": "agg"}'}
        assert all(letter.headers["X-Original-Topic"] == topic.encode() for letter in letters)

    async def test_sync_handler_and_custom_dead_letter_topic(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        bus = await open_bus()
        topic = backend.topic()
        dlq = backend.topic("custom-dlq")
        letters = Collected()
        watcher = await open_bus()
        await watcher.subscribe(dlq, letters)

        def handler(message: keybus.Message) -> None:  # plain functions are handlers too
            raise ValueError(f"bad {message.value!r}")

        await bus.subscribe(topic, handler, max_attempts=1, dead_letter_topic=dlq)
        await bus.publish(topic, b"payload", key="k")
        await eventually(lambda: len(letters) == 1, what="dead letter on the custom topic")
        assert letters[0].headers["X-Error"] == b"ValueError: bad b'payload'"
        assert letters[0].headers["X-Attempts"] == b"1"
