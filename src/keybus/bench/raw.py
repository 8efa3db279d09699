"""The raw baselines: the same publish/consume work without a bus, so the bus's overhead
is a ratio from the same run.

Same as the keybus side: one publisher per aggregate sending its versions in order, each
publish awaiting the broker's ack; the same envelope bytes, key and headers keybus puts
on the wire (encoded at publish time, as keybus does); consumption in broker order with
one lane per partition and the same handler body. What the raw side does *not* do is
the bus's work: no decoding, no per-aggregate lanes across a partition, no done-prefix
tracking, no retries or dead letters, no bounded close.

- Kafka (confluent-kafka): a Producer with keybus's producer settings, delivery reports
  served by a ``poll(0)`` task on the loop; a Consumer in a thread handing batches of 500
  to the loop, committing asynchronously after each batch (the position, not a done
  prefix).
- NATS (nats-py): ``js.publish_async`` with each PubAck awaited; one durable pull consumer
  per partition (``AckPolicy.ALL``), pull requests of 512 with the next queued when half
  has arrived, the last message of each full request acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import threading
from collections.abc import Callable, Coroutine
from typing import Any, cast

import keybus
from keybus.bench.run import Run
from keybus.envelope import envelope_headers
from keybus.partitioning import key_partition

__all__ = ["RAW_CLIENTS", "delete_kafka_group", "raw_kafka", "raw_nats"]

FETCH_BATCH = 512  # NATS pull request size (as keybus's NatsOptions.fetch_batch)
MAX_ACK_PENDING = 4096  # NATS, per partition (as keybus's NatsOptions.max_ack_pending)
KAFKA_BATCH = 500  # records per consume() (as keybus's fetch_batch)
KAFKA_WAIT = 0.05  # the most one consume() waits for a full batch (as keybus's thread)
QUIET = {"log_level": 4}  # no informational lines of librdkafka's on stderr (keybus logs them)


# -- Kafka -------------------------------------------------------------------------------


def _admin_call(url: str, call: Callable[[Any], dict[Any, Any]]) -> None:
    """Run an AdminClient request and wait for every future it returns (in a thread;
    the client is dropped here, so its librdkafka threads end with it)."""
    from confluent_kafka.admin import AdminClient

    from keybus.transports.kafka import bootstrap_servers

    admin = AdminClient({"bootstrap.servers": bootstrap_servers(url), **QUIET})
    try:
        for future in call(admin).values():
            future.result(timeout=30)
    finally:
        del admin


async def delete_kafka_group(url: str, group: str) -> None:
    await asyncio.to_thread(_admin_call, url, lambda a: a.delete_consumer_groups([group]))


def _kafka_configs(url: str, group: str) -> tuple[dict[str, Any], dict[str, Any]]:
    from keybus.transports.kafka.config import KafkaSettings

    settings = KafkaSettings(url=url)
    # keybus's own producer settings; the consumer's as far as a plain consumer has them.
    producer = {k: v for k, v in settings.producer.items() if k != "logger"}
    consumer = {
        k: settings.consumer[k]
        for k in (
            "bootstrap.servers",
            "partition.assignment.strategy",
            "auto.offset.reset",
            "fetch.wait.max.ms",
            "session.timeout.ms",
            "heartbeat.interval.ms",
        )
    }
    producer["client.id"] = "keybus-bench-raw"
    return {**producer, **QUIET}, {
        **consumer,
        **QUIET,
        "group.id": group,
        "enable.auto.commit": False,
    }


async def raw_kafka(url: str, run: Run) -> None:
    from confluent_kafka import Consumer, KafkaException, Producer
    from confluent_kafka.cimpl import NewTopic

    plan, tracker = run.plan, run.tracker
    loop = asyncio.get_running_loop()
    partitions = plan.level.partitions
    new_topics = [NewTopic(t, partitions, 1) for t in plan.topics]
    new_topics.append(NewTopic(plan.warmup_topic, 1, 1))
    await asyncio.to_thread(_admin_call, url, lambda a: a.create_topics(new_topics))
    producer_config, consumer_config = _kafka_configs(url, plan.group)
    pending: dict[bytes, tuple[int, int]] = {}  # value -> (aggregate, version), in flight
    stop = threading.Event()
    commit_due = threading.Event()
    assigned = threading.Event()
    counted = [0]

    def on_assign(consumer: Any, assignment: list[Any]) -> None:
        counted[0] += len(assignment)
        if counted[0] >= partitions * len(plan.topics):
            assigned.set()

    consumer = Consumer(consumer_config)
    consumer.subscribe(plan.topics, on_assign=on_assign)
    lanes: dict[tuple[str, int], asyncio.Queue[Any]] = {}
    lane_tasks: list[asyncio.Task[None]] = []

    async def lane(queue: asyncio.Queue[Any]) -> None:
        while True:
            record = await queue.get()
            where = pending.pop(record.value(), None)
            if where is None:
                tracker.duplicates += 1
            else:
                await run.handle(*where)

    def dispatch(batch: list[Any]) -> None:
        for record in batch:
            if record.error() is not None:
                continue
            where = (record.topic(), record.partition())
            queue = lanes.get(where)
            if queue is None:
                queue = lanes[where] = asyncio.Queue()
                lane_tasks.append(asyncio.create_task(lane(queue), name=f"raw-lane-{where}"))
            queue.put_nowait(record)
        commit_due.set()

    def fetch() -> None:
        while not stop.is_set():
            if commit_due.is_set():
                commit_due.clear()
                with contextlib.suppress(KafkaException):  # nothing to commit yet
                    consumer.commit(asynchronous=True)
            batch = consumer.consume(KAFKA_BATCH, KAFKA_WAIT)
            if batch:
                loop.call_soon_threadsafe(dispatch, batch)

    producer = Producer(producer_config)

    async def pump() -> None:
        while True:  # delivery reports wait in librdkafka's queue until polled
            served = producer.poll(0)
            await asyncio.sleep(0 if served else 0.001)

    def delivered(future: asyncio.Future[None], err: Any, msg: Any) -> None:
        if future.done():
            return
        if err is None:
            future.set_result(None)
        else:
            future.set_exception(keybus.PublishError(msg.topic(), str(err)))

    async def send(topic: int, aggregate: int, envelope: keybus.Envelope) -> None:
        value = envelope.to_bytes()
        pending[value] = (aggregate, envelope.event_version)
        future = loop.create_future()
        producer.produce(
            plan.topics[topic],
            value,
            envelope.aggregate_id,
            headers=cast(Any, envelope_headers(envelope)),
            on_delivery=functools.partial(delivered, future),
        )
        await future

    thread = threading.Thread(target=fetch, name="keybus-bench-raw-consumer")
    thread.start()
    pumping = asyncio.create_task(pump(), name="keybus-bench-raw-pump")
    try:
        if not await asyncio.to_thread(assigned.wait, 30):
            raise RuntimeError("the raw consumer got no assignment within 30 s")
        warm = loop.create_future()  # the idempotent producer id, before the clock
        producer.produce(
            plan.warmup_topic, b"warm-up", on_delivery=functools.partial(delivered, warm)
        )
        await asyncio.wait_for(warm, 30)
        await run.stream(send)
    finally:
        stop.set()
        await asyncio.to_thread(thread.join)
        for task in [pumping, *lane_tasks]:
            task.cancel()
        await asyncio.gather(pumping, *lane_tasks, return_exceptions=True)
        await asyncio.to_thread(consumer.close)
        await asyncio.to_thread(producer.flush, 10)
        producer.close()
        topics = [*plan.topics, plan.warmup_topic]
        await run.cleanup(
            "delete topics",
            asyncio.to_thread(_admin_call, url, lambda a: a.delete_topics(topics)),
        )
        await run.cleanup(f"delete group {plan.group}", delete_kafka_group(url, plan.group))


# -- NATS --------------------------------------------------------------------------------


class _Puller:
    """Raw pull consuming of one durable consumer: requests of FETCH_BATCH, the next one
    queued when half of the previous has arrived; ``handle(data)`` per message in order,
    then ack (ALL) the last message of every full request."""

    def __init__(
        self,
        nc: Any,
        stream: str,
        consumer: str,
        handle: Callable[[bytes], Coroutine[Any, Any, None]],
    ) -> None:
        self.nc = nc
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.request = json.dumps({"batch": FETCH_BATCH, "expires": 10_000_000_000}).encode()
        self.handle = handle
        self.wake = asyncio.Event()
        self.requested = 0
        self.in_batch = 0
        self.last_reply = ""

    async def on_message(self, msg: Any) -> None:
        if not msg.reply:  # a status (408 request expired, 100 heartbeat...)
            self.requested = 0
            self.wake.set()
            return
        await self.handle(msg.data)
        self.requested -= 1
        self.in_batch += 1
        self.last_reply = msg.reply
        if self.in_batch == FETCH_BATCH:
            self.in_batch = 0
            await self.nc.publish(msg.reply, b"+ACK")
        if self.requested <= FETCH_BATCH // 2:
            self.wake.set()

    async def pull(self, inbox: str) -> None:
        while True:
            if self.requested <= FETCH_BATCH // 2:
                await self.nc.publish(self.subject, self.request, reply=inbox)
                self.requested += FETCH_BATCH
            self.wake.clear()
            if self.requested <= FETCH_BATCH // 2:
                continue
            await self.wake.wait()

    async def final_ack(self) -> None:
        if self.in_batch:
            await self.nc.request(self.last_reply, b"+ACK", timeout=5)


async def raw_nats(url: str, run: Run) -> None:
    from nats.js import api

    import nats
    from keybus.transports.nats import encode_headers

    plan, tracker = run.plan, run.tracker
    partitions = plan.level.partitions
    run_id = plan.prefix.rsplit("-", 1)[1]
    streams = [f"KBRAW_{run_id}_{i}" for i in range(plan.level.topics)]
    subjects = [f"kbraw.{run_id}.{i}" for i in range(plan.level.topics)]
    partition_of = [key_partition(a, partitions) for a in plan.aggregate_ids]
    pending: dict[bytes, tuple[int, int]] = {}

    async def handle(data: bytes) -> None:
        where = pending.pop(data, None)
        if where is None:
            tracker.duplicates += 1
        else:
            await run.handle(*where)

    nc = await nats.connect(url, skip_subject_validation=True, max_reconnect_attempts=0)
    js = nc.jetstream(publish_async_max_pending=8192)
    pullers: list[_Puller] = []
    tasks: list[asyncio.Task[None]] = []
    created: list[str] = []
    try:
        for stream, base in zip(streams, subjects, strict=True):
            await js.add_stream(
                name=stream,
                subjects=[f"{base}.*"],
                storage=api.StorageType.FILE,
                duplicate_window=120,
            )
            created.append(stream)
            for partition in range(partitions):
                name = f"raw_p{partition}"
                await js.add_consumer(
                    stream,
                    api.ConsumerConfig(
                        durable_name=name,
                        filter_subject=f"{base}.{partition}",
                        ack_policy=api.AckPolicy.ALL,
                        max_ack_pending=MAX_ACK_PENDING,
                    ),
                )
                puller = _Puller(nc, stream, name, handle)
                inbox = nc.new_inbox()
                await nc.subscribe(inbox, cb=puller.on_message)
                pullers.append(puller)
                tasks.append(asyncio.create_task(puller.pull(inbox), name="raw-nats-pull"))

        async def send(topic: int, aggregate: int, envelope: keybus.Envelope) -> None:
            data = envelope.to_bytes()
            wire = encode_headers(envelope.aggregate_id, envelope_headers(envelope))
            wire["Nats-Msg-Id"] = envelope.event_id
            pending[data] = (aggregate, envelope.event_version)
            subject = f"{subjects[topic]}.{partition_of[aggregate]}"
            future = await js.publish_async(subject, data, headers=wire)
            await future

        await run.stream(send)
        for puller in pullers:
            await puller.final_ack()  # every handled message acknowledged, as on close
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in created:
            await run.cleanup(f"delete stream {stream}", js.delete_stream(stream))
        await nc.close()


RAW_CLIENTS = {"kafka": ("confluent-kafka", raw_kafka), "nats": ("nats-py", raw_nats)}
"""backend -> (the raw client, its baseline)."""
