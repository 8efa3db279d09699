"""What a subscription has done (counters) and what it is doing now (a snapshot)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["HeldPartition", "SubscriptionSnapshot", "SubscriptionStats", "WaitingKey"]


@dataclass(slots=True)
class SubscriptionStats:
    """Counters of one subscription (cheap ints, kept up by the engine as it goes)."""

    delivered: int = 0  # messages taken from the broker
    handled: int = 0  # handler succeeded
    retries: int = 0  # failed attempts that were retried
    dead_lettered: int = 0
    dropped: int = 0  # queued messages released on revoke/close (redelivered later)
    committed: int = 0  # commit points reported to the transport
    parked: int = 0  # dead-lettered by on_dead_letter="park" (first failures included)
    version_duplicates: int = 0  # versions="strict": skipped, not above the last handled
    version_gaps: int = 0  # versions="strict": above the last handled + 1
    errors: list[str] = field(default_factory=list)  # last few dead-letter reasons

    def note_error(self, text: str) -> None:
        self.errors.append(text)
        del self.errors[:-20]


@dataclass(frozen=True, slots=True)
class WaitingKey:
    """A key with messages queued behind the one of it being handled (or about to be)."""

    key: str
    partition: int
    waiting: int
    """Messages of the key queued, not yet started."""
    running_for: float | None
    """Seconds the key's current message has been running (``None``: none runs)."""
    attempts: int
    """Attempts of the key's current message so far (0: none runs)."""


@dataclass(frozen=True, slots=True)
class HeldPartition:
    """A partition whose commit point waits for its oldest unfinished message: the key
    holding it, and how much is done behind it (redone after a crash, not committable)."""

    topic: str
    partition: int
    key: str | None
    """The key of the oldest unfinished message (``None``: an unkeyed message)."""
    offset: int
    attempts: int
    """Attempts of that message so far (0: not started yet)."""
    running_for: float | None
    """Seconds that message has been running (``None``: queued, not started)."""
    held: int
    """Messages after it that are done and wait for it to be committed."""
    unfinished: int
    """Messages of the partition taken in and not done, that one included."""
    oldest_age: float | None
    """Seconds since that message was written to the broker (its timestamp), on this
    machine's clock: the partition's lag by age (``None``: no timestamp)."""


@dataclass(frozen=True, slots=True)
class SubscriptionSnapshot:
    """``sub.stats()``: the counters and the live state of one subscription at one
    moment. Cheap to take (it walks the work the subscription holds, which
    ``max_uncommitted`` bounds), never needed on a hot path."""

    topic: str
    group: str
    delivered: int
    handled: int
    retries: int
    dead_lettered: int
    dropped: int
    committed: int
    errors: tuple[str, ...]
    """The last few dead-letter reasons."""
    in_flight: int
    """Messages taken in and not yet done (handled or dead-lettered)."""
    uncommitted: int
    """Messages taken in and not yet committed (done or not)."""
    running: int
    """Handlers running now."""
    oldest_running_age: float | None
    """Seconds the longest-running handler has run (``None``: none runs)."""
    waiting_keys: tuple[WaitingKey, ...]
    """The keys with the most queued messages, most first (at most ``top``)."""
    held_partitions: tuple[HeldPartition, ...]
    """Partitions with uncommitted messages, those holding back the most first (at most
    ``top``): which key holds which partition's commit point, and for how long."""
    parked: int = 0
    """Messages dead-lettered by ``on_dead_letter="park"``, first failures included."""
    version_duplicates: int = 0
    """``versions="strict"``: envelopes skipped, their version not above the last handled."""
    version_gaps: int = 0
    """``versions="strict"``: envelopes whose version skipped ahead (handled, or parked)."""
