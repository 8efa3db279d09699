"""Topics: how they are named and how they are created."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

__all__ = ["PartitionPosition", "TopicConfig", "TopicInfo", "check_topic"]

# Kafka's topic rule, the strictest of our backends: one name works everywhere.
_TOPIC = re.compile(r"[A-Za-z0-9._\-]{1,249}")


@functools.lru_cache(maxsize=4096)  # publish checks every call: keep it off the hot path
def check_topic(topic: str) -> str:
    """``topic`` if it is a valid name on every backend, else ``ValueError``."""
    if not _TOPIC.fullmatch(topic):
        raise ValueError(f"invalid topic {topic!r}: use 1 to 249 characters of A-Z a-z 0-9 . _ -")
    return topic


@dataclass(frozen=True, slots=True)
class TopicConfig:
    """How a topic (Kafka topic, JetStream stream, memory log) is created.

    ``ephemeral`` topics trade durability for speed: short retention on Kafka, memory
    storage on NATS. ``retention_seconds=None`` keeps the backend's default.
    ``compacted`` topics keep at least the last record of each key (Kafka
    ``cleanup.policy=compact``, plus ``delete`` when ``retention_seconds`` is given):
    what a store of per-key state needs. NATS and memory keep every record instead (a
    NATS subject is a partition, not a key: JetStream has nothing to compact by).
    """

    partitions: int = 3
    replication_factor: int = 1
    retention_seconds: float | None = None
    compression: str | None = None
    ephemeral: bool = False
    compacted: bool = False

    def __post_init__(self) -> None:
        if type(self.partitions) is not int or self.partitions < 1:
            raise ValueError(f"partitions must be an int >= 1, got {self.partitions!r}")
        if type(self.replication_factor) is not int or self.replication_factor < 1:
            raise ValueError(
                f"replication_factor must be an int >= 1, got {self.replication_factor!r}"
            )
        if type(self.compacted) is not bool:
            raise ValueError(f"compacted must be a bool, got {self.compacted!r}")
        if self.retention_seconds is not None and not self.retention_seconds > 0:
            raise ValueError(f"retention_seconds must be > 0, got {self.retention_seconds!r}")


@dataclass(frozen=True, slots=True)
class TopicInfo:
    """What a backend reports about an existing topic."""

    name: str
    partitions: int


@dataclass(frozen=True, slots=True)
class PartitionPosition:
    """Where a group stands in one partition, as the backend has it (``Transport.positions``).

    ``committed``: the position the group resumes at (``None``: it never committed here);
    ``end``: the position the next record gets; ``lag``: records of the partition the
    group has not committed. On Kafka and memory positions are offsets (``lag`` is
    ``end - committed``, or ``end - first retained offset``); on NATS they are stream
    sequences, shared by every partition of the stream, and ``lag`` is the partition's
    own count (its consumer's pending plus unacknowledged messages)."""

    partition: int
    committed: int | None
    end: int
    lag: int
