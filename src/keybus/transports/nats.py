"""The NATS JetStream transport.

Layout on the server (see ``docs/nats.md`` for the why and the cost):

* a topic is one stream ``KB_<token>`` over subjects ``kb.<token>.<partition>``; a
  record's partition is a hash of its key (like Kafka and the memory backend), so one
  partition is a strictly ordered sub-stream;
* a group reads a partition through one durable pull consumer
  ``<group>_p<partition>_<epoch>`` (a new epoch per take-over) with ``AckPolicy.ALL``:
  committing "the contiguous done prefix ends at seq S" is one ack;
* each partition is owned by one member of the group at a time. Members and leases live
  in one JetStream key-value entry per (topic, group), changed only by compare-and-set,
  with a deterministic assignment (:mod:`keybus.transports.nats_group`);
* whenever a member takes a partition it recreates the durable at ``ack_floor + 1``. That
  drops every delivery the previous owner left pending, so nothing can be delivered out
  of stream order and an ack can never cover an unprocessed gap (JetStream would
  otherwise hand out newer messages before the redeliveries, and ack-all would swallow
  the gap).

Everything else — order per key, retries, dead letters, done-tracking — is the core's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import count
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext, api

import nats
from keybus.deadline import Deadline
from keybus.errors import ConnectError, PublishError, TopicError
from keybus.partitioning import partition_for
from keybus.topics import TopicConfig, TopicInfo
from keybus.transports.base import Consumer, Sink, Transport
from keybus.transports.nats_group import NATS_ERRORS, GroupMember
from keybus.transports.nats_headers import decode_headers, encode_headers
from keybus.transports.nats_names import stream_name, subject_base
from keybus.transports.nats_publish import Publisher

__all__ = ["NatsOptions", "NatsTransport", "decode_headers", "encode_headers"]

log = logging.getLogger("keybus.nats")

_PARTITIONS_META = "keybus.partitions"
_TOPIC_META = "keybus.topic"


@dataclass(frozen=True, slots=True)
class NatsOptions:
    """Transport options (keyword arguments of ``keybus.connect("nats://...")``).

    ``ack_wait``: seconds JetStream waits for an ack before redelivering; long handlers
    are kept alive with in-progress acks every ``ack_wait / 3``. ``max_ack_pending``: per
    partition, delivered-but-unacknowledged messages before JetStream pauses it.
    ``lease_ttl``: how long a crashed member keeps its partitions before others take them
    over; leases are renewed every ``heartbeat`` seconds.
    """

    publish_timeout: float = 10.0
    ack_wait: float = 30.0
    max_ack_pending: int = 4096
    fetch_batch: int = 512
    fetch_expires: float = 10.0
    idle_heartbeat: float = 2.0
    lease_ttl: float = 6.0
    heartbeat: float = 1.0
    reconnect_wait: float = 0.25
    duplicate_window: float = 120.0
    max_pending_publishes: int = 8192
    api_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.heartbeat * 3 > self.lease_ttl:
            raise ValueError("lease_ttl must be at least 3 heartbeats")
        if self.idle_heartbeat * 2 > self.fetch_expires:
            raise ValueError("fetch_expires must be at least 2 idle heartbeats")
        if self.ack_wait <= 0 or self.max_ack_pending < 1 or self.fetch_batch < 1:
            raise ValueError("ack_wait, max_ack_pending and fetch_batch must be positive")


_CLOSE_DRAIN = 1.0  # seconds close() waits for outstanding PubAcks
_CLOSE_CLIENT = 1.5  # seconds close() waits for nats-py to close before aborting


async def _close_client(nc: NatsClient) -> None:
    """Close the client within ``_CLOSE_CLIENT`` s; if it hangs (a peer that reads
    nothing, so a flush never ends), abort its socket and stop its subscriptions' tasks
    so nothing is left behind. Survives a cancellation (it finishes the job first)."""
    closing = asyncio.ensure_future(nc.close())
    try:
        await asyncio.wait({closing}, timeout=_CLOSE_CLIENT)
    finally:
        if not closing.done():
            closing.cancel()
            _abort_client(nc)
            with contextlib.suppress(asyncio.CancelledError, *NATS_ERRORS):
                await closing
        elif not closing.cancelled() and closing.exception() is not None:
            log.debug("keybus: closing the NATS client failed: %r", closing.exception())


def _abort_client(nc: Any) -> None:
    """What ``nc.close()`` would have finished: nats-py internals, so every step is
    guarded (a newer client may differ; then only its own close is left to us)."""
    with contextlib.suppress(Exception):
        nc._status = NatsClient.CLOSED
    for name in ("_reading_task", "_ping_interval_task", "_flusher_task", "_reconnection_task"):
        task = getattr(nc, name, None)
        if isinstance(task, asyncio.Task) and not task.done():
            task.cancel()
    with contextlib.suppress(Exception):
        for sub in list(nc._subs.values()):
            task = getattr(sub, "_wait_for_msgs_task", None)
            if isinstance(task, asyncio.Task) and not task.done():
                task.cancel()
        nc._subs.clear()
    for name in ("_io_writer", "_bare_io_writer"):
        with contextlib.suppress(Exception):
            getattr(nc._transport, name).transport.abort()


@dataclass(frozen=True, slots=True)
class _TopicInfo:
    stream: str
    subject_base: str
    partitions: int


class NatsTransport(Transport):
    """A connection to one NATS server (JetStream enabled)."""

    def __init__(self, url: str, **options: Any) -> None:
        self.url = url
        try:
            self.options = NatsOptions(**options)
        except TypeError as exc:
            raise TypeError(f"unknown options for nats://: {exc}") from None
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._publisher: Publisher | None = None
        self._topics: dict[str, _TopicInfo] = {}
        self._round_robin = count()
        self._members: set[GroupMember] = set()
        self._bucket_ready = False
        self._closing = False
        self.reconnects = 0

    # -- connection ------------------------------------------------------------------

    async def connect(self, deadline: Deadline) -> None:
        nc = self._nc = NatsClient()
        server = "nats://" + self.url.split("://", 1)[1]
        try:
            # One attempt per server at first (max_reconnect_attempts=1): an unreachable
            # server must fail the connect, not retry forever. Afterwards the client
            # reconnects without limit, so the bus survives a server restart.
            await nc.connect(
                servers=[server],
                connect_timeout=2,
                reconnect_time_wait=self.options.reconnect_wait,  # type: ignore[arg-type]
                max_reconnect_attempts=1,
                allow_reconnect=True,
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
                name="keybus",
                # Every subject keybus uses is built from escaped names: valid by
                # construction, so nats-py need not re-check two subjects per publish.
                skip_subject_validation=True,
            )
        except nats.errors.NoServersError as exc:
            raise ConnectError(self.url, f"no NATS server answers ({nc.last_error!r})") from exc
        nc.options["max_reconnect_attempts"] = -1
        self._js = nc.jetstream(timeout=self.options.api_timeout)
        try:
            await self._js.account_info()
            publisher = Publisher(
                nc, self.options.publish_timeout, self.options.max_pending_publishes
            )
            await publisher.start()
        except NATS_ERRORS as exc:
            raise ConnectError(self.url, f"JetStream is not available: {exc}") from exc
        self._publisher = publisher

    async def _on_error(self, exc: Exception) -> None:
        log.debug("keybus: NATS %s: %r", self.url, exc)

    async def _on_disconnected(self) -> None:
        if self._closing:
            return
        log.warning("keybus: disconnected from %s; reconnecting", self.url)

    async def _on_reconnected(self) -> None:
        # Pull requests die with the connection: every consumer asks again at once.
        self.reconnects += 1
        log.warning("keybus: reconnected to %s", self.url)
        for member in list(self._members):
            member.on_reconnected()

    def live(self) -> tuple[NatsClient, JetStreamContext]:
        if self._nc is None or self._js is None or self._nc.is_closed:
            raise ConnectError(self.url, "transport is not connected")
        return self._nc, self._js

    async def close(self, deadline: Deadline) -> None:
        # The bus gives this 5 s in all. Budgets: publishes drain for at most
        # _CLOSE_DRAIN s, the client closes in at most _CLOSE_CLIENT s (then its socket is
        # aborted), and the client is closed whatever happens before (try/finally).
        nc, self._nc = self._nc, None
        self._js = None
        publisher, self._publisher = self._publisher, None
        if nc is None:
            return
        self._closing = True
        try:
            # Consumers are closed before; one whose close was cut short by the core's
            # bound may still own tasks: end them now rather than leave them running.
            members, self._members = list(self._members), set()
            for member in members:
                member.abort()
            if publisher is not None:
                await publisher.close(min(self.options.publish_timeout, _CLOSE_DRAIN))
            for member in members:
                await member.aborted()
        finally:
            await _close_client(nc)

    # -- topics ----------------------------------------------------------------------

    def admin_error(self, what: str, exc: BaseException) -> ConnectError:
        """A failed administrative call (topics, consumers, group state) as a keybus error;
        the caller chains ``exc``."""
        if isinstance(exc, TimeoutError):
            return ConnectError(self.url, f"{what}: the server did not answer in time")
        return ConnectError(self.url, f"{what}: {str(exc) or repr(exc)}")

    async def ensure_topic(self, topic: str, config: TopicConfig) -> None:
        try:
            await self._ensure(topic, config)
        except ConnectError:
            raise
        except NATS_ERRORS as exc:
            raise self.admin_error(f"cannot create topic {topic!r}", exc) from exc

    async def _ensure(self, topic: str, config: TopicConfig) -> _TopicInfo:
        _, js = self.live()
        name = stream_name(topic)
        partitions = max(1, config.partitions)
        # persistent: file storage, kept by limits (age) — survives restarts and crashes.
        # ephemeral: memory storage — faster, gone when the server restarts.
        stream = api.StreamConfig(
            name=name,
            subjects=[f"{subject_base(topic)}.*"],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.MEMORY if config.ephemeral else api.StorageType.FILE,
            max_age=config.retention_seconds,
            num_replicas=max(1, config.replication_factor),
            duplicate_window=self.options.duplicate_window,
            compression=api.StoreCompression.S2 if config.compression else None,
            metadata={_TOPIC_META: topic, _PARTITIONS_META: str(partitions)},
        )
        try:
            info = await js.add_stream(stream)
        except nats.js.errors.BadRequestError:
            # It exists with other settings. The partition count of an existing topic is
            # kept: changing it would move keys to other partitions and break their order.
            info = await js.stream_info(name)
        return self._remember(topic, info)

    def _remember(self, topic: str, info: api.StreamInfo) -> _TopicInfo:
        metadata = info.config.metadata or {}
        partitions = int(metadata.get(_PARTITIONS_META, "1"))
        known = _TopicInfo(info.config.name or stream_name(topic), subject_base(topic), partitions)
        self._topics[topic] = known
        return known

    async def topic_info(self, topic: str) -> _TopicInfo:
        known = self._topics.get(topic)
        if known is not None:
            return known
        _, js = self.live()
        try:
            return self._remember(topic, await js.stream_info(stream_name(topic)))
        except nats.js.errors.NotFoundError:
            # Publishing to a topic nobody created yet creates it (as Kafka auto-creates).
            return await self._ensure(topic, TopicConfig())

    async def describe_topic(self, topic: str) -> TopicInfo:
        _, js = self.live()
        try:
            info = self._remember(topic, await js.stream_info(stream_name(topic)))
        except nats.js.errors.NotFoundError as exc:
            raise TopicError(topic, "describe", "no such topic") from exc
        except NATS_ERRORS as exc:
            raise TopicError(topic, "describe", str(exc) or repr(exc)) from exc
        return TopicInfo(topic, info.partitions)

    async def delete_topic(self, topic: str) -> None:
        _, js = self.live()
        self._topics.pop(topic, None)
        try:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(stream_name(topic))
            await GroupMember.forget_topic(self, topic)
        except NATS_ERRORS as exc:
            raise self.admin_error(f"cannot delete topic {topic!r}", exc) from exc

    async def ensure_bucket(self) -> None:
        if not self._bucket_ready:
            try:
                await GroupMember.ensure_bucket(self)
            except NATS_ERRORS as exc:
                raise self.admin_error("cannot open the group-state bucket", exc) from exc
            self._bucket_ready = True

    # -- publishing ------------------------------------------------------------------

    async def publish(
        self, topic: str, value: bytes, key: str | None, headers: Mapping[str, bytes]
    ) -> None:
        publisher = self._publisher
        try:
            if publisher is None:
                raise ConnectError(self.url, "transport is not connected")
            info = self._topics.get(topic) or await self.topic_info(topic)
        except ConnectError:
            raise
        except NATS_ERRORS as exc:
            raise PublishError(topic, f"cannot look up its stream: {exc!r}") from exc
        partition = partition_for(key, info.partitions, self._round_robin)
        nats_headers = encode_headers(key, headers)
        event_id = headers.get("X-Event-ID")
        if event_id is not None:
            # JetStream drops a re-publish of the same event within the duplicate window.
            nats_headers["Nats-Msg-Id"] = event_id.decode(errors="replace")
        timeout = self.options.publish_timeout
        try:
            # Many publishes in flight on one reply subscription, each resolved by its
            # own PubAck — no round trip per message.
            await publisher.publish(f"{info.subject_base}.{partition}", value, nats_headers)
        except nats.js.errors.NoStreamResponseError as exc:
            self._topics.pop(topic, None)  # deleted meanwhile: the next publish recreates
            raise PublishError(topic, "no stream answered") from exc
        except TimeoutError as exc:
            raise PublishError(topic, f"no acknowledgement within {timeout:g} s") from exc
        except NATS_ERRORS as exc:
            raise PublishError(topic, repr(exc)) from exc

    # -- consuming -------------------------------------------------------------------

    def consumer(self, topic: str, group: str, sink: Sink) -> Consumer:
        self.live()
        return GroupMember(self, topic, group, sink)

    def register(self, member: GroupMember) -> None:
        self._members.add(member)

    def unregister(self, member: GroupMember) -> None:
        self._members.discard(member)
