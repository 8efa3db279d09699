"""Heartbeats, as the Go SDK had them: a service publishes a small message every
interval; a watcher alerts when a source falls silent — warning, error, critical after
3, 5, 10 missed intervals — and says when it is back.

A heartbeat is a JSON object on its topic, keyed by its source::

    {"source": "billing", "instance": "<uuid>", "sequence": 17, "sent_at": 1764... }

``sent_at`` is the sender's wall clock (information only): the watcher judges silence on
its own monotonic clock, from when it *received* a source's last heartbeat, so no two
machines' clocks are compared. Both sides are tasks the bus owns: they end with
``close()`` (or ``stop()``) and leave nothing behind.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import msgspec

from keybus._aio import call_hook

__all__ = ["LEVELS", "HeartbeatAlert", "HeartbeatWatch", "heartbeat_message"]

log = logging.getLogger("keybus")

Level = Literal["warning", "error", "critical", "recovered"]

LEVELS: tuple[tuple[int, Level], ...] = ((10, "critical"), (5, "error"), (3, "warning"))
"""Missed intervals -> alert level, highest first."""


class _Beat(msgspec.Struct, frozen=True):
    source: str
    instance: str
    sequence: int
    sent_at: float


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(_Beat).decode


def heartbeat_message(source: str, instance: str, sequence: int) -> bytes:
    """One heartbeat's value."""
    return _encode(_Beat(source, instance, sequence, time.time()))


@dataclass(frozen=True, slots=True)
class HeartbeatAlert:
    """A source's state changed: ``level`` is ``warning`` / ``error`` / ``critical``
    (``missed`` intervals without a heartbeat so far) or ``recovered`` (a heartbeat came
    after an alert)."""

    source: str
    instance: str
    level: Level
    missed: int
    silent_for: float
    """Seconds since its last heartbeat arrived (0 for ``recovered``)."""
    sequence: int
    """The sequence number of its last heartbeat."""


OnAlert = Callable[[HeartbeatAlert], Awaitable[None] | None]


@dataclass(slots=True)
class _Source:
    instance: str
    sequence: int
    seen: float  # time.monotonic() of the last heartbeat received
    level: Level | None = None  # the last alert raised, None while healthy


class HeartbeatWatch:
    """The watcher's state: fed heartbeats (:meth:`beat`), asked now and then what
    changed (:meth:`check`). Pure, so its rules are tested without a bus."""

    def __init__(self, interval: float) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0, got {interval!r}")
        self.interval = interval
        self.sources: dict[str, _Source] = {}

    def beat(self, value: bytes, now: float) -> HeartbeatAlert | None:
        """A heartbeat arrived; the recovery alert if its source had an alert raised."""
        try:
            beat = _decode(value)
        except msgspec.DecodeError:
            log.warning("keybus: a heartbeat that is not one (%d bytes) ignored", len(value))
            return None
        known = self.sources.get(beat.source)
        if known is None:
            self.sources[beat.source] = _Source(beat.instance, beat.sequence, now)
            return None
        recovered = known.level is not None
        known.instance, known.sequence, known.seen, known.level = (
            beat.instance,
            beat.sequence,
            now,
            None,
        )
        if recovered:
            return HeartbeatAlert(beat.source, beat.instance, "recovered", 0, 0.0, beat.sequence)
        return None

    def check(self, now: float) -> list[HeartbeatAlert]:
        """Alerts for sources that crossed a level since the last check."""
        alerts = []
        for name, source in self.sources.items():
            silent = now - source.seen
            missed = math.floor(silent / self.interval)
            level = next((lv for at, lv in LEVELS if missed >= at), None)
            if level is not None and level != source.level:
                source.level = level
                alerts.append(
                    HeartbeatAlert(name, source.instance, level, missed, silent, source.sequence)
                )
        return alerts


async def publish_heartbeats(
    publish: Callable[[str, bytes, str], Awaitable[None]],
    topic: str,
    source: str,
    interval: float,
) -> None:
    """The sender's loop: one heartbeat now and every ``interval`` after; a failed publish
    is logged and the loop goes on (a broker away is what the watchers are for)."""
    instance = uuid.uuid4().hex
    sequence = 0
    while True:
        sequence += 1
        try:
            await publish(topic, heartbeat_message(source, instance, sequence), source)
        except Exception as exc:  # (a cancellation is no Exception: it ends the loop)
            log.warning("keybus: heartbeat %d of %s not sent: %s", sequence, source, exc)
        await asyncio.sleep(interval)


async def watch_heartbeats(watch: HeartbeatWatch, on_alert: OnAlert) -> None:
    """The watcher's checks: every half interval, alert on the sources that crossed a
    level."""
    while True:
        await asyncio.sleep(watch.interval / 2)
        for alert in watch.check(time.monotonic()):
            await call_hook(on_alert, alert)
