"""NATS: group ownership never depends on the members' wall clocks agreeing. Each member
measures how long a peer has been silent on its own monotonic clock, so two members whose
``time.time()`` are a minute apart share the work, never handle one key at once, and take
a killed member's partitions over in bounded time."""

from __future__ import annotations

import asyncio
import time

import pytest

import keybus
from tests.conftest import Backend, BusFactory
from tests.helpers import envelope, eventually
from tests.members import handled, member_process, overlaps

LEASE = {"lease_ttl": 1.5, "heartbeat": 0.3}
DELAY = 0.003


@pytest.mark.slow
async def test_members_with_clocks_a_minute_apart_share_work_without_overlap_and_take_over(
    open_bus: BusFactory, backend: Backend
) -> None:
    """Two member processes, one with ``time.time`` 30 s behind and one 30 s ahead,
    consume one topic: no key is handled on both at once, both get work, and when the one
    ahead is SIGKILLed its partitions reach the other within the lease and a few
    heartbeats. With leases that compare wall-clock expiries across members, the member
    ahead takes every partition for good (the other's leases look long expired to it)
    and, once killed, its leases look valid to the other for a minute."""
    topic = backend.topic("skew")
    group = f"skew-{topic[-6:]}"
    publisher = await open_bus()
    await publisher.ensure_topic(topic, keybus.TopicConfig(partitions=4))
    keys = [f"agg-{i}" for i in range(40)]

    async def produce(versions: range) -> None:
        async def one(key: str) -> None:
            for version in versions:
                await publisher.publish_envelope(topic, envelope(key, version))

        await asyncio.gather(*(one(key) for key in keys))

    async with (
        member_process(backend, topic, group, "behind", shift=-30, delay=DELAY, **LEASE) as behind,
        member_process(backend, topic, group, "ahead", shift=30, delay=DELAY, **LEASE) as ahead,
    ):
        first = {(key, v) for key in keys for v in range(1, 26)}
        await produce(range(1, 26))
        await eventually(
            lambda: handled(behind.spans) | handled(ahead.spans) >= first,
            what="the first batch handled",
            timeout=30,
        )
        assert overlaps(behind.spans + ahead.spans, until=time.monotonic()) == []
        shares = {m.name: len(handled(m.spans) & first) for m in (behind, ahead)}
        assert all(share >= len(first) // 5 for share in shares.values()), (
            f"both members must get work: {shares}"
        )
        owned = {s.partition for s in ahead.spans}
        killed = await ahead.kill()
        second = {(key, v) for key in keys for v in range(26, 31)}
        await produce(range(26, 31))
        await eventually(
            lambda: handled(behind.spans) >= second,
            what="the killed member's partitions taken over",
            timeout=30,
        )
    taken = {
        p: min(s.start for s in behind.spans if s.partition == p and s.start > killed) - killed
        for p in owned
    }
    bound = LEASE["lease_ttl"] + 4 * LEASE["heartbeat"] + 1.0
    assert max(taken.values()) < bound, f"take-over took {taken} (bound {bound:.1f} s)"
    assert overlaps(behind.spans + ahead.spans, until=killed) == []
    print(f"shares of the first batch {shares}; take-over after the kill (s): {taken}")
