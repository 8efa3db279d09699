"""Partitions: which partition a record goes to, and which member of a group owns which.

Both rules are the core's, shared by every backend that places records or assigns
partitions itself (memory, NATS); on Kafka librdkafka places records with the same hash
(``partitioner=fnv1a_random``) and the group coordinator assigns.

The hash is the one the Go SDK's services use (sarama's default hash partitioner:
32-bit FNV-1a of the key's bytes, taken as a signed int32, modulo the partition count,
then made non-negative), so an aggregate published by a Go service and by keybus lands
on one partition and keeps its order. ``tests/golden/go_sdk/sarama-partitions.tsv`` holds
sarama's own answers.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import TypeVar

__all__ = ["Partition", "assign_partitions", "fnv1a_32", "key_partition", "partition_for"]

Partition = tuple[str, int]
"""A stream of strictly ordered positions: ``(topic, partition)``."""

M = TypeVar("M")


_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193


def fnv1a_32(data: bytes) -> int:
    """32-bit FNV-1a."""
    value = _FNV_OFFSET
    for byte in data:
        value = ((value ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return value


@functools.lru_cache(maxsize=65_536)  # a service sees the same aggregates over and over
def key_partition(key: str, partitions: int) -> int:
    """The partition of ``key`` among ``partitions``, as sarama places it."""
    value = fnv1a_32(key.encode("utf-8", "surrogatepass"))
    signed = value - (1 << 32) if value & 0x80000000 else value
    # Go's % truncates toward zero; sarama then takes the absolute value.
    return abs(signed) % partitions if signed < 0 else signed % partitions


def partition_for(key: str | None, partitions: int, round_robin: Iterator[int]) -> int:
    """The partition of a record: a hash of its key (so one key stays on one partition
    and in order), round-robin without a key. Keys with lone surrogates hash too."""
    if partitions <= 1:
        return 0
    if key is None:
        return next(round_robin) % partitions
    return key_partition(key, partitions)


def assign_partitions(members: Sequence[M], partitions: int) -> dict[int, M]:
    """The group's desired owner of each partition: round-robin over ``members`` in the
    order given (join order), so every member computes the same answer from the same
    view, and a member that joins last moves as few partitions as possible."""
    if not members:
        return {}
    count = len(members)
    return {p: members[p % count] for p in range(partitions)}
