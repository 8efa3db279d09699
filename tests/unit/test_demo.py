"""The main job (`keybus demo`) and the scenario runner behind it."""

from __future__ import annotations

import time

from typer.testing import CliRunner

from keybus.bench.scenario import aggregates_for, percentile, run_scenario
from keybus.cli.app import app


async def test_scenario_delivers_everything_in_order_despite_injected_failures() -> None:
    result = await run_scenario("memory://unit-scenario", 2000, max_delay=0.0005, fail_rate=0.05)
    assert result.delivered == 2000
    assert result.order_violations == 0
    assert result.duplicates == 0
    assert result.retries > 0, "some first attempts failed and were retried in place"
    assert result.dead_lettered == 0
    assert result.resources_after == result.resources_before
    assert not result.leftovers
    assert result.throughput > 0
    assert result.latency(0.5) <= result.latency(0.99)
    assert result.ok


async def test_scenario_clock_ends_when_the_last_handler_returned() -> None:
    # One envelope per aggregate, handlers sleeping up to 0.3 s: every delivery starts at
    # once, and the run lasts as long as the longest sleep.
    started = time.perf_counter()
    result = await run_scenario("memory://unit-clock", 50, aggregates=50, max_delay=0.3)
    wall = time.perf_counter() - started
    assert result.ok
    assert 0.15 < result.seconds < wall
    assert result.delivered == 50


def test_aggregate_rule_and_percentiles() -> None:
    assert [aggregates_for(n) for n in (500, 2000, 5000, 10000, 50000)] == [
        50,
        200,
        500,
        1000,
        1000,
    ]
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.99) == 5.0


def test_demo_command_prints_the_summary_and_succeeds() -> None:
    result = CliRunner().invoke(app, ["demo", "--messages", "1000", "--max-delay-ms", "0.5"])
    assert result.exit_code == 0, result.output
    assert "1000 / 1000" in result.output
    assert "order violations" in result.output
    assert "after close" in result.output
