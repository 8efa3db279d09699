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
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from keybus._aio import cancel_and_wait, wait_event
from keybus.deadline import Deadline
from keybus.errors import ConnectError, KeybusError
from keybus.transports.nats.auth import NatsAuth
from keybus.transports.nats.errors import (
    NATS_ERRORS,
    PlainRefused,
    closed,
    reason,
    refused,
    translate,
)
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
# Replacing a client nats-py closed for good: the longest pause between two attempts, and
# how long closing a failed attempt's client may take.
_MAX_REPLACE_PAUSE = 2.0
_ATTEMPT_CLOSE = 1.0
_ATTEMPT_ERRORS: tuple[type[BaseException], ...] = (KeybusError, *NATS_ERRORS)


@dataclass(frozen=True, slots=True)
class Stream:
    """What a topic is on the server: its stream, and the subject of each partition
    (``kb.<token>.<p>`` in keybus's layout; the topic itself, one partition, in the
    subject layout)."""

    name: str
    subjects: tuple[str, ...]

    @property
    def partitions(self) -> int:
        return len(self.subjects)


class Member(Protocol):
    """What the connection asks of a group member registered with it."""

    def on_reconnected(self) -> None:
        """Deliveries in flight when the connection broke may be lost."""

    def on_replaced(self) -> None:
        """The connection was replaced by a new one (nats-py had closed the old one for
        good): subscriptions and key-value handles of the old one are gone, and
        deliveries in flight with them."""

    def abort(self) -> None:
        """Cancel every task, without any network step (the transport is closing)."""

    async def aborted(self, deadline: Deadline) -> None:
        """Wait until ``deadline`` for the cancelled tasks to end."""


class Connection:
    """One nats-py client and JetStream context, and the members that use them.

    ``stream(topic)`` is the topic's :class:`Stream` (the transport's lookup: cached,
    creating a missing topic with the defaults).

    A client that nats-py closes for good while we did not ask it to (the server answered
    ``-ERR``, e.g. for a message over ``max_payload``) is **replaced**: new clients are
    tried with a growing pause until ``replace_timeout``; the transport's ``on_open`` runs
    on the new one (its publisher) and every member is told (:meth:`Member.on_replaced`:
    it re-takes its partitions at their ack floors). Meanwhile :meth:`live` raises
    ``ConnectError`` ("being replaced") and :meth:`ready` waits. If no new client is
    connected in time, the connection has **failed**: :attr:`failure` is the
    ``ConnectError`` (naming the cause) every later call raises — it is never open and
    dead."""

    def __init__(
        self,
        url: str,
        auth: NatsAuth,
        options: NatsOptions,
        stream: Callable[[str], Awaitable[Stream]],
    ) -> None:
        self.url = url  # redacted: what logs and errors show
        self.auth = auth
        self.options = options
        self.stream = stream
        self.reconnects = 0
        self.replacements = 0  # clients replaced after nats-py closed one for good
        # The transport's: set up what it needs on a new client (raises NATS errors), and
        # drop what it had on a client closed for good.
        self.on_open: Callable[[NatsClient], Awaitable[None]] | None = None
        self.on_lost: Callable[[], None] | None = None
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._members: set[Member] = set()
        self._closed = False
        self._opened = False  # the first connect succeeded
        self._failure: ConnectError | None = None
        self._lost_why = ""
        self._replacer: asyncio.Task[None] | None = None
        self._attempt: NatsClient | None = None  # a replacement being connected
        self._dead: NatsClient | None = None  # the client nats-py closed, until buried
        self._settled = asyncio.Event()  # set while live or failed (not while replacing)
        # While a client connects: what its last attempt failed with, and whether that
        # was final (refused credentials or certificate: trying again cannot help).
        self._attempt_error: BaseException | None = None
        self._refused = asyncio.Event()

    @property
    def failure(self) -> ConnectError | None:
        """Why the connection is gone for good (``None``: it is not)."""
        return self._failure

    @property
    def replacing(self) -> bool:
        return self._replacer is not None and not self._replacer.done()

    async def open(self, deadline: Deadline) -> tuple[NatsClient, JetStreamContext]:
        """Connect by ``deadline`` and check that JetStream answers; ``ConnectError``
        otherwise (the client is closed by :meth:`shut` and :func:`close_client` even
        then)."""
        nc = self._nc = NatsClient()
        js = self._js = await self._connect(nc, deadline)
        self._opened = True
        self._settled.set()
        return nc, js

    async def _connect(self, nc: NatsClient, deadline: Deadline) -> JetStreamContext:
        attempt = max(0.0, deadline.remaining() - self.options.reconnect_wait) / _CONNECT_ATTEMPTS
        # One attempt per server at first (max_reconnect_attempts=1): an unreachable
        # server must fail the connect, not retry forever. Afterwards the client
        # reconnects without limit, so the bus survives a server restart.
        connecting = asyncio.ensure_future(
            nc.connect(
                servers=[self.auth.server],
                connect_timeout=attempt,  # type: ignore[arg-type]
                reconnect_time_wait=self.options.reconnect_wait,  # type: ignore[arg-type]
                max_reconnect_attempts=1,
                allow_reconnect=True,
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
                closed_cb=self._closed_callback(nc),
                name="keybus",
                # Every subject keybus uses is built from escaped names: valid by
                # construction, so nats-py need not re-check two subjects per publish.
                skip_subject_validation=True,
                **self.auth.client_options(lambda: getattr(nc, "_server_info", None)),
            )
        )
        self._attempt_error = None
        self._refused.clear()
        refused = asyncio.ensure_future(self._refused.wait())
        try:
            await asyncio.wait(
                {connecting, refused},
                timeout=deadline.remaining(),
                return_when=asyncio.FIRST_COMPLETED,
            )
        except BaseException:
            connecting.cancel()  # cancelled meanwhile: the closing transport ends the client
            raise
        finally:
            refused.cancel()
        if not connecting.done():
            # Refused for good, or out of time — nats-py may also hang closing a socket
            # whose TLS handshake failed: end the attempt here, with its cause.
            await close_client(nc, Deadline.after(_ATTEMPT_CLOSE))
            with contextlib.suppress(asyncio.CancelledError, *NATS_ERRORS):
                await cancel_and_wait(connecting)
            raise self._attempt_failed()
        try:
            connecting.result()
        except nats.errors.NoServersError as exc:
            raise self._attempt_failed() from exc
        if self.auth.refuses(getattr(nc, "_server_info", None)):
            # No secret was sent (the credentials' callables refuse), but the bus must
            # not run in clear when TLS was asked for.
            raise translate(PlainRefused(), "connect", self.url)
        nc.options["max_reconnect_attempts"] = -1
        nc.options["connect_timeout"] = _RECONNECT_ATTEMPT_TIMEOUT
        js = nc.jetstream(timeout=self.options.api_timeout)
        try:
            async with asyncio.timeout(deadline.remaining()):
                await js.account_info()
        except NATS_ERRORS as exc:
            raise translate(exc, "connect", self.url, context="JetStream is not available") from exc
        return js

    def _attempt_failed(self) -> KeybusError:
        """The error for a connect that failed: the cause of its last attempt, if any."""
        cause = self._attempt_error
        if cause is None:
            return translate("no answer in time", "connect", self.url)
        text = reason(cause)
        if not refused(cause):
            text = f"no NATS server answers: {text}"
        if isinstance(cause, ssl.SSLCertVerificationError) and not self.auth.tls_required:
            text += " (the server requires TLS: pass tls=keybus.TLS(ca_file=...))"
        error = translate(text, "connect", self.url)
        error.__cause__ = cause
        return error

    def live(self) -> tuple[NatsClient, JetStreamContext]:
        """The client and JetStream context; ``BusClosedError`` once closed,
        ``ConnectError`` before connecting, while the client is being replaced and once
        the connection failed."""
        nc, js = self._nc, self._js
        if nc is None or js is None or nc.is_closed:
            self.notice_closed()
            raise self.gone()
        return nc, js

    def notice_closed(self) -> bool:
        """Whether the client is gone for good and being replaced — starting the
        replacement at once if nats-py closed it and its closed callback has not run yet
        (which happens only after it has closed the socket)."""
        nc = self._nc
        if nc is not None and nc.is_closed and self._opened and not self._closed:
            self._lost(nc)
        return self.replacing

    async def ready(self, timeout: float) -> tuple[NatsClient, JetStreamContext]:
        """:meth:`live`, waiting up to ``timeout`` seconds while the client is being
        replaced."""
        if self.replacing:
            await wait_event(self._settled, timeout)
        return self.live()

    def gone(self) -> KeybusError:
        """The error for a call the connection cannot serve (see :meth:`live`)."""
        if self._closed:
            return closed(self.url)
        if self._failure is not None:
            return self._failure
        if self.replacing:
            return ConnectError(self.url, f"the connection is being replaced ({self._lost_why})")
        if self._nc is not None and self._nc.is_closed:
            return ConnectError(self.url, "the connection is closed")
        return ConnectError(self.url, "transport is not connected")

    def register(self, member: Member) -> None:
        self._members.add(member)

    def unregister(self, member: Member) -> None:
        self._members.discard(member)

    def shut(self) -> tuple[NatsClient | None, list[Member]]:
        """Refuse every call from now on; hand over the client (to :func:`close_client`)
        and the members still registered (their close was cut short: end their tasks).
        A replacement in progress is ended by :meth:`stop_replacing`."""
        nc, self._nc, self._js = self._nc, None, None
        self._closed = True
        self._settled.set()
        members, self._members = list(self._members), set()
        return nc, members

    async def stop_replacing(self) -> None:
        """End a replacement in progress (after :meth:`shut`), closing its new client."""
        await cancel_and_wait(self._replacer)
        attempt, self._attempt = self._attempt, None
        if attempt is not None:
            await close_client(attempt, Deadline.after(_ATTEMPT_CLOSE))
        self._bury()

    def _bury(self) -> None:
        """End what the client nats-py closed may have left behind: its own close can
        fail half-way (a reset socket while it flushes), before it stops its
        subscriptions' tasks and closes its socket — and before it calls our closed
        callback (the client's closed state is what :meth:`live` notices then)."""
        dead, self._dead = self._dead, None
        if dead is not None:
            _abort_client(dead)

    # -- a client closed for good ----------------------------------------------------------

    def _closed_callback(self, nc: NatsClient) -> Callable[[], Awaitable[None]]:
        async def on_closed() -> None:
            # Our own close (shut first), a failed first connect (not ours yet) and a
            # replacement attempt that failed (not installed) are no news.
            if self._closed or nc is not self._nc:
                return
            self._lost(nc)

        return on_closed

    def _lost(self, nc: NatsClient) -> None:
        cause = nc.last_error
        self._lost_why = (
            f"nats-py closed it for good: {reason(cause)}"
            if cause
            else ("nats-py closed it for good")
        )
        log.error("keybus: %s: %s; replacing it", self.url, self._lost_why)
        self._nc = self._js = None
        self._dead = nc
        self._settled.clear()
        if self.on_lost is not None:
            self.on_lost()
        self._replacer = asyncio.get_running_loop().create_task(
            self._replace(), name=f"keybus-nats-replace:{self.url}"
        )

    async def _replace(self) -> None:
        options = self.options
        bound = Deadline.after(options.replace_timeout)
        pause = options.reconnect_wait
        per_attempt = _RECONNECT_ATTEMPT_TIMEOUT * _CONNECT_ATTEMPTS + options.reconnect_wait
        last: BaseException | None = None
        while not self._closed:
            nc = self._attempt = NatsClient()
            try:
                js = await self._connect(nc, bound.within(per_attempt))
                if self.on_open is not None:
                    await self.on_open(nc)
            except _ATTEMPT_ERRORS as exc:
                last = exc
                self._attempt = None
                await close_client(nc, Deadline.after(_ATTEMPT_CLOSE))
                if bound.remaining() <= pause:
                    break
                log.warning("keybus: %s: replacing the connection failed: %s", self.url, exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, _MAX_REPLACE_PAUSE)
                continue
            self._attempt = None
            self._bury()  # (by now nats-py's own close of it has run)
            self._nc, self._js = nc, js
            self.replacements += 1
            self._settled.set()
            log.warning("keybus: %s: connection replaced", self.url)
            for member in list(self._members):
                member.on_replaced()
            return
        if self._closed:
            return
        self._bury()
        detail = reason(last) if last is not None else "closed meanwhile"
        self._failure = ConnectError(
            self.url,
            f"the connection is gone ({self._lost_why}) and could not be replaced within "
            f"{options.replace_timeout:g} s (last attempt: {detail})",
        )
        if last is not None:
            self._failure.__cause__ = last
        log.error("keybus: %s", self._failure)
        self._settled.set()

    # -- nats-py's callbacks -------------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        # nats-py reports errors of its own and the server's: neither carries credentials
        # (nats-py was never given a URL with any), so they are logged as they are.
        if self._refused.is_set() and not refused(exc):
            return  # the socket's end after a refusal: the refusal is the news (until
            # the next connect, which clears it)
        self._attempt_error = exc
        if refused(exc):
            self._refused.set()
            log.warning("keybus: NATS %s refused the connection: %s", self.url, reason(exc))
            return
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
