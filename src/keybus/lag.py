"""Consumer lag by count and by age: what a group has not committed yet, per partition.

The count comes from the backend (``Transport.positions``: committed and end positions,
read-only, for any group); the age and what is held back come from the core, for the
partitions this bus consumes itself — the age of the oldest message not done yet (since
the broker stored it) and how many done messages wait behind it to be committed. Both
are what an operator of an ordered consumer asks first: how far behind, and since when.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Lag", "LagAlert", "LagWatch", "PartitionLag"]


@dataclass(frozen=True, slots=True)
class PartitionLag:
    """One partition of one topic, for one group."""

    topic: str
    partition: int
    group: str
    committed: int | None
    """Where the group resumes (``None``: it never committed here)."""
    end: int
    """The position the next record gets (Kafka, memory: an offset; NATS: a stream
    sequence, shared by the stream's partitions)."""
    lag: int
    """Records the group has not committed."""
    oldest_unfinished_age: float | None
    """Seconds since the oldest record this bus has taken in and not finished was stored
    (``None``: this bus does not consume the partition, or has nothing unfinished)."""
    uncommitted: int | None
    """Records this bus finished that wait behind that one to be committed (``None``:
    this bus does not consume the partition)."""


@dataclass(frozen=True, slots=True)
class Lag:
    """``await bus.lag()``: every partition asked about."""

    partitions: tuple[PartitionLag, ...]

    @property
    def total(self) -> int:
        """Records not committed, over every partition."""
        return sum(p.lag for p in self.partitions)

    @property
    def max_age(self) -> float | None:
        """The oldest unfinished record's age over the partitions this bus consumes."""
        return max(
            (
                p.oldest_unfinished_age
                for p in self.partitions
                if p.oldest_unfinished_age is not None
            ),
            default=None,
        )


@dataclass(frozen=True, slots=True)
class LagAlert:
    """``bus.watch_lag``'s notice: a partition fell behind (``behind``: its count lag
    reached the threshold, or its oldest unfinished message the maximum age — ``reason``
    says which) or caught up again."""

    partition: PartitionLag
    behind: bool
    reason: str


class LagWatch:
    """Which partitions are behind, from one :class:`Lag` to the next: alerts on the
    changes only. Pure, so its rules are tested without a bus."""

    def __init__(self, threshold: int | None, max_age: float | None) -> None:
        if threshold is None and max_age is None:
            raise ValueError("watch_lag needs a threshold, a max_age or both")
        if threshold is not None and threshold < 1:
            raise ValueError(f"threshold must be >= 1, got {threshold!r}")
        if max_age is not None and not max_age > 0:
            raise ValueError(f"max_age must be > 0, got {max_age!r}")
        self.threshold = threshold
        self.max_age = max_age
        self.behind: set[tuple[str, str, int]] = set()

    def _reason(self, row: PartitionLag) -> str | None:
        if self.threshold is not None and row.lag >= self.threshold:
            return f"{row.lag} records behind (threshold {self.threshold})"
        age = row.oldest_unfinished_age
        if self.max_age is not None and age is not None and age >= self.max_age:
            return f"oldest unfinished record {age:.1f} s old (max {self.max_age:g} s)"
        return None

    def update(self, lag: Lag) -> list[LagAlert]:
        alerts = []
        for row in lag.partitions:
            where = (row.topic, row.group, row.partition)
            reason = self._reason(row)
            if reason is not None and where not in self.behind:
                self.behind.add(where)
                alerts.append(LagAlert(row, True, reason))
            elif reason is None and where in self.behind:
                self.behind.discard(where)
                alerts.append(LagAlert(row, False, f"caught up: {row.lag} records behind"))
        return alerts
