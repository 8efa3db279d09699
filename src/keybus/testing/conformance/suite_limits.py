"""Conformance: records at the backend's size limit. A record over it is refused at once
(not after a delivery timeout) and for good (``PublishError.permanent``), and the bus
goes on working; a poison record a few bytes under it, whose dead letter is over it,
never wedges its key."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

import keybus
from keybus.testing.conformance.backend import Backend
from keybus.testing.conformance.fixtures import BackendFixtures, BusFactory
from keybus.testing.conformance.helpers import (
    Collected,
    envelope,
    eventually,
    watch_dead_letters,
)

__all__ = ["LimitsSuite"]

_KEY = "agg"
_PROBE_RANGE = 2048  # the largest value taken is this close to the declared limit
_AT_ONCE = 5.0  # s: a refusal comes before any delivery timeout (Kafka's is 30 s)


def _limit(backend: Backend) -> int:
    limit = backend.features.max_message_bytes
    if limit is None:
        pytest.skip("the backend declares no max_message_bytes")
    return limit


async def _refused(bus: keybus.EventBus, topic: str, size: int) -> keybus.PublishError:
    """Publish ``size`` bytes under :data:`_KEY`; it must be refused at once, for good."""
    started = time.monotonic()
    with pytest.raises(keybus.PublishError) as raised:
        await bus.publish(topic, bytes(size), key=_KEY)
    took = time.monotonic() - started
    assert raised.value.permanent, raised.value.reason
    assert took < _AT_ONCE, f"refused after {took:.1f} s"
    return raised.value


async def largest_value(bus: keybus.EventBus, topic: str, limit: int) -> int:
    """The largest value (key :data:`_KEY`, no headers) the backend takes, found by
    bisection between ``limit - _PROBE_RANGE`` (taken) and ``limit + 1`` (refused at
    once, for good); every refusal on the way must be permanent and immediate too."""
    low, high = limit - _PROBE_RANGE, limit + 1
    await bus.publish(topic, bytes(low), key=_KEY)
    await _refused(bus, topic, high)
    while high - low > 1:
        middle = (low + high) // 2
        try:
            await bus.publish(topic, bytes(middle), key=_KEY)
        except keybus.PublishError:
            await _refused(bus, topic, middle)  # the same size, checked like the rest
            high = middle
        else:
            low = middle
    return low


class LimitsSuite(BackendFixtures):
    async def test_a_record_over_the_size_limit_is_refused_at_once_and_for_good(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        """What the backend takes ends within a record's framing of the declared limit;
        one byte more is a permanent ``PublishError`` raised at once, and the bus still
        publishes and delivers afterwards (the connection was not dropped for it)."""
        limit = _limit(backend)
        bus = await open_bus()
        largest = await largest_value(bus, backend.topic("probe"), limit)
        assert limit - 256 <= largest <= limit, f"largest value taken: {largest}"
        refusal = await _refused(bus, backend.topic("over"), largest + 1)
        assert refusal.reason
        topic = backend.topic("after")
        got = Collected()
        await bus.subscribe(topic, got)
        await bus.publish(topic, b"after", key=_KEY)
        await eventually(lambda: got.values() == [b"after"], what="a publish after the refusals")

    async def test_a_poison_record_near_the_size_limit_does_not_wedge_its_key(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        """Its dead letter, with the headers that say why, is over the broker's limit:
        written reduced (no value; size, SHA-256 and origin in headers) instead of retried
        without end, and the key's later envelopes are handled."""
        limit = _limit(backend)
        bus = await open_bus()
        topic = backend.topic()
        letters = await watch_dead_letters(open_bus, topic)
        handled: list[int] = []

        async def handler(envelope: keybus.Envelope) -> None:
            handled.append(envelope.event_version)

        await bus.subscribe_envelope(topic, handler)
        # Not JSON, incompressible, a few bytes under the limit with its own headers; its
        # dead letter adds X-Error and the X-Original-* headers, which take it over.
        poison = os.urandom(limit - 160)
        await bus.publish(topic, poison, key=_KEY, headers={"X-Note": "x" * 32})
        for version in (1, 2, 3):
            await bus.publish_envelope(topic, envelope(_KEY, version))
        await eventually(
            lambda: handled == [1, 2, 3] and len(letters) == 1, what="the key moving on"
        )
        letter = letters[0]
        assert letter.value == b""
        assert letter.headers["X-Original-Size"] == str(len(poison)).encode()
        assert letter.headers["X-Original-SHA256"] == hashlib.sha256(poison).hexdigest().encode()
        assert letter.headers["X-Original-Topic"] == topic.encode()
        assert letter.headers["X-Error"].startswith(b"EnvelopeError")
        assert "X-Truncated" in letter.headers
        assert "X-Note" not in letter.headers

    async def test_a_record_a_few_bytes_under_the_limit_failing_with_a_long_error_moves_on(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        """The largest record the backend takes, less three bytes, whose handler fails
        with an error text of the full 2,000 characters a dead letter carries: written
        reduced, and the key's next records are handled in order."""
        limit = _limit(backend)
        bus = await open_bus()
        size = await largest_value(bus, backend.topic("probe"), limit) - 3
        topic = backend.topic()
        letters = await watch_dead_letters(open_bus, topic)
        handled: list[bytes] = []

        async def handler(message: keybus.Message) -> None:
            if len(message.value) == size:
                raise RuntimeError("why " * 1000)  # cut to 2,000 characters in X-Error
            handled.append(message.value)

        await bus.subscribe(topic, handler, max_attempts=2, retry_backoff=0.01)
        poison = os.urandom(size)
        await bus.publish(topic, poison, key=_KEY)
        for n in (1, 2, 3):
            await bus.publish(topic, b"%d" % n, key=_KEY)
        await eventually(
            lambda: handled == [b"1", b"2", b"3"] and len(letters) == 1, what="the key moving on"
        )
        letter = letters[0]
        assert (letter.key, letter.value) == (_KEY, b"")
        assert letter.headers["X-Original-Size"] == str(size).encode()
        assert letter.headers["X-Original-SHA256"] == hashlib.sha256(poison).hexdigest().encode()
        assert letter.headers["X-Error"].startswith(b"RuntimeError: why why")
        assert letter.headers["X-Attempts"] == b"2"
        assert letter.headers["X-Truncated"]
