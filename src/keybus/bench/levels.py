"""The bench's workloads: the Go SDK's comparison levels, bigger ones, custom ones, and the
concrete plan of one run (names, who publishes what, the envelopes)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import keybus

__all__ = ["GO_LEVELS", "LEVELS", "Level", "Plan", "aggregates_for", "resolve_levels"]

# The Go SDK's comparison levels (name -> messages), kept as our compatibility levels.
GO_LEVELS = {"low": 500, "medium": 2000, "high": 5000, "extreme": 10000}
# ... and beyond them.
LEVELS = {**GO_LEVELS, "100k": 100_000, "1m": 1_000_000}


def aggregates_for(messages: int) -> int:
    """Aggregates = messages / 10, clamped to 50..1000 (the Go SDK's rule)."""
    return max(50, min(1000, messages // 10))


@dataclass(frozen=True)
class Level:
    """One workload: ``aggregates`` publishers, aggregate i sending versions 1..n in order
    to topic i % topics; each topic has ``partitions`` partitions; every payload carries
    ``payload_bytes`` bytes of padding; every handler call takes ``handler_ms``."""

    name: str
    messages: int
    aggregates: int
    topics: int = 5
    partitions: int = 3
    payload_bytes: int = 100
    handler_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.messages < 1 or self.aggregates < 1 or self.topics < 1 or self.partitions < 1:
            raise ValueError("messages, aggregates, topics and partitions must be at least 1")
        if self.aggregates > self.messages:
            raise ValueError(f"{self.aggregates} aggregates cannot share {self.messages} messages")
        if self.payload_bytes < 0 or self.handler_ms < 0:
            raise ValueError("payload bytes and handler time cannot be negative")

    @classmethod
    def named(cls, name: str) -> Level:
        if name not in LEVELS:
            raise ValueError(f"unknown level {name!r}: use {', '.join(LEVELS)} or --messages")
        messages = LEVELS[name]
        return cls(name, messages, aggregates_for(messages))


def resolve_levels(
    names: list[str],
    *,
    messages: int | None = None,
    aggregates: int | None = None,
    topics: int | None = None,
    partitions: int | None = None,
    payload_bytes: int | None = None,
    handler_ms: float | None = None,
) -> list[Level]:
    """The named levels, plus a ``custom`` one when ``messages`` is given; the other
    settings, when given, apply to every level (their rows record what ran)."""
    levels = [Level.named(name) for name in names]
    if messages is not None:
        levels.append(Level("custom", messages, aggregates or aggregates_for(messages)))
    overrides: dict[str, Any] = {
        key: value
        for key, value in {
            "aggregates": aggregates,
            "topics": topics,
            "partitions": partitions,
            "payload_bytes": payload_bytes,
            "handler_ms": handler_ms,
        }.items()
        if value is not None
    }
    return [dataclasses.replace(level, **overrides) for level in levels]


class Plan:
    """One run of a level: fresh names (``prefix``), how many versions each aggregate
    sends, and the envelopes themselves (built when published, so their timestamps are
    the publish time)."""

    def __init__(self, level: Level, run_id: str) -> None:
        self.level = level
        self.prefix = f"kb-bench-{run_id}"
        self.topics = [f"{self.prefix}-{i}" for i in range(level.topics)]
        self.warmup_topic = f"{self.prefix}-warmup"
        self.group = f"{self.prefix}-group"
        base, extra = divmod(level.messages, level.aggregates)
        self.counts = [base + (1 if i < extra else 0) for i in range(level.aggregates)]
        self.aggregate_ids = [f"agg-{i}" for i in range(level.aggregates)]
        self.index = {name: i for i, name in enumerate(self.aggregate_ids)}
        self._padding = "x" * level.payload_bytes

    def topic_of(self, aggregate: int) -> int:
        return aggregate % self.level.topics

    def envelope(self, aggregate: int, version: int) -> keybus.Envelope:
        return keybus.Envelope(
            aggregate_id=self.aggregate_ids[aggregate],
            event_type="BenchEvent",
            event_version=version,
            payload={"n": version, "pad": self._padding},
        )
