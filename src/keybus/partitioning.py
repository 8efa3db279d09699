"""Partitions: which partition a record goes to, and which member of a group owns which.

Both rules are the core's, shared by every backend that places records or assigns
partitions itself (memory, NATS); Kafka's broker and client do both on their own.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from typing import TypeVar

__all__ = ["Partition", "assign_partitions", "partition_for"]

Partition = tuple[str, int]
"""A stream of strictly ordered positions: ``(topic, partition)``."""

M = TypeVar("M")


def partition_for(key: str | None, partitions: int, round_robin: Iterator[int]) -> int:
    """The partition of a record: a hash of its key (so one key stays on one partition
    and in order), round-robin without a key. Keys with lone surrogates hash too."""
    if partitions <= 1:
        return 0
    if key is None:
        return next(round_robin) % partitions
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % partitions


def assign_partitions(members: Sequence[M], partitions: int) -> dict[int, M]:
    """The group's desired owner of each partition: round-robin over ``members`` in the
    order given (join order), so every member computes the same answer from the same
    view, and a member that joins last moves as few partitions as possible."""
    if not members:
        return {}
    count = len(members)
    return {p: members[p % count] for p in range(partitions)}
