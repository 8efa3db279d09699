"""Where a topic lives on the server: finding, creating, describing and deleting its
stream, in either layout.

* keybus's partitioned layout: stream ``KB_<token>`` over ``kb.<token>.<p>``, the
  partition count in the stream metadata (:mod:`.names`);
* the subject layout (the ``subject_topics`` option, :mod:`.layout`): the subject is the
  topic, in the stream a Go service with the same ``JetStream.Stream`` config uses; one
  partition.

Every method raises NATS errors (the transport translates them for what it was doing);
:class:`~.errors.Overlap` when a stream of another name already stores a subject-layout
topic's subject.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext, api

from keybus.topics import TopicConfig
from keybus.transports.nats.client import Stream
from keybus.transports.nats.errors import OVERLAP, Overlap
from keybus.transports.nats.layout import SubjectLayout, SubjectTopics, subject_matches
from keybus.transports.nats.names import is_group_durable, stream_name, subject_base
from keybus.transports.nats.options import NatsOptions

__all__ = ["Streams"]

_PARTITIONS_META = "keybus.partitions"
_TOPIC_META = "keybus.topic"
_LAYOUT_META = "keybus.layout"


class Streams:
    """The streams behind topics, cached per topic (the publish path asks every time)."""

    def __init__(
        self, live: Callable[[], tuple[NatsClient, JetStreamContext]], options: NatsOptions
    ) -> None:
        self._live = live
        self._options = options
        self._layouts: SubjectTopics = options.layouts
        self.known: dict[str, Stream] = {}

    def layout(self, topic: str) -> SubjectLayout | None:
        return self._layouts.layout(topic)

    def forget(self, topic: str) -> None:
        self.known.pop(topic, None)

    async def lookup(self, topic: str) -> Stream:
        """The topic's stream, from the cache or the server; a topic nobody created yet is
        created with the default :class:`TopicConfig` (as Kafka auto-creates)."""
        known = self.known.get(topic)
        if known is not None:
            return known
        try:
            return await self.find(topic)
        except nats.js.errors.NotFoundError:
            return await self.ensure(topic, TopicConfig())

    async def find(self, topic: str) -> Stream:
        """The topic's existing stream; ``NotFoundError`` if there is none."""
        _, js = self._live()
        layout = self.layout(topic)
        if layout is None:
            info = await js.stream_info(stream_name(topic))
            return self._remember(topic, info.config.name or stream_name(topic), _partitions(info))
        info = await self._locate(js, topic, layout)
        return self._remember(topic, info.config.name or layout.topic_stream(topic), 1)

    @staticmethod
    async def _locate(js: JetStreamContext, topic: str, layout: SubjectLayout) -> api.StreamInfo:
        """A subject-layout topic's stream, by the Go SDK's rule: its configured stream if
        that stores the topic's subject, else the topic's own; ``NotFoundError``."""
        with contextlib.suppress(nats.js.errors.NotFoundError):
            info = await js.stream_info(layout.stream)
            if _stores(info, topic):
                return info
        name = layout.topic_stream(topic)
        info = await js.stream_info(name)
        if not _stores(info, topic):
            raise nats.errors.Error(
                f"stream {name} exists but does not store subject {topic} "
                f"(its subjects: {', '.join(info.config.subjects or [])})"
            )
        return info

    async def ensure(self, topic: str, config: TopicConfig) -> Stream:
        """The topic's stream, created with ``config`` if missing. An existing stream is
        kept as it is: the partition count in particular must never change, or keys would
        move partitions and lose their order."""
        layout = self.layout(topic)
        if layout is None:
            partitions = max(1, config.partitions)
            metadata = {_TOPIC_META: topic, _PARTITIONS_META: str(partitions)}
            name, subjects = stream_name(topic), [f"{subject_base(topic)}.*"]
        else:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                return await self.find(topic)
            metadata = {_LAYOUT_META: "subject"}
            if layout.covers(topic) and not await _exists(self._live()[1], layout.stream):
                # As the Go service creates its configured stream at start-up.
                name, subjects = layout.stream, list(layout.subjects)
            else:
                name, subjects = layout.topic_stream(topic), [topic]
        _, js = self._live()
        try:
            info = await js.add_stream(self._config(name, subjects, config, metadata))
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code == OVERLAP:
                raise await _overlap(js, subjects[0], exc, hint=layout is not None) from exc
            # It exists with other settings (kept, above), or meanwhile (a Go service
            # made it): use it. Anything else is the server's refusal, reported as is.
            try:
                return await self.find(topic)
            except nats.js.errors.NotFoundError:
                raise exc from None
        # (Either layout's new stream stores the topic: no second look-up.)
        return self._remember(topic, name, _partitions(info) if layout is None else 1)

    def _config(
        self, name: str, subjects: list[str], config: TopicConfig, metadata: dict[str, str]
    ) -> api.StreamConfig:
        # persistent: file storage, kept by limits (age) — survives restarts and crashes.
        # ephemeral: memory storage — faster, gone when the server restarts.
        return api.StreamConfig(
            name=name,
            subjects=subjects,
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.MEMORY if config.ephemeral else api.StorageType.FILE,
            max_age=config.retention_seconds,
            num_replicas=max(1, config.replication_factor),
            # Off (None): the server's default, which never applies without Nats-Msg-Id.
            duplicate_window=self._options.dedupe_window or 0,
            compression=api.StoreCompression.S2 if config.compression else None,
            metadata=metadata,
        )

    async def topics(self) -> list[str]:
        """The topics of keybus's partitioned layout (streams ``KB_*``, named in their
        metadata), sorted. Key-value buckets and streams of other layouts or of other
        programs are not topics of this kind, so they are left out."""
        _, js = self._live()
        names: set[str] = set()
        offset = 0
        while True:  # pages of streams until one comes back empty
            page = await js.streams_info(offset)
            offset += len(page)
            for info in page:
                metadata = info.config.metadata or {}
                topic = metadata.get(_TOPIC_META)
                if topic and (info.config.name or "").startswith("KB_"):
                    names.add(topic)
            if not page:
                return sorted(names)

    async def delete(self, topic: str) -> None:
        """Delete the topic's stream — or, for a subject-layout topic in a stream shared
        with other subjects (a Go service's ``JetStream.Stream.Name``), purge its subject
        only. A missing topic is no error."""
        self.forget(topic)
        _, js = self._live()
        layout = self.layout(topic)
        if layout is None:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(stream_name(topic))
            return
        try:
            info = await self._locate(js, topic, layout)
        except nats.js.errors.NotFoundError:
            return
        name = info.config.name or layout.topic_stream(topic)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            if list(info.config.subjects or []) == [topic]:
                await js.delete_stream(name)
                return
            await js.purge_stream(name, subject=topic)
            # The stream stays (others' subjects): drop keybus's durables on this topic
            # with the topic, as deleting a stream of its own would. Go's stay.
            for consumer in await js.consumers_info(name):
                if consumer.config.filter_subject == topic and is_group_durable(consumer.name):
                    await js.delete_consumer(name, consumer.name)

    def _remember(self, topic: str, name: str, partitions: int) -> Stream:
        if self.layout(topic) is None:
            base = subject_base(topic)
            subjects = tuple(f"{base}.{p}" for p in range(partitions))
        else:
            subjects = (topic,)
        known = self.known[topic] = Stream(name, subjects)
        return known


def _partitions(info: api.StreamInfo) -> int:
    metadata = info.config.metadata or {}
    return max(1, int(metadata.get(_PARTITIONS_META, "1")))


async def _overlap(
    js: JetStreamContext, subject: str, exc: nats.js.errors.APIError, *, hint: bool
) -> Overlap:
    """The server's refusal, naming the stream that already stores ``subject``."""
    try:
        holder: str | None = await js.find_stream_name_by_subject(subject)
    except (nats.errors.Error, TimeoutError):
        holder = None
    return Overlap(exc, subject, holder, hint=hint)


async def _exists(js: JetStreamContext, name: str) -> bool:
    try:
        await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        return False
    return True


def _stores(info: api.StreamInfo, topic: str) -> bool:
    return any(subject_matches(s, topic) for s in info.config.subjects or [])
