"""Consumer processes crash, join and leave mid-stream: nothing acknowledged is lost,
per-aggregate order holds from the resume point, no aggregate runs on two members at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

import keybus
from keybus.testing import LeakChecker
from keybus.transports.kafka import bootstrap_servers
from tests.conftest import Backend, unique
from tests.helpers import eventually, reordered_after_redelivery
from tests.kafka import logs
from tests.kafka.conftest import Spawn

pytestmark = pytest.mark.slow


def _envelope(aggregate: str, version: int) -> keybus.Envelope:
    return keybus.Envelope(
        aggregate_id=aggregate, event_type="E", event_version=version, payload={}
    )


class Stream:
    """Paced publishers, one per aggregate, until ``stop`` (at least ``minimum`` each)."""

    def __init__(self, bus: keybus.EventBus, topic: str, aggregates: int, minimum: int) -> None:
        self.bus = bus
        self.topic = topic
        self.minimum = minimum
        self.last: dict[str, int] = {}
        self.stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._produce(f"agg-{i}")) for i in range(aggregates)]

    async def _produce(self, aggregate: str) -> None:
        version = 0
        while version < self.minimum or not self.stop.is_set():
            version += 1
            await self.bus.publish_envelope(self.topic, _envelope(aggregate, version))
            self.last[aggregate] = version
            await asyncio.sleep(0.005)

    @property
    def sent(self) -> int:
        return sum(self.last.values())

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), 120)


def _committed(url: str, group: str, topic: str, partitions: int = 3) -> int:
    """Records the group has committed on ``topic``: offsets of a fresh, non-transactional
    topic are dense, so the committed offsets add up to a record count. (Reading them
    joins no group; the handle is closed, and its threads gone, before this returns.)"""
    reader = Consumer({"bootstrap.servers": bootstrap_servers(url), "group.id": group})
    try:
        wanted = [TopicPartition(topic, p) for p in range(partitions)]
        return sum(max(tp.offset, 0) for tp in reader.committed(wanted, timeout=10))
    finally:
        reader.close()


def _complete(entries: list[logs.Handled], last: dict[str, int]) -> bool:
    seen = logs.by_aggregate(entries)
    return all(
        {h.version for h in seen.get(a, [])} >= set(range(1, v + 1)) for a, v in last.items()
    )


async def test_consumer_process_killed_mid_stream_successor_resumes_without_loss(
    no_leaks: LeakChecker, backend: Backend, spawn: Spawn, tmp_path: Path
) -> None:
    topic, group, log = backend.topic("crash"), unique("crash-g"), tmp_path / "handled.log"
    async with keybus.connect(backend.url) as publisher:
        await publisher.ensure_topic(topic, keybus.TopicConfig(partitions=3))
        first = await spawn(backend.url, topic, group, "first", log, 0.003)
        await first.ready()
        stream = Stream(publisher, topic, aggregates=30, minimum=60)
        await eventually(lambda: len(logs.read(log)) >= 400, timeout=60, what="first busy")

        # A commit must be seen before the kill, or "nothing redone that was committed"
        # below would hold for a member that never commits at all.
        async def seen_committed() -> int:
            # A blocking librdkafka call: off the loop, which runs the publishers.
            return await asyncio.to_thread(_committed, backend.url, group, topic)

        async def a_commit() -> bool:
            return await seen_committed() >= 100

        await eventually(a_commit, timeout=30, what="a commit")
        committed = await seen_committed()
        await first.kill()  # SIGKILL: no close, no final commit
        before = logs.by_aggregate(logs.read(log))
        second = await spawn(backend.url, topic, group, "second", log, 0.001)
        await second.ready()
        await stream.finish()
        await eventually(
            lambda: _complete(logs.read(log), stream.last), timeout=90, what="everything handled"
        )
        await second.terminate()
        after = logs.by_aggregate([h for h in logs.read(log) if h.name == "second"])
        duplicates = 0
        for aggregate, last in stream.last.items():
            ran = [h.version for h in before.get(aggregate, [])]
            assert ran == list(range(1, len(ran) + 1)), f"{aggregate} out of order: {ran}"
            resumed = [h.version for h in after.get(aggregate, [])]
            if not resumed:
                assert len(ran) == last, f"{aggregate} lost {len(ran) + 1}..{last}"
                continue
            # The successor starts at or before the first envelope the crashed member had
            # not finished (never after: nothing lost) and keeps the order from there.
            assert resumed[0] <= len(ran) + 1, f"{aggregate} skipped to v{resumed[0]}"
            assert resumed == list(range(resumed[0], last + 1)), f"{aggregate}: {resumed}"
            duplicates += len(ran) - resumed[0] + 1
        handled_first = sum(map(len, before.values()))
        print(
            f"crash: {stream.sent} sent, {handled_first} handled by the first member, "
            f"{committed} seen committed, {duplicates} handled twice after the SIGKILL"
        )
        # The successor resumes at the committed offsets (at least what was seen): only
        # what the first member handled beyond them may run twice.
        assert duplicates <= handled_first - committed


async def test_member_process_joins_then_leaves_mid_stream_without_loss_or_overlap(
    no_leaks: LeakChecker, backend: Backend, spawn: Spawn, tmp_path: Path
) -> None:
    topic, group, log = backend.topic("rebal"), unique("rebal-g"), tmp_path / "handled.log"
    async with keybus.connect(backend.url) as publisher:
        await publisher.ensure_topic(topic, keybus.TopicConfig(partitions=4))
        first = await spawn(backend.url, topic, group, "first", log)
        await first.ready()
        stream = Stream(publisher, topic, aggregates=20, minimum=20)
        await eventually(lambda: len(logs.read(log)) >= 100, timeout=60, what="first busy")
        second = await spawn(backend.url, topic, group, "second", log)
        await second.ready()
        await eventually(
            lambda: any(h.name == "second" for h in logs.read(log)),
            timeout=60,
            what="the joining member to take over partitions",
        )
        await second.terminate()  # a graceful leave: revoke, commit, LeaveGroup
        left = len(logs.read(log))
        await eventually(
            lambda: sum(h.name == "first" for h in logs.read(log)[left:]) >= 50,
            timeout=60,
            what="the first member to take the partitions back",
        )
        await stream.finish()
        await eventually(
            lambda: _complete(logs.read(log), stream.last), timeout=60, what="everything handled"
        )
        await first.terminate()
        entries = logs.read(log)
        assert {h.name for h in entries} == {"first", "second"}
        assert not logs.overlaps(entries), logs.overlaps(entries)[:5]
        versions = {a: [h.version for h in hs] for a, hs in logs.by_aggregate(entries).items()}
        assert reordered_after_redelivery(versions) == {}, "out of order"
        duplicates = len(entries) - len({(h.aggregate, h.version) for h in entries})
        print(f"rebalance: {stream.sent} sent, {duplicates} handled twice")
