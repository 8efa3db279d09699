"""NATS: nothing stalls silently. A crashed pull task re-takes its partition, a crashed
rebalance round or acker is restarted, a consumer deleted under a member is re-taken
(not polled in a tight loop), and a group-state entry someone else wrote is repaired."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

import keybus
from keybus.transports.nats.group import GroupMember
from keybus.transports.nats.names import GROUPS_BUCKET, group_key, stream_name
from keybus.transports.nats.partition_feed import PartitionFeed
from tests.conftest import Backend, BusFactory
from tests.helpers import Collected, eventually
from tests.nats.server import ack_floor, jetstream, until_server

# These inject bugs: a crash can only be planted by patching the code that crashes.


async def test_a_crashing_pull_task_re_takes_its_partition_and_loses_nothing(
    open_bus: BusFactory, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    crashed: list[bytes] = []
    original = PartitionFeed.convert

    def convert(self: PartitionFeed, msg: Msg) -> keybus.Message | None:
        if msg.data == b"3" and not crashed:
            crashed.append(msg.data)
            raise RuntimeError("a bug in the pull loop")
        return original(self, msg)

    monkeypatch.setattr(PartitionFeed, "convert", convert)
    topic = backend.topic("pullcrash")
    bus = await open_bus(group="pullcrash")
    await bus.ensure_topic(topic, keybus.TopicConfig(partitions=1))
    seen: list[int] = []

    async def handler(message: keybus.Message) -> None:
        seen.append(int(message.value))

    await bus.subscribe(topic, handler)
    for version in range(1, 6):
        await bus.publish(topic, str(version).encode(), key="k")
    await eventually(lambda: 5 in seen, what="v5 after the crash", timeout=10)
    assert crashed == [b"3"]
    assert seen == [1, 2, 3, 4, 5]


async def test_crashing_coordinator_rounds_and_acker_are_survived(
    open_bus: BusFactory, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round that raises something unexpected, and an acker that crashes: the member
    keeps renewing, delivering and acknowledging."""
    rounds = 0
    keep_alive_crashes = 0
    original_round = GroupMember._round
    original_keep_alive = GroupMember._keep_alive

    async def flaky_round(self: GroupMember, *, leaving: bool) -> Any:
        nonlocal rounds
        rounds += 1
        if rounds in (3, 4):
            raise RuntimeError("a bug in a round")
        return await original_round(self, leaving=leaving)

    async def flaky_keep_alive(self: GroupMember, nc: NatsClient, interval: float) -> None:
        nonlocal keep_alive_crashes
        if keep_alive_crashes < 2:
            keep_alive_crashes += 1
            raise RuntimeError("a bug in the acker")
        await original_keep_alive(self, nc, interval)

    monkeypatch.setattr(GroupMember, "_round", flaky_round)
    monkeypatch.setattr(GroupMember, "_keep_alive", flaky_keep_alive)
    topic = backend.topic("flaky")
    bus = await open_bus(group="flaky", heartbeat=0.1, lease_ttl=1.0, ack_wait=0.6)
    await bus.ensure_topic(topic, keybus.TopicConfig(partitions=1))
    seen: list[int] = []

    async def handler(message: keybus.Message) -> None:
        seen.append(int(message.value))

    await bus.subscribe(topic, handler)
    await eventually(lambda: rounds > 8 and keep_alive_crashes == 2, what="crashes survived")
    for version in range(1, 4):
        await bus.publish(topic, str(version).encode(), key="k")
    await eventually(lambda: seen == [1, 2, 3], what="v1..v3")
    await until_server(backend.url, topic, lambda cs: ack_floor(cs[0]) == 3, "acks after crashes")


async def test_a_consumer_deleted_under_a_member_is_re_taken_not_polled_in_a_tight_loop(
    open_bus: BusFactory, backend: Backend
) -> None:
    """The topic is deleted (and with it every consumer) under a live subscription, then
    created again. The server answers the pending pull with 409 Consumer Deleted and
    every new one with 503 No Responders: the member must not re-request at once forever
    (thousands of requests a second, and the partition never flows again) but re-take
    the partition, so a message published to the new stream is handled."""
    topic = backend.topic("deleted")
    admin = await open_bus()
    await admin.ensure_topic(topic, keybus.TopicConfig(partitions=1))
    bus = await open_bus(group="deleted", heartbeat=0.3, lease_ttl=1.5)
    seen = Collected()
    await bus.subscribe(topic, seen)
    pulls = 0

    async def count_pull(msg: Msg) -> None:
        nonlocal pulls
        pulls += 1

    async with jetstream(backend.url) as (nc, _):
        # Pull requests are plain messages on the JetStream API subjects: anyone sees them.
        await nc.subscribe(f"$JS.API.CONSUMER.MSG.NEXT.{stream_name(topic)}.>", cb=count_pull)
        await nc.flush()
        started = time.monotonic()
        await admin.delete_topic(topic)
        await admin.ensure_topic(topic, keybus.TopicConfig(partitions=1))
        await admin.publish(topic, b"after", key="k")
        await eventually(lambda: seen.values() == [b"after"], what="the message on the new stream")
        took = time.monotonic() - started
    assert pulls < 50 + 20 * took, f"{pulls} pull requests in {took:.1f} s"


async def test_malformed_group_state_is_repaired_and_the_member_keeps_its_partitions(
    open_bus: BusFactory, backend: Backend
) -> None:
    topic = backend.topic("kvjunk")
    group = "kvjunk"
    bus = await open_bus(group=group, heartbeat=0.1, lease_ttl=1.0)
    await bus.ensure_topic(topic, keybus.TopicConfig(partitions=2))
    seen = Collected()
    await bus.subscribe(topic, seen)
    junk_entries = (
        b"[1, 2]",
        b"not json",
        b'{"m": {"x": "y"}, "o": {"zz": 1, "0": [1]}}',
        '{"o": {"\u00b2": ["x", 1e300]}}'.encode(),  # a digit int() cannot read
        b"[" * 100_000,  # too deep for the parser
    )
    async with jetstream(backend.url) as (_, js):
        kv = await js.key_value(GROUPS_BUCKET)
        key = group_key(topic, group)
        for junk in junk_entries:
            await kv.put(key, junk)

            async def repaired() -> bool:
                entry = await kv.get(key)
                try:
                    state = json.loads(entry.value or b"")
                except (ValueError, RecursionError):
                    return False
                return isinstance(state, dict) and len(state.get("o", {})) == 2

            await eventually(repaired, timeout=10, what=f"state {junk[:40]!r} repaired")
    await bus.publish(topic, b"a", key="a")
    await bus.publish(topic, b"b", key="b")
    await eventually(lambda: sorted(seen.values()) == [b"a", b"b"], what="both keys")
