"""End-to-end latency at a fixed rate (the OpenMessaging Benchmark's method), not at
saturation: first the maximum end-to-end rate is measured, then an open-loop publisher
sends at a fraction of it (default 50 %) for ``--seconds``, and every envelope's latency
from its publish call to its handler's start is recorded.

    make brokers
    .venv/bin/python benchmarks/latency_at_rate.py --backend kafka [--seconds 30]
                                                   [--fraction 0.5] [--rate R] [--runs 1]

Open loop: the publisher fires each envelope at its scheduled moment (rate x elapsed)
without waiting for earlier acks, so a slow broker shows as latency, not as a lower
rate (a closed loop would hide it: "coordinated omission"). Publisher and subscriber
are two buses in this process, so both ends read one clock (``perf_counter``).
Reported: the rate asked and achieved, p50 / p99 / p99.9 / max, and anything lost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
import uuid

import keybus
from keybus.bench.scenario import backend_url
from keybus.bench.stats import percentile

AGGREGATES = 1000
SATURATION = 20_000  # envelopes of the maximum-rate measurement


async def _drop(url: str, topic: str) -> None:
    async with keybus.connect(url) as admin:
        await admin.delete_topic(topic)
        await admin.delete_topic(f"{topic}.dlq")


def _envelope(aggregate: int, version: int, sent: float) -> keybus.Envelope:
    return keybus.Envelope(
        aggregate_id=f"agg-{aggregate}",
        event_type="Tick",
        event_version=version,
        payload={"t": sent},
    )


async def maximum_rate(url: str) -> float:
    """End-to-end envelopes/s when everything is published at once (publish_many)."""
    topic = f"kb-lat-max-{uuid.uuid4().hex[:8]}"
    done = asyncio.Event()
    handled = 0

    async def handler(envelope: keybus.Envelope) -> None:
        nonlocal handled
        handled += 1
        if handled == SATURATION:
            done.set()

    async with keybus.connect(url, group=topic) as consumer, keybus.connect(url) as publisher:
        await consumer.subscribe_envelope(topic, handler, max_concurrency=1024)
        items = [_envelope(i % AGGREGATES, i // AGGREGATES + 1, 0.0) for i in range(SATURATION)]
        started = time.perf_counter()
        for at in range(0, SATURATION, 5000):
            await publisher.publish_many(topic, items[at : at + 5000])
        await asyncio.wait_for(done.wait(), 120)
        rate = SATURATION / (time.perf_counter() - started)
    await _drop(url, topic)  # once the consumer left: it would log the topic gone
    return rate


async def at_rate(url: str, rate: float, seconds: float) -> tuple[int, int, list[float], float]:
    """Publish at ``rate`` for ``seconds``; returns (sent, handled, latencies, achieved)."""
    topic = f"kb-lat-{uuid.uuid4().hex[:8]}"
    latencies: list[float] = []
    all_in = asyncio.Event()  # set when every envelope sent so far was handled
    expected = 0

    async def handler(envelope: keybus.Envelope) -> None:
        latencies.append(time.perf_counter() - envelope.payload["t"])
        if expected and len(latencies) >= expected:
            all_in.set()

    async with keybus.connect(url, group=topic) as consumer, keybus.connect(url) as publisher:
        await consumer.subscribe_envelope(topic, handler, max_concurrency=1024)
        await publisher.publish(f"{topic}.dlq", b"warm-up")  # (a producer's first ack is slow)
        versions = [0] * AGGREGATES
        pending: set[asyncio.Future[None]] = set()
        sent = 0
        started = time.perf_counter()
        total = int(rate * seconds)
        while sent < total:
            due = min(total, int((time.perf_counter() - started) * rate) + 1)
            while sent < due:
                aggregate = sent % AGGREGATES
                versions[aggregate] += 1
                item = _envelope(aggregate, versions[aggregate], time.perf_counter())
                future = asyncio.ensure_future(publisher.publish_envelope(topic, item))
                pending.add(future)
                future.add_done_callback(pending.discard)
                sent += 1
            await asyncio.sleep(0.001)
        achieved = sent / (time.perf_counter() - started)
        if pending:
            await asyncio.wait(pending, timeout=60)
        expected = sent
        if len(latencies) < sent:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_in.wait(), 60)
    await _drop(url, topic)
    return sent, len(latencies), latencies, achieved


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="memory", help="memory, kafka or nats")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--fraction", type=float, default=0.5, help="of the maximum rate")
    parser.add_argument("--rate", type=float, default=0.0, help="envelopes/s (skips the max)")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    url = backend_url(args.backend)
    rate = args.rate
    if not rate:
        maximum = await maximum_rate(url)
        rate = maximum * args.fraction
        print(f"{args.backend}: maximum end-to-end {maximum:,.0f} envelopes/s", flush=True)
    rows = []
    for run in range(args.runs):
        sent, handled, latencies, achieved = await at_rate(url, rate, args.seconds)
        ordered = sorted(latencies)
        row = [percentile(ordered, q) * 1000 for q in (0.5, 0.99, 0.999)] + [ordered[-1] * 1000]
        rows.append(row)
        print(
            f"run {run + 1}: asked {rate:,.0f}/s, achieved {achieved:,.0f}/s for "
            f"{args.seconds:g} s; {handled:,} of {sent:,} handled; latency ms "
            f"p50 {row[0]:.2f}  p99 {row[1]:.2f}  p99.9 {row[2]:.2f}  max {row[3]:.2f}",
            flush=True,
        )
        if handled < sent:
            raise SystemExit(f"{sent - handled} envelopes not handled")
    if args.runs > 1:
        p50, p99, p999, top = (statistics.median(r[i] for r in rows) for i in range(4))
        print(
            f"median of {args.runs}: p50 {p50:.2f}  p99 {p99:.2f}  "
            f"p99.9 {p999:.2f}  max {top:.2f} ms"
        )


if __name__ == "__main__":
    asyncio.run(main())
