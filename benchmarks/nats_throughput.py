"""End-to-end envelope throughput on NATS JetStream: keybus vs a raw nats-py baseline.

    tools/nats/nats.sh up
    .venv/bin/python benchmarks/nats_throughput.py --runs 3

keybus: 1000 aggregates publish their envelopes in order (all aggregates concurrently),
one subscription handles them with ordering on, acks after the handler. Baseline: the
same envelope bytes, JetStream publish with pipelined acks (publish_async), one pull
consumer fetching batches and acking each batch's last message (AckPolicy.ALL) — no
decoding, no ordering, no bus. Throughput = messages / (first publish → last handled);
latency = message stored (JetStream timestamp) or created (envelope timestamp) → handled.
Medians over the runs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from datetime import UTC, datetime

from nats.js import api

import keybus
import nats

URL = "nats://127.0.0.1:4222"


def _envelopes(total: int, aggregates: int) -> list[list[keybus.Envelope]]:
    per = total // aggregates
    return [
        [
            keybus.Envelope(aggregate_id=f"agg-{a}", event_type="E", event_version=v, payload={})
            for v in range(1, per + 1)
        ]
        for a in range(aggregates)
    ]


async def run_keybus(total: int, aggregates: int) -> tuple[float, float]:
    topic = f"kb-bench-{uuid.uuid4().hex[:8]}"
    latencies: list[float] = []
    done = asyncio.Event()
    async with (
        keybus.connect(URL) as publisher,
        keybus.connect(URL, group="bench") as consumer,
    ):
        await publisher.ensure_topic(topic, keybus.TopicConfig(partitions=4))

        async def handler(envelope: keybus.Envelope) -> None:
            latencies.append((datetime.now(UTC) - envelope.timestamp).total_seconds())
            if len(latencies) == total:
                done.set()

        await consumer.subscribe_envelope(topic, handler, max_concurrency=256)
        # Fresh timestamps: the latency counts from just before the publish.
        batches = _envelopes(total, aggregates)
        started = time.perf_counter()

        async def produce(envelopes: list[keybus.Envelope]) -> None:
            for envelope in envelopes:
                await publisher.publish_envelope(topic, envelope)

        await asyncio.gather(*(produce(b) for b in batches))
        await asyncio.wait_for(done.wait(), 300)
        elapsed = time.perf_counter() - started
    async with keybus.connect(URL) as admin:
        await admin.delete_topic(topic)
        await admin.delete_topic(f"{topic}.dlq")
    return total / elapsed, _p99(latencies)


async def run_baseline(total: int, aggregates: int) -> tuple[float, float]:
    stream = f"BENCH_{uuid.uuid4().hex[:8]}"
    payloads = [[e.to_bytes() for e in b] for b in _envelopes(total, aggregates)]
    nc = await nats.connect(URL)
    js = nc.jetstream(publish_async_max_pending=8192)
    await js.add_stream(name=stream, subjects=[f"{stream}.*"])
    sub = await js.pull_subscribe(
        f"{stream}.*",
        durable="bench",
        stream=stream,
        config=api.ConsumerConfig(ack_policy=api.AckPolicy.ALL, max_ack_pending=-1),
    )
    latencies: list[float] = []

    async def consume() -> None:
        while len(latencies) < total:
            try:
                msgs = await sub.fetch(512, timeout=1)
            except TimeoutError:
                continue
            now = time.time()
            for msg in msgs:
                latencies.append(now - msg.metadata.timestamp.timestamp())
            await msgs[-1].ack()

    consumer = asyncio.create_task(consume())
    started = time.perf_counter()

    async def produce(index: int, items: list[bytes]) -> None:
        for data in items:
            future = await js.publish_async(f"{stream}.{index % 4}", data)
            await future

    await asyncio.gather(*(produce(i, p) for i, p in enumerate(payloads)))
    await asyncio.wait_for(consumer, 300)
    elapsed = time.perf_counter() - started
    await js.delete_stream(stream)
    await nc.close()
    return total / elapsed, _p99(latencies)


def _p99(values: list[float]) -> float:
    values = sorted(values)
    return values[int(len(values) * 0.99) - 1] if values else float("nan")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--aggregates", type=int, default=1000)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {"keybus": [], "baseline": []}
    for run in range(args.runs):
        # Alternate the order so neither side always runs on a warmer server.
        order = ("baseline", "keybus") if run % 2 else ("keybus", "baseline")
        for name in order:
            fn = run_keybus if name == "keybus" else run_baseline
            rate, p99 = await fn(args.messages, args.aggregates)
            results[name].append((rate, p99))
            print(f"run {run + 1} {name:8s} {rate:9.0f} msg/s  p99 {p99 * 1000:7.1f} ms")
    print(f"\n{args.messages} envelopes, {args.aggregates} aggregates, medians of {args.runs}:")
    medians = {}
    for name, rows in results.items():
        rate = statistics.median(r for r, _ in rows)
        p99 = statistics.median(p for _, p in rows)
        medians[name] = rate
        print(f"  {name:8s} {rate:9.0f} msg/s  p99 end-to-end {p99 * 1000:7.1f} ms")
    print(f"  keybus / baseline = {medians['keybus'] / medians['baseline']:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
