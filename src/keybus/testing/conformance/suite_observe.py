"""Conformance: what an operator sees of a subscription and of the bus — the stuck key
in ``sub.stats()``, lag by count and by age, health."""

from __future__ import annotations

import asyncio

import keybus
from keybus.testing.conformance.backend import Backend, unique
from keybus.testing.conformance.fixtures import BackendFixtures, BusFactory
from keybus.testing.conformance.helpers import eventually

__all__ = ["ObserveSuite"]


async def _holding(
    open_bus: BusFactory, backend: Backend, held: str
) -> tuple[keybus.EventBus, str, keybus.Subscription, asyncio.Event, list[str]]:
    """A bus subscribed to a fresh one-partition topic whose handler holds key ``held``
    until the returned event is set; the keys handled so far, in order."""
    bus = await open_bus()
    topic = backend.topic()
    await bus.ensure_topic(topic, keybus.TopicConfig(partitions=1))
    release = asyncio.Event()
    handled: list[str] = []

    async def handler(message: keybus.Message) -> None:
        if message.key == held:
            await release.wait()
        handled.append(message.key or "")

    return bus, topic, await bus.subscribe(topic, handler), release, handled


class ObserveSuite(BackendFixtures):
    async def test_a_stuck_key_shows_in_stats_with_the_partition_it_holds(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        """One key's handler hangs with more of its messages queued behind it, while
        other keys of its partition are handled: ``stats()`` names the key as the one
        with the most waiting messages and as the holder of the partition's commit
        point, with how long it has run and how many done messages wait behind it."""
        bus, topic, sub, release, handled = await _holding(open_bus, backend, "order-42")
        for i in range(4):
            await bus.publish(topic, b"x", key="order-42")
            await bus.publish(topic, b"y", key=f"other-{i}")
        await eventually(lambda: len(handled) == 4, what="the other keys handled")
        await eventually(
            lambda: (
                (s := sub.stats()).oldest_running_age is not None and s.oldest_running_age > 0.05
            ),
            what="the stuck handler running a while",
        )
        stats = sub.stats()
        assert (stats.running, stats.in_flight, stats.handled) == (1, 4, 4)
        assert stats.uncommitted == 8, "the done ones wait behind the stuck one"
        waiting = stats.waiting_keys[0]
        assert (waiting.key, waiting.waiting, waiting.attempts) == ("order-42", 3, 1)
        assert waiting.partition == 0
        assert waiting.running_for is not None
        assert waiting.running_for > 0.05
        (held,) = stats.held_partitions
        assert (held.topic, held.partition, held.key) == (topic, 0, "order-42")
        assert (held.held, held.unfinished, held.attempts) == (4, 4, 1)
        assert held.running_for is not None
        assert held.running_for >= waiting.running_for
        assert held.oldest_age is not None
        assert held.oldest_age > 0
        release.set()
        await eventually(lambda: sub.stats().handled == 8, what="everything handled")
        await eventually(lambda: sub.stats().uncommitted == 0, what="everything committed")
        stats = sub.stats()
        assert (stats.in_flight, stats.running, stats.oldest_running_age) == (0, 0, None)
        assert stats.waiting_keys == ()
        assert stats.held_partitions == ()

    async def test_lag_grows_by_count_and_age_while_a_handler_is_held_and_drains_after(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        """A held first message keeps its partition's commit point where it was: the
        count lag is everything published, the age of the oldest unfinished message
        grows, the messages of other keys done behind it are held; released, the lag
        drains to 0 and nothing unfinished is left."""
        bus, topic, _, release, handled = await _holding(open_bus, backend, "held")
        await bus.publish(topic, b"first", key="held")
        for i in range(9):
            await bus.publish(topic, b"x", key=f"other-{i}")
        await eventually(lambda: len(handled) == 9, what="the other keys handled")
        first = await bus.lag()
        (row,) = first.partitions
        assert (row.topic, row.partition, row.group) == (topic, 0, bus.group)
        assert row.lag == 10
        assert first.total == 10
        assert row.uncommitted == 9
        assert row.oldest_unfinished_age is not None

        async def older() -> bool:
            return ((await bus.lag()).max_age or 0) > (first.max_age or 0) + 0.05

        async def drained() -> bool:
            return (await bus.lag(topic)).total == 0

        await eventually(older, what="the age growing")
        release.set()
        await eventually(drained, what="the lag drained")
        (row,) = (await bus.lag(topic)).partitions
        assert (row.lag, row.uncommitted, row.oldest_unfinished_age) == (0, 0, None)

    async def test_the_lag_of_a_group_that_never_consumed_is_everything_published(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        bus = await open_bus()
        topic = backend.topic()
        await bus.ensure_topic(topic, keybus.TopicConfig(partitions=2))
        for i in range(6):
            await bus.publish(topic, b"x", key=f"k{i}")
        lag = await bus.lag(topic, group=unique("idle"))
        assert lag.total == 6
        assert all(p.committed is None for p in lag.partitions)
        assert all(p.oldest_unfinished_age is None for p in lag.partitions)
        assert all(p.uncommitted is None for p in lag.partitions), "not consumed here"

    async def test_health_names_the_broker_each_subscription_and_the_publisher(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        bus = await open_bus()
        topic = backend.topic()
        got: list[keybus.Message] = []

        async def handler(message: keybus.Message) -> None:
            got.append(message)

        sub = await bus.subscribe(topic, handler)
        await bus.publish(topic, b"x", key="k")
        await eventually(lambda: len(got) == 1, what="one message")
        health = await bus.health(timeout=5.0)
        assert health.ok, health
        assert health.backend == bus.url.split("://")[0]
        assert health.checks["broker"].ok
        subscription = health.checks[f"subscription:{topic}"]
        assert subscription.ok
        assert subscription.values["state"] == "running"
        assert subscription.values["seconds_since_fetch"] is not None
        assert health.checks["publisher"].values["pending"] == 0
        await sub.unsubscribe()
        assert f"subscription:{topic}" not in (await bus.health()).checks
        await bus.close()
        closed = await bus.health()
        assert not closed.ok

    async def test_a_silent_heartbeat_source_raises_warning_error_critical_then_recovery(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        interval = 0.25
        sender, watcher = await open_bus(), await open_bus()
        topic = backend.topic("hb")
        alerts: list[keybus.HeartbeatAlert] = []
        watching = watcher.watch_heartbeats(topic, interval, on_alert=alerts.append)
        await watching.ready()
        beating = sender.start_heartbeat(topic, interval, source="billing")
        watch = watching.watch
        assert isinstance(watch, keybus.HeartbeatWatch)
        await eventually(
            lambda: (
                watch.sources.get("billing") is not None and watch.sources["billing"].sequence >= 3
            ),
            what="three heartbeats seen",
        )
        await beating.stop()
        stopped = len(alerts)  # (a slow broker may have raised one before the stop)
        await eventually(
            lambda: [a.level for a in alerts[stopped:]][-1:] == ["critical"],
            what="a critical alert",
            timeout=30,
        )
        silent = [a for a in alerts[stopped:] if a.level != "recovered"]
        assert [a.level for a in silent][-3:] == ["warning", "error", "critical"]
        missed = [a.missed for a in silent][-3:]
        assert all(m >= at for m, at in zip(missed, [3, 5, 10], strict=True)), missed
        assert all(a.source == "billing" for a in silent)
        again = sender.start_heartbeat(topic, interval, source="billing")
        await eventually(lambda: alerts[-1].level == "recovered", what="the recovery")
        assert alerts[-1].missed == 0
        await again.stop()
        await watching.stop()
        assert not watching.running
        assert not again.running

    async def test_watch_lag_calls_back_when_a_partition_falls_behind_and_catches_up(
        self, open_bus: BusFactory, backend: Backend
    ) -> None:
        bus = await open_bus()
        topic = backend.topic()
        await bus.ensure_topic(topic, keybus.TopicConfig(partitions=1))
        release = asyncio.Event()

        async def handler(message: keybus.Message) -> None:
            await release.wait()

        await bus.subscribe(topic, handler)
        changes: list[keybus.LagAlert] = []
        watching = bus.watch_lag(threshold=5, max_age=None, interval=0.1, on_change=changes.append)
        for i in range(8):
            await bus.publish(topic, b"x", key=f"k{i}")
        await eventually(lambda: len(changes) == 1, what="falling behind")
        assert changes[0].behind
        assert changes[0].partition.lag >= 5
        assert "threshold 5" in changes[0].reason
        release.set()
        await eventually(lambda: len(changes) == 2, what="catching up")
        assert not changes[1].behind
        await watching.stop()
