"""Rebalances meeting the rest of the lifecycle: a close while a revoke waits for handlers."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from confluent_kafka import TopicPartition

import keybus
from keybus.testing import LeakChecker
from keybus.transports.kafka import KafkaTransport, _GroupConsumer
from tests.conftest import Backend, unique
from tests.helpers import Collected, eventually


async def test_close_during_a_revoke_waiting_for_a_slow_handler_is_bounded(
    no_leaks: LeakChecker, backend: Backend
) -> None:
    topic = backend.topic("revoke-close")
    group = unique("revoke-close-g")
    async with keybus.connect(backend.url) as publisher:
        await publisher.ensure_topic(topic)
        first = await keybus.connect(backend.url, group=group)
        running: set[int] = set()

        async def slow(message: keybus.Message) -> None:
            running.add(message.partition)
            await asyncio.Event().wait()  # cancellable, never returns by itself

        sub = await first.subscribe(topic, slow)
        assert len(sub._assigned) == 3
        # A handler running on every partition, whichever the rebalance moves.
        await asyncio.gather(*(publisher.publish(topic, b"x", key=f"k{i}") for i in range(60)))
        await eventually(lambda: running == {0, 1, 2}, what="a handler on every partition")
        # A second member joins: the first one's revoke waits (revoke_timeout, 10 s) for
        # the handler of the partition that moves.
        second = await keybus.connect(backend.url, group=group)
        joining = asyncio.create_task(second.subscribe(topic, Collected()))
        await eventually(lambda: len(sub._assigned) < 3, what="the revoke began")
        started = time.monotonic()
        await first.close(timeout=0.5)
        took = time.monotonic() - started
        await joining
        await second.close(timeout=0.5)
    # close() cancelled the handlers; the revoke must not keep waiting for them.
    assert took < 0.5 + 3.0, f"close took {took:.1f} s"


class _FakeRd:
    """Stands in for the librdkafka consumer inside a rebalance callback."""

    def __init__(self) -> None:
        self.metadata_requests = 0
        self.commits: list[Any] = []
        self.unassigned: list[Any] = []

    def list_topics(self, *args: Any, **kwargs: Any) -> None:
        self.metadata_requests += 1

    def commit(self, *args: Any, **kwargs: Any) -> None:
        self.commits.append(kwargs.get("offsets"))

    def incremental_unassign(self, partitions: list[Any]) -> None:
        self.unassigned.extend(partitions)


async def test_a_revoke_after_the_stop_never_probes_the_broker_inside_the_callback(
    no_leaks: LeakChecker, backend: Backend
) -> None:
    # confluent-kafka's list_topics() ends the CallState of the consume()/close() whose
    # rebalance callback calls it; that call's next callback then aborts the process
    # ("CallState_get: Assertion `cs != NULL' failed"). The close test above hit it:
    # close() set the stop while the revoke waited, and the revoke then probed.
    shared = _GroupConsumer(KafkaTransport(backend.url), "g")
    shared._wanted[("t", 0)] = 7
    shared._stop.set()  # close() began while the revoke was running
    rd = _FakeRd()
    thread = threading.Thread(target=shared._on_revoke, args=(rd, [TopicPartition("t", 0)]))
    thread.start()
    await eventually(lambda: not thread.is_alive(), what="on_revoke returned")
    thread.join()
    assert rd.metadata_requests == 0
    assert [[(tp.topic, tp.partition, tp.offset) for tp in c] for c in rd.commits] == [
        [("t", 0, 7)]
    ]
    assert [tp.partition for tp in rd.unassigned] == [0]
