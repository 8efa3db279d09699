"""The user's handle on a subscription: what it is, its counters, and how to stop it.

The engine the transport drives (``assign``/``deliver``/``revoke``) lives apart, in
:mod:`keybus.engine`: nothing a user holds can feed or revoke a subscription.
"""

from __future__ import annotations

import time

from keybus.engine import Handler, SubscriptionEngine
from keybus.options import SubscribeOptions
from keybus.stats import SubscriptionSnapshot, SubscriptionStats

__all__ = [
    "Handler",
    "SubscribeOptions",
    "Subscription",
    "SubscriptionSnapshot",
    "SubscriptionStats",
]


class Subscription:
    """A live subscription. ``await sub.unsubscribe()`` stops it (bounded, idempotent)."""

    __slots__ = ("_engine",)

    def __init__(self, engine: SubscriptionEngine) -> None:
        self._engine = engine

    @property
    def topic(self) -> str:
        return self._engine.topic

    @property
    def group(self) -> str:
        return self._engine.group

    @property
    def options(self) -> SubscribeOptions:
        return self._engine.options

    @property
    def dead_letter_topic(self) -> str:
        return self._engine.dead_letter_topic

    def stats(self, top: int = 10) -> SubscriptionSnapshot:
        """The counters (delivered, handled, retries, dead-lettered, dropped, committed)
        and the live state: in flight, uncommitted, running handlers and the oldest one's
        age, the ``top`` keys with the most queued messages, and the partitions whose
        commit point is held back, by which key and for how long. What tells an operator
        "order-42 has failed for 3 minutes and holds 12,000 messages of partition 2"."""
        return self._engine.snapshot(top)

    @property
    def peak_concurrency(self) -> int:
        """The most handlers that ran at once so far."""
        return self._engine.peak_concurrency

    @property
    def in_flight(self) -> int:
        """Messages taken from the broker and not yet done."""
        return self._engine.in_flight

    @property
    def running(self) -> int:
        """Handlers running right now."""
        return self._engine.running

    @property
    def closed(self) -> bool:
        """True once it is stopping or stopped."""
        return self._engine.closing

    async def unsubscribe(self, timeout: float = 5.0) -> None:
        """Stop fetching, let running handlers finish until ``timeout``, cancel the rest,
        commit what completed and leave the group. Idempotent; safe to call from inside
        this subscription's own handler."""
        await self._engine.shutdown(time.monotonic() + max(0.0, timeout))

    def __repr__(self) -> str:
        state = "closed" if self._engine.closing else "open"
        return f"<Subscription {self.topic!r} group={self.group!r} {state}>"
