"""Deadlines, and the close-time budget of a bus, in one place.

Every bounded step a transport performs is handed the :class:`Deadline` it must meet
(``Consumer.stop/flush/close``, ``Transport.connect/close``, a revoke's wait); the
transport derives its own internal timeouts from it instead of from constants that
happen to fit the core's. A deadline is a point on this process's monotonic clock, so it
can be passed down, shared by steps running side by side, and narrowed, but never grows.

The budget of ``bus.close(timeout)`` (and ``sub.unsubscribe(timeout)``), step by step;
``close_bound`` adds it up::

    drain        handlers run on until the close's own ``timeout``            timeout
    stop         consumer.stop (stop fetching), from close begin       + STOP_MARGIN
    cancel       handlers still running are cancelled and unwind       + CANCEL_GRACE
    flush        consumer.flush: the last commits made durable         + FLUSH_BUDGET
    leave        consumer.close: leave the group, release its threads  + CONSUMER_CLOSE_BUDGET
    transport    Transport.close: flush publishes, disconnect          + Transport.close_budget

Subscriptions stop side by side, so the first five steps count once per bus. A healthy
broker takes milliseconds of each; the bound is for brokers that are gone or silent.
A transport whose client library may hold its close longer (librdkafka, while a commit
to an absent coordinator waits for the session timeout) declares a larger
``close_budget`` rather than overrun silently.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = [
    "ABANDON_GRACE",
    "CANCEL_GRACE",
    "CONSUMER_CLOSE_BUDGET",
    "FLUSH_BUDGET",
    "STOP_MARGIN",
    "TRANSPORT_CLOSE_BUDGET",
    "Deadline",
    "close_bound",
]

STOP_MARGIN = 1.0
"""``consumer.stop`` must be done this long after the drain deadline at the latest."""

CANCEL_GRACE = 0.5
"""Handlers cancelled at the end of the drain get this long to unwind."""

ABANDON_GRACE = 1.0
"""A revoke that cancelled a partition's running handlers waits this long for them to
unwind (the transport's own wait for the revoke adds it to the revoke's deadline)."""

FLUSH_BUDGET = 2.0
"""``consumer.flush`` at stop: the last commits made durable."""

CONSUMER_CLOSE_BUDGET = 2.0
"""``consumer.close``: leave the group and release what the consumer started."""

TRANSPORT_CLOSE_BUDGET = 5.0
"""The default ``Transport.close_budget``: flush publishes, disconnect."""


def close_bound(timeout: float, transport_budget: float = TRANSPORT_CLOSE_BUDGET) -> float:
    """The most ``close(timeout)`` can take, every step at its limit."""
    return (
        max(0.0, timeout)
        + STOP_MARGIN
        + CANCEL_GRACE
        + FLUSH_BUDGET
        + CONSUMER_CLOSE_BUDGET
        + transport_budget
    )


@dataclass(frozen=True, slots=True)
class Deadline:
    """A moment on ``time.monotonic()``'s clock by which a step must be done."""

    at: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        """``seconds`` from now (negative counts as now)."""
        return cls(time.monotonic() + max(0.0, seconds))

    @classmethod
    def passed(cls) -> Deadline:
        """Already over: "do not wait at all" (e.g. a lost partition's revoke)."""
        return cls(time.monotonic())

    def remaining(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self.at - time.monotonic())

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def within(self, seconds: float) -> Deadline:
        """This deadline, or ``seconds`` from now if that is sooner."""
        return self if self.at <= time.monotonic() + seconds else Deadline.after(seconds)

    def before(self, seconds: float) -> Deadline:
        """``seconds`` earlier: room left for the steps a caller still has to do after."""
        return Deadline(self.at - seconds)

    def later(self, seconds: float) -> Deadline:
        """``seconds`` later: a wait for a step that itself ends at this deadline."""
        return Deadline(self.at + seconds)

    def share(self, fraction: float) -> Deadline:
        """The point ``fraction`` of the time left from now: a first step's share."""
        now = time.monotonic()
        return Deadline(now + max(0.0, self.at - now) * fraction)

    def __repr__(self) -> str:
        return f"Deadline(in {self.at - time.monotonic():.3f} s)"
