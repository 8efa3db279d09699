"""keybus bench's statistics on synthetic input: percentiles, delivered / lost /
duplicates / order violations each counted on its own, the rates from real timestamps,
medians with min-max, the overhead paired run by run, and what makes a row ok."""

from __future__ import annotations

import math

import pytest

from keybus.bench.levels import LEVELS, Level, Plan, aggregates_for, resolve_levels
from keybus.bench.results import Row, summarize
from keybus.bench.stats import Deliveries, Tracker, latency_summary, percentile, spread


def test_percentiles_are_nearest_rank_of_sorted_values() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 0.0) == 1
    assert percentile(values, 0.5) == 51  # round(0.5 * 99) = 50 -> the 51st value
    assert percentile(values, 0.95) == 95
    assert percentile(values, 0.99) == 99
    assert percentile(values, 1.0) == 100
    assert percentile([7.0], 0.99) == 7.0
    assert math.isnan(percentile([], 0.5))


def test_latency_summary_in_milliseconds_and_empty_input() -> None:
    summary = latency_summary([0.003, 0.001, 0.004, 0.010, 0.002])  # seconds, unsorted
    assert summary["p50"] == pytest.approx(3.0)
    assert summary["max"] == pytest.approx(10.0)
    assert summary["p99"] == pytest.approx(10.0)
    assert latency_summary([]) == {"p50": None, "p95": None, "p99": None, "max": None}


def _publish_all(tracker: Tracker, counts: list[int]) -> None:
    tracker.begin()
    for aggregate, count in enumerate(counts):
        for version in range(1, count + 1):
            tracker.published(aggregate, version, 0)
            tracker.acked()


def _handle(tracker: Tracker, aggregate: int, version: int) -> None:
    tracker.finished(tracker.started(aggregate, version))


def test_everything_in_order_once_is_all_delivered_and_done() -> None:
    counts = [3, 2]
    tracker = Tracker(counts)
    _publish_all(tracker, counts)
    for aggregate, version in [(0, 1), (1, 1), (0, 2), (1, 2)]:
        _handle(tracker, aggregate, version)
    assert not tracker.done.is_set(), "one message is still missing"
    assert tracker.lost == 1
    _handle(tracker, 0, 3)
    assert tracker.done.is_set()
    assert (tracker.delivered, tracker.lost, tracker.duplicates, tracker.order_violations) == (
        5,
        0,
        0,
        0,
    )
    assert len(tracker.latencies) == 5
    assert all(latency >= 0 for latency in tracker.latencies)


def test_duplicates_are_counted_apart_and_are_not_deliveries() -> None:
    tracker = Tracker([2])
    _publish_all(tracker, [2])
    for version in (1, 1, 2, 1, 2):
        _handle(tracker, 0, version)
    assert tracker.delivered == 2
    assert tracker.duplicates == 3
    assert tracker.order_violations == 0, "a redelivery of a handled version is no violation"
    assert tracker.lost == 0
    assert len(tracker.latencies) == 5, "every handler call has a latency"


def test_a_late_version_is_one_violation_each_and_per_aggregate() -> None:
    tracker = Tracker([4, 2])
    _publish_all(tracker, [4, 2])
    for aggregate, version in [(0, 1), (0, 3), (1, 2), (0, 2), (0, 4), (1, 1)]:
        _handle(tracker, aggregate, version)
    # aggregate 0: 2 after 3; aggregate 1: 1 after 2. Other aggregates never count.
    assert tracker.order_violations == 2
    assert tracker.delivered == 6
    assert tracker.done.is_set()


def test_nothing_handled_is_all_lost_and_rates_are_zero() -> None:
    tracker = Tracker([5, 5])
    assert tracker.lost == 10
    assert tracker.throughput == 0.0
    assert tracker.publish_rate == 0.0


def test_rates_come_from_the_timestamps() -> None:
    tracker = Tracker([10, 10])
    _publish_all(tracker, [10, 10])
    for aggregate in (0, 1):
        for version in range(1, 11):
            _handle(tracker, aggregate, version)
    tracker.first_publish, tracker.last_ack, tracker.last_handled = 100.0, 100.5, 102.0
    assert tracker.publish_rate == pytest.approx(20 / 0.5)
    assert tracker.throughput == pytest.approx(20 / 2.0)


def test_the_go_sdk_levels_and_beyond() -> None:
    expected = {"low": (500, 50), "medium": (2000, 200), "high": (5000, 500)}
    expected |= {"extreme": (10000, 1000), "100k": (100_000, 1000), "1m": (1_000_000, 1000)}
    for name, (messages, aggregates) in expected.items():
        level = Level.named(name)
        assert (level.messages, level.aggregates, level.topics, level.partitions) == (
            messages,
            aggregates,
            5,
            3,
        )
    assert list(LEVELS) == list(expected)
    assert [aggregates_for(n) for n in (100, 500, 20_000)] == [50, 50, 1000]
    with pytest.raises(ValueError, match="unknown level"):
        Level.named("huge")


def test_custom_levels_and_overrides() -> None:
    levels = resolve_levels(["low"], messages=1234, partitions=6, handler_ms=2.5)
    assert [(lv.name, lv.messages, lv.aggregates, lv.partitions) for lv in levels] == [
        ("low", 500, 50, 6),
        ("custom", 1234, 123, 6),
    ]
    assert all(lv.handler_ms == 2.5 for lv in levels)
    with pytest.raises(ValueError, match="aggregates"):
        resolve_levels([], messages=10, aggregates=20)


def test_a_plan_sends_versions_one_to_n_per_aggregate_to_topic_i_mod_topics() -> None:
    plan = Plan(Level("t", 1003, 10, topics=5, payload_bytes=16), "abc")
    assert sum(plan.counts) == 1003
    assert plan.counts[:4] == [101, 101, 101, 100]
    assert [plan.topics[plan.topic_of(i)] for i in (0, 6)] == ["kb-bench-abc-0", "kb-bench-abc-1"]
    envelope = plan.envelope(7, 3)
    assert (envelope.aggregate_id, envelope.event_version) == ("agg-7", 3)
    assert envelope.payload["pad"] == "x" * 16


def test_deliveries_counts_apart() -> None:
    deliveries = Deliveries()
    for aggregate, version in [("a", 1), ("a", 3), ("a", 2), ("a", 2), ("b", 1)]:
        deliveries.record(aggregate, version)
    assert (deliveries.delivered, deliveries.duplicates, deliveries.order_violations) == (4, 1, 1)


def _row(client: str, repeat: int, throughput: float, **changes: object) -> Row:
    row = Row("kafka", client, "low", repeat, 500, 50, 5, 3, 100, 0.0)
    row.delivered, row.throughput = 500, throughput
    for name, value in changes.items():
        setattr(row, name, value)
    return row


def test_ok_means_nothing_lost_in_order_and_nothing_left_after_close() -> None:
    assert _row("keybus", 1, 1.0).ok
    assert _row("keybus", 1, 1.0, duplicates=3).ok, "at-least-once: duplicates are allowed"
    assert not _row("keybus", 1, 1.0, lost=1, delivered=499).ok
    assert not _row("keybus", 1, 1.0, order_violations=1).ok
    assert not _row("keybus", 1, 1.0, leftovers={"tasks": 0, "threads": 1}).ok
    assert not _row("keybus", 1, 1.0, error="timeout after 1 s").ok


def test_medians_with_min_max_and_overhead_paired_by_repeat() -> None:
    assert spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    assert spread([None]) == {"median": None, "min": None, "max": None}
    rows = [
        _row("keybus", 1, 800.0),
        _row("raw", 1, 1000.0),
        _row("raw", 2, 2000.0),
        _row("keybus", 2, 1000.0),
        _row("keybus", 3, 900.0, order_violations=1),
        _row("raw", 3, 1000.0),
    ]
    keybus, raw = summarize(rows)
    assert (keybus["client"], raw["client"]) == ("keybus", "raw")
    assert keybus["throughput"] == {"median": 900.0, "min": 800.0, "max": 1000.0}
    # Ratios of the same round: 0.8, 0.5, 0.9 (not a ratio of medians, 900 / 1000).
    assert keybus["overhead_vs_raw"] == {"median": 0.8, "min": 0.5, "max": 0.9}
    assert raw["overhead_vs_raw"] is None
    assert (keybus["runs"], keybus["ok_runs"], keybus["ok"]) == (3, 2, False)
    assert keybus["order_violations"] == 1
