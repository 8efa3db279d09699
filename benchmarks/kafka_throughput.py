"""Kafka end-to-end envelope throughput: keybus next to raw confluent-kafka, in one run.

    tools/kafka/kafka.sh up
    .venv/bin/python benchmarks/kafka_throughput.py [--envelopes 100000] [--aggregates 1000]
                                                    [--partitions 3] [--runs 3]

Each run uses a fresh topic with ``--partitions`` partitions and a fresh group, and the
figures are medians over ``--runs`` runs, alternating raw and keybus:

- raw: the same envelope bytes, keys and headers produced with a bare confluent-kafka
  Producer (same settings: idempotent, acks=all, lz4, linger) as fast as it accepts
  them, and consumed by a bare Consumer in a thread that commits every batch
  asynchronously; no ordering, no dispatch, no asyncio.
- keybus: 1000 aggregates publish versions 1..n concurrently through ``publish_envelope``
  (each aggregate in order, every publish awaiting its ack), one ordered envelope
  subscription on another bus handles them (decode, keyed lanes, done tracking, commit).

Throughput = envelopes / (last handled - first publish). Latency = handler start (or
raw consume) minus the envelope's creation time (raw: the record's CreateTime, ms).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
import uuid

from confluent_kafka import Consumer, Producer

import keybus
from keybus.bench.scenario import percentile
from keybus.envelope import envelope_headers

BOOTSTRAP = "127.0.0.1:9092"
URL = f"kafka://{BOOTSTRAP}"
PRODUCER = {
    "bootstrap.servers": BOOTSTRAP,
    "enable.idempotence": True,
    "acks": "all",
    "compression.type": "lz4",
    "linger.ms": 2,
    "batch.num.messages": 10000,
}


def _envelopes(envelopes: int, aggregates: int) -> list[keybus.Envelope]:
    per = envelopes // aggregates
    return [
        keybus.Envelope(
            aggregate_id=f"agg-{a}",
            event_type="OrderChanged",
            event_version=v,
            payload={"amount": 12.5, "n": v},
        )
        for v in range(1, per + 1)
        for a in range(aggregates)
    ]


async def _topic(partitions: int) -> str:
    topic = f"kb-bench-{uuid.uuid4().hex[:10]}"
    async with keybus.connect(URL) as admin:
        await admin.ensure_topic(topic, keybus.TopicConfig(partitions=partitions))
    return topic


async def _drop(topic: str) -> None:
    async with keybus.connect(URL) as admin:
        await admin.delete_topic(topic)
        await admin.delete_topic(f"{topic}.dlq")


def raw_run(topic: str, envelopes: list[keybus.Envelope]) -> tuple[float, float]:
    """Returns (envelopes/s, p99 latency ms)."""
    records = [(e.aggregate_id, e.to_bytes(), list(envelope_headers(e).items())) for e in envelopes]
    total = len(records)
    latencies: list[float] = []
    finished = threading.Event()
    ended = [0.0]
    consumer = Consumer(
        {
            "bootstrap.servers": BOOTSTRAP,
            "group.id": f"raw-{uuid.uuid4().hex[:8]}",
            "partition.assignment.strategy": "cooperative-sticky",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 100,
        }
    )
    consumer.subscribe([topic])

    def consume() -> None:
        seen = 0
        while seen < total:
            batch = consumer.consume(500, 0.1)
            now = time.time()
            for record in batch:
                if record.error() is None:
                    latencies.append(now - record.timestamp()[1] / 1000.0)
                    seen += 1
            if batch:
                consumer.commit(asynchronous=True)
        ended[0] = time.perf_counter()
        finished.set()

    thread = threading.Thread(target=consume, name="raw-consumer")
    thread.start()
    producer = Producer(PRODUCER)
    started = time.perf_counter()
    for i, (key, value, headers) in enumerate(records):
        while True:
            try:
                producer.produce(topic, value, key, headers=headers)
                break
            except BufferError:
                producer.poll(0.001)
        if i % 1000 == 0:
            producer.poll(0)
    producer.flush(60)
    finished.wait(120)
    thread.join()
    consumer.close()
    producer.close()
    return total / (ended[0] - started), percentile(latencies, 99) * 1000


async def keybus_run(topic: str, envelopes: list[keybus.Envelope]) -> tuple[float, float, int]:
    """Returns (envelopes/s, p99 latency ms, order violations)."""
    total = len(envelopes)
    latencies: list[float] = []
    last: dict[str, int] = {}
    violations = 0
    handled = 0
    done = asyncio.Event()
    ended = 0.0

    async def handler(envelope: keybus.Envelope) -> None:
        nonlocal handled, violations, ended
        latencies.append(time.time() - envelope.timestamp.timestamp())
        if envelope.event_version != last.get(envelope.aggregate_id, 0) + 1:
            violations += 1
        last[envelope.aggregate_id] = envelope.event_version
        handled += 1
        if handled == total:
            ended = time.perf_counter()
            done.set()

    by_aggregate: dict[str, list[keybus.Envelope]] = {}
    for envelope in envelopes:
        by_aggregate.setdefault(envelope.aggregate_id, []).append(envelope)
    async with (
        keybus.connect(URL) as publisher,
        keybus.connect(URL, group=f"kb-{uuid.uuid4().hex[:8]}") as consumer,
    ):
        await consumer.subscribe_envelope(topic, handler)

        async def publish(items: list[keybus.Envelope]) -> None:
            for item in items:
                await publisher.publish_envelope(topic, item)

        started = time.perf_counter()
        await asyncio.gather(*(publish(items) for items in by_aggregate.values()))
        await asyncio.wait_for(done.wait(), 120)
    return total / (ended - started), percentile(latencies, 99) * 1000, violations


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--envelopes", type=int, default=100_000)
    parser.add_argument("--aggregates", type=int, default=1000)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    raw: list[tuple[float, float]] = []
    bus: list[tuple[float, float, int]] = []
    for run in range(args.runs):
        envelopes = _envelopes(args.envelopes, args.aggregates)  # fresh timestamps
        topic = await _topic(args.partitions)
        raw.append(await asyncio.to_thread(raw_run, topic, envelopes))
        await _drop(topic)
        envelopes = _envelopes(args.envelopes, args.aggregates)
        topic = await _topic(args.partitions)
        bus.append(await keybus_run(topic, envelopes))
        await _drop(topic)
        print(
            f"run {run + 1}: raw {raw[-1][0]:>9,.0f}/s p99 {raw[-1][1]:7.1f} ms | "
            f"keybus {bus[-1][0]:>9,.0f}/s p99 {bus[-1][1]:7.1f} ms, "
            f"{bus[-1][2]} order violations",
            flush=True,
        )
    raw_rate = statistics.median(r[0] for r in raw)
    bus_rate = statistics.median(b[0] for b in bus)
    print(
        f"\n{args.envelopes:,} envelopes, {args.aggregates} aggregates, "
        f"{args.partitions} partitions, median of {args.runs} runs:\n"
        f"  raw confluent-kafka  {raw_rate:>9,.0f} envelopes/s   "
        f"p99 {statistics.median(r[1] for r in raw):7.1f} ms\n"
        f"  keybus (ordered)     {bus_rate:>9,.0f} envelopes/s   "
        f"p99 {statistics.median(b[1] for b in bus):7.1f} ms   "
        f"order violations {sum(b[2] for b in bus)}\n"
        f"  keybus / raw         {bus_rate / raw_rate:.2f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
