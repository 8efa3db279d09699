"""One delivered message on its way through the core, from intake to done."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from keybus.message import Message
from keybus.partitioning import Partition

if TYPE_CHECKING:
    from keybus.envelope import Envelope

QUEUED = 0
RUNNING = 1
DONE = 2  # handled, or dead-lettered: its position may be committed
DROPPED = 3  # its partition was revoked (before it ran, or abandoned while running)


class Work:
    """A message plus what the core knows about it. ``payload`` is what the handler gets
    (the message, or its decoded envelope); ``error`` is why it could not be decoded."""

    __slots__ = (
        "attempts",
        "error",
        "key",
        "message",
        "partition",
        "payload",
        "started",
        "state",
        "task",
    )

    started: float  # set by the dispatcher when it starts running (see __init__)

    def __init__(
        self,
        message: Message,
        payload: Any,
        error: BaseException | None,
        partition: Partition | None = None,  # (message.topic, message.partition) if known
        key: str | None = None,  # its lane's key (lane_key)
    ) -> None:
        self.message = message
        self.key = key
        self.partition: Partition = (
            partition if partition is not None else (message.topic, message.partition)
        )
        self.payload = payload
        self.error = error
        self.state = QUEUED
        self.attempts = 0
        # The worker running it (while RUNNING), so a revoke can cancel just this one.
        self.task: asyncio.Task[None] | None = None
        # ``started``: when it started running (time.monotonic()), set by the dispatcher
        # as it does (so read it only of RUNNING work): how long a stuck handler has run.


def lane_key(message: Message, envelope: Envelope | None) -> str | None:
    """The key of ``message``'s lane: the record key, else (none, or empty) the aggregate
    id of its decoded ``envelope``. The one source of it: the dispatcher's lanes, parking
    and ``stats()`` must agree (an empty Kafka key once parked under ``""`` while its
    lane was the aggregate's)."""
    if envelope is None:
        return message.key
    return message.key or envelope.aggregate_id
