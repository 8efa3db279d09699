"""The Kafka transport, on confluent-kafka (librdkafka).

Threads. librdkafka's consumer ``consume`` blocks, and its callbacks (rebalances, commit
results) run inside it on the calling thread. So each consumer gets exactly one owned
Python thread, joined in ``close()``: one consumer thread per (bus, group) owns the shared
consumer of all topics the bus subscribes to in that group: it applies subscription
changes, consumes in batches, runs the rebalance callbacks and commits.

The producer has no thread: ``produce`` and ``poll(0)`` never block, so both run on the
event loop, where delivery reports resolve publish futures directly
(``keybus.transports.kafka_producer``).

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
facade's feeder task, which awaits ``sink.deliver``. When every subscription is
backlogged the thread holds (stops fetching, wakes when the backlog drained); when only
some are, or the backlog does not drain within half a second, their partitions are
paused (and resumed once drained), so a slow subscription holds neither the other topics
nor the group's poll loop.

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
import gc
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from typing import Any

from confluent_kafka import Consumer as _RdConsumer
from confluent_kafka import KafkaError, KafkaException, TopicCollection, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from keybus._aio import cancel_and_wait, start_feeder
from keybus.deadline import Deadline
from keybus.errors import ConnectError, KeybusError, PublishError, TopicError
from keybus.message import LazyHeaders, Message
from keybus.partitioning import Partition
from keybus.topics import TopicConfig, TopicInfo
from keybus.transports.base import Consumer, Sink, Transport
from keybus.transports.kafka_producer import KafkaProducer, _reason, _set_done

__all__ = ["KafkaTransport"]

log = logging.getLogger("keybus.kafka")
_librdkafka_log = logging.getLogger("keybus.kafka.librdkafka")

_EPHEMERAL_RETENTION_MS = 15 * 60 * 1000  # "short retention" for TopicConfig(ephemeral=True)
_POLL_TIMEOUT = 0.05  # how long a thread may sit in librdkafka before it sees a stop/request
_BACKLOG_HIGH = 4096  # a facade's undelivered records above which fetching stops
_BACKLOG_DRAINED = 2048  # ... and at or below which a holding consumer thread fetches again
_BACKLOG_LOW = 1024  # a paused facade's partitions resume below this
# When every subscription of the group is backlogged the thread holds (does not fetch)
# instead of pausing: pausing makes librdkafka drop the records it prefetched for those
# partitions and fetch them again after resume, which cost 2/3 of the consume throughput.
# Holding also delays rebalance callbacks, so a backlog that does not drain within this
# long (a stuck handler) is paused after all.
_HOLD_BEFORE_PAUSE = 0.5
# How long a closing consumer may take to commit and leave the group (inside the core's
# 2 s budget for consumer.close). librdkafka holds a commit - and a close behind one -
# until the session times out (6 s) when the coordinator is away, so commits at close are
# only made after a probe showed the broker answers within _PROBE_TIMEOUT.
_SHUTDOWN_WAIT = 1.8
_PROBE_TIMEOUT = 0.5
# transport.close() waits this much longer than the session timeout for a consumer thread
# still in librdkafka's close: an asynchronous commit outstanding when the broker went
# away holds that close until the session times out, and returning earlier would leave
# the thread (and librdkafka's native threads) running after close().
_CLOSE_MARGIN = 2.0

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


def _is_fatal(exc: BaseException) -> bool:
    """librdkafka raised a fatal error: the handle is unusable from now on."""
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return bool(exc.args[0].fatal())
    return False


_CALLBACKS = ("error_cb", "stats_cb", "throttle_cb", "oauth_cb")


def _guard(callback: Callable[..., Any]) -> Callable[..., Any]:
    """A callback that raises inside ``consume`` makes confluent-kafka discard the batch
    it fetched in that call — records skipped without being handled. Log instead."""

    def guarded(*args: Any) -> Any:
        try:
            return callback(*args)
        except Exception:
            log.exception("keybus: Kafka callback %r failed", callback)
            return None

    return guarded


def _guarded(config: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(config)
    for name in _CALLBACKS:
        if name != "oauth_cb" and callable(out.get(name)):
            out[name] = _guard(out[name])
    return out


async def _admin_result(future: Any, fine: int, verb: str, topic: str) -> None:
    """Await an AdminClient future; ``fine`` is the error code that means "already so"
    (idempotent create/delete), anything else a KeybusError with librdkafka's reason."""
    try:
        await asyncio.wrap_future(future)
    except KafkaException as exc:
        if _error_code(exc) != fine:
            raise KeybusError(f"cannot {verb} topic {topic!r}: {_reason(exc)}") from exc


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
        try:
            session = float(self._consumer_config.get("session.timeout.ms", 45000)) / 1000
        except (TypeError, ValueError):  # librdkafka rejects it when the consumer is made
            session = 45.0
        self._close_wait = max(4.5, session + _CLOSE_MARGIN)
        self.close_budget = max(5.0, self._close_wait + 0.5)
        self._admin: AdminClient | None = None
        self._producer: KafkaProducer | None = None
        self._groups: dict[str, list[_GroupConsumer]] = {}
        self._shared: list[_GroupConsumer] = []  # every consumer whose thread may run
        self._closed = False

    # -- connect / admin -------------------------------------------------------------

    async def connect(self, deadline: Deadline) -> None:
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
        await _admin_result(futures[topic], KafkaError.TOPIC_ALREADY_EXISTS, "create", topic)
        # The controller acknowledged; wait until the broker serves the topic's metadata,
        # so a consumer subscribing next sees every partition in its first metadata reply.
        await self._until(lambda: self._topic_state(topic), present=True, topic=topic)

    async def describe_topic(self, topic: str) -> TopicInfo:
        try:
            partitions = await self._topic_state(topic)
        except KafkaException as exc:
            raise TopicError(topic, "describe", _reason(exc)) from exc
        if partitions is None:
            raise TopicError(topic, "describe", "no such topic")
        return TopicInfo(topic, partitions)

    async def delete_topic(self, topic: str) -> None:
        futures = self._admin_client().delete_topics([topic], request_timeout=10.0)
        await _admin_result(futures[topic], KafkaError.UNKNOWN_TOPIC_OR_PART, "delete", topic)
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
        await self.send(topic, value, key, headers)

    def send(
        self, topic: str, value: bytes, key: str | None, headers: Mapping[str, bytes]
    ) -> Awaitable[None]:
        producer = self._producer or self._new_producer(topic)
        try:  # not contextlib.suppress: a Python-level context manager per publish
            return producer.send(topic, value, key, headers)
        except BufferError:  # librdkafka's queue is full: wait for room, boundedly
            return self._send_when_room(producer, topic, value, key, headers)

    def _new_producer(self, topic: str) -> KafkaProducer:
        if self._closed:
            raise PublishError(topic, "the Kafka transport is closed")
        try:
            producer = KafkaProducer(self._producer_config, asyncio.get_running_loop())
        except (KafkaException, TypeError, ValueError) as exc:  # e.g. a bad setting
            reason = f"cannot create the Kafka producer: {_reason(exc)}"
            raise PublishError(topic, reason) from exc
        self._producer = producer
        return producer

    @staticmethod
    async def _send_when_room(
        producer: KafkaProducer,
        topic: str,
        value: bytes,
        key: str | None,
        headers: Mapping[str, bytes],
    ) -> None:
        await (await producer.send_when_room(topic, value, key, headers))

    # -- consume ---------------------------------------------------------------------

    def consumer(self, topic: str, group: str, sink: Sink) -> Consumer:
        if self._closed:
            raise KeybusError(f"the Kafka transport {self.url} is closed")
        members = self._groups.setdefault(group, [])
        # One shared consumer per group for every topic; a second subscription to the same
        # topic in the same group is a second member, like another process would be. So is
        # a member whose previous subscription to the topic is not yet out of librdkafka's
        # subscription or still holds its partitions (an unsubscribe gave up waiting for
        # the release): there the removal and the re-add would reach librdkafka as one
        # unchanged subscribe() - no revoke, no assignment for the new subscription, and
        # the old one's partitions fetched for a subscription that owns none of them.
        for shared in members:
            if not shared.closing and topic not in shared.facades and not shared.detaching(topic):
                break
        else:
            shared = _GroupConsumer(self, group)
            members.append(shared)
            self._shared.append(shared)
        return KafkaConsumer(shared, topic, sink)

    def _forget(self, shared: _GroupConsumer) -> None:
        self._shared = [s for s in self._shared if not s.finished or s is shared]
        members = self._groups.get(shared.group)
        if members and shared in members:
            members.remove(shared)
            if not members:
                del self._groups[shared.group]

    # -- close -----------------------------------------------------------------------

    async def close(self, deadline: Deadline) -> None:
        if self._closed:
            return
        self._closed = True
        # Also those already shutting down (forgotten by their group): a thread that
        # outlives its subscription's close budget is waited for here.
        shared = [s for s in self._shared if not s.finished]
        self._shared.clear()
        self._groups.clear()
        producer, self._producer = self._producer, None
        # Side by side: each is bounded (consumer threads by the session timeout plus a
        # margin, the producer by ~4 s), together within ``close_budget``.
        await asyncio.gather(
            *(s.shutdown(self._close_wait) for s in shared),
            *([producer.close()] if producer else []),
        )
        if self._admin is not None:
            # The admin client has no close(): dropping the last reference destroys the
            # handle (and joins its native threads); collect in case a cycle holds it.
            self._admin = None
            gc.collect()


# -- consuming helpers ------------------------------------------------------------


# -- consuming -----------------------------------------------------------------------


class _RecordHeaders(LazyHeaders):
    """A consumed Kafka record's headers, converted on first use (on the loop, not the
    consumer thread, where it cost ~1.5 µs a record with the GIL held). A header without
    a value reads as ``b""``; a repeated name keeps the last value."""

    __slots__ = ()

    def _load(self) -> dict[str, bytes]:
        try:
            raw = self._source.headers()
            return {k: (v if v is not None else b"") for k, v in raw} if raw else {}
        except Exception as exc:
            # A foreign producer's header confluent-kafka cannot convert (a name that is
            # not UTF-8). Raising here would fail whoever reads the headers — the core's
            # dead-lettering too, which would stall the partition's commits.
            log.warning("keybus: unreadable headers on a Kafka record: %r", exc)
            return {"X-Keybus-Header-Error": f"{type(exc).__name__}: {exc}".encode()}


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
        # Set by the loop when a backlog drained (or anything else needs the thread) while
        # the thread holds; ``holding`` tells the loop it should bother.
        self.drained = threading.Event()
        self.holding = False
        self._consumer: _RdConsumer | None = None
        self._thread: threading.Thread | None = None
        self._done: asyncio.Future[None] = self.loop.create_future()
        self._reachable: bool | None = None  # thread side, see _probe
        self._probed_at = 0.0
        self._async_pending = False  # thread side: an asynchronous commit awaits its result

    # -- loop side ------------------------------------------------------------------

    def attach(self, facade: KafkaConsumer) -> int:
        with self._lock:
            self.facades[facade.topic] = facade
            self._sub_seq += 1
            self._subscription_dirty = True
            seq = self._sub_seq
        self.drained.set()
        if self._thread is None:
            config = {
                **_guarded(self.transport._consumer_config),
                "group.id": self.group,
                "on_commit": _guard(self._on_commit),
            }
            try:
                self._consumer = _RdConsumer(config)
            except (KafkaException, TypeError, ValueError) as exc:  # e.g. a bad setting
                with self._lock:
                    del self.facades[facade.topic]
                raise KeybusError(
                    f"cannot create the Kafka consumer of group {self.group!r}: {_reason(exc)}"
                ) from exc
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
        self.drained.set()
        if last:
            await self.shutdown()
        elif facade.owned:
            await facade.released.wait()

    def detaching(self, topic: str) -> bool:
        """A detached subscription to ``topic`` may still own partitions here."""
        return topic in self._detached

    def _forget_detached(self, facades: list[KafkaConsumer]) -> None:
        # Queued by the thread after the change was applied, behind any release of theirs.
        for facade in facades:
            if self._detached.get(facade.topic) is facade and not facade.owned:
                with self._lock:
                    del self._detached[facade.topic]
                facade.released.set()

    def record_commit(self, topic: str, partition: int, offset: int) -> None:
        # Loop side, once per done message: no lock. The thread only copies the dict
        # (one C call, atomic under the GIL) and pops revoked partitions, which happens
        # after the facade stopped committing them (``owned`` was updated on the loop).
        tp = (topic, partition)
        wanted = self._wanted
        if offset > wanted.get(tp, -1):
            wanted[tp] = offset

    async def flush(self) -> None:
        if self._thread is None or self._stop.is_set():
            return
        request: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._lock:
            self._flush_requests.append(request)
        self.drained.set()
        await asyncio.wrap_future(request)

    @property
    def finished(self) -> bool:
        return self._thread is None or self._done.done()

    async def shutdown(self, wait: float = _SHUTDOWN_WAIT) -> None:
        """Stop the thread (final commit, leave the group) within ``_SHUTDOWN_WAIT``: the
        core gives ``consumer.close`` 2 s, the transport's close its ``close_budget``."""
        if not self.closing:
            self.closing = True
            self.transport._forget(self)
            self._stop.set()
            self.drained.set()
        thread = self._thread
        if thread is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._done), wait)
        except TimeoutError:
            log.error("keybus: Kafka consumer of group %s did not stop in time", self.group)
            return
        thread.join(0.2)  # it signalled done as its last step: this is immediate

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
        held_since: float | None = None
        failures = 0
        try:
            while not self._stop.is_set():
                try:
                    self._apply_subscription(consumer)
                    self._serve_flushes(consumer)
                    now = time.monotonic()
                    if now >= next_commit:
                        next_commit = now + interval
                        self._commit(consumer, None, asynchronous=True)
                    if self._all_backlogged():
                        if held_since is None:
                            held_since = now
                        if now - held_since < _HOLD_BEFORE_PAUSE:
                            self._hold()
                            continue
                    else:
                        held_since = None
                    self._apply_backpressure(consumer)
                    records = consumer.consume(batch, _POLL_TIMEOUT)
                    if records:
                        self._dispatch(records)
                    failures = 0
                except Exception as exc:
                    # A KafkaError from consume, a callback that raised inside it (ours or
                    # a user's error_cb/stats_cb), a failed pause/resume: one bad turn
                    # must not end the thread — every subscription of the group would
                    # stall with nobody noticing. Log, back off, go on.
                    failures += 1
                    log.error(
                        "keybus: Kafka consumer of group %s: %s (retrying)",
                        self.group,
                        _reason(exc),
                        exc_info=failures == 1 or failures % 100 == 0,
                    )
                    if _is_fatal(exc):
                        raise
                    self._stop.wait(min(0.05 * failures, 1.0))
            self._serve_flushes(consumer)
            if self._probe(consumer):
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
                if request.set_running_or_notify_cancel():
                    request.set_result(None)
            self._call(_set_done, self._done)

    def _apply_subscription(self, consumer: _RdConsumer) -> None:
        if not self._subscription_dirty:
            return
        with self._lock:
            topics = sorted(self.facades)
            seq = self._sub_seq
            self._subscription_dirty = False
            # Detached topics this member holds no partition of: no revoke will come for
            # them, so nothing else would take them out of ``_detached``.
            idle = [
                f
                for t, f in self._detached.items()
                if t not in self._assigned and t not in self.facades
            ]
        if topics:
            consumer.subscribe(
                topics,
                on_assign=_guard(self._on_assign),
                on_revoke=_guard(self._on_revoke),
                on_lost=_guard(self._on_lost),
            )
        else:
            consumer.unsubscribe()
        self._applied_seq = seq
        if idle:
            self._call(self._forget_detached, idle)

    def _all_backlogged(self) -> bool:
        """True if every facade with partitions to fetch from is over its backlog limit:
        fetching more helps nobody, and the thread can just wait for the core."""
        backlogged = False
        for topic in self._assigned:
            if topic in self._paused:
                continue
            facade = self.facades.get(topic)
            if facade is None or facade.stopped:
                continue
            if facade.backlog <= _BACKLOG_HIGH:
                return False
            backlogged = True
        return backlogged

    def _hold(self) -> None:
        self.drained.clear()
        self.holding = True
        try:
            if self._all_backlogged() and not self._flush_requests:
                self.drained.wait(_POLL_TIMEOUT)
        finally:
            self.holding = False

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
        # Per-record work here holds the GIL the event loop needs: keep it to the fields
        # the core uses, and leave the headers to whoever reads them (_RecordHeaders).
        by_topic: dict[str, list[Message]] = {}
        last_topic: str | None = None
        chunk: list[Message] = []
        for record in records:
            if record.error() is not None:
                error = record.error()
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("keybus: Kafka consumer of %s: %s", self.group, _reason(error))
                continue
            topic = record.topic()
            if topic != last_topic:
                last_topic = topic
                chunk = by_topic.setdefault(topic, [])
            raw_key = record.key()
            key: str | None
            if type(raw_key) is bytes:
                key = raw_key.decode("utf-8", "replace")
            elif raw_key is None:
                key = None
            else:
                key = str(raw_key)
            kind, stamp = record.timestamp()
            chunk.append(
                Message(
                    topic,
                    record.value() or b"",
                    key,
                    _RecordHeaders(record),
                    record.partition(),
                    record.offset(),
                    stamp / 1000.0 if kind else None,
                    record,
                )
            )
        for topic, messages in by_topic.items():
            facade = self.facades.get(topic)
            if facade is not None and not facade.stopped:
                facade.pushed += len(messages)
                self._call(facade._push, messages)
            # else: nobody consumes the topic any more; nothing is committed for it, so
            # the next owner of its partitions gets these records again.

    def _probe(self, consumer: _RdConsumer) -> bool:
        """Does the broker answer? A synchronous commit to an unreachable coordinator
        blocks (and a close behind it) until the session times out; a metadata request
        with a deadline tells in ``_PROBE_TIMEOUT``. The answer holds for 2 s (one close).
        Never call it from a librdkafka callback (see ``_release``)."""
        now = time.monotonic()
        if self._reachable is None or now - self._probed_at > 2.0:
            self._probed_at = now
            try:
                consumer.list_topics(timeout=_PROBE_TIMEOUT)
                self._reachable = True
            except Exception as exc:
                log.warning(
                    "keybus: Kafka broker unreachable, group %s does not commit at close: %s",
                    self.group,
                    _reason(exc),
                )
                self._reachable = False
        return self._reachable

    def _serve_flushes(self, consumer: _RdConsumer) -> None:
        if not self._flush_requests:
            return
        with self._lock:
            requests, self._flush_requests = self._flush_requests, []
        error: BaseException | None = None
        try:
            # Unreachable: nothing can be committed; the records are redone (at-least-once).
            if self._probe(consumer):
                self._commit(consumer, None, asynchronous=False)
        except KafkaException:  # logged by _commit; the broker keeps the last commit
            pass
        except Exception as exc:  # reported to the waiter
            error = exc
        for request in requests:
            if not request.set_running_or_notify_cancel():
                continue  # the waiter gave up (its own deadline)
            if error is None:
                request.set_result(None)
            else:
                request.set_exception(error)

    def _commit(
        self, consumer: _RdConsumer, only: Collection[tuple[str, int]] | None, *, asynchronous: bool
    ) -> None:
        wanted = self._wanted.copy()  # the loop adds to it without the lock
        with self._lock:
            offsets = [
                TopicPartition(topic, partition, offset)
                for (topic, partition), offset in wanted.items()
                if (only is None or (topic, partition) in only)
                and self._committed.get((topic, partition), -1) < offset
            ]
        if not offsets:
            return
        try:
            if asynchronous:
                if self._async_pending:
                    return  # one at a time: a piled-up commit to an absent coordinator
                    # holds close() until the session times out
                self._async_pending = True
                try:
                    consumer.commit(offsets=offsets, asynchronous=True)
                except BaseException:
                    self._async_pending = False
                    raise
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
        self._async_pending = False  # sync commits report here too: harmless
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
                # Lost: the core cancels running handlers at once (another member may
                # own the partitions already), so the wait is short.
                timeout = (0.0 if lost else facade.revoke_timeout) + 2.0
                self._run_on_loop(facade._revoke(parts, lost=lost), timeout)
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        # No _probe() here: we are inside a librdkafka callback, and list_topics() ends
        # the CallState of the consume()/close() that runs it, so that call's next
        # callback aborts the process (confluent-kafka's CallState_get assertion). A
        # closing thread probed before its consumer.close(); a stop that arrived during
        # this revoke goes by the last answer, and commits like any revoke without one.
        if not lost and (not self._stop.is_set() or self._reachable is not False):
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
        self.revoke_timeout = sink.revoke_timeout
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
        self._feeder: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        self._feeder = start_feeder(self._feed(), f"keybus-kafka-feed:{self.topic}")
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

    async def _revoke(self, partitions: list[int], *, lost: bool = False) -> None:
        revoked = set(partitions)
        # Records of these partitions not yet handed to the core never will be.
        kept: collections.deque[list[Message]] = collections.deque()
        for chunk in self._queue:
            rest = [m for m in chunk if m.partition not in revoked]
            self.taken += len(chunk) - len(rest)
            if rest:
                kept.append(rest)
        self._queue = kept
        try:
            deadline = Deadline.passed() if lost else Deadline.after(self.revoke_timeout)
            await self._sink.revoke([(self.topic, p) for p in partitions], deadline)
        finally:
            # Even if the core's revoke failed or was cut short: nothing the core reports
            # for these partitions from now on may be committed by this member.
            self.owned.difference_update(revoked)
        # A batch the core is still taking in may hold records of these partitions. No need
        # to wait for it: the core skips them, now and after a re-assignment too (a record
        # is taken only if its partition's assignment is no newer than the deliver call).
        # Waiting here held the rebalance callback while intake was parked on a full
        # window behind some other partition's stuck handler.
        if not self.owned:
            self._has_partitions.clear()

    async def _feed(self) -> None:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            chunk = self._queue.popleft()
            try:
                await self._sink.deliver(chunk)
            finally:
                self.taken += len(chunk)
                shared = self._shared
                if shared.holding and self.pushed - self.taken <= _BACKLOG_DRAINED:
                    shared.drained.set()

    # -- Consumer interface -----------------------------------------------------------

    def commit(self, message: Message) -> None:
        partition = message.partition
        if partition in self.owned:
            self._shared.record_commit(self.topic, partition, message.offset + 1)
        # else: no longer ours; the new owner redoes it (at-least-once)

    async def flush(self, deadline: Deadline) -> None:
        await self._shared.flush()

    async def stop(self, deadline: Deadline) -> None:
        if self.stopped:
            return
        self.stopped = True  # the thread pauses our partitions and drops late records
        feeder, self._feeder = self._feeder, None
        if feeder is not None:
            # Cutting a batch short is safe: the core only commits a prefix of what it
            # took, and nothing after the cut is taken any more.
            await cancel_and_wait(feeder)
        for chunk in self._queue:
            self.taken += len(chunk)
        self._queue.clear()

    async def close(self, deadline: Deadline) -> None:
        await self.stop(deadline)
        if self._closed:
            return
        self._closed = True
        await self._shared.detach(self)

    @property
    def assigned(self) -> list[Partition]:
        return [(self.topic, p) for p in sorted(self.owned)]
