"""EventBus: the public publish/subscribe/close surface, wiring the core to a transport."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from keybus.envelope import Envelope, envelope_headers
from keybus.errors import BusClosedError
from keybus.subscription import Handler, SubscribeOptions, Subscription
from keybus.transports.base import ANONYMOUS_GROUP_PREFIX, TopicConfig, Transport, log_failure

__all__ = ["EventBus"]

log = logging.getLogger("keybus")

# Kafka's topic rule, the strictest of our backends: one name works everywhere.
_TOPIC = re.compile(r"[A-Za-z0-9._\-]{1,249}")


@functools.lru_cache(maxsize=4096)  # publish checks every call: keep it off the hot path
def check_topic(topic: str) -> str:
    if not _TOPIC.fullmatch(topic):
        raise ValueError(f"invalid topic {topic!r}: use 1 to 249 characters of A-Z a-z 0-9 . _ -")
    return topic


class EventBus:
    """A connected bus. Create it with :func:`keybus.connect`."""

    def __init__(
        self,
        transport: Transport,
        *,
        group: str | None = None,
        topic_config: TopicConfig | None = None,
        create_topics: bool = True,
    ) -> None:
        self._transport = transport
        # Without a group each bus is its own group: it sees every message (fan-out).
        self.group = group or f"{ANONYMOUS_GROUP_PREFIX}{uuid.uuid4().hex[:12]}"
        self.topic_config = topic_config or TopicConfig()
        self.create_topics = create_topics
        self._subscriptions: set[Subscription] = set()
        self._ensured: set[str] = set()
        self._closing = False
        # Publishes are refused once the subscriptions are drained, not when close()
        # begins: the handlers it lets finish may still publish (follow-up events).
        self._publish_closed = False
        self._close_task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return self._transport.url

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def subscriptions(self) -> frozenset[Subscription]:
        return frozenset(self._subscriptions)

    # -- publishing ------------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        value: bytes,
        *,
        key: str | None = None,
        headers: Mapping[str, str | bytes] | None = None,
    ) -> None:
        """Send raw bytes; returns once the broker acknowledged them."""
        if self._publish_closed:
            raise BusClosedError("the bus is closed")
        if type(value) is not bytes:
            if not isinstance(value, bytes | bytearray | memoryview):
                raise TypeError(f"value must be bytes, got {type(value).__name__}")
            value = bytes(value)
        if key is not None and type(key) is not str:
            raise TypeError(f"key must be a str or None, got {type(key).__name__}")
        if type(topic) is not str:
            raise TypeError(f"topic must be a str, got {type(topic).__name__}")
        check_topic(topic)
        await self._transport.send(topic, value, key, _header_bytes(headers))

    async def publish_envelope(self, topic: str, envelope: Envelope) -> None:
        """Send an envelope (validated at construction): key = aggregate id, headers
        X-Event-ID, X-Aggregate-ID, X-Event-Type, X-Event-Version (+ trace/correlation)."""
        if self._publish_closed:
            raise BusClosedError("the bus is closed")
        if not isinstance(envelope, Envelope):
            raise TypeError(f"expected an Envelope, got {type(envelope).__name__}")
        if type(topic) is not str:
            raise TypeError(f"topic must be a str, got {type(topic).__name__}")
        check_topic(topic)
        await self._transport.send(
            topic, envelope.to_bytes(), envelope.aggregate_id, envelope_headers(envelope)
        )

    async def _send_internal(
        self, topic: str, value: bytes, key: str | None, headers: Mapping[str, bytes]
    ) -> None:
        # Dead letters are still sent while the bus drains during close().
        await self._transport.publish(topic, value, key, headers)

    # -- subscribing -----------------------------------------------------------------

    async def subscribe(self, topic: str, handler: Handler, **options: Any) -> Subscription:
        """Call ``handler(message)`` for each :class:`~keybus.Message` of ``topic``.

        Options: ``max_concurrency`` (256), ``max_attempts`` (3), ``retry_backoff`` (0.1 s,
        doubled per attempt, at most ``max_retry_backoff``, 30 s), ``dead_letter_topic``
        (``f"{topic}.dlq"``), ``max_in_flight`` (taken in, not yet handled: max(1024,
        4 x max_concurrency)), ``max_uncommitted`` (taken in, not yet committed: 16 x
        max_in_flight), ``revoke_timeout`` (10 s)."""
        return await self._subscribe(topic, handler, options, envelopes=False)

    async def subscribe_envelope(
        self, topic: str, handler: Handler, **options: Any
    ) -> Subscription:
        """Call ``handler(envelope)`` for each envelope of ``topic``; undecodable messages
        go to the dead-letter topic with the reason. Same options as :meth:`subscribe`."""
        return await self._subscribe(topic, handler, options, envelopes=True)

    async def _subscribe(
        self, topic: str, handler: Handler, options: dict[str, Any], *, envelopes: bool
    ) -> Subscription:
        if self._closing:
            raise BusClosedError("the bus is closed")
        if not callable(handler):
            raise TypeError("handler must be callable")
        if type(topic) is not str:
            raise TypeError(f"topic must be a str, got {type(topic).__name__}")
        check_topic(topic)
        unknown = sorted(set(options) - set(SubscribeOptions.__dataclass_fields__))
        if unknown:
            raise TypeError(f"unknown subscribe option(s): {unknown}")
        try:
            settings = SubscribeOptions(**options)
        except TypeError as exc:  # e.g. max_attempts="3"
            raise TypeError(f"invalid subscribe option: {exc}") from None
        sub = Subscription(
            topic,
            self.group,
            handler,
            settings,
            envelopes=envelopes,
            publish=self._send_internal,
            on_closed=self._subscriptions.discard,
        )
        check_topic(sub.dead_letter_topic)
        if sub.dead_letter_topic == topic:
            # Its dead letters would come back to it: a poison message would loop forever.
            raise ValueError(f"dead_letter_topic must differ from the topic {topic!r}")
        # Registered before the first await, so a close() racing this subscribe sees it
        # (and waits for its start) instead of leaving it running on a closed bus.
        self._subscriptions.add(sub)
        try:
            if self.create_topics:
                await self.ensure_topic(topic)
                await self.ensure_topic(sub.dead_letter_topic)
            if self._closing:
                raise BusClosedError("the bus was closed while subscribing")
            await sub._start(self._transport.consumer(topic, self.group, sub))
            if self._closing:
                raise BusClosedError("the bus was closed while subscribing")
        except BaseException:
            await sub.unsubscribe(timeout=0)
            raise
        return sub

    # -- topics ----------------------------------------------------------------------

    async def ensure_topic(self, topic: str, config: TopicConfig | None = None) -> None:
        """Create ``topic`` if missing, with ``config`` or the bus's default."""
        check_topic(topic)
        if topic in self._ensured and config is None:
            return
        await self._transport.ensure_topic(topic, config or self.topic_config)
        self._ensured.add(topic)

    async def delete_topic(self, topic: str) -> None:
        check_topic(topic)
        self._ensured.discard(topic)
        await self._transport.delete_topic(topic)

    # -- closing ---------------------------------------------------------------------

    async def close(self, timeout: float = 5.0) -> None:
        """Stop fetching, let in-flight handlers finish until ``timeout``, cancel those
        still running, commit what completed, flush publishes and disconnect. Publishing
        (a draining handler's follow-up events, say) works until the handlers are done;
        afterwards it raises :class:`BusClosedError`.

        Returns within ``timeout`` plus a small constant even if a handler never returns
        (Kafka with its broker unreachable: up to the consumer session timeout more, the
        time librdkafka holds a consumer's close; see docs/kafka.md).
        Idempotent, and safe to call from inside a handler; afterwards the bus owns no
        task, thread, socket or fd."""
        if self._close_task is not None:
            # Already closing: this call is bounded by its own timeout too.
            deadline = time.monotonic() + max(0.0, timeout)
            for sub in self._subscriptions:
                sub._hasten(deadline)
        else:
            self._closing = True
            # Its own task, shielded: a handler calling close() gets cancelled by the
            # close itself (it is a running handler) — the close must go on regardless.
            self._close_task = asyncio.get_running_loop().create_task(
                self._close(max(0.0, timeout)), name=f"keybus-close:{self.url}"
            )
            self._close_task.add_done_callback(log_failure)
        await asyncio.shield(self._close_task)

    async def _close(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        subs = list(self._subscriptions)
        if subs:
            results = await asyncio.gather(
                *(s._shutdown(deadline) for s in subs), return_exceptions=True
            )
            for sub, result in zip(subs, results, strict=True):
                if isinstance(result, BaseException):
                    # Keep closing the rest: a failed subscription must not leak the
                    # transport.
                    log.error("keybus: closing %s failed: %r", sub.topic, result)
        self._publish_closed = True
        try:
            await asyncio.wait_for(self._transport.close(), self._transport.close_budget)
        except TimeoutError:
            log.error("keybus: transport %s did not close in time", self.url)

    async def __aenter__(self) -> EventBus:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closing else "open"
        return f"<EventBus {self.url} group={self.group!r} {state}>"


def _header_bytes(headers: Mapping[str, str | bytes] | None) -> dict[str, bytes]:
    if not headers:
        return {}
    if not isinstance(headers, Mapping):
        raise TypeError(f"headers must be a mapping, got {type(headers).__name__}")
    out: dict[str, bytes] = {}
    for name, value in headers.items():
        if type(name) is not str:
            raise TypeError(f"header names must be str, got {type(name).__name__}")
        if type(value) is str:
            out[name] = value.encode()
        elif isinstance(value, bytes | bytearray | memoryview):
            out[name] = bytes(value)
        else:
            raise TypeError(f"header {name!r} must be str or bytes, got {type(value).__name__}")
    return out
