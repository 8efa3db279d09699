"""In-memory end-to-end envelope throughput with ordering on, and where the time goes.

    .venv/bin/python benchmarks/memory_throughput.py [--envelopes 100000] [--aggregates 1000]
                                                     [--runs 5] [--metrics]
                                                     [--tracing noop|sdk] [--versions]
    .venv/bin/python benchmarks/memory_throughput.py --interleave [--runs 7]

Every figure is a median over ``--runs`` runs made in this one process, side by side:
- end to end: 1000 aggregates publish versions 1..n concurrently (each in order), one
  ordered envelope subscription handles them; messages / (last handled - first publish);
- consume only: the same envelopes already in the topic, a new group handles them all;
- dispatcher only: the keyed lanes with a no-op step, no codec, no transport;
- codec: Envelope construction, encoding and decoding per envelope.

``--metrics`` connects with ``metrics=`` (a registry of its own, never scraped: what a
message costs is the counting); ``--tracing noop`` with ``tracing=True`` and no SDK
installed as the global provider (the OpenTelemetry API's no-op tracer), ``--tracing
sdk`` with an SDK ``TracerProvider`` that records every span and exports none.
``--versions`` subscribes with ``versions="strict"`` (the version guard, its versions
kept in the broker's store).

``--interleave`` measures what telemetry costs: each run does the four variants one
after the other (off, metrics, tracing without an SDK, both), so a change in the
machine's load falls on all of them alike; it prints per variant the median end-to-end
rate, CPU microseconds per envelope end to end (this process's CPU time over the run:
steadier than wall time on a shared machine) and the consume path's wall microseconds,
each against "off".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import keybus
from keybus.bench.scenario import Deliveries, percentile
from keybus.dispatch import KeyedDispatcher
from keybus.message import Message
from keybus.work import Work


def _envelope(aggregate: int, version: int) -> keybus.Envelope:
    return keybus.Envelope(
        aggregate_id=f"agg-{aggregate}",
        event_type="OrderChanged",
        event_version=version,
        payload={"amount": 12.5, "n": version},
    )


# connect() options for --metrics / --tracing, subscribe options for --versions (main()).
TELEMETRY: dict[str, Any] = {}
SUBSCRIBE: dict[str, Any] = {}
LAST_CPU = [0.0]


async def end_to_end(envelopes: int, aggregates: int) -> tuple[float, float, Deliveries, int]:
    """Returns (envelopes/s, p99 latency ms, what was delivered, envelopes lost); the
    CPU seconds of the run (publish to last handled) are left in ``LAST_CPU``."""
    per = envelopes // aggregates
    total = per * aggregates
    done = asyncio.Event()
    deliveries = Deliveries()
    latencies: list[float] = []
    finished = 0.0

    async def handler(envelope: keybus.Envelope) -> None:
        nonlocal finished
        latencies.append(time.time() - envelope.timestamp.timestamp())
        if deliveries.record(envelope.aggregate_id, envelope.event_version):
            finished = time.perf_counter()
            if deliveries.delivered == total:
                done.set()

    async with keybus.connect("memory://bench-e2e", group="bench", **TELEMETRY) as bus:
        await bus.subscribe_envelope("orders", handler, **SUBSCRIBE)

        async def publish(aggregate: int) -> None:
            for version in range(1, per + 1):
                await bus.publish_envelope("orders", _envelope(aggregate, version))

        started = time.perf_counter()
        cpu = time.process_time()
        await asyncio.gather(*(publish(a) for a in range(aggregates)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 300)
        LAST_CPU[0] = time.process_time() - cpu
        await bus.delete_topic("orders")
    latencies.sort()
    rate = deliveries.delivered / (finished - started) if deliveries.delivered else 0.0
    return rate, percentile(latencies, 0.99) * 1000, deliveries, total - deliveries.delivered


async def consume_only(envelopes: int, aggregates: int) -> float:
    """Seconds per envelope for the consumer path alone (decode, lanes, handler, commit)."""
    done = asyncio.Event()
    handled = 0

    async def handler(envelope: keybus.Envelope) -> None:
        nonlocal handled
        handled += 1
        if handled == envelopes:
            done.set()

    async with keybus.connect("memory://bench-consume", group="bench", **TELEMETRY) as bus:
        await bus.ensure_topic("orders")
        for i in range(envelopes):
            await bus.publish_envelope("orders", _envelope(i % aggregates, i // aggregates + 1))
        started = time.perf_counter()
        await bus.subscribe_envelope("orders", handler, **SUBSCRIBE)
        await asyncio.wait_for(done.wait(), 300)
        elapsed = time.perf_counter() - started
        await bus.delete_topic("orders")
    return elapsed / envelopes


async def dispatcher_only(messages: int, aggregates: int) -> float:
    """Seconds per message through the keyed lanes with a no-op step."""
    done = asyncio.Event()
    count = 0

    async def process(work: Work) -> None:
        nonlocal count
        count += 1
        if count == messages:
            done.set()

    dispatcher = KeyedDispatcher(process, 256, "bench")
    works = [
        (Work(Message("t", b"", None, {}, 0, i), None, None), f"agg-{i % aggregates}")
        for i in range(messages)
    ]
    started = time.perf_counter()
    for work, key in works:
        dispatcher.submit(work, key)
    await asyncio.wait_for(done.wait(), 300)
    return (time.perf_counter() - started) / messages


def per_call(fn: Callable[[], object], n: int = 100_000) -> float:
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - started) / n


def _variants() -> dict[str, dict[str, Any]]:
    from prometheus_client import CollectorRegistry

    return {
        "off": {},
        "metrics": {"metrics": CollectorRegistry()},
        "tracing": {"tracing": True},
        "both": {"metrics": CollectorRegistry(), "tracing": True},
    }


def interleaved(envelopes: int, aggregates: int, runs: int) -> None:
    """The four telemetry variants, one after the other in each run (see the module's
    doc); exits non-zero on any order violation or loss."""
    variants = _variants()
    rows: dict[str, dict[str, list[float]]] = {
        name: {"e2e": [], "cpu": [], "consume": []} for name in variants
    }
    bad = 0
    for _ in range(runs):
        for name, options in variants.items():
            TELEMETRY.clear()
            TELEMETRY.update(options)
            gc.collect()
            rate, _, deliveries, missing = asyncio.run(end_to_end(envelopes, aggregates))
            bad += deliveries.order_violations + missing
            rows[name]["e2e"].append(rate)
            rows[name]["cpu"].append(LAST_CPU[0] / (envelopes // aggregates * aggregates))
            rows[name]["consume"].append(asyncio.run(consume_only(envelopes, aggregates)))
    med = {name: {k: statistics.median(v) for k, v in row.items()} for name, row in rows.items()}
    off = med["off"]
    print(
        f"keybus memory benchmark, telemetry interleaved: {envelopes} envelopes, "
        f"{aggregates} aggregates, median of {runs} runs per variant"
    )
    print(
        f"  {'variant':<8} {'end to end/s':>13} {'vs off':>7} {'CPU us/env':>11} {'+us':>6}"
        f" {'CPU vs off':>10} {'consume us':>11} {'+us':>6}"
    )
    for name, m in med.items():
        print(
            f"  {name:<8} {m['e2e']:>13,.0f} {m['e2e'] / off['e2e'] - 1:>+7.1%}"
            f" {m['cpu'] * 1e6:>11.2f} {(m['cpu'] - off['cpu']) * 1e6:>+6.2f}"
            f" {m['cpu'] / off['cpu'] - 1:>+10.1%}"
            f" {m['consume'] * 1e6:>11.2f} {(m['consume'] - off['consume']) * 1e6:>+6.2f}"
        )
    for name, row in rows.items():
        print(f"  {name:<8} end to end, runs: {', '.join(f'{r:,.0f}' for r in row['e2e'])}")
    if bad:
        raise SystemExit(f"{bad} order violations or envelopes lost")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envelopes", type=int, default=100_000)
    parser.add_argument("--aggregates", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--metrics", action="store_true", help="connect with metrics on")
    parser.add_argument("--tracing", choices=("noop", "sdk"), help="connect with tracing on")
    parser.add_argument("--versions", action="store_true", help='subscribe versions="strict"')
    parser.add_argument(
        "--interleave", action="store_true", help="off / metrics / tracing / both, interleaved"
    )
    args = parser.parse_args()
    if args.versions:
        SUBSCRIBE["versions"] = "strict"
    if args.interleave:
        interleaved(args.envelopes, args.aggregates, args.runs)
        return
    if args.metrics:
        from prometheus_client import CollectorRegistry

        TELEMETRY["metrics"] = CollectorRegistry()
    if args.tracing == "noop":
        TELEMETRY["tracing"] = True
    elif args.tracing == "sdk":
        from opentelemetry.sdk.trace import TracerProvider

        TELEMETRY["tracing"] = TracerProvider()

    sample = _envelope(1, 1)
    data = sample.to_bytes()
    rows: dict[str, list[float]] = {k: [] for k in ("e2e", "p99", "consume", "dispatch")}
    rows.update({"construct": [], "encode": [], "decode": []})
    violations = duplicates = lost = 0
    for _ in range(args.runs):
        gc.collect()
        rate, p99, deliveries, missing = asyncio.run(end_to_end(args.envelopes, args.aggregates))
        violations += deliveries.order_violations
        duplicates += deliveries.duplicates
        lost += missing
        rows["e2e"].append(rate)
        rows["p99"].append(p99)
        rows["consume"].append(asyncio.run(consume_only(args.envelopes, args.aggregates)))
        rows["dispatch"].append(asyncio.run(dispatcher_only(args.envelopes, args.aggregates)))
        rows["construct"].append(per_call(lambda: _envelope(1, 1)))
        rows["encode"].append(per_call(sample.to_bytes))
        rows["decode"].append(per_call(lambda: keybus.Envelope.from_bytes(data)))

    med = {k: statistics.median(v) for k, v in rows.items()}
    print(
        f"keybus memory benchmark: {args.envelopes} envelopes, {args.aggregates} aggregates, "
        f"telemetry: {', '.join(f'{k}={v!r}' for k, v in TELEMETRY.items()) or 'off'}, "
        f"subscribe: {SUBSCRIBE or 'defaults'}, "
        f"median of {args.runs} runs (end to end, all runs: {violations} order violations, "
        f"{duplicates} duplicates, {lost} lost)"
    )
    print(
        f"  end to end (publish -> ordered handler -> commit): {med['e2e']:>10,.0f} envelopes/s"
        f"   (runs: {', '.join(f'{r:,.0f}' for r in rows['e2e'])})"
    )
    print(f"  end-to-end latency p99:                          {med['p99']:>10.1f} ms")
    consume = med["consume"] * 1e6
    dispatch = med["dispatch"] * 1e6
    print(
        f"  consume path per envelope:                       {consume:>10.2f} us"
        f"   ({1 / med['consume']:,.0f}/s)"
    )
    print(
        f"  dispatcher (keyed lanes) per message:            {dispatch:>10.2f} us"
        f"   ({dispatch / consume:.0%} of the consume path)"
    )
    for name in ("construct", "encode", "decode"):
        print(f"  envelope {name:<10} per envelope:               {med[name] * 1e6:>10.2f} us")
    if violations or lost:
        raise SystemExit(f"{violations} order violations, {lost} envelopes lost")


if __name__ == "__main__":
    main()
