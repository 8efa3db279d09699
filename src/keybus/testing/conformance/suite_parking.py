"""Conformance: event-sourcing safety. A key whose message was dead-lettered is parked
(``on_dead_letter="park"``): its later messages are dead-lettered behind it, other keys
go on; the parked state outlives the consumer; a replay hands the parked messages back
in order before live ones; the version guard skips duplicates and counts gaps."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import keybus
from keybus.envelope import Envelope
from keybus.testing.conformance.backend import Backend
from keybus.testing.conformance.fixtures import BackendFixtures, BusFactory
from keybus.testing.conformance.helpers import envelope, eventually, watch_dead_letters

__all__ = ["ParkingSuite"]

_PARK = {"on_dead_letter": "park", "max_attempts": 2, "retry_backoff": 0.01}


class _Aggregates:
    """An envelope handler that records each aggregate's handled versions and fails for
    good on the (aggregate, version) pairs in ``broken``."""

    def __init__(self, *broken: tuple[str, int]) -> None:
        self.broken = set(broken)
        self.seen: dict[str, list[int]] = defaultdict(list)
        # Awaited before handling the (aggregate, version) it is keyed by.
        self.before: dict[tuple[str, int], Callable[[], Awaitable[None]]] = {}

    async def __call__(self, event: Envelope) -> None:
        wait = self.before.get((event.aggregate_id, event.event_version))
        if wait is not None:
            await wait()
        if (event.aggregate_id, event.event_version) in self.broken:
            raise RuntimeError(f"cannot apply {event.aggregate_id} v{event.event_version}")
        self.seen[event.aggregate_id].append(event.event_version)


async def _counts(bus: keybus.EventBus, topic: str, expected: list[tuple[str, int]]) -> bool:
    """Whether ``bus.parked(topic)`` shows exactly these (key, count) pairs."""
    return [(p.key, p.count) for p in await bus.parked(topic)] == expected


def _store(backend: Backend, topic: str) -> None:
    # The stores, deleted with the test's topics.
    backend.topics += [f"{topic}.dlq.parked", f"{topic}.dlq.versions"]


async def _publish(bus: keybus.EventBus, topic: str, key: str, versions: range) -> list[Envelope]:
    sent = [envelope(key, v) for v in versions]
    for event in sent:
        await bus.publish_envelope(topic, event)
    return sent


def _version(letter: keybus.Message) -> int:
    version: int = Envelope.from_bytes(letter.value).event_version
    return version


async def _no_lag(bus: keybus.EventBus, topic: str) -> bool:
    lag = await bus.lag(topic)
    return all(row.lag == 0 for row in lag.partitions)


async def _parking(
    open_bus: BusFactory, backend: Backend, broken: int
) -> tuple[keybus.EventBus, _Aggregates, keybus.Subscription, str]:
    """A parking subscription on a fresh topic whose handler fails K's version ``broken``
    for good: ``(bus, handler, subscription, topic)``."""
    topic, group = backend.topic("park"), backend.topic("g")
    _store(backend, topic)
    bus = await open_bus(group=group)
    handler = _Aggregates(("K", broken))
    sub = await bus.subscribe_envelope(topic, handler, **_PARK)
    return bus, handler, sub, topic


async def _parked_from_v3(
    open_bus: BusFactory, backend: Backend, last: int
) -> tuple[keybus.EventBus, _Aggregates, keybus.Subscription, str]:
    """A parking subscription whose handler fails K's v3 for good, once K's v1..``last``
    were published and v3..``last`` parked: ``(bus, handler, subscription, topic)``."""
    bus, handler, sub, topic = await _parking(open_bus, backend, 3)
    await _publish(bus, topic, "K", range(1, last + 1))
    await eventually(lambda: sub.stats().parked == last - 2, what=f"v3..v{last} parked")
    return bus, handler, sub, topic


Member = tuple[keybus.EventBus, _Aggregates, keybus.Subscription]


async def _two_warm_members(
    open_bus: BusFactory, backend: Backend, topic: str, group: str, **options: Any
) -> list[Member]:
    """Two members of ``group`` on a two-partition ``topic`` (K's v3 fails for good in
    both handlers), each having handled a message: each has read the (empty) stores by
    then, so only a take-over's read can tell the survivor what the other one stored."""
    members = []
    for _ in range(2):  # both running before K is handled
        bus = await open_bus(group=group)
        await bus.ensure_topic(topic, keybus.TopicConfig(partitions=2))
        handler = _Aggregates(("K", 3))
        sub = await bus.subscribe_envelope(topic, handler, **options)
        members.append((bus, handler, sub))
    partitions = backend.features.topic_partitions(2)
    warm = [backend.key_on(p, partitions) for p in range(partitions)]
    for key in warm:
        await _publish(members[0][0], topic, key, range(1, 2))
    await eventually(
        lambda: sum(len(m[1].seen[k]) for m in members for k in warm) == partitions,
        what="warm-up",
    )
    return members


class ParkingSuite(BackendFixtures):
    async def test_a_dead_lettered_key_parks_its_later_messages_while_other_keys_go_on(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        bus, handler, sub, topic = await _parking(open_bus, backend, 3)
        letters = await watch_dead_letters(open_bus, topic)
        sent = await _publish(bus, topic, "K", range(1, 7))
        await _publish(bus, topic, "other", range(1, 7))
        await eventually(lambda: len(letters) == 4, what="v3..v6 of K dead-lettered")
        await eventually(lambda: handler.seen["other"] == [1, 2, 3, 4, 5, 6], what="other key")
        assert handler.seen["K"] == [1, 2]
        assert [_version(letter) for letter in letters] == [3, 4, 5, 6]
        first = letters[0]
        assert keybus.PARKED_BEHIND not in first.headers
        where = (
            f"{topic}/{first.headers['X-Original-Partition'].decode()}/"
            f"{first.headers['X-Original-Offset'].decode()}"
        )
        behind = f"{where} event={sent[2].event_id}".encode()
        assert [letter.headers[keybus.PARKED_BEHIND] for letter in letters[1:]] == [behind] * 3
        assert all(b"parked" in letter.headers["X-Error"] for letter in letters[1:])
        # Nothing blocks the partition: every message, parked ones too, is committed.
        await eventually(lambda: sub.stats().uncommitted == 0, what="all done")
        await eventually(lambda: _no_lag(bus, topic), what="all committed")
        [parked] = await bus.parked(topic)
        assert (parked.key, parked.count, parked.first_failure) == ("K", 4, where)
        assert parked.event_id == sent[2].event_id
        assert "cannot apply K v3" in parked.reason
        assert sub.stats().parked == 4

    async def test_a_restarted_consumer_keeps_the_key_parked(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        backend.require("parked_persistence")
        topic, group = backend.topic("park"), backend.topic("g")
        _store(backend, topic)
        letters = await watch_dead_letters(open_bus, topic)
        first = await open_bus(group=group)
        sub = await first.subscribe_envelope(topic, _Aggregates(("K", 3)), **_PARK)
        await _publish(first, topic, "K", range(1, 4))
        await eventually(lambda: len(letters) == 1, what="v3 dead-lettered")
        await eventually(lambda: sub.stats().uncommitted == 0, what="v3 done")
        await first.close()
        second = await open_bus(group=group)
        fixed = _Aggregates()
        await second.subscribe_envelope(topic, fixed, **_PARK)
        # Known before anything is delivered: read from the broker.
        assert [(p.key, p.count) for p in await second.parked(topic)] == [("K", 1)]
        await _publish(second, topic, "K", range(4, 6))
        await _publish(second, topic, "other", range(1, 2))
        await eventually(lambda: len(letters) == 3, what="v4, v5 parked after the restart")
        await eventually(lambda: fixed.seen["other"] == [1], what="other key")
        assert fixed.seen["K"] == []
        assert letters[2].headers[keybus.PARKED_BEHIND] == letters[1].headers[keybus.PARKED_BEHIND]
        # (The store's count is written after the dead letter, which the watcher may see
        # first.)
        await eventually(lambda: _counts(second, topic, [("K", 3)]), what="K counted 3")
        # The replay after the restart reads v3..v5 back from the dead-letter topic.
        assert await second.replay_parked(topic, key="K") == 3
        assert fixed.seen["K"] == [3, 4, 5]

    async def test_the_member_that_takes_the_partition_over_keeps_the_key_parked(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        backend.require("parked_persistence", "consumer_groups")
        topic, group = backend.topic("park"), backend.topic("g")
        _store(backend, topic)
        letters = await watch_dead_letters(open_bus, topic)
        members = await _two_warm_members(open_bus, backend, topic, group, **_PARK)
        await _publish(members[0][0], topic, "K", range(1, 4))
        await eventually(lambda: len(letters) == 1, what="v3 dead-lettered")
        # (A member counts a dead letter once the broker acknowledged it; the watcher may
        # see it first.)
        await eventually(
            lambda: any(m[2].stats().parked == 1 for m in members), what="v3 counted parked"
        )
        parker = next(m for m in members if m[2].stats().parked == 1)
        await eventually(lambda: parker[2].stats().uncommitted == 0, what="v3 done")
        await parker[0].close()
        bus, handler, sub = next(m for m in members if m is not parker)
        await _publish(bus, topic, "K", range(4, 5))
        await _publish(bus, topic, "other", range(1, 2))
        timeout = backend.features.handover_timeout
        await eventually(lambda: len(letters) == 2, timeout=timeout, what="v4 parked")
        await eventually(lambda: handler.seen["other"] == [1], timeout=timeout, what="other")
        await eventually(lambda: sub.stats().parked == 1, what="v4 counted parked")
        assert 4 not in handler.seen["K"]
        await eventually(lambda: _counts(bus, topic, [("K", 2)]), what="K counted 2")

    async def test_a_replay_hands_the_parked_messages_in_order_then_the_live_ones(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        backend.require("parked_persistence")
        bus, handler, sub, topic = await _parked_from_v3(open_bus, backend, 6)
        handler.broken.clear()  # the handler is fixed

        async def live_ones_parked_meanwhile() -> None:
            # The replay is slow to hand v3: live messages of K arrive, and are parked.
            await eventually(lambda: sub.stats().parked >= 8, what="live K parked")

        handler.before[("K", 3)] = live_ones_parked_meanwhile

        async def keep_publishing() -> None:
            # Live messages of K arrive while the replay runs (yielding between them).
            for version in range(7, 41):
                await bus.publish_envelope(topic, envelope("K", version))
                await asyncio.sleep(0)

        publisher = asyncio.create_task(keep_publishing())
        try:
            handed = await bus.replay_parked(topic, key="K")
        finally:
            await publisher
        assert handed >= 4
        await eventually(lambda: len(handler.seen["K"]) >= 40, what="every version of K")
        await eventually(lambda: sub.stats().uncommitted == 0, what="all done")
        assert handler.seen["K"] == list(range(1, 41))  # in order, none lost or twice
        assert await bus.parked(topic) == []
        await bus.publish_envelope(topic, envelope("K", 41))
        await eventually(lambda: handler.seen["K"][-1:] == [41], what="K flows again")

    async def test_a_failing_replay_leaves_the_key_parked_with_the_new_error(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        backend.require("parked_persistence")
        bus, handler, sub, topic = await _parked_from_v3(open_bus, backend, 5)
        [before] = await bus.parked(topic)
        # Not fixed yet: the first message fails again, K stays parked where it was.
        with pytest.raises(keybus.ReplayError) as info:
            await bus.replay_parked(topic, key="K")
        assert info.value.handled == 0
        [still] = await bus.parked(topic)
        assert (still.first_failure, still.count) == (before.first_failure, 3)
        handler.broken = {("K", 4)}  # v3 is fixed, v4 still fails
        with pytest.raises(keybus.ReplayError) as info:
            await bus.replay_parked(topic, key="K")
        assert info.value.handled == 1
        assert handler.seen["K"] == [1, 2, 3]
        [after] = await bus.parked(topic)
        assert "cannot apply K v4" in after.reason
        assert after.first_failure != before.first_failure  # parked from v4 on now
        await bus.publish_envelope(topic, envelope("K", 6))
        await eventually(lambda: sub.stats().parked == 4, what="live v6 parked")
        assert handler.seen["K"] == [1, 2, 3]
        handler.broken.clear()
        assert await bus.replay_parked(topic, key="K") == 3  # v4..v6, v3 not again
        assert handler.seen["K"] == [1, 2, 3, 4, 5, 6]

    async def test_a_request_from_a_bus_without_the_handler_is_served_by_the_owner(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        # What `keybus dlq replay` does: another process asks through the store, the
        # member owning K's partition replays with its handler.
        backend.require("parked_persistence")
        bus, handler, sub, topic = await _parked_from_v3(open_bus, backend, 5)
        group = sub.group
        operator = await open_bus(group=backend.topic("operator"))
        absent = await operator.request_parked(topic, key="nobody", group=group, timeout=5)
        assert absent.outcome == "not-parked"
        # Not fixed yet: the replay fails again, K stays parked, the answer says why.
        failed = await operator.request_parked(topic, key="K", group=group, timeout=30)
        assert (failed.outcome, failed.handled, failed.parked) == ("failed", 0, True)
        assert "cannot apply K v3" in failed.reason
        assert [p.key for p in await operator.parked(topic, group)] == ["K"]
        handler.broken.clear()
        done = await operator.request_parked(topic, key="K", group=group, timeout=30)
        assert (done.outcome, done.handled, done.parked) == ("replayed", 3, False)
        assert handler.seen["K"] == [1, 2, 3, 4, 5]
        assert await operator.parked(topic, group) == []
        await bus.publish_envelope(topic, envelope("K", 6))
        await eventually(lambda: handler.seen["K"][-1:] == [6], what="K flows again")
        # Discard, asked the same way.
        handler.broken = {("K", 7)}
        await bus.publish_envelope(topic, envelope("K", 7))
        await eventually(lambda: sub.stats().parked == 4, what="v7 parked")
        gone = await operator.request_parked(
            topic, key="K", group=group, action="discard", timeout=30
        )
        assert (gone.outcome, gone.handled) == ("discarded", 1)
        await bus.publish_envelope(topic, envelope("K", 8))
        await eventually(lambda: handler.seen["K"][-1:] == [8], what="K flows after discard")

    async def test_a_request_nobody_serves_times_out(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        backend.require("parked_persistence")
        bus, _, sub, topic = await _parked_from_v3(open_bus, backend, 3)
        group = sub.group
        await sub.unsubscribe()  # the service is down
        answer = await bus.request_parked(topic, key="K", group=group, timeout=1.5)
        assert (answer.outcome, answer.parked) == ("timed-out", True)
        assert group in answer.reason

    async def test_discard_drops_the_parked_messages_and_records_it(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        bus, handler, sub, topic = await _parking(open_bus, backend, 2)
        letters = await watch_dead_letters(open_bus, topic)
        await _publish(bus, topic, "K", range(1, 4))
        await eventually(lambda: sub.stats().parked == 2, what="v2, v3 parked")
        assert await bus.discard_parked(topic, key="K") == 2
        await eventually(lambda: len(letters) == 3, what="the discard recorded")
        assert letters[2].headers["X-Discarded"] == b"2"
        await bus.publish_envelope(topic, envelope("K", 4))
        await eventually(lambda: handler.seen["K"] == [1, 4], what="K flows again")
        assert await bus.parked(topic) == []

    async def test_an_empty_record_key_parks_the_aggregate_its_lane_is(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        # An envelope's lane is its aggregate when the record key is empty: parking and
        # stats() must name the same key, or every key-less aggregate would park at once.
        bus, handler, sub, topic = await _parking(open_bus, backend, 2)
        for version in range(1, 4):
            await bus.publish(topic, envelope("K", version).to_bytes(), key="")
        await eventually(lambda: sub.stats().parked == 2, what="v2, v3 of K parked")
        assert [p.key for p in await bus.parked(topic)] == ["K"]
        release = asyncio.Event()

        async def held() -> None:
            await release.wait()

        handler.before[("other", 1)] = held
        await bus.publish(topic, envelope("other", 1).to_bytes(), key="")

        def holding() -> bool:
            return any(h.key == "other" for h in sub.stats().held_partitions)

        await eventually(holding, what="other's handler held, under its aggregate")
        release.set()
        await eventually(lambda: handler.seen["other"] == [1], what="other handled")
        assert handler.seen["K"] == [1]
        assert sub.stats().parked == 2

    @pytest.mark.parametrize("on_dead_letter", ["continue", "park"])
    async def test_the_version_guard_skips_duplicates_and_counts_gaps(
        self, open_bus: BusFactory, backend: Backend, on_dead_letter: str
    ) -> None:
        topic, group = backend.topic("versions"), backend.topic("g")
        _store(backend, topic)
        bus = await open_bus(group=group)
        handler = _Aggregates()
        options: dict[str, Any] = {**_PARK, "on_dead_letter": on_dead_letter}
        sub = await bus.subscribe_envelope(topic, handler, versions="strict", **options)
        script = [1, 2, 2, 3, 5, 4, 6]
        for version in script:
            await bus.publish_envelope(topic, envelope("A", version))
        await eventually(lambda: sub.stats().uncommitted == 0 and sub.stats().delivered == 7)
        stats = sub.stats()
        if on_dead_letter == "continue":
            # 5 skips ahead: handled and counted; 2 again and 4 (below 5): skipped.
            assert handler.seen["A"] == [1, 2, 3, 5, 6]
            assert (stats.version_duplicates, stats.version_gaps) == (2, 1)
        else:
            # 5 skips ahead: dead-lettered, A parked behind it (4 and 6 too).
            assert handler.seen["A"] == [1, 2, 3]
            assert (stats.version_duplicates, stats.version_gaps) == (1, 1)
            assert stats.parked == 3

    async def test_the_version_guard_remembers_the_versions_across_a_restart(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        backend.require("stored_versions")
        topic, group = backend.topic("versions"), backend.topic("g")
        _store(backend, topic)
        first = await open_bus(group=group)
        handler = _Aggregates()
        await first.subscribe_envelope(topic, handler, versions="strict")
        await _publish(first, topic, "A", range(1, 4))
        await _publish(first, topic, "B", range(1, 4))
        await eventually(
            lambda: handler.seen["A"] == [1, 2, 3] and handler.seen["B"] == [1, 2, 3],
            what="A and B v1..v3",
        )
        await eventually(lambda: _no_lag(first, topic), what="all committed")
        second = await open_bus(group=group)  # first: the in-memory broker lives on
        await first.close()
        again = _Aggregates()
        sub = await second.subscribe_envelope(topic, again, versions="strict")
        await second.publish_envelope(topic, envelope("A", 2))  # a duplicate, re-published
        await second.publish_envelope(topic, envelope("B", 5))  # skips v4
        await second.publish_envelope(topic, envelope("A", 4))
        await eventually(
            lambda: sub.stats().delivered == 3 and sub.stats().uncommitted == 0,
            what="the three after the restart done",
        )
        assert again.seen["A"] == [4]  # v2 skipped: v3 was handled before the restart
        assert again.seen["B"] == [5]  # handled (on_dead_letter="continue"), and counted
        stats = sub.stats()
        assert (stats.version_duplicates, stats.version_gaps) == (1, 1)

    async def test_the_member_that_takes_a_partition_over_knows_its_versions(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        backend.require("stored_versions", "consumer_groups")
        topic, group = backend.topic("versions"), backend.topic("g")
        _store(backend, topic)
        members = await _two_warm_members(open_bus, backend, topic, group, versions="strict")
        for member in members:
            member[1].broken.clear()  # no failure here: K's versions only
        await _publish(members[0][0], topic, "K", range(1, 4))
        await eventually(lambda: any(m[1].seen["K"] == [1, 2, 3] for m in members), what="K v1..v3")
        owner = next(m for m in members if m[1].seen["K"])
        await owner[0].close()  # its revoke stores K's versions before the commit
        bus, handler, sub = next(m for m in members if m is not owner)
        await _publish(bus, topic, "K", range(2, 3))  # a duplicate, re-published
        await _publish(bus, topic, "K", range(4, 5))
        timeout = backend.features.handover_timeout
        await eventually(lambda: handler.seen["K"] == [4], timeout=timeout, what="K v4")
        assert sub.stats().version_duplicates == 1
