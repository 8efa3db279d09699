"""What ``versions="strict"`` costs a consumer, its versions kept in the broker or not.

    .venv/bin/python benchmarks/versions_cost.py [--url kafka://127.0.0.1:9092]
        [--envelopes 50000] [--aggregates 1000] [--runs 5]

One topic is prefilled with ``--envelopes`` envelopes (``--aggregates`` aggregates,
versions 1..n each, in order); then, ``--runs`` times, each side consumes all of it in a
fresh group, the sides alternating: the defaults, and ``versions="strict"``. Reported:
the median envelopes/s from ``subscribe`` returned to the last handled (and how long
``subscribe`` took: a store topic is made then), and — where the transport
keeps the versions in a store (Kafka) — the store records written per envelope and how
long after the last handled envelope its commit was made (the flush the commits wait
for).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from typing import Any

import keybus
from keybus.bench.scenario import backend_url


def _envelope(aggregate: int, version: int) -> keybus.Envelope:
    return keybus.Envelope(
        aggregate_id=f"agg-{aggregate}",
        event_type="OrderChanged",
        event_version=version,
        payload={"amount": 12.5, "n": version},
    )


async def _consume(
    url: str, topic: str, total: int, options: dict[str, Any]
) -> tuple[float, float, float]:
    """(envelopes/s from subscribed to the last handled, seconds from the last handled to
    its commit, seconds subscribe took)."""
    done = asyncio.Event()
    handled = 0

    async def handler(envelope: keybus.Envelope) -> None:
        nonlocal handled
        handled += 1
        if handled == total:
            done.set()

    async with keybus.connect(url, group=f"kb-cost-{uuid.uuid4().hex[:8]}") as bus:
        began = time.perf_counter()
        await bus.subscribe_envelope(topic, handler, **options)
        started = time.perf_counter()
        await asyncio.wait_for(done.wait(), 300)
        ended = time.perf_counter()
        deadline = time.monotonic() + 30
        while True:  # the commit of the last one reported
            lag = await bus.lag(topic)
            if all(row.lag == 0 for row in lag.partitions):
                break
            if time.monotonic() >= deadline:
                # Not a figure: the deadline's 30 s would be reported as the commit delay.
                raise SystemExit("FAILED: the last envelope's commit not seen within 30 s")
            await asyncio.sleep(0.01)
        committed = time.perf_counter()
    return total / (ended - started), committed - ended, started - began


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=backend_url("kafka"))
    parser.add_argument("--envelopes", type=int, default=50_000)
    parser.add_argument("--aggregates", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    topic = f"kb-cost-{uuid.uuid4().hex[:8]}"
    sides: dict[str, dict[str, Any]] = {"defaults": {}, "strict": {"versions": "strict"}}
    rates: dict[str, list[float]] = {side: [] for side in sides}
    commits: dict[str, list[float]] = {side: [] for side in sides}
    subscribes: dict[str, list[float]] = {side: [] for side in sides}
    async with keybus.connect(args.url) as admin:
        await admin.ensure_topic(topic, keybus.TopicConfig(partitions=3))
        per = args.envelopes // args.aggregates
        batch = [_envelope(a, v) for v in range(1, per + 1) for a in range(args.aggregates)]
        for start in range(0, len(batch), 5000):
            await admin.publish_many(topic, batch[start : start + 5000])
        total = len(batch)
        try:
            for run in range(args.runs):
                order = list(sides) if run % 2 == 0 else list(reversed(sides))
                for side in order:
                    rate, commit, subscribe = await _consume(args.url, topic, total, sides[side])
                    rates[side].append(rate)
                    commits[side].append(commit)
                    subscribes[side].append(subscribe)
            store = f"{topic}.dlq.versions"
            # (the bus's private read: the benchmark counts what the core wrote)
            written = len(await admin._read_topic(store))
        finally:
            for name in (topic, f"{topic}.dlq", f"{topic}.dlq.versions"):
                await admin.delete_topic(name)
    print(
        f"{total} envelopes, {args.aggregates} aggregates, {args.url.split(':')[0]}, "
        f"median of {args.runs} runs per side (alternating)"
    )
    for side in sides:
        runs = ", ".join(f"{r:,.0f}" for r in rates[side])
        print(
            f"  {side:9} {statistics.median(rates[side]):>9,.0f} envelopes/s   (runs: {runs});"
            f" last commit {statistics.median(commits[side]) * 1000:.0f} ms after the last"
            f" handled; subscribe {statistics.median(subscribes[side]) * 1000:.0f} ms"
        )
    strict, plain = statistics.median(rates["strict"]), statistics.median(rates["defaults"])
    print(
        f"  strict / defaults {strict / plain:.2f}; versions store records: {written} "
        f"({written / (total * args.runs):.3f} per envelope handled with strict)"
    )


if __name__ == "__main__":
    asyncio.run(main())
