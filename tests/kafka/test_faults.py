"""Faults the Kafka transport survives: lost partitions, callbacks that raise, unreadable
headers, and a close with the broker away."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from inspect import CORO_SUSPENDED, getcoroutinestate
from typing import Any

import pytest
from confluent_kafka import TopicPartition

import keybus
from keybus.engine import SubscriptionEngine
from keybus.message import Message
from keybus.options import SubscribeOptions
from keybus.testing import LeakChecker
from keybus.transports.kafka.config import KafkaSettings
from keybus.transports.kafka.group_consumer import _PROBE_TIMEOUT, GroupConsumer, _ConsumerThread
from keybus.transports.kafka.headers import RecordHeaders
from keybus.transports.kafka.topic_feed import KafkaConsumer
from tests.conftest import Backend, unique
from tests.helpers import Collected, eventually
from tests.kafka.conftest import FakeRd, kafka_sh, on_consumer_thread

LIBRDKAFKA_SCAN = 1.0  # librdkafka looks for timed-out requests and commits once a second
LOADED_MACHINE = 1.0  # scheduling of the loop and the threads on a busy machine


async def test_on_lost_cancels_running_handlers_at_once(
    no_leaks: LeakChecker, backend: Backend
) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def stuck(message: Message) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def publish(*args: Any) -> None:
        pass

    engine = SubscriptionEngine(
        "t",
        "g",
        stuck,
        SubscribeOptions(revoke_timeout=10.0),
        envelopes=False,
        publish=publish,
        on_closed=lambda s: None,
    )
    # White-box: the group consumer's thread side, driven by hand (no librdkafka).
    shared = GroupConsumer(KafkaSettings(url=backend.url), "g")
    feed = KafkaConsumer(shared, "t", engine)
    shared.facades["t"] = feed
    feed.assign([0], math.inf)
    await engine.deliver([Message("t", b"x", "k", {}, 0, 5)])
    await eventually(started.is_set, what="handler running")
    rd = FakeRd()
    began = time.monotonic()
    await on_consumer_thread(_ConsumerThread(shared)._on_lost, rd, [TopicPartition("t", 0)])
    # Before the fix the core was asked to wait revoke_timeout (10 s) for the handler.
    assert time.monotonic() - began < 3.0
    assert cancelled.is_set()
    assert [tp.partition for tp in rd.unassigned] == [0]
    assert rd.commits == [], "nothing may be committed for lost partitions"
    assert not feed.owned
    assert not shared.wanted
    await engine.shutdown(time.monotonic())


class _BadHeadersRecord:
    def headers(self) -> Any:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")


def test_unreadable_headers_of_a_foreign_record_do_not_raise() -> None:
    headers = RecordHeaders(_BadHeadersRecord())
    # The core's dead-lettering copies the headers; an exception there left the record
    # undone forever, so the partition's commits stopped advancing.
    copied = dict(headers)
    assert copied["X-Keybus-Header-Error"].startswith(b"UnicodeDecodeError")


_stats_calls = 0


def _raising_callback(stats: str) -> None:
    global _stats_calls
    _stats_calls += 1
    raise RuntimeError("a user callback failed")


async def test_raising_librdkafka_callbacks_kill_neither_pump_nor_consumer_thread(
    no_leaks: LeakChecker, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL, logger="keybus")
    topic = backend.topic("cb")
    stats = {"statistics.interval.ms": 100, "stats_cb": _raising_callback}
    async with keybus.connect(
        backend.url, group=unique("cb-g"), producer_config=stats, consumer_config=stats
    ) as bus:
        got = Collected()
        await bus.subscribe(topic, got)
        for round_ in range(3):  # spans several stats intervals: each one raised
            values = [f"{round_}-{i}".encode() for i in range(20)]
            await asyncio.wait_for(
                asyncio.gather(*(bus.publish(topic, v, key="k") for v in values)), 15.0
            )
            await eventually(
                lambda values=values: set(values) <= set(got.values()),  # type: ignore[misc]
                timeout=15.0,
            )
            seen = _stats_calls
            await eventually(
                lambda seen=seen: _stats_calls >= seen + 2,  # type: ignore[misc]
                what="two more raising stats callbacks",
            )
        consumers = [t for t in threading.enumerate() if t.name.startswith("keybus-kafka-cons")]
        assert consumers
        assert all(t.is_alive() for t in consumers)


@pytest.mark.slow
async def test_close_with_the_broker_stopped_is_bounded_and_leaves_nothing(
    no_leaks: LeakChecker, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL, logger="keybus.kafka.librdkafka")
    topic = backend.topic("down")
    bus = await keybus.connect(backend.url, group=unique("down-g"))
    try:
        got = Collected()
        await bus.subscribe(topic, got)
        await bus.publish(topic, b"x", key="k")
        await eventually(lambda: len(got) == 1)
        await kafka_sh("stop")
        pending = [asyncio.ensure_future(bus.publish(topic, b"y", key="k")) for _ in range(5)]
        # Each publish runs up to its ack wait: handed to librdkafka, unacknowledged. (Not
        # librdkafka's queue length: with the broker gone it also counts error events.)
        await eventually(
            lambda: all(getcoroutinestate(t.get_coro()) == CORO_SUSPENDED for t in pending),
            what="5 publishes waiting for their ack",
        )
        began = time.monotonic()
        await bus.close(timeout=0.5)
        took = time.monotonic() - began
        # Where the time goes (docs/kafka.md, on close): the flush's probe of the gone
        # broker, then librdkafka holds the consumer's close while the commit of "x"'s
        # offset is outstanding — made before this close began, around the broker's exit.
        # Made with no coordinator, it fails a session timeout after it was made; sent to
        # the coordinator as it went away, a request timeout (socket.timeout.ms) after it
        # was sent; either is noticed by a scan librdkafka runs once a second. close()
        # waits for it (no thread may outlive close), and not much longer.
        settings = KafkaSettings(url=backend.url)
        held = max(settings.session_timeout, settings.request_timeout) + LIBRDKAFKA_SCAN
        bound = 0.5 + _PROBE_TIMEOUT + held + LOADED_MACHINE
        assert took < bound, f"the close took {took:.1f} s (bound {bound:.1f} s)"
        print(f"close with the broker stopped: {took:.2f} s (bound {bound:.1f} s)")
        results = await asyncio.gather(*pending, return_exceptions=True)
        assert all(isinstance(r, keybus.PublishError) for r in results), results
        assert not [t for t in threading.enumerate() if t.name.startswith("keybus-kafka")]
    finally:
        await bus.close(timeout=0.5)
        await kafka_sh("start")
