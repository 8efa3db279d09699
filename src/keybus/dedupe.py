"""The one duplicate rule every backend follows (API.md, "De-duplication").

Publish-side de-duplication by event id is opt-in: ``dedupe_window`` (seconds) on a
backend that can do it, off (``None``) by default — then every record is stored, however
many share an event id. With it on, a record carrying an ``X-Event-ID`` that was already
published within the window is not stored, and its publish raises
:func:`duplicate` (a permanent ``PublishError``): reported, never swallowed. A record
carrying ``X-Original-Topic`` — a dead letter, or one re-published as it is to its
topic — is never de-duplicated: a dead letter never vanishes. A backend that cannot
de-duplicate refuses a window at connect with a ``ValueError`` saying what it offers
instead.

The transports share the words and the checks from here, so the rule reads the same on
each of them.
"""

from __future__ import annotations

from collections.abc import Mapping

from keybus.errors import PublishError

__all__ = ["DUPLICATE_REASON", "EVENT_ID", "ORIGIN", "check_window", "duplicate", "event_id"]

EVENT_ID = "X-Event-ID"
"""The header that names a record's event (every envelope publish sets it)."""

ORIGIN = "X-Original-Topic"
"""The header of a dead letter: a record that carries it is never de-duplicated."""

DUPLICATE_REASON = "duplicate of an event published within the de-duplication window"


def check_window(value: object) -> float | None:
    """The ``dedupe_window`` option, checked: ``None`` (off) or a positive number of
    seconds; anything else is a ``ValueError``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"dedupe_window must be positive seconds (or None: off), got {value!r}")
    return float(value)


def event_id(headers: Mapping[str, bytes]) -> bytes | None:
    """The event id a record is de-duplicated by, or ``None``: none (no ``X-Event-ID``)
    or a dead letter's (``X-Original-Topic``), which is never de-duplicated."""
    if ORIGIN in headers:
        return None
    return headers.get(EVENT_ID)


def duplicate(topic: str) -> PublishError:
    """What a publish the backend found a duplicate raises. Permanent: sending it again
    within the window cannot succeed, and a caller that retries publishes after a timeout
    can take exactly this error as "stored earlier"."""
    return PublishError(topic, DUPLICATE_REASON, permanent=True)
