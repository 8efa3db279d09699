"""Counters of one subscription."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["SubscriptionStats"]


@dataclass(slots=True)
class SubscriptionStats:
    """Counters of one subscription (cheap ints, read them any time)."""

    delivered: int = 0  # messages taken from the broker
    handled: int = 0  # handler succeeded
    retries: int = 0  # failed attempts that were retried
    dead_lettered: int = 0
    dropped: int = 0  # queued messages released on revoke/close (redelivered later)
    committed: int = 0  # commit points reported to the transport
    errors: list[str] = field(default_factory=list)  # last few dead-letter reasons

    def note_error(self, text: str) -> None:
        self.errors.append(text)
        del self.errors[:-20]
