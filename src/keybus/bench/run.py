"""One level x backend x client run, measured; and the keybus side of it.

A run: fresh topics and group (:class:`~keybus.bench.levels.Plan`), resources counted
before anything opens, one publisher per aggregate sending its versions in order (each
publish awaiting its ack), handlers noting what they see (:class:`~keybus.bench.stats.
Tracker`); it ends when every expected message was handled or at ``timeout`` (a failure,
with the counts), then everything is closed and deleted and the resources are counted
again, after ``close()`` returned (:class:`~keybus.bench.resources.Probe`). No sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import uuid
from collections.abc import Awaitable, Callable

import keybus
from keybus.bench.environment import BrokerProcess, load_average
from keybus.bench.levels import Level, Plan
from keybus.bench.resources import KINDS, Probe
from keybus.bench.results import Row
from keybus.bench.stats import Tracker, latency_summary

__all__ = ["Body", "Run", "Send", "backend_url", "broker_answers", "keybus_side", "measure"]

Send = Callable[[int, int, keybus.Envelope], Awaitable[None]]
"""``send(topic index, aggregate index, envelope)``: publish and wait for the ack."""


def backend_url(backend: str) -> str:
    """The URL of a local backend: ``KEYBUS_KAFKA_URL`` / ``KEYBUS_NATS_URL`` override the
    brokers ``make brokers`` starts; memory gets a fresh private name."""
    if backend == "memory":
        return f"memory://{uuid.uuid4().hex[:8]}"
    if backend == "kafka":
        return os.environ.get("KEYBUS_KAFKA_URL", "kafka://127.0.0.1:9092")
    if backend == "nats":
        return os.environ.get("KEYBUS_NATS_URL", "nats://127.0.0.1:4222")
    raise ValueError(f"unknown backend {backend!r}: use memory, kafka or nats")


async def broker_answers(url: str, timeout: float = 5.0) -> str | None:
    """None if a bus connects to ``url`` within ``timeout``, else why not (in one line:
    librdkafka's log of every refused connection attempt is held back meanwhile)."""
    client_log = logging.getLogger("keybus.kafka.librdkafka")
    level = client_log.level
    client_log.setLevel(logging.CRITICAL)
    try:
        async with keybus.connect(url, connect_timeout=timeout):
            return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        client_log.setLevel(level)


class Run:
    """What a side's body gets: the plan, the tracker, the streaming step and the
    handler's body, and a place to note cleanup failures."""

    def __init__(self, plan: Plan, timeout: float, broker: BrokerProcess | None) -> None:
        self.plan = plan
        self.tracker = Tracker(plan.counts)
        self.timeout = timeout
        self.broker = broker
        self.broker_cpu: float | None = None
        self.error: str | None = None
        self.cleanup_errors: list[str] = []
        self._handler_s = plan.level.handler_ms / 1000

    async def handle(self, aggregate: int, version: int) -> None:
        """A handler's body: note the start, do the level's work, note the end."""
        new = self.tracker.started(aggregate, version)
        if self._handler_s:
            await asyncio.sleep(self._handler_s)
        self.tracker.finished(new)

    async def stream(self, send: Send) -> None:
        """Publish every envelope, one publisher per aggregate in version order, and wait
        until all are handled or the timeout (then :attr:`error` says what came)."""
        plan, tracker = self.plan, self.tracker

        async def publisher(aggregate: int) -> None:
            topic = plan.topic_of(aggregate)
            for version in range(1, plan.counts[aggregate] + 1):
                envelope = plan.envelope(aggregate, version)
                tracker.published(aggregate, version, envelope.timestamp_ns)
                await send(topic, aggregate, envelope)
                tracker.acked()

        cpu = self.broker.cpu_seconds() if self.broker else None
        tracker.begin()
        try:
            async with asyncio.timeout(self.timeout):
                await asyncio.gather(*(publisher(i) for i in range(plan.level.aggregates)))
                await tracker.done.wait()
        except TimeoutError:
            self.error = (
                f"timeout after {self.timeout:g} s: {tracker.published_count} published, "
                f"{tracker.completed} of {tracker.expected} handled "
                f"({tracker.delivered} handler calls begun)"
            )
        tracker.stop_clock()
        after = self.broker.cpu_seconds() if self.broker else None
        if cpu is not None and after is not None:
            self.broker_cpu = (after - cpu) * 1000 / tracker.expected

    async def cleanup(self, what: str, step: Awaitable[object]) -> None:
        """Run a cleanup step; a failure is noted (the broker keeps garbage), not raised."""
        try:
            await step
        except Exception as exc:
            self.cleanup_errors.append(f"{what}: {type(exc).__name__}: {exc}")


Body = Callable[[str, Run], Awaitable[None]]
"""One side: ``body(url, run)`` sets up, calls ``run.stream``, closes and deletes."""


async def measure(
    level: Level,
    backend: str,
    client: str,
    repeat: int,
    url: str,
    body: Body,
    *,
    timeout: float,
    broker: BrokerProcess | None = None,
    progress: Callable[[Tracker], None] | None = None,
) -> Row:
    run = Run(Plan(level, uuid.uuid4().hex[:8]), timeout, broker)
    tracker = run.tracker
    probe = Probe(on_tick=(lambda: progress(tracker)) if progress else None)
    gc.collect()  # the previous run's garbage is not this run's to collect
    load_start = load_average()
    probe.start()
    try:
        await body(url, run)
    except Exception as exc:
        run.error = run.error or f"{type(exc).__name__}: {exc}"
    await probe.stop()
    workload = dataclasses.asdict(level)
    workload["level"] = workload.pop("name")
    return Row(
        backend=backend,
        client=client,
        repeat=repeat,
        **workload,
        delivered=tracker.delivered,
        lost=tracker.lost,
        duplicates=tracker.duplicates,
        order_violations=tracker.order_violations,
        publish_rate=tracker.publish_rate,
        throughput=tracker.throughput,
        publish_seconds=max(0.0, tracker.last_ack - tracker.first_publish),
        end_to_end_seconds=max(0.0, tracker.last_handled - tracker.first_publish),
        latency_ms=latency_summary(tracker.latencies),
        envelope_latency_ms=latency_summary(tracker.stamp_latencies),
        cpu_s_per_1k=tracker.cpu_s_per_1k,
        broker_cpu_s_per_1k=run.broker_cpu,
        rss_mb=dict(probe.rss_mb),
        resources={
            kind: {
                "before": probe.before.get(kind, 0),
                "peak": probe.peak.get(kind, 0),
                "after": probe.after.get(kind, 0),
            }
            for kind in KINDS
        },
        leftovers=probe.leftovers,
        leftover_report=probe.leftover_report,
        load_average={"start": load_start, "end": load_average()},
        error=run.error,
        cleanup_error="; ".join(run.cleanup_errors) or None,
    )


async def keybus_side(url: str, run: Run) -> None:
    """The bus: a publishing bus and a consuming bus (one group, an ordered envelope
    subscription per topic), both closed before the resources are counted again."""
    plan = run.plan
    topics = [*plan.topics, plan.warmup_topic]
    config = keybus.TopicConfig(partitions=plan.level.partitions)

    async def handler(envelope: keybus.Envelope) -> None:
        await run.handle(plan.index[envelope.aggregate_id], envelope.event_version)

    async def send(topic: int, aggregate: int, envelope: keybus.Envelope) -> None:
        await publisher.publish_envelope(plan.topics[topic], envelope)

    async with keybus.connect(url) as publisher:
        try:
            for name in topics:
                await publisher.ensure_topic(name, config)
            async with keybus.connect(url, group=plan.group) as consumer:
                for name in plan.topics:
                    await consumer.subscribe_envelope(name, handler)
                # The producer's first publish (Kafka: fetching its idempotent producer id)
                # happens before the clock starts, as on the raw side.
                await publisher.publish(plan.warmup_topic, b"warm-up")
                await run.stream(send)
        finally:
            for name in topics:
                await run.cleanup(f"delete {name}", publisher.delete_topic(name))
                await run.cleanup(f"delete {name}.dlq", publisher.delete_topic(f"{name}.dlq"))
    if url.startswith("kafka://"):
        from keybus.bench.raw import delete_kafka_group

        await run.cleanup(f"delete group {plan.group}", delete_kafka_group(url, plan.group))
