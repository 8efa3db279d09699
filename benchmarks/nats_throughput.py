"""End-to-end envelope throughput on NATS JetStream: keybus vs a raw nats-py baseline.

    tools/nats/nats.sh up
    .venv/bin/python benchmarks/nats_throughput.py --runs 3 [--bare]

Both sides move the same messages the same way, in the same process, alternating order:

* **Messages**: 100k envelopes of 1000 aggregates, 4 partitions (subject by the hash keybus
  routes keys with, ``keybus.partitioning.key_partition`` of the aggregate id), file
  storage. The baseline sends exactly the bytes keybus puts on the wire — the encoded
  envelope plus keybus's NATS headers (key, event headers, ``Nats-Msg-Id``) —
  pre-encoded before the clock starts. ``--bare`` adds a baseline without headers (the
  old figure) as a third row.
* **Publishing**: 1000 producers (one per aggregate, all concurrent), each publishing its
  envelopes in order and awaiting each PubAck before the next (pipelining depth 1000).
  keybus: ``publish_envelope``; baseline: nats-py ``js.publish_async`` + await the future.
* **Consuming**: one durable pull consumer per partition, ``AckPolicy.ALL``,
  ``max_ack_pending`` 4096, pull requests of 512 with a second request queued when half of
  the first has arrived (keybus's own pulling). Baseline: the callback counts the message
  and acks the last message of each full request (every message is acknowledged);
  keybus: ``subscribe_envelope`` with ordering on, the handler counts the envelope.
* **Warm-up**: each side first runs once with a tenth of the messages, not counted.
* **Garbage collection**: each side runs with its pre-built messages frozen out of the
  collector (`keybus.bench.scenario.static_inputs`); no service holds 100k of them.
* **Clock**: throughput = messages / (first publish → last message handled), both
  ``perf_counter`` in the handler; latency = just before the message's publish call →
  its handler ran (p99). Medians over the runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import api

import keybus
import nats
from keybus.bench.scenario import Deliveries, percentile, static_inputs
from keybus.envelope import envelope_headers
from keybus.partitioning import key_partition
from keybus.transports.nats import encode_headers

URL = os.environ.get("KEYBUS_NATS_URL", "nats://127.0.0.1:4222")
PARTITIONS = 4
FETCH_BATCH = 512
MAX_ACK_PENDING = 4096
PRODUCER_DEPTH = 1  # publishes in flight per producer (each awaits its PubAck)

Result = tuple[float, float, int, int, int]  # rate, p99, order violations, duplicates, lost


def _envelopes(total: int, aggregates: int) -> list[list[keybus.Envelope]]:
    per = total // aggregates
    return [
        [
            keybus.Envelope(aggregate_id=f"agg-{a}", event_type="E", event_version=v, payload={})
            for v in range(1, per + 1)
        ]
        for a in range(aggregates)
    ]


def _result(
    count: int,
    started: float,
    finished: float,
    latencies: list[float],
    delivered: int,
    violations: int = 0,
) -> Result:
    """``finished``: when the last distinct message was handled; ``latencies``: every
    handler call, duplicates included."""
    return (
        delivered / (finished - started) if delivered else 0.0,
        _p99(latencies),
        violations,
        len(latencies) - delivered,
        count - delivered,
    )


async def run_keybus(total: int, aggregates: int) -> Result:
    topic = f"kb-bench-{uuid.uuid4().hex[:8]}"
    batches = _envelopes(total, aggregates)
    with static_inputs():  # the pre-built messages are no part of the run
        count = sum(map(len, batches))
        sent: dict[str, float] = {}
        handled: list[tuple[str, float]] = []
        deliveries = Deliveries()
        last = [0.0]  # when the last distinct envelope was handled
        done = asyncio.Event()
        clock = time.perf_counter
        async with (
            keybus.connect(URL) as publisher,
            keybus.connect(URL, group="bench") as consumer,
        ):
            await publisher.ensure_topic(topic, keybus.TopicConfig(partitions=PARTITIONS))

            async def handler(envelope: keybus.Envelope) -> None:
                now = clock()
                handled.append((envelope.event_id, now))
                if deliveries.record(envelope.aggregate_id, envelope.event_version):
                    last[0] = now
                    if deliveries.delivered == count:
                        done.set()

            await consumer.subscribe_envelope(topic, handler, max_concurrency=256)

            async def produce(envelopes: list[keybus.Envelope]) -> None:
                for envelope in envelopes:
                    sent[envelope.event_id] = clock()
                    await publisher.publish_envelope(topic, envelope)

            started = clock()
            await asyncio.gather(*(produce(b) for b in batches))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 300)
        async with keybus.connect(URL) as admin:
            await admin.delete_topic(topic)
            await admin.delete_topic(f"{topic}.dlq")
        latencies = [t - sent[e] for e, t in handled]
        return _result(
            count, started, last[0], latencies, deliveries.delivered, deliveries.order_violations
        )


async def run_baseline(total: int, aggregates: int, *, headers: bool = True) -> Result:
    stream = f"BENCH_{uuid.uuid4().hex[:8]}"
    # The wire messages keybus sends, encoded before the clock starts.
    messages: list[list[tuple[str, bytes, dict[str, str] | None]]] = []
    for batch in _envelopes(total, aggregates):
        rows = []
        for e in batch:
            wire = encode_headers(e.aggregate_id, envelope_headers(e))
            wire["Nats-Msg-Id"] = e.event_id
            partition = key_partition(e.aggregate_id, PARTITIONS)
            rows.append((f"{stream}.{partition}", e.to_bytes(), wire if headers else None))
        messages.append(rows)
    with static_inputs():  # the pre-built messages are no part of the run
        count = sum(map(len, messages))
        sent: dict[bytes, float] = {}
        handled: list[tuple[bytes, float]] = []
        seen: set[bytes] = set()  # no order to check: the baseline does not keep one
        last = [0.0]  # when the last distinct message was handled
        done = asyncio.Event()
        clock = time.perf_counter

        nc = await nats.connect(URL, skip_subject_validation=True)  # as keybus connects
        js = nc.jetstream(publish_async_max_pending=8192)
        await js.add_stream(
            name=stream,
            subjects=[f"{stream}.*"],
            storage=api.StorageType.FILE,
            duplicate_window=120,
        )
        pullers = []
        for partition in range(PARTITIONS):
            name = f"bench_p{partition}"
            await js.add_consumer(
                stream,
                api.ConsumerConfig(
                    durable_name=name,
                    filter_subject=f"{stream}.{partition}",
                    ack_policy=api.AckPolicy.ALL,
                    max_ack_pending=MAX_ACK_PENDING,
                ),
            )
            pullers.append(await _puller(nc, stream, name, handled, seen, last, count, done))
        tasks = [asyncio.create_task(pull()) for pull, _ in pullers]

        async def produce(rows: list[tuple[str, bytes, dict[str, str] | None]]) -> None:
            for subject, data, wire in rows:
                sent[data] = clock()
                future = await js.publish_async(subject, data, headers=wire)
                await future

        started = clock()
        await asyncio.gather(*(produce(rows) for rows in messages))
        await asyncio.wait_for(done.wait(), 300)
        for _, final_ack in pullers:
            await final_ack()  # every message is acknowledged, as keybus's close() does
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await js.delete_stream(stream)
        await nc.close()
        return _result(count, started, last[0], [t - sent[d] for d, t in handled], len(seen))


async def _puller(
    nc: NatsClient,
    stream: str,
    consumer: str,
    handled: list[tuple[bytes, float]],
    seen: set[bytes],
    handled_last: list[float],
    count: int,
    done: asyncio.Event,
) -> tuple[Callable[[], Coroutine[Any, Any, None]], Callable[[], Coroutine[Any, Any, None]]]:
    """Raw pull consuming: requests of FETCH_BATCH, the next one queued when half of the
    previous has arrived; ack (ALL) the last message of every full request, and at the
    end the last one of the rest. Returns (pull loop, final ack)."""
    clock = time.perf_counter
    wake = asyncio.Event()
    state = {"requested": 0, "in_batch": 0}
    last = [""]

    async def on_message(msg: Msg) -> None:
        if not msg.reply:  # status (408 request expired, 100 heartbeat...)
            state["requested"] = 0
            wake.set()
            return
        now = clock()
        handled.append((msg.data, now))
        if msg.data not in seen:
            seen.add(msg.data)
            handled_last[0] = now
        state["requested"] -= 1
        state["in_batch"] += 1
        last[0] = msg.reply
        if state["in_batch"] == FETCH_BATCH:
            state["in_batch"] = 0
            await nc.publish(msg.reply, b"+ACK")
        if len(seen) == count:
            done.set()
        if state["requested"] <= FETCH_BATCH // 2:
            wake.set()

    inbox = nc.new_inbox()
    await nc.subscribe(inbox, cb=on_message)
    request = json.dumps({"batch": FETCH_BATCH, "expires": 10_000_000_000}).encode()
    subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"

    async def pull() -> None:
        while True:
            if state["requested"] <= FETCH_BATCH // 2:
                await nc.publish(subject, request, reply=inbox)
                state["requested"] += FETCH_BATCH
            wake.clear()
            if state["requested"] <= FETCH_BATCH // 2:
                continue
            await wake.wait()

    async def final_ack() -> None:
        if state["in_batch"]:
            await nc.request(last[0], b"+ACK", timeout=5)

    return pull, final_ack


def _p99(values: list[float]) -> float:
    return percentile(sorted(values), 0.99)


async def publish_rates(total: int, aggregates: int) -> tuple[float, float, float]:
    """Publishing alone, envelopes/s: keybus ``publish_many`` (batches of 5,000, each
    awaited), keybus ``publish_envelope`` from one producer per aggregate (each awaiting
    its PubAck), and raw nats-py ``publish_async`` of the same pre-encoded wire messages
    with every PubAck awaited at the end."""
    envelopes = [e for batch in _envelopes(total, aggregates) for e in batch]
    rates = []
    async with keybus.connect(URL) as bus:
        for mode in ("many", "each"):
            topic = f"kb-pub-{uuid.uuid4().hex[:8]}"
            await bus.ensure_topic(topic, keybus.TopicConfig(partitions=PARTITIONS))
            started = time.perf_counter()
            if mode == "many":
                for at in range(0, len(envelopes), 5000):
                    await bus.publish_many(topic, envelopes[at : at + 5000])
            else:

                async def produce(batch: list[keybus.Envelope], topic: str = topic) -> None:
                    for envelope in batch:
                        await bus.publish_envelope(topic, envelope)

                await asyncio.gather(*(produce(b) for b in _envelopes(total, aggregates)))
            rates.append(len(envelopes) / (time.perf_counter() - started))
            await bus.delete_topic(topic)
    stream = f"BENCH_{uuid.uuid4().hex[:8]}"
    rows = []
    for e in envelopes:
        wire = encode_headers(e.aggregate_id, envelope_headers(e))
        rows.append((f"{stream}.{key_partition(e.aggregate_id, PARTITIONS)}", e.to_bytes(), wire))
    nc = await nats.connect(URL, skip_subject_validation=True)
    js = nc.jetstream(publish_async_max_pending=8192)
    await js.add_stream(name=stream, subjects=[f"{stream}.*"], storage=api.StorageType.FILE)
    started = time.perf_counter()
    futures = [await js.publish_async(subject, data, headers=wire) for subject, data, wire in rows]
    await asyncio.gather(*futures)
    rates.append(len(rows) / (time.perf_counter() - started))
    await js.delete_stream(stream)
    await nc.close()
    return rates[0], rates[1], rates[2]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--aggregates", type=int, default=1000)
    parser.add_argument("--bare", action="store_true", help="also a baseline without headers")
    parser.add_argument("--publish", action="store_true", help="publishing rates only")
    args = parser.parse_args()
    if args.publish:
        rates: list[tuple[float, float, float]] = []
        for run in range(args.runs):
            rates.append(await publish_rates(args.messages, args.aggregates))
            many, each, raw = rates[-1]
            print(
                f"run {run + 1}: publish_many {many:,.0f}/s  publish_envelope {each:,.0f}/s  "
                f"raw publish_async {raw:,.0f}/s",
                flush=True,
            )
        many, each, raw = (statistics.median(r[i] for r in rates) for i in range(3))
        print(
            f"medians of {args.runs}: publish_many / raw {many / raw:.2f}, "
            f"publish_envelope / raw {each / raw:.2f}"
        )
        return

    async def bare(total: int, aggregates: int) -> Result:
        return await run_baseline(total, aggregates, headers=False)

    sides: dict[str, Callable[[int, int], Coroutine[Any, Any, Result]]] = {
        "keybus": run_keybus,
        "baseline": run_baseline,
    }
    if args.bare:
        sides["bare"] = bare
    results: dict[str, list[Result]] = {name: [] for name in sides}
    failures = 0
    # Not counted: the first run of each side in a process is slower (imports, first
    # streams on a fresh store), and keybus would always pay it (it runs first).
    for name in sides:
        await sides[name](args.messages // 10, args.aggregates // 10)
    for run in range(args.runs):
        # Alternate the order so neither side always runs on a warmer server.
        order = list(sides)[::-1] if run % 2 else list(sides)
        for name in order:
            result = await sides[name](args.messages, args.aggregates)
            rate, p99, violations, duplicates, lost = result
            results[name].append(result)
            failures += violations + lost
            print(
                f"run {run + 1} {name:8s} {rate:9.0f} msg/s  p99 {p99 * 1000:7.1f} ms  "
                f"{violations} order violations, {duplicates} duplicates, {lost} lost",
                flush=True,
            )
    print(f"\n{args.messages} envelopes, {args.aggregates} aggregates, medians of {args.runs}:")
    medians = {}
    for name, rows in results.items():
        rate = statistics.median(r[0] for r in rows)
        p99 = statistics.median(r[1] for r in rows)
        medians[name] = rate
        print(f"  {name:8s} {rate:9.0f} msg/s  p99 publish->handled {p99 * 1000:7.1f} ms")
    print(f"  keybus / baseline = {medians['keybus'] / medians['baseline']:.2f}")
    if "bare" in medians:
        print(f"  keybus / bare baseline (no headers) = {medians['keybus'] / medians['bare']:.2f}")
    if failures:
        raise SystemExit("order violated or messages lost")


if __name__ == "__main__":
    asyncio.run(main())
