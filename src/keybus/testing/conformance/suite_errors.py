"""Conformance: the same event raises the same error type on every backend."""

from __future__ import annotations

import time

import pytest

import keybus
from keybus.testing.conformance.backend import Backend
from keybus.testing.conformance.fixtures import BackendFixtures, BusFactory
from keybus.testing.conformance.helpers import Collected, eventually
from keybus.testing.leaks import LeakChecker

__all__ = ["CONNECT_SLACK", "ErrorsSuite"]

CONNECT_SLACK = 3.0
"""Seconds a failed connect may take beyond ``connect_timeout`` (releasing what the
attempt started)."""


async def _ignore(message: object) -> None:
    return None


class ErrorsSuite(BackendFixtures):
    async def test_topic_calls_and_subscribing_on_a_closed_bus_raise_bus_closed(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        bus = await open_bus()
        topic = backend.topic()
        await bus.ensure_topic(topic)
        sub = await bus.subscribe(topic, _ignore)
        await bus.close()
        assert sub.closed
        await sub.unsubscribe()  # already stopped by the close: nothing to do, no error
        with pytest.raises(keybus.BusClosedError):
            await bus.subscribe_envelope(topic, _ignore)
        with pytest.raises(keybus.BusClosedError):
            await bus.ensure_topic(topic)
        with pytest.raises(keybus.BusClosedError):
            await bus.describe_topic(topic)
        with pytest.raises(keybus.BusClosedError):
            await bus.delete_topic(topic)

    async def test_describe_topic_gives_the_partitions_and_a_missing_topic_is_a_topic_error(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        bus = await open_bus()
        topic = backend.topic()
        await bus.ensure_topic(topic, keybus.TopicConfig(partitions=2))
        partitions = backend.features.topic_partitions(2)
        assert await bus.describe_topic(topic) == keybus.TopicInfo(topic, partitions)
        missing = backend.topic("missing")
        with pytest.raises(keybus.TopicError) as info:
            await bus.describe_topic(missing)
        assert (info.value.topic, info.value.action) == (missing, "describe")
        await bus.delete_topic(missing)  # idempotent: a missing topic is no error
        await bus.delete_topic(topic)

        async def gone() -> bool:
            try:
                await bus.describe_topic(topic)
            except keybus.TopicError:
                return True
            return False

        await eventually(gone, what="the deleted topic to be reported missing")

    async def test_an_unreachable_broker_is_a_connect_error_within_the_connect_timeout(
        self, no_leaks: LeakChecker, backend: Backend
    ) -> None:
        url = backend.unreachable_url
        if url is None:
            pytest.skip(f"{backend.name} has no unreachable URL")
        started = time.monotonic()
        with pytest.raises(keybus.ConnectError) as info:
            await keybus.connect(url, connect_timeout=2.0)
        elapsed = time.monotonic() - started
        assert elapsed < 2.0 + CONNECT_SLACK, f"connect failed after {elapsed:.2f} s"
        assert info.value.url == url
        assert url in str(info.value)
        # no_leaks: the failed attempt left nothing running.

    async def test_unknown_options_are_type_errors(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        with pytest.raises(TypeError):
            await keybus.connect(backend.url, no_such_option=1)
        bus = await open_bus()
        topic = backend.topic()
        with pytest.raises(TypeError, match="no_such_option"):
            await bus.subscribe(topic, _ignore, no_such_option=1)
        with pytest.raises(TypeError, match="no_such_option"):
            await bus.subscribe_envelope(topic, _ignore, no_such_option=1)
        assert not bus.subscriptions

    async def test_an_invalid_envelope_raises_envelope_error_and_nothing_is_sent(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        with pytest.raises(keybus.EnvelopeError) as info:
            keybus.Envelope(aggregate_id="not an id!", event_type="E", event_version=1, payload={})
        assert info.value.field == "aggregate_id"
        assert isinstance(info.value, ValueError)
        bus = await open_bus()
        topic = backend.topic()
        got = Collected()
        await bus.subscribe(topic, got)
        unsendable = keybus.Envelope(
            aggregate_id="agg", event_type="E", event_version=1, payload={"x": object()}
        )
        with pytest.raises(keybus.EnvelopeError) as info:
            await bus.publish_envelope(topic, unsendable)
        assert info.value.field == "payload"
        sent = keybus.Envelope(aggregate_id="agg", event_type="E", event_version=2, payload={})
        await bus.publish_envelope(topic, sent)
        # Same key, same partition, in order: had the invalid one gone out, it would
        # have arrived first.
        await eventually(lambda: len(got) >= 1, what="the valid envelope")
        assert [keybus.Envelope.from_bytes(m.value) for m in got] == [sent]
