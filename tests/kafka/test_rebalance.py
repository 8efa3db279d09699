"""Rebalances meeting the rest of the lifecycle: a close while a revoke waits for handlers."""

from __future__ import annotations

import asyncio
import time

from confluent_kafka import TopicPartition

import keybus
from keybus.deadline import Deadline
from keybus.testing import LeakChecker
from keybus.transports.kafka.config import KafkaSettings
from keybus.transports.kafka.group_consumer import GroupConsumer, _ConsumerThread
from tests.conftest import Backend, BusFactory, unique
from tests.helpers import Collected, eventually
from tests.kafka.conftest import (
    FakeRd,
    core_partitions,
    feed_of,
    group_consumers,
    on_consumer_thread,
)


async def test_close_during_a_revoke_waiting_for_a_slow_handler_is_bounded(
    open_bus: BusFactory, backend: Backend
) -> None:
    topic = backend.topic("revoke-close")
    group = unique("revoke-close-g")
    publisher = await open_bus()
    await publisher.ensure_topic(topic)
    first = await open_bus(group=group)
    running: set[int] = set()

    async def slow(message: keybus.Message) -> None:
        running.add(message.partition)
        await asyncio.Event().wait()  # cancellable, never returns by itself

    sub = await first.subscribe(topic, slow)
    # A handler running on every partition, whichever the rebalance moves.
    await asyncio.gather(*(publisher.publish(topic, b"x", key=f"k{i}") for i in range(60)))
    await eventually(lambda: running == {0, 1, 2}, what="a handler on every partition")
    # A second member joins: the first one's revoke waits (revoke_timeout, 10 s) for the
    # handler of the partition that moves.
    second = await open_bus(group=group)
    joining = asyncio.create_task(second.subscribe(topic, Collected()))
    await eventually(lambda: len(core_partitions(sub)) < 3, what="the revoke began")
    started = time.monotonic()
    await first.close(timeout=0.5)
    took = time.monotonic() - started
    await joining
    # close() cancelled the handlers; the revoke must not keep waiting for them.
    assert took < 0.5 + 3.0, f"close took {took:.1f} s"


async def test_a_revoke_after_the_stop_never_probes_the_broker_inside_the_callback(
    no_leaks: LeakChecker, backend: Backend
) -> None:
    # confluent-kafka's list_topics() ends the CallState of the consume()/close() whose
    # rebalance callback calls it; that call's next callback then aborts the process
    # ("CallState_get: Assertion `cs != NULL' failed"). The close test above hit it:
    # close() set the stop while the revoke waited, and the revoke then probed.
    # White-box: the group consumer's thread side, driven by hand (no librdkafka).
    shared = GroupConsumer(KafkaSettings(url=backend.url), "g")
    shared.record_commit("t", 0, 7)
    await shared.shutdown(Deadline.after(2.0))  # close() began while the revoke was running
    rd = FakeRd()
    await on_consumer_thread(_ConsumerThread(shared)._on_revoke, rd, [TopicPartition("t", 0)])
    assert rd.metadata_requests == 0
    assert [[(tp.topic, tp.partition, tp.offset) for tp in c] for c in rd.commits] == [
        [("t", 0, 7)]
    ]
    assert [tp.partition for tp in rd.unassigned] == [0]


async def test_resubscribe_on_a_member_that_owned_none_of_the_topic(
    no_leaks: LeakChecker, backend: Backend
) -> None:
    # The bus's group consumer also serves another topic and got none of the topic's only
    # partition (another member has it), so unsubscribe() had nothing to wait for. The
    # subscribe right after met the same member before its thread applied the removal:
    # one unchanged subscribe() call, no rebalance, and it failed after assign_timeout.
    other = backend.topic("resub-none-other")
    topic = backend.topic("resub-none")
    group = unique("resub-none-g")
    async with (
        keybus.connect(backend.url) as publisher,
        keybus.connect(backend.url, group=group) as owner,
        keybus.connect(backend.url, group=group, assign_timeout=10.0) as bus,
    ):
        await publisher.ensure_topic(topic, keybus.TopicConfig(partitions=1))
        await publisher.ensure_topic(other)
        await owner.subscribe(topic, Collected())
        await bus.subscribe(other, Collected())
        old = await bus.subscribe(topic, Collected())
        assert not feed_of(old).assigned  # the owner keeps the partition (sticky)
        await old.unsubscribe()
        await bus.subscribe(topic, Collected())  # raised KeybusError after 10 s
        # The old subscription leaves nothing behind once its removal was applied.
        await eventually(
            lambda: not any(s.detaching(topic) for s in group_consumers(bus)),
            what="the old feed forgotten",
        )


async def test_resubscribe_while_another_topics_revoke_holds_the_consumer_thread(
    no_leaks: LeakChecker, backend: Backend
) -> None:
    # unsubscribe() waits ~2 s for its partitions' release; the group's consumer thread may
    # be held longer by another topic's revoke (up to revoke_timeout for a slow handler).
    # A subscribe to the same topic right after must still get the topic's records: reusing
    # that member turned the removal and re-add into one unchanged subscribe() call (no
    # revoke, no assignment), and the records went to a subscription that owned nothing.
    slow_topic = backend.topic("resub-slow")
    topic = backend.topic("resub")
    group = unique("resub-g")
    async with (
        keybus.connect(backend.url) as publisher,
        keybus.connect(backend.url, group=group, assign_timeout=20.0) as first,
        keybus.connect(backend.url, group=group) as second,
    ):
        await publisher.ensure_topic(slow_topic)
        await publisher.ensure_topic(topic)
        gate = asyncio.Event()
        running: set[int] = set()

        async def slow(message: keybus.Message) -> None:
            running.add(message.partition)
            await gate.wait()

        slow_sub = await first.subscribe(slow_topic, slow)
        old = await first.subscribe(topic, Collected())
        feed = feed_of(old)
        assert len(feed.assigned) == 3
        await asyncio.gather(*(publisher.publish(slow_topic, b"x", key=f"k{i}") for i in range(60)))
        await eventually(lambda: running == {0, 1, 2}, what="a handler on every partition")
        # A second member joins for slow_topic: first's consumer thread now waits in the
        # revoke callback for the handler of the partition that moves (revoke_timeout 10 s).
        joining = asyncio.create_task(second.subscribe(slow_topic, Collected()))
        await eventually(lambda: len(core_partitions(slow_sub)) < 3, what="the revoke began")
        await old.unsubscribe()  # gave up waiting for the release after ~2 s:
        assert len(feed.assigned) == 3  # the thread is still in that revoke
        got = Collected()
        resubscribing = asyncio.create_task(first.subscribe(topic, got))
        await eventually(
            lambda: any(topic in s.facades for s in group_consumers(first)),
            what="the topic subscribed again",
        )
        gate.set()  # the revoke finishes; the consumer thread applies both changes
        await joining
        await resubscribing
        await publisher.publish(topic, b"after", key="k")
        await eventually(
            lambda: b"after" in got.values(), what="a record published after subscribe returned"
        )
