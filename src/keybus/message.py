"""The message a raw subscription's handler receives, and its lazily read headers."""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LazyHeaders", "Message"]


@dataclass(slots=True, eq=False)
class Message:
    """One record as delivered by a backend. Treat it as read-only: one instance may be
    shared by several subscriptions.

    ``partition`` and ``offset`` are the backend's position where it has one (Kafka:
    partition and offset; NATS: the key's partition and the stream sequence; memory:
    partition and offset).
    ``raw`` is the backend's native message object, an escape hatch for backend features.
    ``fence`` is the partition's ownership token: it increases every time the partition
    changes owner (Kafka: the group generation in which the partition was assigned to
    this member; NATS: the revision of the group-state write that claimed the partition;
    memory: the group's assignment count), for handlers that
    write elsewhere and must refuse a stale owner's write (compare-and-set on the fence;
    docs/api.md).
    """

    topic: str
    value: bytes
    key: str | None = None
    headers: Mapping[str, bytes] = field(default_factory=dict)
    partition: int = 0
    offset: int = 0
    timestamp: float | None = None
    raw: Any = field(default=None, repr=False)
    fence: int = 0


class LazyHeaders(Mapping[str, bytes]):
    """A delivered record's headers as a read-only mapping, converted on first use.

    Converting every record's headers as it arrives costs 1.5-3 µs a record, and most
    subscriptions (every envelope subscription) never read them. A transport subclasses
    this with :meth:`_load`, which builds the dict from ``self._source`` and never raises.
    """

    __slots__ = ("_dict", "_source")

    def __init__(self, source: Any) -> None:
        self._source: Any = source
        self._dict: dict[str, bytes] | None = None

    @abc.abstractmethod
    def _load(self) -> dict[str, bytes]:
        """The headers of ``self._source`` (called once)."""

    def _headers(self) -> dict[str, bytes]:
        headers = self._dict
        if headers is None:
            headers = self._dict = self._load()
            self._source = None
        return headers

    def __getitem__(self, name: str) -> bytes:
        return self._headers()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._headers())

    def __len__(self) -> int:
        return len(self._headers())

    def __contains__(self, name: object) -> bool:
        return name in self._headers()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LazyHeaders):
            other = other._headers()
        return self._headers() == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self._headers())
