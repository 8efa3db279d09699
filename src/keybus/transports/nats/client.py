"""The connection to the server: connecting nats-py, its callbacks, the bounded close.

:class:`Connection` is also everything a group member uses of its transport — the live
client and JetStream context, the options, the stream behind a topic, and registration
for reconnects and close — so the member needs nothing of the transport itself, and the
imports point one way: ``transport -> group -> client``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from keybus.deadline import Deadline
from keybus.errors import ConnectError, KeybusError
from keybus.transports.nats.errors import NATS_ERRORS, closed, translate
from keybus.transports.nats.options import NatsOptions

__all__ = ["Connection", "Member", "Stream", "close_client"]

log = logging.getLogger("keybus.nats")

# nats-py tries each server twice before it gives up on a first connect: once, then once
# more after ``reconnect_wait`` (``max_reconnect_attempts=1``). The connect deadline is
# split between the two.
_CONNECT_ATTEMPTS = 2
# Reconnects have no deadline to derive from: each attempt gets nats-py's own default, as
# before the first connect took its share of the connect deadline.
_RECONNECT_ATTEMPT_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class Stream:
    """What a topic is on the server: its stream, subject prefix and partition count."""

    name: str
    subject_base: str
    partitions: int


class Member(Protocol):
    """What the connection asks of a group member registered with it."""

    def on_reconnected(self) -> None:
        """Deliveries in flight when the connection broke may be lost."""

    def abort(self) -> None:
        """Cancel every task, without any network step (the transport is closing)."""

    async def aborted(self, deadline: Deadline) -> None:
        """Wait until ``deadline`` for the cancelled tasks to end."""


class Connection:
    """One nats-py client and JetStream context, and the members that use them.

    ``stream(topic)`` is the topic's :class:`Stream` (the transport's lookup: cached,
    creating a missing topic with the defaults)."""

    def __init__(
        self, url: str, options: NatsOptions, stream: Callable[[str], Awaitable[Stream]]
    ) -> None:
        self.url = url
        self.options = options
        self.stream = stream
        self.reconnects = 0
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._members: set[Member] = set()
        self._closed = False

    async def open(self, deadline: Deadline) -> tuple[NatsClient, JetStreamContext]:
        """Connect by ``deadline`` and check that JetStream answers; ``ConnectError``
        otherwise (the client is closed by :meth:`shut` and :func:`close_client` even
        then)."""
        nc = self._nc = NatsClient()
        server = "nats://" + self.url.split("://", 1)[1]
        attempt = max(0.0, deadline.remaining() - self.options.reconnect_wait) / _CONNECT_ATTEMPTS
        try:
            # One attempt per server at first (max_reconnect_attempts=1): an unreachable
            # server must fail the connect, not retry forever. Afterwards the client
            # reconnects without limit, so the bus survives a server restart.
            await nc.connect(
                servers=[server],
                connect_timeout=attempt,  # type: ignore[arg-type]
                reconnect_time_wait=self.options.reconnect_wait,  # type: ignore[arg-type]
                max_reconnect_attempts=1,
                allow_reconnect=True,
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
                name="keybus",
                # Every subject keybus uses is built from escaped names: valid by
                # construction, so nats-py need not re-check two subjects per publish.
                skip_subject_validation=True,
            )
        except nats.errors.NoServersError as exc:
            why = f"no NATS server answers ({nc.last_error!r})"
            raise translate(why, "connect", self.url) from exc
        nc.options["max_reconnect_attempts"] = -1
        nc.options["connect_timeout"] = _RECONNECT_ATTEMPT_TIMEOUT
        js = self._js = nc.jetstream(timeout=self.options.api_timeout)
        try:
            async with asyncio.timeout(deadline.remaining()):
                await js.account_info()
        except NATS_ERRORS as exc:
            raise translate(exc, "connect", self.url, context="JetStream is not available") from exc
        return nc, js

    def live(self) -> tuple[NatsClient, JetStreamContext]:
        """The client and JetStream context; ``BusClosedError`` once closed,
        ``ConnectError`` before connecting or once nats-py gave up."""
        nc, js = self._nc, self._js
        if nc is None or js is None or nc.is_closed:
            raise self.gone()
        return nc, js

    def gone(self) -> KeybusError:
        """The error for a call the connection cannot serve (see :meth:`live`)."""
        if self._closed:
            return closed(self.url)
        if self._nc is not None and self._nc.is_closed:
            return ConnectError(self.url, "the connection is closed")
        return ConnectError(self.url, "transport is not connected")

    def register(self, member: Member) -> None:
        self._members.add(member)

    def unregister(self, member: Member) -> None:
        self._members.discard(member)

    def shut(self) -> tuple[NatsClient | None, list[Member]]:
        """Refuse every call from now on; hand over the client (to :func:`close_client`)
        and the members still registered (their close was cut short: end their tasks)."""
        nc, self._nc, self._js = self._nc, None, None
        self._closed = True
        members, self._members = list(self._members), set()
        return nc, members

    # -- nats-py's callbacks -------------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        log.debug("keybus: NATS %s: %r", self.url, exc)

    async def _on_disconnected(self) -> None:
        if self._closed:
            return
        log.warning("keybus: disconnected from %s; reconnecting", self.url)

    async def _on_reconnected(self) -> None:
        # Pull requests die with the connection: every consumer asks again at once.
        self.reconnects += 1
        log.warning("keybus: reconnected to %s", self.url)
        for member in list(self._members):
            member.on_reconnected()


async def close_client(nc: NatsClient, deadline: Deadline) -> None:
    """Close the client by ``deadline``; if it hangs (a peer that reads nothing, so a
    flush never ends), abort its socket and stop its subscriptions' tasks so nothing is
    left behind. Survives a cancellation (it finishes the job first)."""
    closing = asyncio.ensure_future(nc.close())
    try:
        await asyncio.wait({closing}, timeout=deadline.remaining())
    finally:
        if not closing.done():
            closing.cancel()
            _abort_client(nc)
            with contextlib.suppress(asyncio.CancelledError, *NATS_ERRORS):
                await closing
        elif not closing.cancelled() and closing.exception() is not None:
            log.debug("keybus: closing the NATS client failed: %r", closing.exception())


def _abort_client(nc: Any) -> None:
    """What ``nc.close()`` would have finished: nats-py internals, so every step is
    guarded (a newer client may differ; then only its own close is left to us)."""
    with contextlib.suppress(Exception):
        nc._status = NatsClient.CLOSED
    for name in ("_reading_task", "_ping_interval_task", "_flusher_task", "_reconnection_task"):
        task = getattr(nc, name, None)
        if isinstance(task, asyncio.Task) and not task.done():
            task.cancel()
    with contextlib.suppress(Exception):
        for sub in list(nc._subs.values()):
            task = getattr(sub, "_wait_for_msgs_task", None)
            if isinstance(task, asyncio.Task) and not task.done():
                task.cancel()
        nc._subs.clear()
    for name in ("_io_writer", "_bare_io_writer"):
        with contextlib.suppress(Exception):
            getattr(nc._transport, name).transport.abort()
