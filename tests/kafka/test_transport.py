"""Kafka transport specifics: connect errors, options, one consumer per group, bad input,
bounded close under backpressure."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

import keybus
from keybus.testing import LeakChecker
from tests.conftest import Backend, BusFactory, unique
from tests.helpers import Collected, eventually


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_unreachable_broker_raises_connect_error_naming_the_url_in_bounded_time(
    no_leaks: LeakChecker,
) -> None:
    url = f"kafka://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    with pytest.raises(keybus.ConnectError, match=url.replace(".", r"\.")):
        await keybus.connect(url, probe_timeout=2.0)
    assert time.monotonic() - started < 5.0


async def test_the_connect_probe_is_sized_from_the_connect_timeout(no_leaks: LeakChecker) -> None:
    url = f"kafka://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    # probe_timeout stays 5 s: the probe's own timeout, with librdkafka's cause, comes
    # within the 1 s the connect has (not the core's cut at 1 s, nor 5 s later).
    with pytest.raises(keybus.ConnectError, match=r"no Kafka broker answered.*refused"):
        await keybus.connect(url, connect_timeout=1.0)
    assert time.monotonic() - started < 2.0


async def test_unknown_option_is_a_type_error(no_leaks: LeakChecker, backend: Backend) -> None:
    with pytest.raises(TypeError, match="no_such_option"):
        await keybus.connect(backend.url, no_such_option=1)


async def test_one_consumer_thread_per_group_for_all_topics(
    no_leaks: LeakChecker, backend: Backend
) -> None:
    topics = [backend.topic("multi") for _ in range(4)]
    async with keybus.connect(backend.url, group=unique("multi-g")) as bus:
        got = Collected()
        for topic in topics:
            await bus.subscribe(topic, got)
        consumers = [t for t in threading.enumerate() if t.name.startswith("keybus-kafka-cons")]
        assert len(consumers) == 1, [t.name for t in consumers]
        for topic in topics:
            await bus.publish(topic, topic.encode(), key="k")
        await eventually(lambda: sorted(got.values()) == sorted(t.encode() for t in topics))


async def test_oversized_message_raises_a_clear_publish_error(
    no_leaks: LeakChecker, backend: Backend
) -> None:
    topic = backend.topic("big")
    async with keybus.connect(backend.url) as bus:
        await bus.ensure_topic(topic)
        with pytest.raises(keybus.PublishError, match="MSG_SIZE_TOO_LARGE"):
            await bus.publish(topic, b"x" * (2 * 1024 * 1024))
        await bus.publish(topic, b"small")  # the bus is fine afterwards


async def test_non_envelope_bytes_are_dead_lettered_and_unknown_headers_are_fine(
    no_leaks: LeakChecker, backend: Backend
) -> None:
    topic = backend.topic("bad")
    async with keybus.connect(backend.url, group=unique("bad-g")) as bus:
        envelopes, letters = Collected(), Collected()
        await bus.subscribe_envelope(topic, envelopes)
        await bus.subscribe(f"{topic}.dlq", letters)
        await bus.publish(topic, b"\x00\x01 not json at all", key="agg")
        good = keybus.Envelope(aggregate_id="agg", event_type="E", event_version=1, payload=1)
        await bus.publish(topic, good.to_bytes(), key="agg", headers={"X-Unknown": b"\xff"})
        await eventually(lambda: len(envelopes) == 1 and len(letters) == 1)
        assert envelopes[0] == good
        assert letters[0].value == b"\x00\x01 not json at all"
        assert letters[0].headers["X-Error"].startswith(b"EnvelopeError: ")
        assert letters[0].headers["X-Attempts"] == b"0"


async def test_close_with_stuck_handlers_and_paused_backlog_is_bounded(
    no_leaks: LeakChecker, backend: Backend
) -> None:
    topic = backend.topic("stuck")
    async with keybus.connect(backend.url) as publisher:
        await publisher.ensure_topic(topic)
        await asyncio.gather(*(publisher.publish(topic, b"x", key=f"k{i}") for i in range(6000)))
        bus = await keybus.connect(backend.url, group=unique("stuck-g"))
        entered = 0

        async def never_returns(message: keybus.Message) -> None:
            nonlocal entered
            entered += 1
            await asyncio.Event().wait()

        # Every worker blocks and the in-flight limit is small: the feeder waits, the
        # backlog grows past the pause threshold, and close() must still be bounded.
        await bus.subscribe(topic, never_returns, max_concurrency=8, max_in_flight=16)
        await eventually(lambda: entered == 8, what="8 stuck handlers")
        started = time.monotonic()
        await bus.close(timeout=0.5)
        assert time.monotonic() - started < 0.5 + 4.0


async def test_a_full_local_queue_is_flow_control_for_publish_and_publish_many(
    open_bus: BusFactory, backend: Backend
) -> None:
    """librdkafka's queue holds 4 records here: publishes beyond that wait for room (its
    delivery reports free it) instead of failing, one by one and in a batch, in order."""
    topic = backend.topic("queue-full")
    bus = await open_bus(producer_config={"queue.buffering.max.messages": 4})
    await bus.ensure_topic(topic, keybus.TopicConfig(partitions=1))
    await asyncio.gather(*(bus.publish(topic, b"one-%d" % n, key="k") for n in range(20)))
    errors = await bus.publish_many(topic, [(b"many-%d" % n, "k") for n in range(40)])
    assert errors == [None] * 40
    got = Collected()
    await bus.subscribe(topic, got)
    await eventually(lambda: len(got) >= 60, what="every record")
    values = got.values()
    assert len(values) == 60
    assert values[20:] == [b"many-%d" % n for n in range(40)], "the batch kept its order"
    assert sorted(values[:20]) == sorted(b"one-%d" % n for n in range(20))
