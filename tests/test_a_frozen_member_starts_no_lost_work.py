"""Kafka and NATS: a member whose process stalls longer than its ownership lasts
(SIGSTOP, a long GC or VM pause: past the NATS lease, past the Kafka session) starts none
of its queued work when it resumes once another member took its partitions over — its
ownership deadline, on its own monotonic clock, passed while it was frozen — and every
delivery's fence shows who owned the partition when."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

import keybus
from keybus.partitioning import key_partition
from tests.conftest import Backend, BusFactory, backend_fixture, enabled_backends
from tests.helpers import envelope, eventually
from tests.members import Recorder, Span, handled, member_process

DELAY = 0.02  # each handler's time: every key has a long queue when the member freezes
# Per broker: the bus options of both members, and how long ownership outlives a freeze
# with them (NATS: the lease; Kafka: the consumer's session timeout, 6 s by default).
OWNERSHIP: dict[str, tuple[dict[str, Any], float]] = {
    "nats": ({"lease_ttl": 2.0, "heartbeat": 0.4}, 2.0),
    "kafka": ({}, 6.0),
}


@pytest_asyncio.fixture(params=[b for b in OWNERSHIP if b in enabled_backends()])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """The brokers only: members in other processes share nothing in memory://."""
    async for value in backend_fixture(request.param):
        yield value


@pytest.mark.slow
async def test_a_member_frozen_past_its_lease_starts_no_queued_message_after_it_resumes(
    open_bus: BusFactory, backend: Backend
) -> None:
    """Member A (a process) owns both partitions with a deep queue on every key and is
    SIGSTOPped; member B (here) takes both over once A's ownership is out and handles their
    messages with a higher fence. A is SIGCONTed: whatever it starts from then on must be
    work it owns again — never a message it had queued before it froze (with the old
    fence, at an offset B already handled: "v21 after v25"). Fails on a member that
    passes no ownership deadline to the core (it runs its queue on resume, before its
    coordinator notices the lapsed lease or session)."""
    options, lasts = OWNERSHIP[backend.name]
    topic = backend.topic("stall")
    group = f"stall-{topic[-6:]}"
    publisher = await open_bus()
    await publisher.ensure_topic(topic, keybus.TopicConfig(partitions=2))
    keys = [k for k in (f"agg-{i}" for i in range(40)) if key_partition(k, 2) == 0][:2]
    keys += [k for k in (f"agg-{i}" for i in range(40)) if key_partition(k, 2) == 1][:2]
    versions = 150
    async with member_process(backend, topic, group, "A", delay=DELAY, **options) as a:

        async def produce(key: str) -> None:
            for version in range(1, versions + 1):
                await publisher.publish_envelope(topic, envelope(key, version))

        await asyncio.gather(*(produce(key) for key in keys))
        await eventually(
            lambda: {s.key for s in a.spans if s.version >= 5} == set(keys),
            what="A handling every key",
        )
        stopped = a.stop()
        assert len(handled(a.spans)) < len(keys) * versions // 2, "A has a queue left"
        b = Recorder("B", DELAY)
        gate = asyncio.Event()  # B pauses after 40 messages of a partition until A resumed

        async def b_handler(envelope: keybus.Envelope) -> None:
            partition = keybus.current_delivery().partition
            if sum(s.partition == partition for s in b.spans) >= 40:
                await gate.wait()
            await b(envelope)

        bus_b = await open_bus(group=group, **options)
        await bus_b.subscribe_envelope(topic, b_handler, max_concurrency=64)
        # A stays frozen well past its ownership, while B handles a part of its queue.
        await eventually(
            lambda: (
                all(sum(s.partition == p for s in b.spans) >= 40 for p in (0, 1))
                and time.monotonic() - stopped > 2 * lasts
            ),
            what="B taking both partitions over from the frozen A",
            timeout=20 + 2 * lasts,
        )
        assert any(s.end is None for s in a.spans), "A froze with handlers running"
        resumed = a.cont()
        frozen_for = resumed - stopped
        assert frozen_for > lasts, f"frozen only {frozen_for:.2f} s"
        # Once A's loop ran again for a while, its lanes would have started their next
        # queued messages: the handlers it froze in ended (or were cancelled) by then.
        await eventually(lambda: a.ticked > resumed + 0.5, what="A running again")
        gate.set()
        everything = {(key, v) for key in keys for v in range(1, versions + 1)}
        await eventually(
            lambda: handled(a.spans) | handled(b.spans) >= everything,
            what="every envelope handled",
            timeout=60,
        )
        after = [s for s in a.spans if s.start > stopped]

    def b_before(span: Span) -> list[Span]:
        return [s for s in b.spans if s.partition == span.partition and s.start < span.start]

    stale = [s for s in after if any(s.offset <= o.offset for o in b_before(s))]
    assert stale == [], (
        f"A started {len(stale)} message(s) B had already started, the first "
        f"{stale[0].start - resumed:.3f} s after resuming: {stale[:3]}"
        if stale
        else ""
    )
    before = {s.partition: s.fence for s in a.spans if s.start < stopped}
    for span in after:
        earlier = b_before(span)
        assert not earlier or span.fence > max(o.fence for o in earlier), (
            f"A started {span} without a newer fence than B's"
        )
        assert span.fence > before.get(span.partition, 0), f"{span} under A's old fence"
    taken_over = {p: min(s.fence for s in b.spans if s.partition == p) for p in (0, 1)}
    for partition, fence in before.items():
        assert taken_over[partition] > fence, "B's ownership has a higher fence than A's"
    print(
        f"frozen {frozen_for:.1f} s; after resuming A started {len(after)} message(s), "
        f"all of partitions it took back; fences A {before} -> B {taken_over}"
    )
