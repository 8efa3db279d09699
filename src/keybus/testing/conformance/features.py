"""What a backend can do, as the conformance suite needs to know it.

The suite decides what to run from these flags and facts, never from a backend's name:
a test whose property a backend declares it does not have is skipped with the flag's
name, and placement and timing come from here instead of being hard-coded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

from keybus.partitioning import key_partition

__all__ = ["Features"]


@dataclass(frozen=True, kw_only=True)
class Features:
    """Capability flags and facts of one backend. The defaults are the full contract
    (every flag on but ``retakes_crashed_partition`` and ``dedupe``, which are optional):
    a backend switches off what it cannot do, and the tests that need it are skipped,
    naming the flag."""

    consumer_groups: bool = True
    """Members of one group share a topic's partitions (each message handled by one of
    them, a key by one member); separate groups each get every message."""

    rebalance: bool = True
    """A member may join a group mid-stream: partitions move to it without losing a
    message, reordering a key, or two members handling one key at once."""

    restart_resumes: bool = True
    """A group's position outlives its members: a new member (a restarted service)
    resumes at the first message not committed, including one whose handler never
    finished when the previous member closed."""

    single_active_member: bool = False
    """A topic is one partition and a group has one active member on it at a time (NATS
    topics in the Go SDK's subject layout: one subject): a member that joins while another
    is active takes nothing until that one leaves, then takes over. Tests that need two
    members sharing a topic close the first member instead, and a topic created with
    more partitions has one (:meth:`topic_partitions`)."""

    retakes_crashed_partition: bool = False
    """After a crash inside the core's intake (a keybus bug), the backend re-takes the
    partition and delivers the message again, instead of only reporting the crash (the
    subscription then stalls until reopened — also allowed)."""

    fences: bool = True
    """Every delivery carries ``Message.fence``, the partition's ownership token, and it
    increases every time the partition changes owner."""

    dedupe: bool = False
    """Publish-side de-duplication by event id, opt-in with ``dedupe_window`` (seconds):
    a record whose ``X-Event-ID`` was published to its topic within the window is not
    stored, and its publish raises a permanent ``PublishError``; dead letters are never
    de-duplicated. Without it, the backend refuses a window at connect with a
    ``ValueError``. Either way, ``dedupe_window=None`` (off) is the default and is taken."""

    parked_persistence: bool = True
    """Parked keys (``on_dead_letter="park"``) are stored in the broker
    (``Transport.read_topic``): a restarted consumer, or the member that takes a
    partition over, keeps parking them, and a replay reads their dead letters back.
    Without it, parking works within one subscription's life and replay is refused."""

    stored_versions: bool = True
    """The version guard's versions (``versions="strict"``) are kept in the broker
    (``Transport.compacts_topics`` and ``read_topic``): after a restart a duplicate is
    still skipped and a gap still seen. Without it they live in the subscription."""

    max_message_bytes: int | None = None
    """The largest record (value and headers) the backend accepts, if the suite should
    test what happens near it: a poison record a few bytes under the limit, whose dead
    letter (with its added headers) is over it, must not wedge its key."""

    partition_for: Callable[[str, int], int] = key_partition
    """``partition_for(key, partitions)``: the partition a keyed record lands on in a
    topic of ``partitions`` partitions. Default: keybus's own placement (sarama's FNV-1a,
    as the Go SDK's services place keys; :func:`keybus.partitioning.key_partition`).
    Tests that need keys on given partitions get them from here, and one test checks
    that the backend places keys this way."""

    handover_timeout: float = 20.0
    """Seconds within which a partition reaches another member: one joining mid-stream,
    a successor after a close, a re-take after a crash. The suite's deadline for those."""

    def topic_partitions(self, requested: int) -> int:
        """The partitions a topic created with ``TopicConfig(partitions=requested)`` has."""
        return 1 if self.single_active_member else requested

    @classmethod
    def flags(cls) -> frozenset[str]:
        """The names of the boolean capability flags."""
        return frozenset(f.name for f in fields(cls) if f.type in (bool, "bool"))
