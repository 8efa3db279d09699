"""Parking a key behind its dead letter (``on_dead_letter="park"``): the parked state,
its store in the broker and the dead letters a replay reads back.

The store is a topic beside the dead-letter topic, ``f"{dead_letter_topic}.parked"``,
with one record per change of a parked key, keyed ``f"{group}/{key}"``: a JSON state
(``parked``, with its first failure and count) or ``{"state": "unparked"}``. The last
record of a key wins, so it reads like a compacted topic; a subscription reads it back
(``Transport.read_topic``) before its first delivery and again after an assignment, so
a restarted consumer, or the member that takes a partition over, keeps parking the key.
No new database, and the store is written and read once, here and in the engine, for
every backend.

A replay finds a key's parked messages in the dead-letter topic itself: the dead letters
of this topic and group (``X-Group``) for that key from the first failure on, in offset
order, de-duplicated by original offset (a crash before a commit may have written one
twice).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from keybus.envelope import Envelope
from keybus.message import Message

__all__ = [
    "PARKED_BEHIND",
    "ParkedKey",
]

PARKED_BEHIND = "X-Parked-Behind"
GROUP = "X-Group"
# What the core adds to a dead letter; stripped again when a replay rebuilds the message.
_DEAD_LETTER_HEADERS = frozenset(
    {
        "X-Error",
        "X-Original-Topic",
        "X-Original-Partition",
        "X-Original-Offset",
        "X-Attempts",
        GROUP,
        PARKED_BEHIND,
    }
)


@dataclass(frozen=True, slots=True)
class ParkedKey:
    """One parked key of a subscription (``bus.parked()``).

    ``count``: its messages dead-lettered since it was parked, the first failure
    included; ``first_failure``: where the message that parked it was
    (``"topic/partition/offset"``), ``event_id`` its envelope's id if it had one,
    ``reason`` why it (or, after a failed replay, the message that failed then) failed;
    ``since``: when it was parked (``time.time()``)."""

    key: str
    count: int
    first_failure: str
    event_id: str | None
    reason: str
    since: float

    @property
    def age(self) -> float:
        """Seconds since the key was parked."""
        return max(0.0, time.time() - self.since)


@dataclass(slots=True)
class Parked:
    """The engine's live state of one parked key."""

    partition: int
    offset: int
    event_id: str | None
    reason: str
    since: float
    count: int = 1
    # Parked messages whose dead letter is being written: a replay starting now may
    # not read them back yet, so it takes them from here.
    writing: list[Message] = field(default_factory=list)

    def view(self, topic: str, key: str) -> ParkedKey:
        return ParkedKey(
            key,
            self.count,
            f"{topic}/{self.partition}/{self.offset}",
            self.event_id,
            self.reason,
            self.since,
        )

    def behind(self, topic: str) -> bytes:
        """The ``X-Parked-Behind`` header: the first failed message."""
        where = f"{topic}/{self.partition}/{self.offset}"
        return (where if self.event_id is None else f"{where} event={self.event_id}").encode()

    def moved_to(self, message: Message, event_id: str | None, reason: str) -> None:
        """A replay failed at ``message``: the key stays parked from there on."""
        self.partition, self.offset = message.partition, message.offset
        self.event_id = event_id
        self.reason = reason


def store_topic(dead_letter_topic: str) -> str:
    return f"{dead_letter_topic}.parked"


def store_key(group: str, key: str) -> str:
    return f"{group}/{key}"


def encode(state: Parked | None) -> bytes:
    if state is None:
        return b'{"state":"unparked"}'
    record = {
        "state": "parked",
        "partition": state.partition,
        "offset": state.offset,
        "event_id": state.event_id,
        "reason": state.reason,
        "since": state.since,
        "count": state.count,
    }
    return json.dumps(record, separators=(",", ":")).encode()


def load(records: Iterable[Message], group: str) -> dict[str, Parked]:
    """The parked keys of ``group`` in the store's records (the last record of a key
    wins; an unreadable one is skipped: a foreign writer must not wedge a subscription)."""
    prefix = f"{group}/"
    latest: dict[str, Any] = {}
    for record in records:
        name = record.key
        if name is None or not name.startswith(prefix):
            continue
        try:
            latest[name[len(prefix) :]] = json.loads(record.value)
        except ValueError:
            continue
    parked: dict[str, Parked] = {}
    for key, state in latest.items():
        if not isinstance(state, dict) or state.get("state") != "parked":
            continue
        try:
            parked[key] = Parked(
                int(state["partition"]),
                int(state["offset"]),
                state.get("event_id"),
                str(state.get("reason", "")),
                float(state["since"]) if "since" in state else time.time(),
                int(state.get("count", 1)),
            )
        except (KeyError, TypeError, ValueError):
            continue
    return parked


def event_id_of(payload: object, decoded: bool) -> str | None:
    """The event id of a message whose handler gets ``payload``: an envelope
    subscription's decoded envelope (``decoded``: not decoded again — ``None`` when it
    could not be), else the message, whose value may be an envelope."""
    if isinstance(payload, Envelope):
        return payload.event_id
    if decoded or not isinstance(payload, Message):
        return None
    try:
        return Envelope.from_bytes(payload.value).event_id
    except Exception:  # not an envelope: the position alone names it
        return None


def to_replay(
    dead_letters: Iterable[Message], topic: str, group: str, key: str, state: Parked
) -> list[Message]:
    """The parked messages of ``key`` rebuilt from their dead letters, in order."""
    found: dict[tuple[int, int], Message] = {}
    for letter in dead_letters:
        if letter.key != key:
            continue
        headers = letter.headers
        try:
            if (
                headers.get("X-Original-Topic") != topic.encode()
                or headers.get(GROUP) != group.encode()
                or "X-Discarded" in headers
            ):
                continue
            partition = int(headers["X-Original-Partition"])
            offset = int(headers["X-Original-Offset"])
        except (KeyError, ValueError):
            continue
        if partition != state.partition or offset < state.offset:
            continue  # an earlier parking's, already replayed or discarded
        original = {k: v for k, v in headers.items() if k not in _DEAD_LETTER_HEADERS}
        found.setdefault(
            (partition, offset),
            Message(topic, letter.value, key, original, partition, offset, letter.timestamp),
        )
    return [found[where] for where in sorted(found)]
