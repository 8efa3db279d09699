"""Pipelined JetStream publishing: many publishes in flight, each resolved by its PubAck.

``JetStreamContext.publish_async`` does the same but costs, per message, a task (it wraps
its semaphore acquire in ``asyncio.wait_for`` with a timeout), a ``secrets.token_hex``
(a getrandom syscall), a done-callback and a full ``PubAck`` parse — and the caller still
needs a ``wait_for`` of its own for a timeout: about a third of the Python time of a
publish. Here a publish is one ``nc.publish`` plus one future in a dict:

* replies come back on one wildcard subscription ``<inbox>.*``, the token is a counter;
* a PubAck is taken as success unless it contains ``"error"`` (it never holds user data)
  or — with de-duplication on — ``"duplicate": true`` (the server stored an earlier record
  with the same ``Nats-Msg-Id``, not this one: :class:`~.errors.Duplicate`);
* one timer, not one per message, fails publishes older than ``timeout`` (the pending
  dict is in publish order, so the oldest are at its front);
* at most ``limit`` publishes are in flight; more wait (bounded by ``timeout``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from itertools import count

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription

from keybus.deadline import Deadline
from keybus.transports.nats.errors import Duplicate, Unsent

__all__ = ["Publisher"]

_NO_RESPONDERS = "503"
_DUPLICATE = b'"duplicate"'  # only in the PubAck of a duplicate (then parsed to be sure)


class Publisher:
    def __init__(self, nc: NatsClient, timeout: float, limit: int, *, dedupe: bool) -> None:
        self._nc = nc
        self._timeout = timeout
        self._limit = limit
        self._dedupe = dedupe
        self._prefix = f"{nc.new_inbox()}."
        self._tokens = count()
        # reply subject -> (future, deadline in loop time); insertion (= deadline) order
        self._pending: dict[str, tuple[asyncio.Future[None], float]] = {}
        self._room = asyncio.Event()
        self._room.set()
        self._sub: NatsSubscription | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._drained: asyncio.Future[None] | None = None  # set while close() waits
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._sub = await self._nc.subscribe(f"{self._prefix}*", cb=self._on_reply)

    def pending(self) -> int:
        return len(self._pending)

    @property
    def max_payload(self) -> int:
        """The largest message (header block plus payload) the server takes: its
        ``max_payload``, as it announced it."""
        return self._nc.max_payload

    async def publish(self, subject: str, value: bytes, headers: dict[str, str]) -> None:
        """Publish and wait for the PubAck. Raises ``TimeoutError`` (no PubAck within the
        timeout, or no room for that long), ``NoStreamResponseError``, an ``APIError``
        (refused), :class:`~.errors.Duplicate`, :class:`~.errors.Unsent` (the client was
        closed: nothing was sent) or what ``nc.publish`` raises."""
        await (await self.begin(subject, value, headers))

    async def begin(
        self, subject: str, value: bytes, headers: dict[str, str]
    ) -> asyncio.Future[None]:
        """Publish; return the future its PubAck resolves (what :meth:`publish` awaits),
        so a batch keeps all of its publishes in flight without a task each."""
        pending = self._pending
        if len(pending) >= self._limit:
            await self._wait_for_room()
        loop = self._loop
        assert loop is not None, "Publisher.start() first"
        reply = f"{self._prefix}{next(self._tokens)}"
        future: asyncio.Future[None] = loop.create_future()
        deadline = loop.time() + self._timeout
        pending[reply] = (future, deadline)
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire)
        try:
            await self._nc.publish(subject, value, reply=reply, headers=headers)
        except nats.errors.ConnectionClosedError as exc:
            # nats-py refuses before sending anything: safe to send again elsewhere.
            pending.pop(reply, None)
            raise Unsent() from exc
        except BaseException:
            pending.pop(reply, None)
            raise
        return future

    async def _wait_for_room(self) -> None:
        async with asyncio.timeout(self._timeout):
            while len(self._pending) >= self._limit:
                self._room.clear()
                await self._room.wait()

    async def _on_reply(self, msg: Msg) -> None:
        pending = self._pending
        entry = pending.pop(msg.subject, None)
        if len(pending) < self._limit and not self._room.is_set():
            self._room.set()
        if not pending and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if entry is None:
            return  # expired meanwhile
        future = entry[0]
        if future.done():
            return  # its publisher was cancelled
        data = msg.data
        if not data:
            status = (msg.headers or {}).get("Status")
            if status == _NO_RESPONDERS:
                future.set_exception(nats.js.errors.NoStreamResponseError())
            else:
                future.set_exception(nats.errors.Error(f"unexpected reply, status {status}"))
        elif b'"error"' in data:
            future.set_exception(_api_error(data))
        elif self._dedupe and _DUPLICATE in data and _is_duplicate(data):
            future.set_exception(Duplicate())
        else:
            future.set_result(None)

    def _expire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        pending = self._pending
        expired: list[str] = []
        next_deadline = None
        for reply, (_, deadline) in pending.items():
            if deadline > now:
                next_deadline = deadline
                break
            expired.append(reply)
        for reply in expired:
            future, _ = pending.pop(reply)
            if not future.done():
                future.set_exception(TimeoutError())
        if expired and not self._room.is_set():
            self._room.set()
        if not pending and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)  # close() waits for nothing any more
        if next_deadline is not None and not self._closed:
            self._timer = loop.call_at(next_deadline, self._expire)

    async def close(self, deadline: Deadline) -> None:
        """Wait until ``deadline`` for outstanding PubAcks, then fail the rest (also when
        cancelled: nothing waits on a closed publisher)."""
        try:
            if self._pending:
                self._drained = asyncio.get_running_loop().create_future()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(deadline.remaining()):
                        await self._drained
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Fail every outstanding publish (``ConnectionClosedError``) and refuse to wait
        any more: the connection is gone."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, {}
        for future, _ in pending.values():
            if not future.done():
                future.set_exception(nats.errors.ConnectionClosedError())
        self._room.set()


def _is_duplicate(data: bytes) -> bool:
    try:
        return json.loads(data).get("duplicate") is True
    except (ValueError, AttributeError):
        return False


def _api_error(data: bytes) -> Exception:
    try:
        error = json.loads(data)["error"]
        try:
            return nats.js.errors.APIError.from_error(error)  # type: ignore[no-any-return]
        except nats.js.errors.APIError as raised:  # from_error raises the known ones
            return raised
    except (ValueError, KeyError, TypeError) as exc:
        return nats.errors.Error(f"malformed PubAck {data[:200]!r}: {exc!r}")
