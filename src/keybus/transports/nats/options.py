"""The options of ``keybus.connect("nats://...", **options)``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from keybus.dedupe import check_window
from keybus.transports.nats.layout import SubjectLayout, SubjectTopics

__all__ = ["NatsOptions"]


@dataclass(frozen=True, slots=True)
class NatsOptions:
    """Transport options (keyword arguments of ``keybus.connect("nats://...")``).

    ``ack_wait``: seconds JetStream waits for an ack before redelivering; long handlers
    are kept alive with in-progress acks every ``ack_wait / 3``. ``max_ack_pending``: per
    partition, delivered-but-unacknowledged messages before JetStream pauses it.
    ``lease_ttl``: how long a crashed member keeps its partitions before others take them
    over; leases are renewed every ``heartbeat`` seconds. ``dedupe_window``: off
    (``None``) by default; seconds of JetStream's publish-side de-duplication by event id
    when set (the ``Nats-Msg-Id`` header and the duplicate window of streams this bus
    creates), and a publish the server found a duplicate raises ``PublishError``.
    ``replace_timeout``: how long the transport tries to replace a connection nats-py
    closed for good before it declares itself failed. ``subject_topics``: the topics laid
    out as the Go SDK lays them out (the subject is the topic, one partition, the stream
    a Go service with the same config uses): topic names or patterns (``orders``,
    ``business.>``, ``>``), each mapped to a :class:`~.layout.SubjectLayout` or listed
    alone (the Go SDK's default stream config); see :class:`~.layout.SubjectTopics`.
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
    dedupe_window: float | None = None
    max_pending_publishes: int = 8192
    api_timeout: float = 5.0
    replace_timeout: float = 30.0
    subject_topics: Mapping[str, SubjectLayout] | Iterable[str] | None = None
    layouts: SubjectTopics = field(init=False, repr=False, compare=False)

    @property
    def duplicate_window(self) -> float | None:
        """The duplicate window (seconds) of the streams this bus creates: the
        ``dedupe_window``, or ``None`` when de-duplication is off (the server's default
        then; without ``Nats-Msg-Id`` headers it never applies)."""
        return self.dedupe_window

    def __post_init__(self) -> None:
        if self.heartbeat * 3 > self.lease_ttl:
            raise ValueError("lease_ttl must be at least 3 heartbeats")
        if self.idle_heartbeat * 2 > self.fetch_expires:
            raise ValueError("fetch_expires must be at least 2 idle heartbeats")
        if self.ack_wait <= 0 or self.max_ack_pending < 1 or self.fetch_batch < 1:
            raise ValueError("ack_wait, max_ack_pending and fetch_batch must be positive")
        check_window(self.dedupe_window)  # None or positive seconds, else ValueError
        if not self.replace_timeout > 0:
            raise ValueError("replace_timeout must be positive")
        topics = self.subject_topics
        layouts = topics if isinstance(topics, SubjectTopics) else SubjectTopics(topics)
        object.__setattr__(self, "layouts", layouts)
