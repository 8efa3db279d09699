"""The NATS JetStream transport: connect and close, topics, publishing, consumers.

Layout on the server (see ``docs/nats.md`` for the why and the cost):

* a topic is one stream ``KB_<token>`` over subjects ``kb.<token>.<partition>``; a
  record's partition is a hash of its key (like Kafka and the memory backend), so one
  partition is a strictly ordered sub-stream; a topic in ``subject_topics`` is instead
  the subject named like it, in the stream a Go service with the same config uses — one
  partition (:mod:`.layout`, :mod:`.streams`);
* a group reads a partition through one durable pull consumer
  ``<group>_p<partition>_<epoch>`` (a new epoch per take-over) with ``AckPolicy.ALL``:
  committing "the contiguous done prefix ends at seq S" is one ack;
* each partition is owned by one member of the group at a time. Members and leases live
  in one JetStream key-value entry per (topic, group), changed only by compare-and-set,
  with a deterministic assignment (:mod:`.group`, :mod:`.group_state`);
* whenever a member takes a partition it recreates the durable at ``ack_floor + 1``. That
  drops every delivery the previous owner left pending, so nothing can be delivered out
  of stream order and an ack can never cover an unprocessed gap (JetStream would
  otherwise hand out newer messages before the redeliveries, and ack-all would swallow
  the gap).

Everything else — order per key, retries, dead letters, done-tracking — is the core's.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping, Sequence
from itertools import count
from typing import Any

import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from keybus.deadline import Deadline
from keybus.dedupe import EVENT_ID, ORIGIN
from keybus.errors import ConnectError, KeybusError, PublishError
from keybus.message import Message
from keybus.partitioning import partition_for
from keybus.security import redact_url
from keybus.topics import PartitionPosition, TopicConfig, TopicInfo
from keybus.transports.base import Consumer, Sink, Transport
from keybus.transports.nats.auth import AUTH_OPTIONS, NatsAuth
from keybus.transports.nats.bucket import forget_topic
from keybus.transports.nats.client import Connection, Stream, close_client
from keybus.transports.nats.errors import NATS_ERRORS, Unsent, translate
from keybus.transports.nats.group import GroupMember
from keybus.transports.nats.headers import encode_headers
from keybus.transports.nats.options import NatsOptions
from keybus.transports.nats.positions import group_positions
from keybus.transports.nats.publisher import Publisher
from keybus.transports.nats.reader import read_topic
from keybus.transports.nats.streams import Streams

__all__ = ["NatsTransport"]

# Shares of the close deadline (the time left when close begins; 5 s from the core):
# outstanding PubAcks drain for at most the first, nats-py's own close gets the second,
# and the rest is room for the abort path — local, and what releases the socket when the
# client's close hangs, so it must never be what the core's bound cuts off.
_DRAIN_SHARE = 0.2
_CLIENT_CLOSE_SHARE = 0.3
_MAX_HEADER_BLOCK = 65535  # JetStream refuses a larger header block (error 10097)


class NatsTransport(Transport):
    """A connection to one NATS server (JetStream enabled)."""

    def __init__(self, url: str, **options: Any) -> None:
        # Shown in logs, reprs and errors: credentials in the URL are masked (and split
        # off into the auth settings, never handed to nats-py).
        self.url = redact_url(url)
        auth = NatsAuth.parse(url, {k: options.pop(k) for k in AUTH_OPTIONS if k in options})
        try:
            self.options = NatsOptions(**options)
        except TypeError as exc:
            raise TypeError(f"unknown options for nats://: {exc}") from None
        self._streams = Streams(self._live, self.options)
        self._conn = Connection(self.url, auth, self.options, self._streams.lookup)
        self._conn.on_open = self._open_publisher
        self._conn.on_lost = self._drop_publisher
        self._publisher: Publisher | None = None
        self._dedupe = self.options.dedupe_window is not None
        self._topics = self._streams.known  # topic -> Stream: the publish path's cache
        self._round_robin = count()

    def _live(self) -> tuple[NatsClient, JetStreamContext]:
        return self._conn.live()

    @property
    def reconnects(self) -> int:
        """How often the client reconnected since :meth:`connect`."""
        return self._conn.reconnects

    @property
    def replacements(self) -> int:
        """How often a client nats-py had closed for good was replaced by a new one."""
        return self._conn.replacements

    @property
    def failure(self) -> KeybusError | None:
        """``None`` while the transport works (or is replacing its connection); the
        ``ConnectError`` every call raises once its connection is gone for good."""
        return self._conn.failure

    # -- connection ------------------------------------------------------------------

    async def connect(self, deadline: Deadline) -> None:
        nc, _ = await self._conn.open(deadline)
        await self._open_publisher(nc)

    async def _open_publisher(self, nc: NatsClient) -> None:
        options = self.options
        publisher = Publisher(
            nc, options.publish_timeout, options.max_pending_publishes, dedupe=self._dedupe
        )
        try:
            await publisher.start()
        except NATS_ERRORS as exc:
            raise translate(exc, "connect", self.url, context="no PubAck subscription") from exc
        self._publisher = publisher

    def _drop_publisher(self) -> None:
        """nats-py closed the client for good: its PubAcks will never come."""
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            publisher.abandon()

    async def close(self, deadline: Deadline) -> None:
        budget = deadline.remaining()
        publisher, self._publisher = self._publisher, None
        nc, members = self._conn.shut()
        await self._conn.stop_replacing()
        if nc is None:
            for member in members:
                member.abort()
            for member in members:
                await member.aborted(Deadline.after(budget * _DRAIN_SHARE))
            return
        try:
            # Consumers are closed before; one whose close was cut short by the core's
            # bound may still own tasks: end them now rather than leave them running.
            for member in members:
                member.abort()
            drained_by = Deadline.after(budget * _DRAIN_SHARE)
            if publisher is not None:
                await publisher.close(drained_by)
            for member in members:
                await member.aborted(drained_by)
        finally:
            await close_client(nc, Deadline.after(budget * _CLIENT_CLOSE_SHARE))

    # -- topics ----------------------------------------------------------------------

    async def ensure_topic(self, topic: str, config: TopicConfig) -> None:
        try:
            await self._streams.ensure(topic, config)
        except NATS_ERRORS as exc:
            raise translate(exc, "create", topic) from exc

    async def describe_topic(self, topic: str) -> TopicInfo:
        self._conn.live()
        try:
            known = await self._streams.find(topic)
        except nats.js.errors.NotFoundError as exc:
            raise translate(exc, "describe", topic, context="no such topic") from exc
        except NATS_ERRORS as exc:
            raise translate(exc, "describe", topic) from exc
        return TopicInfo(topic, known.partitions)

    async def list_topics(self, deadline: Deadline) -> list[str]:
        self._conn.live()
        try:
            async with asyncio.timeout(deadline.remaining()):
                return await self._streams.topics()
        except TimeoutError:
            raise translate("no answer in time", "list", "") from None
        except NATS_ERRORS as exc:
            raise translate(exc, "list", "") from exc

    async def positions(
        self, topic: str, group: str, deadline: Deadline
    ) -> list[PartitionPosition]:
        _, js = self._conn.live()
        try:
            async with asyncio.timeout(deadline.remaining()):
                return await group_positions(js, await self._streams.find(topic), group)
        except TimeoutError:
            raise translate("no answer in time", "describe", topic) from None
        except nats.js.errors.NotFoundError as exc:
            raise translate(exc, "describe", topic, context="no such topic") from exc
        except NATS_ERRORS as exc:
            raise translate(exc, "describe", topic) from exc

    can_read_topics = True

    async def read_topic(self, topic: str, deadline: Deadline) -> list[Message]:
        _, js = self._conn.live()
        try:
            async with asyncio.timeout(deadline.remaining()):
                try:
                    stream = await self._streams.find(topic)
                except nats.js.errors.NotFoundError:
                    return []
                return await read_topic(js, topic, stream, deadline)
        except TimeoutError:
            raise translate("no answer in time", "describe", topic) from None
        except NATS_ERRORS as exc:
            raise translate(exc, "describe", topic) from exc

    @property
    def pending_publishes(self) -> int:
        return self._publisher.pending() if self._publisher is not None else 0

    async def ping(self, deadline: Deadline) -> float:
        nc, _ = self._conn.live()
        began = time.monotonic()
        try:
            # (nats-py's flush takes whole seconds; the deadline cuts it shorter.)
            async with asyncio.timeout(deadline.remaining()):
                await nc.flush(timeout=max(1, math.ceil(deadline.remaining())))
        except TimeoutError:
            raise translate("no answer in time", "connect", self.url) from None
        except NATS_ERRORS as exc:
            raise translate(exc, "connect", self.url) from exc
        return time.monotonic() - began

    async def delete_topic(self, topic: str) -> None:
        _, js = self._conn.live()
        try:
            await self._streams.delete(topic)
            await forget_topic(js, topic)
        except NATS_ERRORS as exc:
            raise translate(exc, "delete", topic) from exc

    # -- publishing ------------------------------------------------------------------

    async def publish(
        self, topic: str, value: bytes, key: str | None, headers: Mapping[str, bytes]
    ) -> None:
        publisher = self._publisher
        if publisher is None:
            publisher = await self._wait_for_publisher(topic)
        info = await self._stream_for(topic)
        subject, nats_headers = self._prepare(topic, info, value, key, headers, publisher)
        try:
            # Many publishes in flight on one reply subscription, each resolved by its
            # own PubAck — no round trip per message.
            await publisher.publish(subject, value, nats_headers)
        except Unsent as exc:
            # nats-py closed the client for good before this was sent: send it on the
            # client that replaces it (waiting for it up to publish_timeout).
            if not self._conn.notice_closed():
                raise translate(exc, "publish", topic) from exc
            await self._publish_again(topic, subject, value, nats_headers)
        except NATS_ERRORS as exc:
            raise self._refused(topic, exc) from exc

    async def send_many(
        self, topic: str, records: Sequence[tuple[bytes, str | None, Mapping[str, bytes]]]
    ) -> list[PublishError | None]:
        """Every record in flight at once, each resolved by its PubAck, without a task per
        record (the default's gather would make one for each publish coroutine)."""
        publisher = self._publisher or await self._wait_for_publisher(topic)
        info = await self._stream_for(topic)
        errors: list[PublishError | None] = [None] * len(records)
        acks: list[asyncio.Future[None]] = []
        where: list[int] = []
        try:
            for index, (value, key, headers) in enumerate(records):
                try:
                    subject, nats_headers = self._prepare(
                        topic, info, value, key, headers, publisher
                    )
                    acks.append(await publisher.begin(subject, value, nats_headers))
                except PublishError as exc:
                    errors[index] = exc
                except Unsent:
                    # nats-py closed the client for good before this one left: the rest
                    # go one by one, as publish() sends them (on the replacing client).
                    for rest, (value, key, headers) in enumerate(records[index:], index):
                        try:
                            await self.publish(topic, value, key, headers)
                        except PublishError as exc:
                            errors[rest] = exc
                    break
                except NATS_ERRORS as exc:
                    errors[index] = self._refused(topic, exc)
                else:
                    where.append(index)
        except BaseException:
            for ack in acks:  # nobody will wait for them now
                ack.cancel()
            raise
        results = await asyncio.gather(*acks, return_exceptions=True)
        for index, result in zip(where, results, strict=True):
            if isinstance(result, NATS_ERRORS):
                errors[index] = self._refused(topic, result)
            elif isinstance(result, BaseException):
                raise result
        return errors

    async def _stream_for(self, topic: str) -> Stream:
        try:
            return self._topics.get(topic) or await self._streams.lookup(topic)
        except NATS_ERRORS as exc:
            raise translate(exc, "publish", topic, context="cannot look up its stream") from exc

    def _refused(self, topic: str, exc: BaseException) -> PublishError:
        if isinstance(exc, nats.js.errors.NoStreamResponseError):
            self._topics.pop(topic, None)  # deleted meanwhile: the next publish recreates
        error = translate(exc, "publish", topic, timeout=self.options.publish_timeout)
        if not isinstance(error, PublishError):
            raise error from exc
        return error

    def _prepare(
        self,
        topic: str,
        info: Stream,
        value: bytes,
        key: str | None,
        headers: Mapping[str, bytes],
        publisher: Publisher,
    ) -> tuple[str, dict[str, str]]:
        """The subject and NATS headers of one record; :class:`PublishError` (permanent)
        if the server would refuse it for its size."""
        partition = partition_for(key, info.partitions, self._round_robin)
        nats_headers = encode_headers(key, headers)
        if self._dedupe and ORIGIN not in headers:  # a dead letter is never de-duplicated
            # JetStream drops a re-publish of the same event within the duplicate window
            # (and the publisher reports it). The wire form of X-Event-ID is ASCII.
            event_id = nats_headers.get(EVENT_ID)
            if event_id is not None:
                nats_headers["Nats-Msg-Id"] = event_id
        # What the server counts against max_payload: the payload and the header block
        # ("NATS/1.0\r\n", "<name>: <value>\r\n" each, "\r\n"). Over it, the server
        # would answer -ERR and nats-py close the connection for good.
        size = len(value)
        block = 12 + 4 * len(nats_headers) + sum(map(len, nats_headers))
        block += sum(map(len, nats_headers.values()))
        if size + block > publisher.max_payload or block > _MAX_HEADER_BLOCK:
            raise self._too_large(topic, size, block, publisher.max_payload)
        return info.subjects[partition], nats_headers

    async def _publish_again(
        self, topic: str, subject: str, value: bytes, nats_headers: dict[str, str]
    ) -> None:
        publisher = await self._wait_for_publisher(topic)
        try:
            await publisher.publish(subject, value, nats_headers)
        except NATS_ERRORS as exc:
            raise translate(exc, "publish", topic, timeout=self.options.publish_timeout) from exc

    async def _wait_for_publisher(self, topic: str) -> Publisher:
        """No publisher: never connected, closed, failed — or a client nats-py closed for
        good is being replaced, which a publish waits for (up to ``publish_timeout``)."""
        conn = self._conn
        if not conn.replacing:
            raise conn.gone()
        timeout = self.options.publish_timeout
        try:
            await conn.ready(timeout)
        except ConnectError as exc:
            if conn.failure is not None or not conn.replacing:
                raise
            raise PublishError(topic, f"no connection within {timeout:g} s: {exc.reason}") from exc
        publisher = self._publisher
        if publisher is None:
            raise conn.gone()
        return publisher

    @staticmethod
    def _too_large(topic: str, size: int, block: int, limit: int) -> PublishError:
        if block > _MAX_HEADER_BLOCK:
            why = (
                f"its header block is {block} bytes, JetStream takes at most "
                f"{_MAX_HEADER_BLOCK} (payload {size} bytes)"
            )
        else:
            why = (
                f"payload {size} bytes + header block {block} bytes = {size + block} bytes, "
                f"over the server's max_payload of {limit} bytes"
            )
        return PublishError(topic, why, permanent=True)

    # -- consuming -------------------------------------------------------------------

    def consumer(self, topic: str, group: str, sink: Sink) -> Consumer:
        self._conn.live()
        return GroupMember(self._conn, topic, group, sink)
