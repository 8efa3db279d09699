"""Kafka: a member whose consumer thread stalls longer than its ownership window while
librdkafka keeps its session (heartbeats run on librdkafka's own thread) has its
partitions' ownership lapse in the core — their queued work dropped — and then re-takes
them after the coordinator accepted a commit, resuming at their done prefix: every
message handled, each key in order, under the same fence (the member never left the
group). The fence itself is the group generation of the partition's assignment."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import types
from typing import Any

import pytest
from confluent_kafka import Consumer

import keybus
from keybus.partitioning import key_partition
from keybus.transports.kafka.config import KafkaSettings
from keybus.transports.kafka.group_consumer import _ConsumerThread, generation_of
from tests.conftest import Backend, BusFactory
from tests.helpers import envelope, eventually, key_on, reordered_after_redelivery

STALL = 5.5  # > the ownership window with the default 6 s session (6 - 0.25 - 1.0 s)


def test_the_fence_is_read_from_librdkafkas_group_metadata() -> None:
    assert generation_of(b"CGMDv2:" + (7).to_bytes(4, "little") + b"g\x00m\x00\x01") == 7
    assert generation_of(b"CGMDv2:\xff\xff\xff\xffg\x00\x00\x01") == 0  # no generation yet
    assert generation_of(b"CGMDv9:junk") == 0
    assert generation_of(None) == 0


@pytest.mark.slow
async def test_a_stalled_consumer_thread_lapses_its_partitions_then_retakes_them_in_order(
    open_bus: BusFactory, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    stall = threading.Event()
    stalled = threading.Event()

    def stats(_: Any) -> None:
        # Runs on the consumer thread, inside consume(): while it sleeps the thread turns
        # no more (as in a process frozen between two heartbeats), but librdkafka's own
        # threads go on heartbeating, so the member stays in the group.
        if stall.is_set():
            stall.clear()
            time.sleep(STALL)
            stalled.set()

    topic = backend.topic("lapse")
    bus = await open_bus(
        group=topic,
        consumer_config={"statistics.interval.ms": 200, "stats_cb": stats},
    )
    await bus.ensure_topic(topic, keybus.TopicConfig(partitions=2))
    keys = [k for k in (f"agg-{i}" for i in range(40)) if key_partition(k, 2) == 0][:2]
    keys += [k for k in (f"agg-{i}" for i in range(40)) if key_partition(k, 2) == 1][:2]
    seen: list[tuple[str, int, int]] = []  # (key, version, fence) in the order started

    async def handler(env: keybus.Envelope) -> None:
        seen.append((env.aggregate_id, env.event_version, keybus.current_delivery().fence))
        await asyncio.sleep(0.002)

    await bus.subscribe_envelope(topic, handler)

    async def produce(versions: range) -> None:
        for version in versions:
            await asyncio.gather(*(bus.publish_envelope(topic, envelope(k, version)) for k in keys))

    await produce(range(1, 51))
    await eventually(lambda: len({(k, v) for k, v, _ in seen}) == 4 * 50, what="first half")
    (fence,) = {f for _, _, f in seen}
    assert fence > 0, "the fence is the group generation"
    caplog.set_level(logging.INFO, logger="keybus")
    stall.set()
    await eventually(lambda: not stall.is_set(), what="the consumer thread stalling")
    # Published while the thread sleeps: fetched after it, past the ownership deadline.
    await produce(range(51, 101))
    await eventually(stalled.is_set, what="the stall ending", timeout=STALL + 10)
    everything = {(k, v) for k in keys for v in range(1, 101)}
    await eventually(
        lambda: {(k, v) for k, v, _ in seen} >= everything, what="every envelope", timeout=30
    )
    messages = [r.getMessage() for r in caplog.records]
    assert any("lapsed" in m for m in messages), "the ownership lapsed in the core"
    assert any("re-took" in m for m in messages), "the member re-took its partitions"
    versions = {key: [v for k, v, _ in seen if k == key] for key in keys}
    assert reordered_after_redelivery(versions) == {}, "first handled out of order"
    assert {f for _, _, f in seen} == {fence}, "the same member, the same fence"


@pytest.mark.slow
async def test_a_never_committed_partition_is_retaken_where_its_reset_policy_started_it(
    open_bus: BusFactory, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """With ``auto.offset.reset=latest`` a new group starts at the end: the records
    written before it joined are not its to handle. A partition that lapses before the
    group handled (so committed) anything in it resumes where it started — not at its
    earliest record — and none of what was fetched after that start is skipped."""
    stall = threading.Event()
    stalled = threading.Event()
    fetching: set[int] = set()  # partitions whose fetch position is resolved
    topic = backend.topic("lapse-latest")

    def stats(raw: str) -> None:
        partitions = json.loads(raw).get("topics", {}).get(topic, {}).get("partitions", {})
        fetching.update(int(p) for p, row in partitions.items() if row["fetch_state"] == "active")
        if stall.is_set():
            stall.clear()
            time.sleep(STALL)
            stalled.set()

    bus = await open_bus(
        group=topic,
        consumer_config={
            "statistics.interval.ms": 200,
            "stats_cb": stats,
            "auto.offset.reset": "latest",
        },
    )
    await bus.ensure_topic(topic, keybus.TopicConfig(partitions=2))
    keys = [key_on(0, 2), key_on(1, 2)]
    for key in keys:  # before the group joined: never to be handled
        await bus.publish_envelope(topic, envelope(key, 1000))
    seen: list[tuple[str, int]] = []

    async def handler(env: keybus.Envelope) -> None:
        seen.append((env.aggregate_id, env.event_version))

    await bus.subscribe_envelope(topic, handler)
    # (latest resolves to an offset once fetching starts: published earlier, a record
    # would be skipped by the policy itself, and nothing would lapse)
    await eventually(lambda: fetching == {0, 1}, what="both partitions fetching")
    caplog.set_level(logging.INFO, logger="keybus")
    stall.set()
    await eventually(lambda: not stall.is_set(), what="the consumer thread stalling")
    for version in range(1, 6):  # fetched after the stall, past the ownership deadline
        await asyncio.gather(*(bus.publish_envelope(topic, envelope(k, version)) for k in keys))
    await eventually(stalled.is_set, what="the stall ending", timeout=STALL + 10)
    wanted = {(k, v) for k in keys for v in range(1, 6)}
    await eventually(lambda: set(seen) >= wanted, what="every envelope", timeout=30)
    messages = [r.getMessage() for r in caplog.records]
    assert any("re-took" in m for m in messages), "the member re-took its partitions"
    assert not [s for s in seen if s[1] == 1000], "resumed at the earliest record"


@pytest.mark.parametrize("reset", ["earliest", "latest"])
async def test_where_a_lapsed_partition_resumes(
    open_bus: BusFactory, backend: Backend, reset: str
) -> None:
    """``_done_prefix``, step by step, against the broker: a done prefix or a committed
    offset, else where the assignment started fetching, else the reset policy's offset —
    each step one request for all its partitions."""
    topic = backend.topic("resume")
    bus = await open_bus()
    await bus.ensure_topic(topic, keybus.TopicConfig(partitions=3))
    for partition, count in enumerate((4, 3, 2)):
        for n in range(count):
            await bus.publish(topic, b"%d" % n, key=key_on(partition, 3))
    settings = KafkaSettings(url=backend.url, consumer_config={"auto.offset.reset": reset})
    group = types.SimpleNamespace(settings=settings, wanted={(topic, 0): 3})
    thread = _ConsumerThread(group)  # type: ignore[arg-type]
    thread._started[(topic, 1)] = 1
    consumer = Consumer({**settings.consumer, "group.id": topic})
    try:
        targets = await asyncio.to_thread(
            thread._done_prefix, consumer, [(topic, 0), (topic, 1), (topic, 2)]
        )
    finally:
        await asyncio.to_thread(consumer.close)
    end = 2 if reset == "latest" else 0
    assert targets == {(topic, 0): 3, (topic, 1): 1, (topic, 2): end}
