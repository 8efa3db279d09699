"""The delivery being handled: what a middleware sees, and what a handler can ask for.

``keybus.current_delivery()`` works anywhere inside a handler (and in tasks it starts):
the core sets a context variable to the work in hand before each message's attempts, and
the :class:`Delivery` is built from it only when asked for, so handlers that never ask
pay one context-variable set per message.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Protocol

from keybus.envelope import Envelope
from keybus.message import Message

__all__ = ["Delivery", "current_delivery"]


class _InHand(Protocol):
    """What the core hands over (a ``keybus.work.Work``)."""

    message: Message
    payload: Any
    attempts: int


CURRENT: ContextVar[_InHand | None] = ContextVar("keybus_current_delivery", default=None)


def current_delivery() -> Delivery:
    """The message the calling handler is handling: topic, partition, offset, key,
    attempt (1-based) and fence. ``LookupError`` outside a keybus handler."""
    work = CURRENT.get()
    if work is None:
        raise LookupError("keybus.current_delivery() is only available inside a handler")
    return Delivery(work.message, work.payload, work.attempts)


class Delivery:
    """One handling attempt of one message, as a middleware sees it. ``payload`` is what
    the handler gets: the :class:`~keybus.Message` itself, or its decoded
    :class:`~keybus.Envelope`. A middleware may pass a changed copy to ``call_next``."""

    __slots__ = ("attempt", "message", "payload")

    def __init__(self, message: Message, payload: Any, attempt: int) -> None:
        self.message = message
        self.payload = payload
        self.attempt = attempt  # 1-based

    @property
    def topic(self) -> str:
        return self.message.topic

    @property
    def partition(self) -> int:
        return self.message.partition

    @property
    def offset(self) -> int:
        return self.message.offset

    @property
    def fence(self) -> int:
        """The partition's ownership token (``Message.fence``): it increases every time
        the partition changes owner, so a write elsewhere can refuse a stale owner."""
        return self.message.fence

    @property
    def key(self) -> str | None:
        """The key the message is ordered by: the record key (an envelope's aggregate id
        on keybus's publishes) — or, in an envelope subscription, the envelope's aggregate
        id when the record has none (a Go service's NATS publish carries no key)."""
        key = self.message.key
        if key is None and isinstance(self.payload, Envelope):
            return self.payload.aggregate_id
        return key

    def __repr__(self) -> str:
        return (
            f"<Delivery {self.topic}[{self.partition}]@{self.offset} key={self.key!r} "
            f"attempt={self.attempt} fence={self.fence}>"
        )
