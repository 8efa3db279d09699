"""The bus's admin client: the connect probe, and topics created, described, deleted.

It needs no thread of ours: AdminClient futures are completed by librdkafka's own
background thread and bridged with ``asyncio.wrap_future``. The client has no
``close()``: dropping the last reference destroys the handle and joins its native
threads (:meth:`KafkaAdmin.close`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import (
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka import admin as rd_admin
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from keybus.deadline import Deadline
from keybus.topics import PartitionPosition, TopicConfig, TopicInfo
from keybus.transports.kafka.errors import Action, closed, error_code, translate
from keybus.transports.kafka.failures import ConnectionFailures
from keybus.transports.kafka.threads import OwnedThread

__all__ = ["KafkaAdmin"]

log = logging.getLogger("keybus.kafka")

_COMPACTED_SEGMENT_MS = 60 * 60 * 1000  # TopicConfig(compacted=True): segments roll hourly
_EPHEMERAL_RETENTION_MS = 15 * 60 * 1000  # "short retention" for TopicConfig(ephemeral=True)
# The interface gives topic calls no deadline; these bound each request and the wait for
# its effect so that a silent broker fails a call instead of hanging it.
_DESCRIBE_TIMEOUT = 5.0
_CHANGE_TIMEOUT = 10.0  # create / delete: the controller may take a while under load
_VISIBLE_TIMEOUT = 15.0  # until the brokers serve the change in their metadata
# librdkafka reports a request that timed out a little after its request timeout: the
# probe's own wait allows this much more, so librdkafka's reason arrives first.
_ANSWER_MARGIN = 1.0
# How often the probe serves the client's error events while it waits: a wrong password
# or an untrusted certificate fails the connect this soon, not when the wait runs out.
_PROBE_POLL = 0.05
# (OffsetSpec is neither exported nor typed by confluent-kafka's stubs.)
_LATEST = rd_admin.OffsetSpec.latest()  # type: ignore[attr-defined,no-untyped-call]
_EARLIEST = rd_admin.OffsetSpec.earliest()  # type: ignore[attr-defined,no-untyped-call]


class KafkaAdmin:
    """The AdminClient of one transport, created by :meth:`connect`."""

    def __init__(self, url: str, config: dict[str, Any], probe_timeout: float) -> None:
        self._url = url
        self._config = config
        self._probe_timeout = probe_timeout
        self._client: AdminClient | None = None
        self._closed = False

    async def connect(self, deadline: Deadline) -> None:
        """Create the client and prove the broker answers, by ``deadline``; a failure
        names librdkafka's cause (:class:`ConnectionFailures`)."""
        config = dict(self._config)
        failures = ConnectionFailures(config["logger"], config.get("error_cb"))
        config.update(logger=failures, error_cb=failures.error_cb)
        try:
            self._client = AdminClient(config)
        except KafkaException as exc:
            raise translate(exc, "connect", self._url) from exc
        # librdkafka retries unreachable brokers forever; a metadata request with a
        # deadline is what tells "down" from "slow" within a bounded time. It gets what
        # the connect's deadline leaves (probe_timeout at most), minus the margin for
        # librdkafka's own report of a timeout.
        left = deadline.remaining()
        request = min(self._probe_timeout, max(left - _ANSWER_MARGIN, left / 2))
        future = self._client.describe_cluster(request_timeout=request)
        answer = asyncio.wrap_future(future)
        waited = f"no Kafka broker answered within {round(request, 1):g} s"
        try:
            async with asyncio.timeout(deadline.within(request + _ANSWER_MARGIN).remaining()):
                # Served here (the admin client has no thread of ours): its error events,
                # its log lines, an OAUTHBEARER token refresh.
                while not (await asyncio.wait({answer}, timeout=_PROBE_POLL))[0]:
                    self._client.poll(0)
                    if failures.definitive is not None:
                        raise translate(failures.definitive, "connect", self._url)
                answer.result()
        except TimeoutError:
            future.cancel()
            self._client.poll(0)
            cause = failures.reason()
            text = f"{waited}: {cause}" if cause else waited
            raise translate(text, "connect", self._url) from None
        except KafkaException as exc:
            self._client.poll(0)
            cause = failures.reason()
            if cause and error_code(exc) == KafkaError._TIMED_OUT:
                # librdkafka's timeout is only the symptom: name the cause instead.
                raise translate(f"{waited}: {cause}", "connect", self._url) from exc
            raise translate(exc, "connect", self._url, context=cause or "") from exc
        finally:
            answer.cancel()
            self._client.poll(0)

    def close(self) -> None:
        """Destroy the client (idempotent); later calls raise ``BusClosedError``."""
        self._closed = True
        if self._client is not None:
            # The admin client has no close(): dropping the last reference destroys the
            # handle (and joins its native threads); collect in case a cycle holds it.
            self._client = None
            gc.collect()

    def _live(self) -> AdminClient:
        if self._closed:
            raise closed(self._url)
        if self._client is None:
            raise translate("the transport is not connected", "connect", self._url)
        self._client.poll(0)  # hand queued librdkafka log lines to logging
        return self._client

    async def ensure_topic(self, topic: str, config: TopicConfig) -> None:
        settings: dict[str, str] = {}
        if config.retention_seconds is not None:
            settings["retention.ms"] = str(int(config.retention_seconds * 1000))
        elif config.ephemeral:
            settings["retention.ms"] = str(_EPHEMERAL_RETENTION_MS)
        if config.compression:
            settings["compression.type"] = config.compression
        if config.compacted:
            retained = config.retention_seconds is not None
            settings["cleanup.policy"] = "compact,delete" if retained else "compact"
            # Only closed segments are compacted: roll hourly, not weekly (the default),
            # so a store written at every parked message stays near one record per key.
            settings["segment.ms"] = str(_COMPACTED_SEGMENT_MS)
        new = NewTopic(
            topic,
            num_partitions=max(1, config.partitions),
            replication_factor=max(1, config.replication_factor),
            config=settings,
        )
        await self._change(
            topic,
            "create",
            lambda admin: admin.create_topics([new], request_timeout=_CHANGE_TIMEOUT),
            already=KafkaError.TOPIC_ALREADY_EXISTS,
        )

    async def describe_topic(self, topic: str) -> TopicInfo:
        try:
            partitions = await self._partitions(topic)
        except KafkaException as exc:
            raise translate(exc, "describe", topic) from exc
        if partitions is None:
            raise translate("no such topic", "describe", topic)
        return TopicInfo(topic, partitions)

    async def list_topics(self, deadline: Deadline) -> list[str]:
        """The cluster's topics from a metadata request, internal ones (``__*``) left out.
        confluent-kafka offers that request only as a blocking call: it runs in a thread
        of its own, joined by ``deadline`` (librdkafka's own timeout ends it soon after)."""
        client = self._live()
        timeout = max(0.1, deadline.remaining())
        found: list[str] = []
        failed: list[BaseException] = []

        def request() -> None:
            try:
                found.extend(client.list_topics(timeout=timeout).topics)
            except Exception as exc:  # handed to the loop side, translated there
                failed.append(exc)

        thread = OwnedThread(request, "keybus-kafka-list-topics", asyncio.get_running_loop())
        thread.start()
        if not await thread.join(deadline.within(timeout + _ANSWER_MARGIN)):
            raise translate("no answer in time", "list", "")
        if failed:
            raise translate(failed[0], "list", "") from failed[0]
        return sorted(name for name in found if not name.startswith("__"))

    async def delete_group(self, group: str, deadline: Deadline) -> None:
        """Delete ``group``'s committed offsets (it has no members left); a group the
        broker does not know, or an answer not in by ``deadline``, is let be."""
        client = self._live()
        timeout = max(0.1, deadline.remaining())
        future = client.delete_consumer_groups([group], request_timeout=timeout)[group]
        try:
            async with asyncio.timeout(deadline.remaining()):
                await asyncio.wrap_future(future)
        except (TimeoutError, KafkaException) as exc:
            future.cancel()
            log.debug("keybus: could not delete the private group %s: %r", group, exc)

    async def positions(
        self, topic: str, group: str, deadline: Deadline
    ) -> list[PartitionPosition]:
        """The group's committed offsets and the partitions' first and next offsets."""
        try:
            async with asyncio.timeout(deadline.remaining()):
                count = await self._partitions(topic)
                if count is None:
                    raise translate("no such topic", "describe", topic)
                client = self._live()
                timeout = max(0.1, deadline.remaining())
                parts = [TopicPartition(topic, p) for p in range(count)]
                committed_f = client.list_consumer_group_offsets(
                    [ConsumerGroupTopicPartitions(group, parts)], request_timeout=timeout
                )[group]
                ends_f = client.list_offsets(dict.fromkeys(parts, _LATEST), request_timeout=timeout)
                starts_f = client.list_offsets(
                    dict.fromkeys(parts, _EARLIEST), request_timeout=timeout
                )
                listed = await asyncio.wrap_future(committed_f)
                ends = {
                    tp.partition: (await asyncio.wrap_future(f)).offset for tp, f in ends_f.items()
                }
                starts = {
                    tp.partition: (await asyncio.wrap_future(f)).offset
                    for tp, f in starts_f.items()
                }
        except TimeoutError:
            raise translate("no answer in time", "describe", topic) from None
        except KafkaException as exc:
            raise translate(exc, "describe", topic) from exc
        committed = {tp.partition: tp.offset for tp in listed.topic_partitions}
        out = []
        for p in range(count):
            at = committed.get(p, -1)
            mark = at if at >= 0 else None
            end = ends[p]
            out.append(PartitionPosition(p, mark, end, max(0, end - max(at, starts[p]))))
        return out

    async def ping(self, deadline: Deadline) -> float:
        """A metadata round trip (the cluster's description), in seconds."""
        began = time.monotonic()
        future = self._live().describe_cluster(request_timeout=max(0.1, deadline.remaining()))
        try:
            async with asyncio.timeout(deadline.remaining()):
                await asyncio.wrap_future(future)
        except TimeoutError:
            future.cancel()
            raise translate("no answer in time", "connect", self._url) from None
        except KafkaException as exc:
            raise translate(exc, "connect", self._url) from exc
        return time.monotonic() - began

    async def delete_topic(self, topic: str) -> None:
        await self._change(
            topic,
            "delete",
            lambda admin: admin.delete_topics([topic], request_timeout=_CHANGE_TIMEOUT),
            already=KafkaError.UNKNOWN_TOPIC_OR_PART,
        )

    async def _change(
        self,
        topic: str,
        action: Action,
        request: Callable[[AdminClient], dict[str, Any]],
        *,
        already: int,
    ) -> None:
        """Send a create/delete request; ``already`` is the error code that means "it is
        so already" (idempotent). Then wait until the brokers' metadata shows the change,
        so a consumer subscribing next sees every partition in its first metadata reply
        (and a deleted topic is gone for whoever asks next)."""
        try:
            await asyncio.wrap_future(request(self._live())[topic])
        except KafkaException as exc:
            if error_code(exc) != already:
                raise translate(exc, action, topic) from exc
        await self._until_visible(topic, action)

    async def _partitions(self, topic: str) -> int | None:
        """The topic's partition count once every partition has a leader, else None."""
        futures = self._live().describe_topics(
            TopicCollection([topic]), request_timeout=_DESCRIBE_TIMEOUT
        )
        try:
            description = await asyncio.wrap_future(futures[topic])
        except KafkaException as exc:
            if error_code(exc) == KafkaError.UNKNOWN_TOPIC_OR_PART:
                return None
            raise
        partitions = description.partitions
        if not partitions or any(p.leader is None for p in partitions):
            return None
        return len(partitions)

    async def _until_visible(self, topic: str, action: Action) -> None:
        present = action == "create"
        deadline = time.monotonic() + _VISIBLE_TIMEOUT
        delay = 0.005
        while True:
            try:
                exists = (await self._partitions(topic)) is not None
            except KafkaException:
                exists = not present  # a transient admin error: ask again
            if exists == present:
                return
            if time.monotonic() > deadline:
                what = "appear" if present else "disappear"
                raise translate(f"did not {what} within {_VISIBLE_TIMEOUT:g} s", action, topic)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)
