"""The options of one subscription (the keyword options of ``subscribe``)."""

from __future__ import annotations

from dataclasses import dataclass

from keybus.middleware import Middleware, check_middleware

__all__ = ["SubscribeOptions"]


@dataclass(frozen=True, slots=True)
class SubscribeOptions:
    """Per-subscription settings (the keyword options of ``subscribe``)."""

    max_concurrency: int = 256
    max_attempts: int = 3
    retry_backoff: float = 0.1
    max_retry_backoff: float = 30.0
    dead_letter_topic: str | None = None  # default: f"{topic}.dlq"
    max_in_flight: int | None = None  # default: max(1024, 4 * max_concurrency)
    # Taken in and not yet committed: handled messages wait behind an unfinished earlier
    # one of their partition (a commit is a prefix), so a handler stuck forever would
    # otherwise let them pile up without end. Default: 16 x the in-flight limit.
    max_uncommitted: int | None = None
    revoke_timeout: float = 10.0
    # Around each attempt, inside the key's lane (keybus.middleware); the bus's own
    # middleware wraps these.
    middleware: tuple[Middleware, ...] = ()
    # "continue": a dead letter's key goes on with its next message; "park": the key's
    # later messages are dead-lettered behind it until a replay or discard (parking.py).
    on_dead_letter: str = "continue"
    # Envelope subscriptions: "strict" checks each aggregate's event_version against the
    # last handled one (duplicates skipped, gaps counted; parked with "park"), for the
    # last version_window aggregates.
    versions: str | None = None
    version_window: int = 100_000

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.retry_backoff < 0 or self.max_retry_backoff < 0:
            raise ValueError("retry_backoff must be >= 0")
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        if self.max_uncommitted is not None and self.max_uncommitted < 1:
            raise ValueError("max_uncommitted must be >= 1")
        if self.revoke_timeout < 0:
            raise ValueError("revoke_timeout must be >= 0")
        if self.on_dead_letter not in ("continue", "park"):
            raise ValueError('on_dead_letter must be "continue" or "park"')
        if self.versions not in (None, "strict"):
            raise ValueError('versions must be None or "strict"')
        if self.version_window < 1:
            raise ValueError("version_window must be >= 1")
        object.__setattr__(self, "middleware", check_middleware(self.middleware))

    def in_flight_limit(self) -> int:
        if self.max_in_flight is not None:
            return self.max_in_flight
        return max(1024, 4 * self.max_concurrency)

    def uncommitted_limit(self) -> int:
        if self.max_uncommitted is not None:
            return self.max_uncommitted
        return 16 * self.in_flight_limit()

    def backoff(self, attempt: int) -> float:
        return float(min(self.retry_backoff * 2 ** (attempt - 1), self.max_retry_backoff))
