"""Conformance: ``publish_many`` — a batch acknowledged item by item, each key's order
kept, a refused item reported where it stands, an invalid item sending nothing."""

from __future__ import annotations

import pytest

import keybus
from keybus.testing.conformance.backend import Backend
from keybus.testing.conformance.fixtures import BackendFixtures, BusFactory
from keybus.testing.conformance.helpers import Collected, eventually, order_violations

__all__ = ["BatchSuite"]


async def _collecting(
    open_bus: BusFactory, backend: Backend
) -> tuple[keybus.EventBus, str, Collected]:
    """A bus subscribed to a fresh topic, collecting its raw messages."""
    bus = await open_bus()
    topic = backend.topic()
    got = Collected()
    await bus.subscribe(topic, got)
    return bus, topic, got


class BatchSuite(BackendFixtures):
    async def test_publish_many_acknowledges_every_item_and_keeps_each_keys_order(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        bus = await open_bus()
        topic = backend.topic()
        seen: dict[str, list[int]] = {}

        async def handler(env: keybus.Envelope) -> None:
            seen.setdefault(env.aggregate_id, []).append(env.event_version)

        await bus.subscribe_envelope(topic, handler)
        items = [
            keybus.Envelope(aggregate_id=f"agg-{a}", event_type="E", event_version=v, payload={})
            for v in range(1, 41)
            for a in range(5)
        ]
        results = await bus.publish_many(topic, items)
        assert results == [None] * 200
        await eventually(lambda: sum(map(len, seen.values())) >= 200, what="all 200 handled")
        assert order_violations(seen) == 0
        assert all(versions == list(range(1, 41)) for versions in seen.values())

    async def test_publish_many_takes_records_in_every_shape(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        bus, topic, got = await _collecting(open_bus, backend)
        await bus.publish_many(topic, [b"bare", (b"keyed", "k"), (b"full", "k", {"h": "v"})])
        await eventually(lambda: len(got) == 3, what="three records")
        by_value = {m.value: m for m in got}
        assert by_value[b"bare"].key is None
        assert by_value[b"keyed"].key == "k"
        assert by_value[b"full"].headers["h"] == b"v"
        assert [m.value for m in got if m.key == "k"] == [b"keyed", b"full"]

    async def test_an_invalid_item_raises_before_anything_is_sent(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        bus, topic, got = await _collecting(open_bus, backend)
        with pytest.raises(TypeError):
            await bus.publish_many(topic, [(b"first", "k"), ("not bytes", "k")])
        await bus.publish(topic, b"sentinel", key="k")
        await eventually(lambda: len(got) >= 1, what="the sentinel")
        assert got.values() == [b"sentinel"], "the batch before it sent nothing"

    async def test_a_refused_item_is_reported_where_it_stands_and_the_rest_go(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        limit = backend.features.max_message_bytes
        if limit is None:
            pytest.skip("the backend declares no max_message_bytes")
        bus, topic, got = await _collecting(open_bus, backend)
        items = [(b"a", "k1"), (bytes(limit + 1), "k2"), (b"c", "k3")]
        with pytest.raises(keybus.PublishBatchError) as raised:
            await bus.publish_many(topic, items)
        error = raised.value
        assert error.failed == 1
        assert error.errors[0] is None
        assert error.errors[2] is None
        refused = error.errors[1]
        assert refused is not None
        assert refused.permanent
        results = await bus.publish_many(topic, items, raise_on_error=False)
        assert [r is None for r in results] == [True, False, True]
        await eventually(
            lambda: sorted(got.values()) == [b"a", b"a", b"c", b"c"], what="the others"
        )
