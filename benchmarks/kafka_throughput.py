"""Kafka end-to-end envelope throughput: keybus next to raw confluent-kafka, in one run.

    tools/kafka/kafka.sh up
    .venv/bin/python benchmarks/kafka_throughput.py [--envelopes 100000] [--aggregates 1000]
                                                    [--partitions 3] [--runs 3] [--phases]
                                                    [--versions]

Each run uses a fresh topic with ``--partitions`` partitions and a fresh group, and the
figures are medians over ``--runs`` runs, the three sides' order rotating from run to run:

- raw: the same envelope bytes, keys and headers produced with a bare confluent-kafka
  Producer (same settings as keybus's producer: idempotent, acks=all, lz4, linger.ms=2,
  batch.num.messages) **fire-and-forget** — ``produce()`` as fast as librdkafka accepts,
  ``poll(0)`` now and then, one ``flush()`` at the end; nobody waits for an ack — and
  consumed by a bare Consumer in a thread that commits every batch asynchronously; no
  ordering, no decoding, no dispatch, no asyncio. That is what a raw baseline does, and
  it is the upper bound; keybus's ``publish`` returns only after the broker's ack.
- keybus: 1000 aggregates publish versions 1..n concurrently through ``publish_envelope``
  (each aggregate in order, every publish awaiting its ack: at most one publish in
  flight per aggregate), one ordered envelope subscription on another bus handles them
  (decode, keyed lanes, done tracking, commit) in the same process and event loop.

Both sides start the clock only when they are ready to stream: the consumer has its
partitions (keybus: ``subscribe`` returned; raw: the first assignment arrived) and the
producer has its idempotent producer id (one record to a warm-up topic acknowledged —
librdkafka takes ~0.5 s for that on a new handle, which would otherwise land in the
first measured publishes). Throughput = envelopes / (last handled - first publish),
both ``perf_counter``. Latency (wall clock): raw = consume time - the record's
CreateTime (set by ``produce()``, ms resolution); keybus = handler start - the moment
``publish_envelope`` was called for that envelope. p50/p99 over every envelope. The two
latency figures describe different loads (raw dumps everything at once into
librdkafka's queue, keybus keeps ≤ 1 publish in flight per aggregate), so compare
throughput, and read latency per side.

Each side runs with the harness's pre-built inputs (100k envelopes, or their records)
frozen out of the garbage collector (``keybus.bench.scenario.static_inputs``): no
service holds them, and otherwise every full collection the measured code triggers walks
them too. Neither side's own objects are exempt.

``--phases`` adds keybus alone per direction: publish only (same 1000 concurrent
publishers, no subscriber) and consume only (a topic prefilled by the raw producer).
``--versions`` subscribes keybus with ``versions="strict"`` (the version guard, its
versions kept in a store topic).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import statistics
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from confluent_kafka import Consumer, Producer

import keybus
from keybus.bench.scenario import Deliveries, backend_url, percentile, static_inputs
from keybus.envelope import envelope_headers
from keybus.transports.kafka import bootstrap_servers

URL = backend_url("kafka")  # KEYBUS_KAFKA_URL, else the broker `make brokers` starts
# Subscribe options of keybus's consumers: --versions adds versions="strict".
SUBSCRIBE: dict[str, Any] = {}
BOOTSTRAP = bootstrap_servers(URL)
PRODUCER = {
    "bootstrap.servers": BOOTSTRAP,
    "enable.idempotence": True,
    "acks": "all",
    "compression.type": "lz4",
    "linger.ms": 2,
    "batch.num.messages": 10000,
    "partitioner": "fnv1a_random",  # as keybus's producer
}
WARMUP_TOPIC = f"kb-bench-warmup-{uuid.uuid4().hex[:6]}"


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


def _records(envelopes: list[keybus.Envelope]) -> list[tuple[str, bytes, dict[str, bytes]]]:
    # Exactly what keybus's publish_envelope sends: key, value and headers.
    return [(e.aggregate_id, e.to_bytes(), envelope_headers(e)) for e in envelopes]


async def _topic(partitions: int) -> str:
    topic = f"kb-bench-{uuid.uuid4().hex[:10]}"
    async with keybus.connect(URL) as admin:
        await admin.ensure_topic(topic, keybus.TopicConfig(partitions=partitions))
    return topic


async def _drop(*topics: str) -> None:
    async with keybus.connect(URL) as admin:
        for topic in topics:
            await admin.delete_topic(topic)
            await admin.delete_topic(f"{topic}.dlq")
            await admin.delete_topic(f"{topic}.dlq.versions")  # --versions' store


def _quantiles(latencies: list[float]) -> tuple[float, float]:
    ordered = sorted(latencies)
    return percentile(ordered, 0.50) * 1000, percentile(ordered, 0.99) * 1000


def _produce_all(producer: Producer, topic: str, records: list[Any]) -> None:
    for i, (key, value, headers) in enumerate(records):
        while True:
            try:
                producer.produce(topic, value, key, headers=headers)
                break
            except BufferError:
                producer.poll(0.001)
        if i % 1000 == 0:
            producer.poll(0)


def _warm_producer() -> Producer:
    producer = Producer(PRODUCER)
    producer.produce(WARMUP_TOPIC, b"warm-up")
    if producer.flush(30):
        raise RuntimeError("raw producer warm-up not acknowledged")
    return producer


def _raw_consumer(topic: str, assigned: threading.Event) -> Consumer:
    """A bare consumer of ``topic`` in a fresh group; ``assigned`` is set on assignment."""
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
    consumer.subscribe([topic], on_assign=lambda c, partitions: assigned.set())
    return consumer


def raw_run(topic: str, records: list[Any]) -> tuple[float, float, float]:
    """Returns (envelopes/s, p50 ms, p99 ms)."""
    total = len(records)
    latencies: list[float] = []
    assigned = threading.Event()
    finished = threading.Event()
    stop = threading.Event()
    ended = [0.0]
    consumer = _raw_consumer(topic, assigned)

    def consume() -> None:
        seen = 0
        while seen < total and not stop.is_set():
            batch = consumer.consume(500, 0.1)
            now = time.time()
            for record in batch:
                if record.error() is None:
                    latencies.append(now - record.timestamp()[1] / 1000.0)
                    seen += 1
            if batch:
                consumer.commit(asynchronous=True)
        if seen == total:
            ended[0] = time.perf_counter()
            finished.set()

    thread = threading.Thread(target=consume, name="raw-consumer")
    thread.start()
    try:
        producer = _warm_producer()
        if not assigned.wait(30):
            raise RuntimeError("raw consumer got no assignment")
        started = time.perf_counter()
        _produce_all(producer, topic, records)
        producer.flush(60)
        if not finished.wait(120):
            raise RuntimeError("raw consumer did not see every record within 120 s")
    finally:
        stop.set()  # else a failed run's consumer thread spins on and the process never exits
        thread.join()
        consumer.close()
    producer.close()
    return (total / (ended[0] - started), *_quantiles(latencies))


async def raw_asyncio_run(
    topic: str, records: list[Any], aggregates: int
) -> tuple[float, float, float]:
    """The same records through bare confluent-kafka wired into asyncio the plain way, as
    a service without keybus would: 1000 concurrent producer coroutines, each awaiting
    its delivery report (a future per record, a poll(0) pump task), and a consumer thread
    handing batches to the loop, where one task awaits a trivial async handler per record
    in arrival order (no decoding, no per-key lanes, no concurrency, no retries); the
    consumer thread commits asynchronously after each handled batch. Returns
    (envelopes/s, p50 ms, p99 ms)."""
    loop = asyncio.get_running_loop()
    total = len(records)
    latencies: list[float] = []
    sent: dict[bytes, float] = {}
    batches: asyncio.Queue[list[Any]] = asyncio.Queue()
    assigned = threading.Event()
    stop = threading.Event()
    ended = 0.0
    consumer = _raw_consumer(topic, assigned)

    handled_batch = threading.Event()

    def fetch() -> None:
        while not stop.is_set():
            if handled_batch.is_set():
                # Committed here, not from the loop: a commit() on the loop thread while
                # this thread is inside consume() was seen to block.
                handled_batch.clear()
                consumer.commit(asynchronous=True)
            batch = consumer.consume(500, 0.1)
            if batch:
                loop.call_soon_threadsafe(batches.put_nowait, batch)

    async def handler(value: bytes) -> None:
        latencies.append(time.time() - sent[value])

    async def consume() -> None:
        nonlocal ended
        seen = 0
        while seen < total:
            batch = await batches.get()
            for record in batch:
                if record.error() is None:
                    await handler(record.value())
                    seen += 1
            handled_batch.set()
        ended = time.perf_counter()

    producer = _warm_producer()

    async def pump() -> None:
        while True:
            # Delivery reports wait in librdkafka's queue until polled (keybus pumps too).
            served = producer.poll(0)
            await asyncio.sleep(0 if served else 0.001)

    def delivered(future: asyncio.Future[None], err: Any, msg: Any) -> None:
        if err is None:
            future.set_result(None)
        else:
            future.set_exception(RuntimeError(str(err)))

    async def produce(rows: list[Any]) -> None:
        for key, value, headers in rows:
            future = loop.create_future()
            sent[value] = time.time()
            producer.produce(
                topic, value, key, headers=headers, on_delivery=functools.partial(delivered, future)
            )
            await future

    by_key: dict[str, list[Any]] = {}
    for row in records:
        by_key.setdefault(row[0], []).append(row)
    thread = threading.Thread(target=fetch, name="raw-asyncio-consumer")
    thread.start()
    pumping = asyncio.create_task(pump())
    try:
        if not await asyncio.to_thread(assigned.wait, 30):
            raise RuntimeError("raw consumer got no assignment")
        consuming = asyncio.create_task(consume())
        started = time.perf_counter()
        await asyncio.gather(*(produce(rows) for rows in by_key.values()))
        await asyncio.wait_for(consuming, 120)
    finally:
        stop.set()
        await asyncio.to_thread(thread.join)
        pumping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pumping
        consumer.close()
        producer.flush(10)
    return (total / (ended - started), *_quantiles(latencies))


def _by_aggregate(envelopes: list[keybus.Envelope]) -> list[list[keybus.Envelope]]:
    by_aggregate: dict[str, list[keybus.Envelope]] = {}
    for envelope in envelopes:
        by_aggregate.setdefault(envelope.aggregate_id, []).append(envelope)
    return list(by_aggregate.values())


async def keybus_run(
    topic: str, envelopes: list[keybus.Envelope]
) -> tuple[float, float, float, int, int, int]:
    """Returns (envelopes/s, p50 ms, p99 ms, order violations, duplicates, lost)."""
    total = len(envelopes)
    latencies: list[float] = []
    sent: dict[str, float] = {}
    deliveries = Deliveries()
    done = asyncio.Event()
    ended = 0.0

    async def handler(envelope: keybus.Envelope) -> None:
        nonlocal ended
        latencies.append(time.time() - sent[envelope.event_id])
        if deliveries.record(envelope.aggregate_id, envelope.event_version):
            ended = time.perf_counter()
            if deliveries.delivered == total:
                done.set()

    async with (
        keybus.connect(URL) as publisher,
        keybus.connect(URL, group=f"kb-{uuid.uuid4().hex[:8]}") as consumer,
    ):
        await consumer.subscribe_envelope(topic, handler, **SUBSCRIBE)
        await publisher.publish(WARMUP_TOPIC, b"warm-up")

        async def publish(items: list[keybus.Envelope]) -> None:
            for item in items:
                sent[item.event_id] = time.time()
                await publisher.publish_envelope(topic, item)

        started = time.perf_counter()
        await asyncio.gather(*(publish(items) for items in _by_aggregate(envelopes)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 120)
    delivered = deliveries.delivered
    return (
        delivered / (ended - started) if delivered else 0.0,
        *_quantiles(latencies),
        deliveries.order_violations,
        deliveries.duplicates,
        total - delivered,
    )


async def keybus_publish_only(topic: str, envelopes: list[keybus.Envelope]) -> float:
    async with keybus.connect(URL) as publisher:
        await publisher.publish(WARMUP_TOPIC, b"warm-up")

        async def publish(items: list[keybus.Envelope]) -> None:
            for item in items:
                await publisher.publish_envelope(topic, item)

        started = time.perf_counter()
        await asyncio.gather(*(publish(items) for items in _by_aggregate(envelopes)))
        return len(envelopes) / (time.perf_counter() - started)


BATCH = 5000  # envelopes per publish_many call


async def keybus_publish_many(topic: str, envelopes: list[keybus.Envelope]) -> float:
    """``publish_many`` in batches of :data:`BATCH`, one after the other (each returns
    when all of its records are acknowledged)."""
    async with keybus.connect(URL) as publisher:
        await publisher.publish(WARMUP_TOPIC, b"warm-up")
        started = time.perf_counter()
        for at in range(0, len(envelopes), BATCH):
            await publisher.publish_many(topic, envelopes[at : at + BATCH])
        return len(envelopes) / (time.perf_counter() - started)


def raw_publish_only(topic: str, records: list[Any]) -> float:
    """The fire-and-forget producer alone: produce everything, then one flush."""
    producer = _warm_producer()
    try:
        started = time.perf_counter()
        _produce_all(producer, topic, records)
        if producer.flush(120):
            raise RuntimeError("raw publishes not all acknowledged")
        return len(records) / (time.perf_counter() - started)
    finally:
        producer.close()


def _prefill(topic: str, records: list[Any]) -> None:
    producer = _warm_producer()
    _produce_all(producer, topic, records)
    producer.flush(60)
    producer.close()


def raw_consume_only(topic: str, records: list[Any]) -> float:
    """A bare threaded consumer on a pre-filled topic that decodes each record's JSON
    (msgspec, as keybus does) and commits asynchronously per batch: the consume-side
    baseline doing comparable work (no ordering, lanes or done tracking)."""
    _prefill(topic, records)
    total = len(records)
    assigned = threading.Event()
    decode = msgspec.json.decode
    consumer = _raw_consumer(topic, assigned)
    started = time.perf_counter()
    seen = 0
    try:
        while seen < total and time.perf_counter() - started < 120:
            batch = consumer.consume(500, 0.1)
            for record in batch:
                if record.error() is None:
                    decode(record.value() or b"null")
                    seen += 1
            if batch:
                consumer.commit(asynchronous=True)
        if seen < total:
            raise RuntimeError("raw consumer did not see every record within 120 s")
        return total / (time.perf_counter() - started)
    finally:
        consumer.close()


async def keybus_consume_only(topic: str, envelopes: list[keybus.Envelope]) -> float:
    records = _records(envelopes)
    await asyncio.to_thread(_prefill, topic, records)
    records.clear()  # not this phase's input any more: keep it out of the heap
    total = len(envelopes)
    handled = 0
    done = asyncio.Event()

    async def handler(envelope: keybus.Envelope) -> None:
        nonlocal handled
        handled += 1
        if handled == total:
            done.set()

    with static_inputs():
        async with keybus.connect(URL, group=f"kb-{uuid.uuid4().hex[:8]}") as consumer:
            started = time.perf_counter()  # includes the group join: ~0.1 s
            await consumer.subscribe_envelope(topic, handler, **SUBSCRIBE)
            await asyncio.wait_for(done.wait(), 120)
            return total / (time.perf_counter() - started)


Rows = list[tuple[float, float, float]]
BusRows = list[tuple[float, float, float, int, int, int]]


async def _raw_in_thread(topic: str, records: list[Any]) -> tuple[float, float, float]:
    return await asyncio.to_thread(raw_run, topic, records)


async def _measure(partitions: int, rows: list[Any], run: Callable[[str], Awaitable[Any]]) -> None:
    """One side of one run, on a fresh topic, with the harness's inputs frozen."""
    topic = await _topic(partitions)
    with static_inputs():
        rows.append(await run(topic))
    await _drop(topic)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--envelopes", type=int, default=100_000)
    parser.add_argument("--aggregates", type=int, default=1000)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--phases", action="store_true", help="also keybus per direction")
    parser.add_argument("--versions", action="store_true", help='subscribe versions="strict"')
    args = parser.parse_args()
    if args.versions:
        SUBSCRIBE["versions"] = "strict"
    async with keybus.connect(URL) as admin:
        await admin.ensure_topic(WARMUP_TOPIC, keybus.TopicConfig(partitions=1))
    raw: Rows = []
    raw_async: Rows = []
    bus: BusRows = []
    pub_only: list[float] = []
    pub_many: list[float] = []
    raw_pub: list[float] = []
    con_only: list[float] = []
    raw_con: list[float] = []
    try:
        for run in range(args.runs):
            envelopes = _envelopes(args.envelopes, args.aggregates)
            records = _records(envelopes)

            sides: list[tuple[list[Any], Callable[[str], Awaitable[Any]]]] = [
                (raw, functools.partial(_raw_in_thread, records=records)),
                (
                    raw_async,
                    functools.partial(raw_asyncio_run, records=records, aggregates=args.aggregates),
                ),
                (bus, functools.partial(keybus_run, envelopes=envelopes)),
            ]
            # Rotate the order so no side always runs first (on a colder process/broker).
            for rows, measure in sides[run % 3 :] + sides[: run % 3]:
                await _measure(args.partitions, rows, measure)
            del sides, records  # the phases below do not use them
            line = (
                f"run {run + 1}: raw {raw[-1][0]:>9,.0f}/s p99 {raw[-1][2]:7.1f} ms | "
                f"raw asyncio {raw_async[-1][0]:>9,.0f}/s p99 {raw_async[-1][2]:7.1f} ms | "
                f"keybus {bus[-1][0]:>9,.0f}/s p99 {bus[-1][2]:7.1f} ms, "
                f"{bus[-1][3]} order violations, {bus[-1][4]} duplicates, {bus[-1][5]} lost"
            )
            if args.phases:
                topic = await _topic(args.partitions)
                with static_inputs():
                    pub_only.append(await keybus_publish_only(topic, envelopes))
                await _drop(topic)
                topic = await _topic(args.partitions)
                with static_inputs():
                    pub_many.append(await keybus_publish_many(topic, envelopes))
                await _drop(topic)
                topic = await _topic(args.partitions)
                raw_pub.append(
                    await asyncio.to_thread(raw_publish_only, topic, _records(envelopes))
                )
                await _drop(topic)
                topic = await _topic(args.partitions)
                con_only.append(await keybus_consume_only(topic, envelopes))
                await _drop(topic)
                topic = await _topic(args.partitions)
                raw_con.append(
                    await asyncio.to_thread(raw_consume_only, topic, _records(envelopes))
                )
                await _drop(topic)
                line += (
                    f" | publish only {pub_only[-1]:,.0f}/s, publish_many {pub_many[-1]:,.0f}/s, "
                    f"raw publish {raw_pub[-1]:,.0f}/s, consume only {con_only[-1]:,.0f}/s, "
                    f"raw consume {raw_con[-1]:,.0f}/s"
                )
            print(line, flush=True)
    finally:
        await _drop(WARMUP_TOPIC)

    def row(name: str, rows: list[Any], note: str) -> str:
        return (
            f"  {name:<20} {statistics.median(r[0] for r in rows):>9,.0f} envelopes/s   "
            f"p50 {statistics.median(r[1] for r in rows):7.1f} ms   "
            f"p99 {statistics.median(r[2] for r in rows):7.1f} ms   {note}\n"
        )

    raw_rate = statistics.median(r[0] for r in raw)
    async_rate = statistics.median(r[0] for r in raw_async)
    bus_rate = statistics.median(b[0] for b in bus)
    print(
        f"\n{args.envelopes:,} envelopes, {args.aggregates} aggregates, "
        f"{args.partitions} partitions, median of {args.runs} runs:\n"
        + row("raw confluent-kafka", raw, "(threads, fire-and-forget produce)")
        + row("raw asyncio", raw_async, "(acks awaited, one sequential handler)")
        + row(
            "keybus (ordered)",
            bus,
            f"order violations {sum(b[3] for b in bus)}, duplicates {sum(b[4] for b in bus)}, "
            f"lost {sum(b[5] for b in bus)}",
        )
        + f"  keybus / raw         {bus_rate / raw_rate:.2f}\n"
        f"  keybus / raw asyncio {bus_rate / async_rate:.2f}"
    )
    if args.phases:
        many_rate, raw_pub_rate = statistics.median(pub_many), statistics.median(raw_pub)
        print(
            f"  keybus publish only  {statistics.median(pub_only):>9,.0f} envelopes/s"
            f"   (1000 concurrent publishers, each awaiting its ack)\n"
            f"  keybus publish_many  {statistics.median(pub_many):>9,.0f} envelopes/s"
            f"   (batches of {BATCH}, each awaited)\n"
            f"  raw publish only     {statistics.median(raw_pub):>9,.0f} envelopes/s"
            f"   (fire-and-forget produce, one flush)\n"
            f"  publish_many / raw publish {many_rate / raw_pub_rate:.2f}; "
            f"publish / raw publish {statistics.median(pub_only) / raw_pub_rate:.2f}\n"
            f"  keybus consume only  {statistics.median(con_only):>9,.0f} envelopes/s"
            f"   (prefilled topic, from subscribe to last handled)\n"
            f"  raw consume only     {statistics.median(raw_con):>9,.0f} envelopes/s"
            f"   (threaded, JSON decoded, commit per batch)\n"
            f"  consume only / raw consume "
            f"{statistics.median(con_only) / statistics.median(raw_con):.2f}"
        )
    if sum(b[3] + b[5] for b in bus):
        raise SystemExit("order violated or envelopes lost")


if __name__ == "__main__":
    asyncio.run(main())
