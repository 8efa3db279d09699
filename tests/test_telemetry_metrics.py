"""Prometheus metrics (``connect(metrics=...)``), on every enabled backend: the counts
equal the events of a scripted scenario exactly, labels carry no aggregate id, buses
share a registry, and a closed bus's subscriptions leave the gauges."""

from __future__ import annotations

import asyncio
import threading

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import keybus
from keybus.testing import LeakChecker
from keybus.testing.conformance import Backend, BusFactory, unique
from tests.helpers import envelope, eventually, system_label

_LABEL_NAMES = {"backend", "topic", "group", "outcome", "le"}


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


async def test_metric_values_equal_the_events_of_a_scripted_scenario(
    open_bus: BusFactory, backend: Backend
) -> None:
    """Publish N envelopes; k fail once then succeed; j fail every attempt and are
    dead-lettered; one undecodable message is dead-lettered without an attempt."""
    registry = CollectorRegistry()
    group = unique("g")
    bus = await open_bus(group=group, metrics=registry)
    topic = backend.topic()
    n, flaky, doomed = 12, {"agg-1", "agg-2", "agg-3"}, {"agg-4", "agg-5"}
    failed_once: set[str] = set()
    handled: list[str] = []

    async def handler(env: keybus.Envelope) -> None:
        if env.aggregate_id in doomed:
            raise RuntimeError("always fails")
        if env.aggregate_id in flaky and env.aggregate_id not in failed_once:
            failed_once.add(env.aggregate_id)
            raise RuntimeError("fails once")
        handled.append(env.aggregate_id)

    await bus.subscribe_envelope(topic, handler, max_attempts=3, retry_backoff=0.01)
    for i in range(n):
        await bus.publish_envelope(topic, envelope(f"agg-{i}", 1))
    await bus.publish(topic, b"not an envelope", key="raw")

    labels = {"backend": system_label(backend), "topic": topic, "group": group}
    k, j = len(flaky), len(doomed)
    await eventually(
        lambda: (
            len(handled) == n - j
            and sample(registry, "keybus_dead_letters_total", **labels) == j + 1
        ),
        what="every envelope handled or dead-lettered",
    )
    published = {"backend": system_label(backend), "topic": topic}
    assert sample(registry, "keybus_published_total", outcome="ok", **published) == n + 1
    assert sample(registry, "keybus_published_total", outcome="failed", **published) == 0
    assert sample(registry, "keybus_publish_duration_seconds_count", **published) == n + 1
    expected = {"ok": n - j, "retried": k + 2 * j, "dead_lettered": j, "abandoned": 0}
    for outcome, count in expected.items():
        assert sample(registry, "keybus_handled_total", outcome=outcome, **labels) == count
    attempts = n + k + 2 * j
    assert sample(registry, "keybus_handler_duration_seconds_count", **labels) == attempts
    # Per message, at its first attempt (the undecodable one has none).
    assert sample(registry, "keybus_end_to_end_latency_seconds_count", **labels) == n
    inf = sample(registry, "keybus_end_to_end_latency_seconds_bucket", le="+Inf", **labels)
    assert inf == n
    await eventually(
        lambda: (
            sample(registry, "keybus_uncommitted_messages", **labels) == 0
            and sample(registry, "keybus_in_flight_messages", **labels) == 0
            and sample(registry, "keybus_running_handlers", **labels) == 0
        ),
        what="the gauges back to zero once everything is committed",
    )
    _assert_no_aggregate_ids(registry, {f"agg-{i}" for i in range(n)} | {"raw"})


def _assert_no_aggregate_ids(registry: CollectorRegistry, ids: set[str]) -> None:
    text = generate_latest(registry).decode()
    families = [f for f in text_string_to_metric_families(text) if f.name.startswith("keybus_")]
    assert families
    for family in families:
        for s in family.samples:
            assert set(s.labels) <= _LABEL_NAMES, (s.name, s.labels)
            assert not ids & set(s.labels.values()), (s.name, s.labels)


async def test_gauges_show_a_held_handler_and_drop_a_closed_bus_subscriptions(
    open_bus: BusFactory, backend: Backend
) -> None:
    """Two buses report to one registry (no clash); each one's live subscriptions show in
    the gauges, read at scrape time; once a bus closes, its subscriptions vanish from the
    gauges while its counts stay, and the other bus still reports."""
    registry = CollectorRegistry()
    group_a, group_b = unique("a"), unique("b")
    bus_a = await open_bus(group=group_a, metrics=registry)
    bus_b = await open_bus(group=group_b, metrics=registry)
    topic = backend.topic()
    release = asyncio.Event()
    started: list[str] = []

    async def held(env: keybus.Envelope) -> None:
        started.append(env.aggregate_id)
        await release.wait()

    await bus_a.subscribe_envelope(topic, held)
    got: list[str] = []

    async def quick(env: keybus.Envelope) -> None:
        got.append(env.aggregate_id)

    await bus_b.subscribe_envelope(topic, quick)
    for i in range(3):
        await bus_b.publish_envelope(topic, envelope("one-key", i + 1))
    a = {"backend": system_label(backend), "topic": topic, "group": group_a}
    b = {"backend": system_label(backend), "topic": topic, "group": group_b}
    await eventually(lambda: len(got) == 3 and started, what="b handled all, a holds the first")
    # A scrape from another thread, as prometheus_client.start_http_server does.
    scraped: list[str] = []
    scraper = threading.Thread(target=lambda: scraped.append(generate_latest(registry).decode()))
    scraper.start()
    await asyncio.to_thread(scraper.join, 10)
    assert scraped
    assert f'group="{group_a}"' in scraped[0]
    await eventually(
        lambda: (
            sample(registry, "keybus_running_handlers", **a) == 1
            and sample(registry, "keybus_in_flight_messages", **a) == 3
            and sample(registry, "keybus_uncommitted_messages", **a) == 3
        ),
        what="a's held handler and the two messages behind it in the gauges",
    )
    assert sample(registry, "keybus_handled_total", outcome="ok", **b) == 3
    release.set()
    await eventually(
        lambda: sample(registry, "keybus_handled_total", outcome="ok", **a) == 3,
        what="a handled all three",
    )
    await bus_a.close()
    assert sample(registry, "keybus_running_handlers", **a) is None
    assert sample(registry, "keybus_in_flight_messages", **a) is None
    assert sample(registry, "keybus_uncommitted_messages", **a) is None
    assert sample(registry, "keybus_handled_total", outcome="ok", **a) == 3  # counts stay
    assert sample(registry, "keybus_in_flight_messages", **b) == 0  # b still reports
    sub = next(iter(bus_b.subscriptions))
    await sub.unsubscribe()
    assert sample(registry, "keybus_in_flight_messages", **b) is None


async def test_two_buses_with_metrics_true_share_the_default_registry(
    open_bus: BusFactory, backend: Backend
) -> None:
    from prometheus_client import REGISTRY

    group = unique("g")
    first = await open_bus(group=group, metrics=True)
    second = await open_bus(group=group, metrics=True)
    topic = backend.topic()
    got: list[str] = []

    async def handler(env: keybus.Envelope) -> None:
        got.append(env.aggregate_id)

    await first.subscribe_envelope(topic, handler)
    await second.subscribe_envelope(topic, handler)
    for i in range(10):
        await (first if i % 2 else second).publish_envelope(topic, envelope(f"k{i}", 1))
    await eventually(lambda: len(set(got)) == 10, what="ten envelopes handled by the group")
    labels = {"backend": system_label(backend), "topic": topic}
    assert REGISTRY.get_sample_value("keybus_published_total", {**labels, "outcome": "ok"}) == 10
    # One series per label set, whichever of the group's buses handled a message.
    handled = REGISTRY.get_sample_value(
        "keybus_handled_total", {**labels, "group": group, "outcome": "ok"}
    )
    assert handled == len(got)


@pytest.mark.parametrize(
    ("option", "error"),
    [("metrics", "metrics must be True"), ("tracing", "tracing must be True")],
)
async def test_a_wrong_telemetry_option_raises_before_connecting(
    option: str, error: str, no_leaks: LeakChecker
) -> None:
    with pytest.raises(TypeError, match=error):
        await keybus.connect("memory://telemetry-options", **{option: "yes"})


async def test_an_attempt_cancelled_by_close_counts_as_abandoned(
    open_bus: BusFactory, backend: Backend
) -> None:
    registry = CollectorRegistry()
    group = unique("g")
    bus = await open_bus(group=group, metrics=registry)
    topic = backend.topic()
    started = asyncio.Event()

    async def stuck(env: keybus.Envelope) -> None:
        started.set()
        await asyncio.Event().wait()  # until cancelled

    await bus.subscribe_envelope(topic, stuck)
    await bus.publish_envelope(topic, envelope("agg", 1))
    await asyncio.wait_for(started.wait(), 30)
    labels = {"backend": system_label(backend), "topic": topic, "group": group}
    assert sample(registry, "keybus_running_handlers", **labels) == 1
    await bus.close(timeout=0.1)
    outcomes = {
        outcome: sample(registry, "keybus_handled_total", outcome=outcome, **labels)
        for outcome in ("ok", "retried", "dead_lettered", "abandoned")
    }
    assert outcomes == {"ok": 0, "retried": 0, "dead_lettered": 0, "abandoned": 1}
    assert sample(registry, "keybus_handler_duration_seconds_count", **labels) == 1


async def test_a_configuration_turns_metrics_and_tracing_on(no_leaks: LeakChecker) -> None:
    """``metrics = true`` / ``tracing = true`` in a configuration are connect's
    ``metrics=True`` / ``tracing=True`` (the default registry, the global provider)."""
    from prometheus_client import REGISTRY

    topic = unique("cfg")
    config = {"url": "memory://telemetry-config", "metrics": True, "tracing": True}
    async with keybus.connect_from_config(config, environ={}) as bus:
        await bus.publish(topic, b"x")
        await bus.delete_topic(topic)
    labels = {"backend": "memory", "topic": topic, "outcome": "ok"}
    assert REGISTRY.get_sample_value("keybus_published_total", labels) == 1


async def test_publish_many_is_counted_record_by_record(
    open_bus: BusFactory, backend: Backend
) -> None:
    registry = CollectorRegistry()
    bus = await open_bus(metrics=registry)
    topic = backend.topic()
    items = [envelope(f"agg-{i}", 1) for i in range(5)] + [(b"raw", "k")]
    assert await bus.publish_many(topic, items) == [None] * 6
    labels = {"backend": system_label(backend), "topic": topic}
    assert sample(registry, "keybus_published_total", **labels, outcome="ok") == 6
    assert sample(registry, "keybus_publish_duration_seconds_count", **labels) == 6


async def test_lag_gauges_show_the_count_while_a_handler_is_held_and_drain_after(
    open_bus: BusFactory, backend: Backend
) -> None:
    """The lag gauges (read every lag_interval seconds): three envelopes of one key behind
    a held handler are three records behind, with an age; released, both drain to 0."""
    registry = CollectorRegistry()
    group = unique("g")
    bus = await open_bus(group=group, metrics=registry, lag_interval=0.1)
    topic = backend.topic()
    release = asyncio.Event()
    got: list[int] = []

    async def held(env: keybus.Envelope) -> None:
        await release.wait()
        got.append(env.event_version)

    await bus.subscribe_envelope(topic, held)
    for version in (1, 2, 3):
        await bus.publish_envelope(topic, envelope("one-key", version))
    labels = {"backend": system_label(backend), "topic": topic, "group": group}
    await eventually(
        lambda: (
            sample(registry, "keybus_lag_messages", **labels) == 3
            and (sample(registry, "keybus_lag_age_seconds", **labels) or 0) > 0.2
        ),
        what="three records behind, the oldest aging",
    )
    release.set()
    await eventually(
        lambda: (
            got == [1, 2, 3]
            and sample(registry, "keybus_lag_messages", **labels) == 0
            and sample(registry, "keybus_lag_age_seconds", **labels) == 0
        ),
        what="the lag drained once the handler was released",
    )
    sub = next(iter(bus.subscriptions))
    await sub.unsubscribe()
    assert sample(registry, "keybus_lag_messages", **labels) is None  # gone with it


async def test_a_failing_lag_read_is_logged_once_per_streak_and_the_gauges_go_on(
    no_leaks: LeakChecker, caplog: pytest.LogCaptureFixture
) -> None:
    """The lag gauges' reader outlives failed reads (logged once until one succeeds
    again, and once more for a new streak), and stops with the bus."""
    registry = CollectorRegistry()
    topic, group = unique("lagfail"), unique("g")
    labels = {"backend": "memory", "topic": topic, "group": group}
    async with keybus.connect(
        "memory://lag-failing", group=group, metrics=registry, lag_interval=0.05
    ) as bus:
        transport = bus._transport
        positions = transport.positions
        broken = True
        calls = 0

        async def flaky(*args: object, **kwargs: object) -> object:
            nonlocal calls
            calls += 1
            if broken:
                raise keybus.TopicError(topic, "describe", "broker says no")
            return await positions(*args, **kwargs)  # type: ignore[arg-type]

        transport.positions = flaky  # type: ignore[method-assign]
        caplog.set_level("INFO", logger="keybus")
        await bus.subscribe_envelope(topic, lambda env: None)
        await eventually(lambda: calls >= 5, what="several failed reads")
        failures = [r for r in caplog.records if "lag gauges not refreshed" in r.message]
        assert len(failures) == 1
        assert sample(registry, "keybus_lag_messages", **labels) is None  # never read
        broken = False
        await eventually(
            lambda: sample(registry, "keybus_lag_messages", **labels) == 0,
            what="the gauges once a read succeeds",
        )
        assert any("lag gauges refreshed again" in r.message for r in caplog.records)
        broken = True
        failed_at = calls
        await eventually(lambda: calls >= failed_at + 3, what="a second streak of failures")
        failures = [r for r in caplog.records if "lag gauges not refreshed" in r.message]
        assert len(failures) == 2
        assert sample(registry, "keybus_lag_messages", **labels) == 0  # the last figures stay
    assert not any(t.get_name() == "keybus-lag-gauges" for t in asyncio.all_tasks())


async def test_parked_keys_store_writes_are_not_counted_as_dead_letters(
    open_bus: BusFactory, backend: Backend
) -> None:
    """on_dead_letter="park" writes the parked-keys store beside each dead letter: only
    the dead letters count in keybus_dead_letters_total."""
    registry = CollectorRegistry()
    group = unique("g")
    bus = await open_bus(group=group, metrics=registry)
    topic = backend.topic()
    handled: list[int] = []

    async def handler(env: keybus.Envelope) -> None:
        if env.aggregate_id == "K" and env.event_version == 1:
            raise RuntimeError("cannot apply K 1")
        handled.append(env.event_version)

    sub = await bus.subscribe_envelope(topic, handler, max_attempts=1, on_dead_letter="park")
    for version in (1, 2, 3):
        await bus.publish_envelope(topic, envelope("K", version))
    await bus.publish_envelope(topic, envelope("other", 1))
    labels = {"backend": system_label(backend), "topic": topic, "group": group}
    # v1 failed, v2 and v3 parked behind it: 3 dead letters, and 3 store writes beside.
    await eventually(lambda: sub.stats().parked == 3 and handled == [1], what="K parked")
    await eventually(lambda: sub.stats().uncommitted == 0, what="all done")
    assert sample(registry, "keybus_dead_letters_total", **labels) == 3
