"""The message a raw subscription's handler receives."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True, eq=False)
class Message:
    """One record as delivered by a backend. Treat it as read-only: one instance may be
    shared by several subscriptions.

    ``partition`` and ``offset`` are the backend's position where it has one (Kafka:
    partition and offset; NATS: the key's partition and the stream sequence; memory:
    partition and offset).
    ``raw`` is the backend's native message object, an escape hatch for backend features.
    """

    topic: str
    value: bytes
    key: str | None = None
    headers: Mapping[str, bytes] = field(default_factory=dict)
    partition: int = 0
    offset: int = 0
    timestamp: float | None = None
    raw: Any = field(default=None, repr=False)
