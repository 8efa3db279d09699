"""Requests to replay or discard a parked key, for a process without the handler
(``keybus dlq replay`` / ``discard``, ``bus.request_parked``).

A replay hands parked messages to the subscription's handler and must run on the member
that owns the key's partition — in the service, not in an operator's shell. So the
asking process writes a *request* into the parked-keys store, and the owning member
(:meth:`keybus.parker.Parking.serve_requests`) performs ``replay_parked`` /
``discard_parked`` itself — the same code, with the same ordering guarantees as the API
call — and writes the outcome back under the same store key (the last record wins, so a
compacted store keeps one record per key and request). The asker polls the store for
the outcome, bounded by its timeout.

Records: keyed ``f"{group}\\x00{key}"`` — never a key's state record ``f"{group}/{key}"``
(a group name with a NUL in it is not one anybody uses), so compaction keeps both —
with the header ``X-Parked-Request`` naming the action, and a JSON value:
``{"id", "action", "state": "requested", "expires"}`` (``expires``: ``time.time()``
after which no member starts it), then ``{"id", "action", "state": <outcome>,
"handled", "reason"}``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from keybus.deadline import Deadline
from keybus.message import Message
from keybus.parking import load

__all__ = ["ParkedRequest", "Request"]

REQUEST_HEADER = "X-Parked-Request"
ACTIONS = ("replay", "discard")
# What an outcome can be (ParkedRequest.outcome); "timed-out" and "not-parked" are the
# asker's own conclusions, the rest the owning member's answers.
OUTCOMES = ("replayed", "discarded", "failed", "refused", "not-parked", "timed-out")


@dataclass(frozen=True, slots=True)
class ParkedRequest:
    """How a replay or discard request ended (``bus.request_parked``).

    ``outcome``: ``"replayed"`` / ``"discarded"`` (the key flows again; ``handled``
    messages handed to the handler, or dropped), ``"failed"`` (a replayed message failed
    again: the key stays parked from it on, ``reason`` says why, ``handled`` were handed
    before it), ``"refused"`` (the owner could not start it: a replay of the key was
    already running), ``"not-parked"`` (nothing to do, or unparked meanwhile by someone
    else) or ``"timed-out"`` (no member answered in time: is the service running?).
    """

    key: str
    action: str
    outcome: str
    handled: int = 0
    reason: str = ""

    @property
    def parked(self) -> bool:
        """Whether the key is (still, as far as this outcome tells) parked."""
        return self.outcome in ("failed", "refused", "timed-out")


@dataclass(frozen=True, slots=True)
class Request:
    """A request found in the store, waiting for its owner."""

    id: str
    key: str
    action: str


def request_key(group: str, key: str) -> str:
    return f"{group}\x00{key}"


def ask(action: str, request_id: str, timeout: float) -> tuple[bytes, dict[str, bytes]]:
    """A request record's value and headers."""
    value = {
        "id": request_id,
        "action": action,
        "state": "requested",
        "expires": time.time() + timeout,
    }
    return _json(value), {REQUEST_HEADER: action.encode()}


def answer(
    request: Request, outcome: str, handled: int, reason: str
) -> tuple[bytes, dict[str, bytes]]:
    """An outcome record's value and headers (written under the request's store key)."""
    value = {
        "id": request.id,
        "action": request.action,
        "state": outcome,
        "handled": handled,
        "reason": reason,
    }
    return _json(value), {REQUEST_HEADER: request.action.encode()}


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _latest(records: Iterable[Message], group: str) -> dict[str, dict[str, Any]]:
    """The last request record of each key of ``group`` (unreadable ones skipped)."""
    prefix = f"{group}\x00"
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        name = record.key
        if name is None or not name.startswith(prefix) or REQUEST_HEADER not in record.headers:
            continue
        try:
            value = json.loads(record.value)
        except ValueError:
            continue
        if isinstance(value, dict) and isinstance(value.get("id"), str):
            latest[name[len(prefix) :]] = value
    return latest


def pending(records: Iterable[Message], group: str) -> list[Request]:
    """The requests of ``group`` no member answered yet and not expired, in store order."""
    now = time.time()
    found = []
    for key, value in _latest(records, group).items():
        if value.get("state") != "requested" or value.get("action") not in ACTIONS:
            continue
        try:
            if float(value["expires"]) < now:
                continue
        except (KeyError, TypeError, ValueError):
            continue
        found.append(Request(value["id"], key, value["action"]))
    return found


def outcome(
    records: Iterable[Message], group: str, key: str, request_id: str
) -> ParkedRequest | None:
    """The answer to request ``request_id`` of ``key``, if it is in ``records``."""
    value = _latest(records, group).get(key)
    if value is None or value.get("id") != request_id:
        return None
    state = value.get("state")
    if state not in OUTCOMES:
        return None
    try:
        handled = int(value.get("handled", 0))
    except (TypeError, ValueError):
        handled = 0
    return ParkedRequest(
        key, str(value.get("action")), state, handled, str(value.get("reason", ""))
    )


ReadStore = Callable[[float], Awaitable[list[Message]]]  # its argument: seconds at most
WriteStore = Callable[[bytes, str, dict[str, bytes]], Awaitable[None]]

# How often the asker reads the store for the answer.
ASK_POLL = 0.5


async def request_through_store(
    read: ReadStore, write: WriteStore, group: str, key: str, action: str, timeout: float
) -> ParkedRequest:
    """Write a request for ``key`` and wait, until ``timeout`` at most, for the owning
    member's answer. ``"not-parked"`` at once when the store shows no parked ``key``."""
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
    deadline = Deadline.after(timeout)
    if key not in load(await read(deadline.remaining()), group):
        return ParkedRequest(key, action, "not-parked")
    request_id = uuid.uuid4().hex
    value, headers = ask(action, request_id, timeout)
    await write(value, request_key(group, key), headers)
    unparked_seen = False
    while not deadline.expired:
        await asyncio.sleep(min(ASK_POLL, deadline.remaining()))
        records = await read(max(ASK_POLL, deadline.remaining()))
        found = outcome(records, group, key, request_id)
        if found is not None:
            return found
        if key not in load(records, group):
            # Unparked; the owner writes its answer right after the key's state: one
            # more look tells ours from someone else's (an API call, another request).
            if unparked_seen:
                return ParkedRequest(key, action, "not-parked", 0, "unparked meanwhile")
            unparked_seen = True
    return ParkedRequest(
        key, action, "timed-out", 0, f"no member of group {group!r} answered in {timeout:g} s"
    )
