"""The Kafka transport, on confluent-kafka (librdkafka).

Threads. librdkafka's ``poll``/``consume`` block, and its callbacks (delivery reports,
rebalances, commit results) run inside them on the calling thread. So each librdkafka
handle that needs serving gets exactly one owned Python thread, joined in ``close()``:

- the producer thread serves delivery reports (``poll`` with a short timeout) and hands
  them to the event loop in one ``call_soon_threadsafe`` per poll, not one per message;
- one consumer thread per (bus, group) owns the shared consumer of all topics the bus
  subscribes to in that group: it applies subscription changes, consumes in batches,
  runs the rebalance callbacks and commits.

The admin client needs no thread of ours: its futures are completed by librdkafka's own
background thread and bridged with ``asyncio.wrap_future``. Every handle is destroyed in
``close()`` (``close()`` of consumer and producer, dropping the last reference of the
admin client), so librdkafka's native threads are gone afterwards.

Consuming. ``consumer(topic, group, sink)`` returns a per-topic facade onto the shared
consumer of the group. Subscribing adds the topic to the shared subscription, and all
changes made between two turns of the consumer thread go out as one ``subscribe`` call,
so a burst of subscribes costs one rebalance. With cooperative-sticky assignment that
rebalance is incremental: partitions of the other topics keep being consumed.

The consumer thread never waits for the core. It hands each fetched batch to the
facade's feeder task, which awaits ``sink.deliver``; when a facade's backlog grows, its
partitions are paused (and resumed once drained), so a slow subscription holds neither
the other topics nor the group's poll loop.

Rebalances. ``on_revoke`` runs on the consumer thread inside ``consume``. It runs the
facade's revoke on the event loop (``sink.revoke``: drop queued records, wait bounded for
running handlers, report the done prefix) and blocks the callback until that finished,
then commits those partitions synchronously, then releases them. Releasing before the
commit would let the next owner start behind the done prefix (duplicates) or, worse,
let a record of ours run after the partition moved.

Commits. ``Consumer.commit(message)`` only records ``offset + 1`` for the partition (the
core reports the end of the contiguous done prefix). The consumer thread commits what
changed asynchronously every ``commit_interval`` seconds, synchronously on revoke, on
``flush`` and before leaving the group. Auto-commit is off: only the core decides.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import gc
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from confluent_kafka import Consumer as _RdConsumer
from confluent_kafka import KafkaError, KafkaException, TopicCollection, TopicPartition
from confluent_kafka import Producer as _RdProducer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from keybus.errors import ConnectError, KeybusError, PublishError
from keybus.message import Message
from keybus.transports.base import Consumer, Partition, Sink, TopicConfig, Transport

__all__ = ["KafkaTransport"]

log = logging.getLogger("keybus.kafka")
_librdkafka_log = logging.getLogger("keybus.kafka.librdkafka")

_EPHEMERAL_RETENTION_MS = 15 * 60 * 1000  # "short retention" for TopicConfig(ephemeral=True)
_POLL_TIMEOUT = 0.05  # how long a thread may sit in librdkafka before it sees a stop/request
_BACKLOG_HIGH = 4096  # a facade's undelivered records above which its partitions pause
_BACKLOG_LOW = 1024  # ... and below which they resume

_PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,  # no duplicates or reordering from the producer's retries
    "acks": "all",
    "compression.type": "lz4",
    "linger.ms": 2,  # concurrent publishes share batches
    "batch.num.messages": 10000,
    # A publish resolves (ack or PublishError) within this, also while the broker is away.
    "message.timeout.ms": 30000,
    "socket.timeout.ms": 10000,
    "topic.metadata.refresh.interval.ms": 10000,
}

_CONSUMER_DEFAULTS: dict[str, Any] = {
    "partition.assignment.strategy": "cooperative-sticky",
    "enable.auto.commit": False,  # only the core's done prefix is ever committed
    "enable.auto.offset.store": False,
    # A new group starts at the earliest record: a message published after subscribe()
    # returned is then never skipped, even if it was written before this member's fetch
    # position was resolved ("latest" would resolve to an offset after it).
    "auto.offset.reset": "earliest",
    # librdkafka's heartbeat thread keeps the session; short timeouts so a crashed member's
    # partitions move within seconds, and a quick heartbeat so members see a rebalance soon.
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 250,
    "socket.timeout.ms": 10000,
    "topic.metadata.refresh.interval.ms": 5000,
    "fetch.wait.max.ms": 100,
    "queued.max.messages.kbytes": 16384,
    "enable.partition.eof": False,
}

_ROUTINE_COMMIT_ERRORS = frozenset(
    {
        KafkaError._NO_OFFSET,
        KafkaError.ILLEGAL_GENERATION,
        KafkaError.REBALANCE_IN_PROGRESS,
        KafkaError.UNKNOWN_MEMBER_ID,
    }
)


def _bootstrap(url: str) -> str:
    rest = url.split("://", 1)[1] if "://" in url else url
    servers = rest.split("/", 1)[0].split("?", 1)[0]
    if not servers:
        raise ConnectError(url, "no bootstrap server in the URL")
    return servers


def _reason(err: Any) -> str:
    if isinstance(err, KafkaException) and err.args and isinstance(err.args[0], KafkaError):
        err = err.args[0]
    if isinstance(err, KafkaError):
        return f"{err.name()}: {err.str()}"
    return str(err) or type(err).__name__


def _error_code(exc: BaseException) -> int | None:
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        code: int = exc.args[0].code()
        return code
    return None


class KafkaTransport(Transport):
    """``kafka://host:port[,host:port]``. Options (``keybus.connect(url, **options)``):

    ``producer_config`` / ``consumer_config`` / ``admin_config``: librdkafka settings
    merged over ours; ``commit_interval`` (s, 0.5): how often done offsets are committed
    asynchronously; ``fetch_batch`` (500): records per ``consume`` call;
    ``assign_timeout`` (s, 30): bound on a subscribe's group join; ``join_settle``
    (s, 3): how long a joining member that got no partition in the first round of a
    cooperative rebalance waits for the second; ``probe_timeout`` (s, 5): the metadata
    request that proves the broker is reachable at connect.
    """

    def __init__(
        self,
        url: str,
        *,
        producer_config: Mapping[str, Any] | None = None,
        consumer_config: Mapping[str, Any] | None = None,
        admin_config: Mapping[str, Any] | None = None,
        commit_interval: float = 0.5,
        fetch_batch: int = 500,
        assign_timeout: float = 30.0,
        join_settle: float = 3.0,
        probe_timeout: float = 5.0,
    ) -> None:
        self.url = url
        servers = _bootstrap(url)
        # librdkafka's own log lines go to Python logging (served by the polling threads;
        # the admin client's when we poll it after a request) instead of raw stderr.
        base = {"bootstrap.servers": servers, "client.id": "keybus", "logger": _librdkafka_log}
        self._producer_config = {**base, **_PRODUCER_DEFAULTS, **dict(producer_config or {})}
        self._consumer_config = {**base, **_CONSUMER_DEFAULTS, **dict(consumer_config or {})}
        self._admin_config = {**base, "socket.timeout.ms": 10000, **dict(admin_config or {})}
        if commit_interval <= 0 or fetch_batch < 1 or assign_timeout <= 0 or probe_timeout <= 0:
            raise ValueError("commit_interval, fetch_batch, assign_timeout, probe_timeout > 0")
        self._commit_interval = float(commit_interval)
        self._fetch_batch = int(fetch_batch)
        self._assign_timeout = float(assign_timeout)
        self._join_settle = max(0.0, float(join_settle))
        self._probe_timeout = float(probe_timeout)
        self._admin: AdminClient | None = None
        self._producer: _ProducerThread | None = None
        self._groups: dict[str, list[_GroupConsumer]] = {}
        self._closed = False

    # -- connect / admin -------------------------------------------------------------

    async def connect(self) -> None:
        try:
            self._admin = AdminClient(dict(self._admin_config))
        except KafkaException as exc:
            raise ConnectError(self.url, _reason(exc)) from exc
        # librdkafka retries unreachable brokers forever; a metadata request with a
        # deadline is what tells "down" from "slow" within a bounded time.
        future = self._admin.describe_cluster(request_timeout=self._probe_timeout)
        try:
            await asyncio.wait_for(asyncio.wrap_future(future), self._probe_timeout + 1.0)
        except TimeoutError:
            future.cancel()
            raise ConnectError(
                self.url, f"no Kafka broker answered within {self._probe_timeout:g} s"
            ) from None
        except KafkaException as exc:
            raise ConnectError(self.url, _reason(exc)) from exc
        finally:
            self._admin.poll(0)

    def _admin_client(self) -> AdminClient:
        if self._admin is None or self._closed:
            raise KeybusError(f"the Kafka transport {self.url} is closed")
        self._admin.poll(0)  # hand queued librdkafka log lines to logging
        return self._admin

    async def _topic_state(self, topic: str) -> int | None:
        """The topic's partition count once every partition has a leader, else None."""
        futures = self._admin_client().describe_topics(
            TopicCollection([topic]), request_timeout=5.0
        )
        try:
            description = await asyncio.wrap_future(futures[topic])
        except KafkaException as exc:
            if _error_code(exc) == KafkaError.UNKNOWN_TOPIC_OR_PART:
                return None
            raise
        partitions = description.partitions
        if not partitions or any(p.leader is None for p in partitions):
            return None
        return len(partitions)

    async def ensure_topic(self, topic: str, config: TopicConfig) -> None:
        settings: dict[str, str] = {}
        if config.retention_seconds is not None:
            settings["retention.ms"] = str(int(config.retention_seconds * 1000))
        elif config.ephemeral:
            settings["retention.ms"] = str(_EPHEMERAL_RETENTION_MS)
        if config.compression:
            settings["compression.type"] = config.compression
        new = NewTopic(
            topic,
            num_partitions=max(1, config.partitions),
            replication_factor=max(1, config.replication_factor),
            config=settings,
        )
        futures = self._admin_client().create_topics([new], request_timeout=10.0)
        try:
            await asyncio.wrap_future(futures[topic])
        except KafkaException as exc:
            if _error_code(exc) != KafkaError.TOPIC_ALREADY_EXISTS:
                raise KeybusError(f"cannot create topic {topic!r}: {_reason(exc)}") from exc
        # The controller acknowledged; wait until the broker serves the topic's metadata,
        # so a consumer subscribing next sees every partition in its first metadata reply.
        await self._until(lambda: self._topic_state(topic), present=True, topic=topic)

    async def delete_topic(self, topic: str) -> None:
        futures = self._admin_client().delete_topics([topic], request_timeout=10.0)
        try:
            await asyncio.wrap_future(futures[topic])
        except KafkaException as exc:
            if _error_code(exc) != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise KeybusError(f"cannot delete topic {topic!r}: {_reason(exc)}") from exc
        await self._until(lambda: self._topic_state(topic), present=False, topic=topic)

    async def _until(
        self, state: Callable[[], Any], *, present: bool, topic: str, timeout: float = 15.0
    ) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            try:
                exists = (await state()) is not None
            except KafkaException:
                exists = not present  # a transient admin error: ask again
            if exists == present:
                return
            if time.monotonic() > deadline:
                what = "appear" if present else "disappear"
                raise KeybusError(f"topic {topic!r} did not {what} within {timeout:g} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    # -- publish ---------------------------------------------------------------------

    async def publish(
        self, topic: str, value: bytes, key: str | None, headers: Mapping[str, bytes]
    ) -> None:
        producer = self._producer
        if producer is None:
            if self._closed:
                raise PublishError(topic, "the Kafka transport is closed")
            producer = self._producer = _ProducerThread(
                self._producer_config, asyncio.get_running_loop(), self.url
            )
        await producer.publish(topic, value, key, headers)

    # -- consume ---------------------------------------------------------------------

    def consumer(self, topic: str, group: str, sink: Sink) -> Consumer:
        if self._closed:
            raise KeybusError(f"the Kafka transport {self.url} is closed")
        members = self._groups.setdefault(group, [])
        # One shared consumer per group for every topic; a second subscription to the same
        # topic in the same group is a second member, like another process would be.
        for shared in members:
            if not shared.closing and topic not in shared.facades:
                break
        else:
            shared = _GroupConsumer(self, group)
            members.append(shared)
        return KafkaConsumer(shared, topic, sink)

    def _forget(self, shared: _GroupConsumer) -> None:
        members = self._groups.get(shared.group)
        if members and shared in members:
            members.remove(shared)
            if not members:
                del self._groups[shared.group]

    # -- close -----------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        shared = [s for members in self._groups.values() for s in members]
        self._groups.clear()
        await asyncio.gather(*(s.shutdown() for s in shared))
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.close()
        if self._admin is not None:
            # The admin client has no close(): dropping the last reference destroys the
            # handle (and joins its native threads); collect in case a cycle holds it.
            self._admin = None
            gc.collect()


# -- producing -----------------------------------------------------------------------


def _report(
    reports: list[tuple[asyncio.Future[None], Any, str]], future: Any, err: Any, msg: Any
) -> None:
    # Runs on the producer thread inside poll(); the batch goes to the loop afterwards.
    reports.append((future, err, msg.topic() if msg is not None else ""))


class _ProducerThread:
    """The idempotent producer and the one thread that serves its delivery reports."""

    def __init__(
        self, config: Mapping[str, Any], loop: asyncio.AbstractEventLoop, url: str
    ) -> None:
        self._loop = loop
        self._url = url
        self._producer: _RdProducer | None = _RdProducer(dict(config))
        self._reports: list[tuple[asyncio.Future[None], Any, str]] = []
        self._stop = threading.Event()
        self._done: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(target=self._run, name="keybus-kafka-producer", daemon=True)
        self._thread.start()

    async def publish(
        self, topic: str, value: bytes, key: str | None, headers: Mapping[str, bytes]
    ) -> None:
        producer = self._producer
        if producer is None:
            raise PublishError(topic, "the Kafka transport is closed")
        future: asyncio.Future[None] = self._loop.create_future()
        callback = functools.partial(_report, self._reports, future)
        header_list: list[tuple[str, str | bytes | None]] | None = (
            list(headers.items()) if headers else None
        )
        deadline = 0.0
        while True:
            try:
                producer.produce(topic, value, key, headers=header_list, on_delivery=callback)
                break
            except BufferError:
                # librdkafka's local queue is full: this is flow control, not a retry of
                # a failed send. Give the I/O threads time to drain it, boundedly.
                now = time.monotonic()
                if not deadline:
                    deadline = now + 30.0
                elif now > deadline:
                    raise PublishError(topic, "local producer queue stayed full") from None
                await asyncio.sleep(0.005)
            except KafkaException as exc:
                raise PublishError(topic, _reason(exc)) from exc
            except (TypeError, ValueError) as exc:
                raise PublishError(topic, str(exc)) from exc
        await future

    def _deliver_reports(self, reports: list[tuple[asyncio.Future[None], Any, str]]) -> None:
        for future, err, topic in reports:
            if future.done():
                continue
            if err is None:
                future.set_result(None)
            else:
                error = PublishError(topic, _reason(err))
                error.__cause__ = KafkaException(err)
                future.set_exception(error)

    def _flush_reports(self) -> None:
        if self._reports:
            # Swap on this thread: only this thread's poll() appends to the list.
            batch = self._reports[:]
            del self._reports[:]
            self._call(self._deliver_reports, batch)

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            self._loop.call_soon_threadsafe(fn, *args)

    def _run(self) -> None:
        producer = self._producer
        assert producer is not None
        try:
            while not self._stop.is_set():
                producer.poll(_POLL_TIMEOUT)
                self._flush_reports()
            # Publishes still in flight get their ack (or error) before the handle goes.
            producer.flush(5.0)
            self._flush_reports()
            producer.purge()
            producer.poll(0)
            self._flush_reports()
            producer.close()
        except Exception:  # pragma: no cover - librdkafka failure: never leave the loop waiting
            log.exception("keybus: Kafka producer thread failed")
        finally:
            del producer
            self._call(_set_done, self._done)

    async def close(self) -> None:
        self._stop.set()
        self._producer = None  # the thread holds the last reference and destroys the handle
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._done), 10.0)
        self._thread.join(1.0)


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# -- consuming -----------------------------------------------------------------------


class _GroupConsumer:
    """One librdkafka consumer of one group for all topics a bus subscribes to, and the
    thread that serves it. Shared state between the loop and the thread is guarded by
    ``_lock``; librdkafka calls are made on the thread only."""

    def __init__(self, transport: KafkaTransport, group: str) -> None:
        self.transport = transport
        self.group = group
        self.loop = asyncio.get_running_loop()
        self.facades: dict[str, KafkaConsumer] = {}
        # Facades taken out of the subscription whose partitions may still be revoked.
        self._detached: dict[str, KafkaConsumer] = {}
        self.closing = False
        self._lock = threading.Lock()
        self._subscription_dirty = False
        self._sub_seq = 0  # bumped by every subscription change
        self._applied_seq = 0  # last change handed to librdkafka (thread side)
        self._flush_requests: list[concurrent.futures.Future[None]] = []
        self._wanted: dict[tuple[str, int], int] = {}  # next offset to commit, per partition
        self._committed: dict[tuple[str, int], int] = {}  # confirmed by the broker
        self._assigned: dict[str, set[int]] = {}  # thread side
        self._paused: set[str] = set()  # topics whose partitions are paused (thread side)
        self._stop = threading.Event()
        self._consumer: _RdConsumer | None = None
        self._thread: threading.Thread | None = None
        self._done: asyncio.Future[None] = self.loop.create_future()

    # -- loop side ------------------------------------------------------------------

    def attach(self, facade: KafkaConsumer) -> int:
        with self._lock:
            self.facades[facade.topic] = facade
            self._sub_seq += 1
            self._subscription_dirty = True
            seq = self._sub_seq
        if self._thread is None:
            config = {
                **self.transport._consumer_config,
                "group.id": self.group,
                "on_commit": self._on_commit,
            }
            self._consumer = _RdConsumer(config)
            self._thread = threading.Thread(
                target=self._run, name=f"keybus-kafka-consumer:{self.group}", daemon=True
            )
            self._thread.start()
        return seq

    async def detach(self, facade: KafkaConsumer) -> None:
        """Take the topic out of the subscription; returns once its partitions are
        released (or, for the last topic, once the consumer left the group)."""
        with self._lock:
            if self.facades.get(facade.topic) is facade:
                del self.facades[facade.topic]
                self._detached[facade.topic] = facade
                self._sub_seq += 1
                self._subscription_dirty = True
            last = not self.facades
        if last:
            await self.shutdown()
        elif facade.owned:
            await facade.released.wait()

    def record_commit(self, topic: str, partition: int, offset: int) -> None:
        with self._lock:
            tp = (topic, partition)
            if offset > self._wanted.get(tp, -1):
                self._wanted[tp] = offset

    async def flush(self) -> None:
        if self._thread is None or self._stop.is_set():
            return
        request: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._lock:
            self._flush_requests.append(request)
        await asyncio.wrap_future(request)

    async def shutdown(self) -> None:
        if self.closing:
            if self._thread is not None:
                await asyncio.shield(self._done)
            return
        self.closing = True
        self.transport._forget(self)
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._done), 15.0)
        except TimeoutError:
            log.error("keybus: Kafka consumer of group %s did not stop in time", self.group)
        thread.join(1.0)

    # -- thread side ----------------------------------------------------------------

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(fn, *args)

    def _run_on_loop(self, coro: Any, timeout: float) -> None:
        """Run ``coro`` on the event loop and wait for it (bounded) on this thread."""
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError:
            coro.close()
            return
        try:
            future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            log.error("keybus: rebalance step of group %s did not finish in time", self.group)
        except Exception:
            log.exception("keybus: rebalance step of group %s failed", self.group)

    def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        batch = self.transport._fetch_batch
        interval = self.transport._commit_interval
        next_commit = time.monotonic() + interval
        try:
            while not self._stop.is_set():
                self._apply_subscription(consumer)
                self._apply_backpressure(consumer)
                self._serve_flushes(consumer)
                now = time.monotonic()
                if now >= next_commit:
                    self._commit(consumer, None, asynchronous=True)
                    next_commit = now + interval
                records = consumer.consume(batch, _POLL_TIMEOUT)
                if records:
                    self._dispatch(records)
            self._serve_flushes(consumer)
            with contextlib.suppress(KafkaException):  # logged; the broker keeps the last
                self._commit(consumer, None, asynchronous=False)
            # Leaving the group runs on_revoke for what we still own (commit, release).
            consumer.close()
        except Exception:  # pragma: no cover - never leave the loop waiting on a dead thread
            log.exception("keybus: Kafka consumer thread of group %s failed", self.group)
            with contextlib.suppress(Exception):
                consumer.close()
        finally:
            self._consumer = None
            del consumer
            with self._lock:
                requests, self._flush_requests = self._flush_requests, []
            for request in requests:
                if not request.done():
                    request.set_result(None)
            self._call(_set_done, self._done)

    def _apply_subscription(self, consumer: _RdConsumer) -> None:
        if not self._subscription_dirty:
            return
        with self._lock:
            topics = sorted(self.facades)
            seq = self._sub_seq
            self._subscription_dirty = False
        if topics:
            consumer.subscribe(
                topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
            )
        else:
            consumer.unsubscribe()
        self._applied_seq = seq

    def _apply_backpressure(self, consumer: _RdConsumer) -> None:
        for topic, partitions in self._assigned.items():
            facade = self.facades.get(topic)
            should_pause = facade is None or facade.stopped or facade.backlog > _BACKLOG_HIGH
            if topic in self._paused:
                if facade is not None and not facade.stopped and facade.backlog < _BACKLOG_LOW:
                    consumer.resume([TopicPartition(topic, p) for p in partitions])
                    self._paused.discard(topic)
            elif should_pause and partitions:
                consumer.pause([TopicPartition(topic, p) for p in partitions])
                self._paused.add(topic)

    def _dispatch(self, records: list[Any]) -> None:
        by_topic: dict[str, list[Message]] = {}
        for record in records:
            error = record.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("keybus: Kafka consumer of %s: %s", self.group, _reason(error))
                continue
            topic = record.topic()
            raw_key = record.key()
            key: str | None
            if raw_key is None:
                key = None
            elif isinstance(raw_key, bytes):
                key = raw_key.decode("utf-8", "replace")
            else:
                key = str(raw_key)
            raw_headers = record.headers()
            headers = (
                {k: (v if v is not None else b"") for k, v in raw_headers} if raw_headers else {}
            )
            kind, stamp = record.timestamp()
            message = Message(
                topic,
                record.value() or b"",
                key,
                headers,
                record.partition(),
                record.offset(),
                stamp / 1000.0 if kind else None,
                record,
            )
            chunk = by_topic.get(topic)
            if chunk is None:
                chunk = by_topic[topic] = []
            chunk.append(message)
        for topic, messages in by_topic.items():
            facade = self.facades.get(topic)
            if facade is not None and not facade.stopped:
                facade.pushed += len(messages)
                self._call(facade._push, messages)
            # else: nobody consumes the topic any more; nothing is committed for it, so
            # the next owner of its partitions gets these records again.

    def _serve_flushes(self, consumer: _RdConsumer) -> None:
        if not self._flush_requests:
            return
        with self._lock:
            requests, self._flush_requests = self._flush_requests, []
        error: BaseException | None = None
        try:
            self._commit(consumer, None, asynchronous=False)
        except Exception as exc:  # reported to the waiter
            error = exc
        for request in requests:
            if error is None:
                request.set_result(None)
            else:
                request.set_exception(error)

    def _commit(
        self, consumer: _RdConsumer, only: Collection[tuple[str, int]] | None, *, asynchronous: bool
    ) -> None:
        with self._lock:
            offsets = [
                TopicPartition(topic, partition, offset)
                for (topic, partition), offset in self._wanted.items()
                if (only is None or (topic, partition) in only)
                and self._committed.get((topic, partition), -1) < offset
            ]
        if not offsets:
            return
        try:
            if asynchronous:
                consumer.commit(offsets=offsets, asynchronous=True)
                return
            result = consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            if _error_code(exc) == KafkaError._NO_OFFSET:
                return
            log.warning("keybus: commit for group %s failed: %s", self.group, _reason(exc))
            if not asynchronous:
                raise
            return
        if result:
            self._note_committed(result)

    def _note_committed(self, partitions: Iterable[Any]) -> None:
        with self._lock:
            for tp in partitions:
                if tp.error is None and tp.offset >= 0:
                    key = (tp.topic, tp.partition)
                    if tp.offset > self._committed.get(key, -1):
                        self._committed[key] = tp.offset

    def _on_commit(self, err: Any, partitions: list[Any]) -> None:
        if err is not None:
            # Offsets that did not make it stay wanted and go out with the next commit;
            # a rebalance in progress makes async commits fail routinely.
            if err.code() in _ROUTINE_COMMIT_ERRORS:
                log.debug("keybus: async commit for group %s: %s", self.group, _reason(err))
            else:
                log.warning(
                    "keybus: async commit for group %s failed: %s", self.group, _reason(err)
                )
            return
        self._note_committed(partitions)

    def _on_assign(self, consumer: _RdConsumer, partitions: list[Any]) -> None:
        consumer.incremental_assign(partitions)
        by_topic: dict[str, list[int]] = {}
        for tp in partitions:
            by_topic.setdefault(tp.topic, []).append(tp.partition)
            self._assigned.setdefault(tp.topic, set()).add(tp.partition)
        paused = [tp for tp in partitions if tp.topic in self._paused]
        if paused:
            consumer.pause(paused)
        # Assignments reach the loop before any record of these partitions (FIFO).
        self._call(self._assigned_on_loop, by_topic, self._applied_seq)

    def _assigned_on_loop(self, by_topic: dict[str, list[int]], seq: int) -> None:
        for facade in list(self.facades.values()):
            parts = by_topic.get(facade.topic)
            if parts:
                facade._assign(parts)
            if facade.seq <= seq:
                facade.rebalanced.set()

    def _on_revoke(self, consumer: _RdConsumer, partitions: list[Any]) -> None:
        self._release(consumer, partitions, lost=False)

    def _on_lost(self, consumer: _RdConsumer, partitions: list[Any]) -> None:
        # Someone else may own these already: drop our records, commit nothing.
        self._release(consumer, partitions, lost=True)

    def _release(self, consumer: _RdConsumer, partitions: list[Any], *, lost: bool) -> None:
        by_topic: dict[str, list[int]] = {}
        for tp in partitions:
            by_topic.setdefault(tp.topic, []).append(tp.partition)
        for topic, parts in by_topic.items():
            facade = self._facade(topic)
            if facade is not None:
                timeout = facade.revoke_timeout + 2.0
                self._run_on_loop(facade._revoke(parts), timeout)
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        if not lost:
            # Commit before release: the next owner starts exactly after our done prefix.
            try:
                self._commit(consumer, revoked, asynchronous=False)
            except Exception as exc:
                log.warning("keybus: commit on revoke for %s failed: %s", self.group, exc)
        with self._lock:
            for tp in revoked:
                self._wanted.pop(tp, None)
                self._committed.pop(tp, None)
        for topic, parts in by_topic.items():
            owned = self._assigned.get(topic)
            if owned is not None:
                owned.difference_update(parts)
                if not owned:
                    del self._assigned[topic]
                    self._paused.discard(topic)
        if lost:
            with contextlib.suppress(KafkaException):
                consumer.incremental_unassign(partitions)
        else:
            consumer.incremental_unassign(partitions)
        self._call(self._released_on_loop, set(by_topic))

    def _released_on_loop(self, topics: set[str]) -> None:
        for topic in topics:
            facade = self._facade(topic)
            if facade is not None and not facade.owned:
                facade.released.set()
                if self._detached.get(topic) is facade:
                    del self._detached[topic]

    def _facade(self, topic: str) -> KafkaConsumer | None:
        with self._lock:
            return self.facades.get(topic) or self._detached.get(topic)


class KafkaConsumer(Consumer):
    """One subscription's view of its group's shared consumer: feeds one topic to one
    sink, in offset order per partition."""

    def __init__(self, shared: _GroupConsumer, topic: str, sink: Sink) -> None:
        self._shared = shared
        self.topic = topic
        self._sink = sink
        self.revoke_timeout = float(getattr(getattr(sink, "options", None), "revoke_timeout", 10.0))
        self.owned: set[int] = set()  # partitions the core was told about (loop side)
        # Records handed over by the thread and not yet accepted by the core: each counter
        # has one writer (pushed: the thread, taken: the loop), so no update is lost.
        self.pushed = 0
        self.taken = 0
        self.stopped = False
        self.seq = 0
        self.rebalanced = asyncio.Event()
        self.released = asyncio.Event()
        self._has_partitions = asyncio.Event()
        self._queue: collections.deque[list[Message]] = collections.deque()
        self._wake = asyncio.Event()
        self._delivering: list[Message] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._feeder: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        self._feeder = asyncio.get_running_loop().create_task(
            self._feed(), name=f"keybus-kafka-feed:{self.topic}"
        )
        self.seq = self._shared.attach(self)
        transport = self._shared.transport
        deadline = time.monotonic() + transport._assign_timeout
        try:
            await asyncio.wait_for(self.rebalanced.wait(), transport._assign_timeout)
        except TimeoutError:
            raise KeybusError(
                f"no partition assignment for {self.topic!r} in group {self._shared.group!r} "
                f"within {transport._assign_timeout:g} s"
            ) from None
        if not self.owned:
            # Cooperative rebalancing hands a joining member its partitions in a second
            # round; a member may also rightly get none (more members than partitions).
            settle = min(transport._join_settle, max(0.0, deadline - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._has_partitions.wait(), settle)

    # -- called on the loop by the group consumer -------------------------------------

    def _assign(self, partitions: list[int]) -> None:
        self.owned.update(partitions)
        self.released.clear()
        self._has_partitions.set()
        self._sink.assign([(self.topic, p) for p in partitions])

    @property
    def backlog(self) -> int:
        return self.pushed - self.taken

    def _push(self, messages: list[Message]) -> None:
        if self.stopped:
            self.taken += len(messages)
            return
        self._queue.append(messages)
        self._wake.set()

    async def _revoke(self, partitions: list[int]) -> None:
        revoked = set(partitions)
        # Records of these partitions not yet handed to the core never will be.
        kept: collections.deque[list[Message]] = collections.deque()
        for chunk in self._queue:
            rest = [m for m in chunk if m.partition not in revoked]
            self.taken += len(chunk) - len(rest)
            if rest:
                kept.append(rest)
        self._queue = kept
        await self._sink.revoke([(self.topic, p) for p in partitions])
        self.owned.difference_update(revoked)
        # A batch the core is still taking in may hold records of these partitions; the
        # core skips them now (no longer assigned), but it must be through that batch
        # before the partition could come back to us, or a stale record would slip in.
        batch = self._delivering
        if batch is not None and any(m.partition in revoked for m in batch):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self.revoke_timeout)
        if not self.owned:
            self._has_partitions.clear()

    async def _feed(self) -> None:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            chunk = self._queue.popleft()
            self._delivering = chunk
            self._idle.clear()
            try:
                await self._sink.deliver(chunk)
            finally:
                self._delivering = None
                self._idle.set()
                self.taken += len(chunk)

    # -- Consumer interface -----------------------------------------------------------

    def commit(self, message: Message) -> None:
        if message.partition in self.owned:
            self._shared.record_commit(message.topic, message.partition, message.offset + 1)
        # else: no longer ours; the new owner redoes it (at-least-once)

    async def flush(self) -> None:
        await self._shared.flush()

    async def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True  # the thread pauses our partitions and drops late records
        feeder, self._feeder = self._feeder, None
        if feeder is not None:
            # Cutting a batch short is safe: the core only commits a prefix of what it
            # took, and nothing after the cut is taken any more.
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
        for chunk in self._queue:
            self.taken += len(chunk)
        self._queue.clear()

    async def close(self) -> None:
        await self.stop()
        if self._closed:
            return
        self._closed = True
        await self._shared.detach(self)

    @property
    def assigned(self) -> list[Partition]:
        return [(self.topic, p) for p in sorted(self.owned)]
