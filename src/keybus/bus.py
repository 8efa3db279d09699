"""EventBus: the public publish/subscribe/close surface, wiring the core to a transport."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

from keybus._aio import call_hook, log_failure
from keybus.background import Background
from keybus.deadline import Deadline
from keybus.engine import Handler, Publish, SubscriptionEngine
from keybus.envelope import Envelope, envelope_headers
from keybus.errors import BusClosedError, KeybusError, PublishBatchError, PublishError
from keybus.groups import anonymous_group
from keybus.health import Check, Health
from keybus.heartbeat import HeartbeatAlert, HeartbeatWatch, publish_heartbeats, watch_heartbeats
from keybus.lag import Lag, LagAlert, LagWatch, PartitionLag
from keybus.message import Message
from keybus.middleware import Middleware, check_middleware
from keybus.options import SubscribeOptions
from keybus.parked_requests import ParkedRequest, request_through_store
from keybus.parking import ParkedKey, load, store_topic
from keybus.subscription import Subscription
from keybus.topics import TopicConfig, TopicInfo, check_topic
from keybus.versions import store_topic as versions_topic

if TYPE_CHECKING:
    from keybus.observer import AttemptObserver
    from keybus.telemetry.hooks import Sending, Telemetry
    from keybus.transports.base import Transport

__all__ = ["EventBus"]

log = logging.getLogger("keybus")

_READ_BUDGET = 30.0  # reading a parked-keys store or a dead-letter topic back


class EventBus:
    """A connected bus. Create it with :func:`keybus.connect`."""

    def __init__(
        self,
        transport: Transport,
        *,
        group: str | None = None,
        topic_config: TopicConfig | None = None,
        create_topics: bool = True,
        middleware: Sequence[Middleware] | None = None,
        subscribe_defaults: Mapping[str, Any] | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._transport = transport
        # Without a group each bus is its own group: it sees every message (fan-out).
        self.group = group or anonymous_group()
        self.topic_config = topic_config or TopicConfig()
        self.create_topics = create_topics
        # Wraps every subscription's own middleware (keybus.middleware).
        self.middleware = check_middleware(middleware)
        # Every subscription's options start from these (a configuration's `subscribe`).
        self.subscribe_defaults = dict(subscribe_defaults or {})
        unknown = sorted(set(self.subscribe_defaults) - set(SubscribeOptions.__dataclass_fields__))
        if unknown:
            raise TypeError(f"unknown subscribe option(s) in subscribe_defaults: {unknown}")
        self._engines: dict[SubscriptionEngine, Subscription] = {}
        self._ensured: set[str] = set()
        self._closing = False
        # Publishes are refused once the subscriptions are drained, not when close()
        # begins: the handlers it lets finish may still publish (follow-up events).
        self._publish_closed = False
        self._close_task: asyncio.Task[None] | None = None
        self._background: set[Background] = set()
        # Metrics and tracing (connect(metrics=..., tracing=...)); None: every path is
        # as it would be without them.
        self._telemetry = telemetry
        # With metrics: what keeps the lag gauges fresh, from the first subscription on.
        self._lag_gauges: Background | None = None
        if telemetry is not None:
            telemetry.bind(transport, lambda: list(self._engines))

    @property
    def url(self) -> str:
        return self._transport.url

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def subscriptions(self) -> frozenset[Subscription]:
        return frozenset(self._engines.values())

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
        telemetry = self._telemetry
        if telemetry is None:
            await self._transport.send(topic, value, key, _header_bytes(headers))
            return
        # Observed: begun and ended around the send here, not in a coroutine around it.
        value, key, sending, token = telemetry.outgoing(topic, value, key, _header_bytes(headers))
        try:
            await self._transport.send(topic, value, key, sending)
        except BaseException as exc:
            telemetry.sent(topic, token, exc)
            raise
        telemetry.sent(topic, token, None)

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
        telemetry = self._telemetry
        if telemetry is None:
            await self._transport.send(
                topic, envelope.to_bytes(), envelope.aggregate_id, envelope_headers(envelope)
            )
            return
        value, key, headers, token = telemetry.outgoing(topic, b"", None, {}, envelope)
        try:
            await self._transport.send(topic, value, key, headers)
        except BaseException as exc:
            telemetry.sent(topic, token, exc)
            raise
        telemetry.sent(topic, token, None)

    async def publish_many(
        self,
        topic: str,
        items: Iterable[Envelope | bytes | tuple[Any, ...]],
        *,
        raise_on_error: bool = True,
    ) -> list[PublishError | None]:
        """Send a batch — envelopes, or records ``(value, key, headers)`` (``key`` and
        ``headers`` may be left out; a bare ``bytes`` is a record without key) — handed
        to the client at once so they travel in the same broker requests; returns when
        every one was acknowledged or refused, with a result per item: ``None``
        (acknowledged) or its :class:`PublishError`, index-aligned with ``items``.

        Every item is checked before anything is sent (an invalid one raises
        ``TypeError`` / ``EnvelopeError`` and nothing is sent). If some were refused,
        :class:`PublishBatchError` is raised (``.errors`` holds the per-item results),
        unless ``raise_on_error=False``: then the list is returned and the caller checks
        it. Records of one key keep their order among themselves (one producer, in
        order), as with awaited single publishes."""
        if self._publish_closed:
            raise BusClosedError("the bus is closed")
        if type(topic) is not str:
            raise TypeError(f"topic must be a str, got {type(topic).__name__}")
        check_topic(topic)
        items = list(items)
        if not items:
            errors: list[PublishError | None] = []
        elif self._telemetry is None:
            errors = await self._transport.send_many(topic, [_record(item) for item in items])
        else:
            errors = await self._observed_many(self._telemetry, topic, items)
        if raise_on_error and any(e is not None for e in errors):
            raise PublishBatchError(topic, errors)
        return errors

    async def _observed_many(
        self, telemetry: Telemetry, topic: str, items: list[Envelope | bytes | tuple[Any, ...]]
    ) -> list[PublishError | None]:
        """A batch with metrics or tracing on: each record gets its measure and its
        PRODUCER span as a publish does (its trace context in its headers, an envelope
        stamped with the trace id and then encoded once), and the batch still goes to
        the transport at once."""
        # Raw records checked before any span starts; an envelope is checked as it is
        # encoded (after its stamp): an invalid one ends the spans begun, nothing sent.
        raw = [None if isinstance(item, Envelope) else _record(item) for item in items]
        records: list[tuple[bytes, str | None, Mapping[str, bytes]]] = []
        tokens: list[Sending] = []
        try:
            for item, record in zip(items, raw, strict=True):
                if record is None:
                    value, key, headers, token = telemetry.outgoing(
                        topic, b"", None, {}, cast(Envelope, item)
                    )
                else:
                    value, key, headers, token = telemetry.outgoing(
                        topic, record[0], record[1], record[2]
                    )
                records.append((value, key, headers))
                tokens.append(token)
        except BaseException:
            for token in tokens:
                telemetry.unsent(token)
            raise
        try:
            errors = await self._transport.send_many(topic, records)
        except BaseException as exc:  # BusClosedError (closed meanwhile), or a bug
            for token in tokens:
                telemetry.sent(topic, token, exc)
            raise
        for token, error in zip(tokens, errors, strict=True):
            telemetry.sent(topic, token, error)
        return errors

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
        max_in_flight), ``revoke_timeout`` (10 s), ``middleware`` (a list run around each
        attempt, inside the bus's own; see :mod:`keybus.middleware`)."""
        return await self._subscribe(topic, handler, options, envelopes=False)

    async def subscribe_envelope(
        self, topic: str, handler: Handler, **options: Any
    ) -> Subscription:
        """Call ``handler(envelope)`` for each envelope of ``topic``; undecodable messages
        go to the dead-letter topic with the reason. Same options as :meth:`subscribe`."""
        return await self._subscribe(topic, handler, options, envelopes=True)

    async def _subscribe(
        self,
        topic: str,
        handler: Handler,
        options: dict[str, Any],
        *,
        envelopes: bool,
        group: str | None = None,
    ) -> Subscription:
        if self._closing:
            raise BusClosedError("the bus is closed")
        if not callable(handler):
            raise TypeError("handler must be callable")
        if type(topic) is not str:
            raise TypeError(f"topic must be a str, got {type(topic).__name__}")
        check_topic(topic)
        if self.subscribe_defaults and group is None:  # not for the bus's own (a watch)
            options = {**self.subscribe_defaults, **options}
        unknown = sorted(set(options) - set(SubscribeOptions.__dataclass_fields__))
        if unknown:
            raise TypeError(f"unknown subscribe option(s): {unknown}")
        if "middleware" in options:
            options["middleware"] = self.middleware + check_middleware(options["middleware"])
        elif self.middleware:
            options["middleware"] = self.middleware
        try:
            settings = SubscribeOptions(**options)
        except TypeError as exc:  # e.g. max_attempts="3"
            raise TypeError(f"invalid subscribe option: {exc}") from None
        if settings.versions and not envelopes:
            raise ValueError('versions="strict" needs an envelope subscription')
        group = group or self.group
        publish: Publish = self._send_internal
        observer: AttemptObserver[Any] | None = None
        if self._telemetry is not None:  # measured and traced: around every attempt
            observer = self._telemetry.attempts(topic, group, settings.max_attempts)
            publish = self._telemetry.dead_letters(publish, topic, group)
        engine = SubscriptionEngine(
            topic,
            group,
            handler,
            settings,
            envelopes=envelopes,
            publish=publish,
            publish_internal=self._send_internal,
            on_closed=self._forget,
            read_topic=self._read_topic if self._transport.can_read_topics else None,
            store_versions=self._stores_versions,
            observer=observer,
        )
        check_topic(engine.dead_letter_topic)
        if engine.dead_letter_topic == topic:
            # Its dead letters would come back to it: a poison message would loop forever.
            raise ValueError(f"dead_letter_topic must differ from the topic {topic!r}")
        sub = Subscription(engine)
        # Registered before the first await, so a close() racing this subscribe sees it
        # (and waits for its start) instead of leaving it running on a closed bus.
        self._engines[engine] = sub
        try:
            if self.create_topics:
                await self.ensure_topic(topic)
                await self.ensure_topic(engine.dead_letter_topic)
                # Per-key state (parked keys, versions): compacted where the backend can,
                # never expiring.
                store = replace(self.topic_config, compacted=True, retention_seconds=None)
                if settings.on_dead_letter == "park":
                    await self.ensure_topic(store_topic(engine.dead_letter_topic), store)
                if settings.versions and self._stores_versions:
                    await self.ensure_topic(versions_topic(engine.dead_letter_topic), store)
            if self._closing:
                raise BusClosedError("the bus was closed while subscribing")
            await engine.start(self._transport.consumer(topic, engine.group, engine))
            if self._closing:
                raise BusClosedError("the bus was closed while subscribing")
        except BaseException:
            await sub.unsubscribe(timeout=0)
            raise
        if self._lag_gauges is None and self._telemetry is not None:
            interval = self._telemetry.lag_interval
            if interval is not None:
                self._lag_gauges = self._start(
                    "keybus-lag-gauges", partial(self._read_lag, interval)
                )
        return sub

    @property
    def _stores_versions(self) -> bool:
        """Whether the version guard keeps its versions in the broker: only where a
        compacted topic bounds them (one record per aggregate), and reads back."""
        return self._transport.can_read_topics and self._transport.compacts_topics

    async def _read_lag(self, interval: float, handle: Background) -> None:
        """The lag gauges' source: every ``interval`` seconds, the lag of each group this
        bus subscribes in (each read bounded by the interval). A failed read keeps the
        last figures and is logged once until a read succeeds again."""
        telemetry = self._telemetry
        assert telemetry is not None
        handle.started()
        failing = False
        while True:
            groups = sorted({engine.group for engine in self._engines})
            try:
                readings = [await self.lag(group=group, timeout=interval) for group in groups]
            except Exception as exc:  # a broker away, or a bug: the gauges must not stop
                if not failing:
                    # The text, not the error: a handler keeping log records (pytest's,
                    # say) would keep its traceback's frames and what they hold — the
                    # transport's admin client, alive past close().
                    log.warning("keybus: lag gauges not refreshed: %s", str(exc))
                failing = True
            else:
                if failing:
                    log.info("keybus: lag gauges refreshed again")
                failing = False
                telemetry.update_lag(readings)
            await asyncio.sleep(interval)

    async def _read_topic(self, topic: str) -> list[Message]:
        return await self._transport.read_topic(topic, Deadline.after(_READ_BUDGET))

    # -- parking and replay (on_dead_letter="park") -------------------------------------

    def _parking_engine(self, topic: str, group: str | None) -> SubscriptionEngine | None:
        group = group or self.group
        for engine in self._engines:
            if engine.topic == topic and engine.group == group and not engine.closing:
                return engine
        return None

    def _parking_subscription(self, topic: str, group: str | None) -> SubscriptionEngine:
        engine = self._parking_engine(topic, group)
        if engine is None:
            raise ValueError(
                f"no subscription of {topic!r} in group {group or self.group!r} on this bus: "
                "a replay hands messages to the subscription's handler"
            )
        return engine

    async def parked(
        self, topic: str, group: str | None = None, *, dead_letter_topic: str | None = None
    ) -> list[ParkedKey]:
        """The parked keys of ``topic`` in ``group`` (default: this bus's): count,
        first failure, reason, age. From this bus's subscription if it has one, else
        read from the broker's parked-keys store (``dead_letter_topic``: the
        subscription's, default ``f"{topic}.dlq"``)."""
        check_topic(topic)
        engine = self._parking_engine(topic, group)
        if engine is not None:
            return await engine.parked()
        if not self._transport.can_read_topics:
            raise ValueError("this transport cannot read parked keys back from the broker")
        store = store_topic(dead_letter_topic or f"{topic}.dlq")
        return [
            state.view(topic, key)
            for key, state in load(await self._read_topic(store), group or self.group).items()
        ]

    async def replay_parked(self, topic: str, *, key: str, group: str | None = None) -> int:
        """Hand ``key``'s parked messages, in their original order, to the handler of this
        bus's subscription of ``topic`` (in ``group``), then unpark ``key``: its live
        messages flow again, none before the parked ones. Returns how many were handed.
        :class:`ReplayError` if one fails again: the key stays parked from it on."""
        return await self._parking_subscription(topic, group).replay_parked(key)

    async def discard_parked(self, topic: str, *, key: str, group: str | None = None) -> int:
        """Drop ``key``'s parked messages (a record in the dead-letter topic says so) and
        unpark it; returns how many were parked."""
        return await self._parking_subscription(topic, group).discard_parked(key)

    async def request_parked(
        self,
        topic: str,
        *,
        key: str,
        action: str = "replay",
        group: str | None = None,
        dead_letter_topic: str | None = None,
        timeout: float = 60.0,
    ) -> ParkedRequest:
        """Ask the member of ``group`` that owns ``key``'s partition — a running service
        with the handler, not this bus — to replay (``action="replay"``) or discard
        ``key``'s parked messages, through a request in the parked-keys store; wait up
        to ``timeout`` seconds for its answer. The member performs ``replay_parked`` /
        ``discard_parked`` itself. ``keybus dlq replay`` / ``discard`` use it."""
        check_topic(topic)
        if not self._transport.can_read_topics:
            raise ValueError("this transport cannot read parked keys back from the broker")
        store = store_topic(dead_letter_topic or f"{topic}.dlq")

        async def read(seconds: float) -> list[Message]:
            budget = Deadline.after(max(0.1, min(seconds, _READ_BUDGET)))
            return await self._transport.read_topic(store, budget)

        async def write(value: bytes, name: str, headers: dict[str, bytes]) -> None:
            await self._transport.publish(store, value, name, headers)

        return await request_through_store(read, write, group or self.group, key, action, timeout)

    def _forget(self, engine: SubscriptionEngine) -> None:
        self._engines.pop(engine, None)

    # -- topics ----------------------------------------------------------------------

    async def ensure_topic(self, topic: str, config: TopicConfig | None = None) -> None:
        """Create ``topic`` if missing, with ``config`` or the bus's default."""
        self._check_admin(topic)
        if topic in self._ensured and config is None:
            return
        await self._transport.ensure_topic(topic, config or self.topic_config)
        self._ensured.add(topic)

    def _check_admin(self, topic: str) -> None:
        check_topic(topic)
        # Like publishing: admin calls work while a close drains, not after it.
        if self._publish_closed:
            raise BusClosedError("the bus is closed")

    async def describe_topic(self, topic: str) -> TopicInfo:
        """The topic as the backend has it (partitions); :class:`TopicError` if missing."""
        self._check_admin(topic)
        return await self._transport.describe_topic(topic)

    async def delete_topic(self, topic: str) -> None:
        """Delete ``topic`` and its data if it exists (idempotent)."""
        self._check_admin(topic)
        self._ensured.discard(topic)
        await self._transport.delete_topic(topic)

    async def list_topics(self, *, timeout: float = 5.0) -> list[str]:
        """The names of the backend's topics, sorted (its internal ones left out: Kafka's
        ``__consumer_offsets``, NATS key-value buckets; on NATS, the topics of keybus's
        own stream layout). :class:`TopicError` if the backend cannot tell in time."""
        if self._publish_closed:
            raise BusClosedError("the bus is closed")
        return await self._transport.list_topics(Deadline.after(timeout))

    # -- operating -------------------------------------------------------------------

    async def health(self, timeout: float = 2.0) -> Health:
        """The bus's checks, within ``timeout``: ``broker`` (a round trip), one per
        subscription, ``publisher``. Never raises for an unhealthy broker: it reports it
        (``Health.ok`` is False). After close: every check says so."""
        checks: dict[str, Check] = {}
        backend = self.url.split("://", 1)[0]
        if self._publish_closed:
            checks["bus"] = Check("bus", False, "closed")
            return Health(backend, checks)
        try:
            rtt = await asyncio.wait_for(
                self._transport.ping(Deadline.after(timeout)), max(0.0, timeout)
            )
        except TimeoutError:
            checks["broker"] = Check("broker", False, f"no answer within {timeout:g} s")
        except KeybusError as exc:
            checks["broker"] = Check("broker", False, str(exc))
        else:
            detail = f"answered in {rtt * 1000:.1f} ms"
            checks["broker"] = Check("broker", True, detail, {"rtt_seconds": rtt})
        now = time.monotonic()
        for engine in list(self._engines):
            name = f"subscription:{engine.topic}"
            since_fetch = None if engine.last_fetch is None else now - engine.last_fetch
            since_commit = None if engine.last_commit is None else now - engine.last_commit
            state = "stopping" if engine.closing else "running"
            checks[name] = Check(
                name,
                not engine.closing,
                f"{state} in group {engine.group}",
                {
                    "state": state,
                    "group": engine.group,
                    "in_flight": engine.in_flight,
                    "seconds_since_fetch": since_fetch,
                    "seconds_since_commit": since_commit,
                },
            )
        pending = self._transport.pending_publishes
        checks["publisher"] = Check(
            "publisher", True, f"{pending} unacknowledged", {"pending": pending}
        )
        return Health(backend, checks)

    async def lag(
        self, topic: str | None = None, group: str | None = None, *, timeout: float = 5.0
    ) -> Lag:
        """Per partition: the group's committed and end positions and the count lag (from
        the broker, for any group); for the partitions this bus consumes, also the age of
        the oldest unfinished message and the done messages held behind it. ``topic``:
        one topic (default: every topic this bus subscribes to in ``group``); ``group``:
        default this bus's. :class:`TopicError` if the broker cannot tell in time."""
        if self._publish_closed:
            raise BusClosedError("the bus is closed")
        group = group or self.group
        engines = [e for e in self._engines if e.group == group]
        topics = [topic] if topic is not None else sorted({e.topic for e in engines})
        for name in topics:
            check_topic(name)
        deadline = Deadline.after(timeout)
        found = await asyncio.gather(
            *(self._transport.positions(name, group, deadline) for name in topics)
        )
        local: dict[tuple[str, int], tuple[float | None, int]] = {}
        for engine in engines:
            for partition, state in engine.partition_state().items():
                local[(engine.topic, partition)] = state
        rows = []
        for name, positions in zip(topics, found, strict=True):
            for position in positions:
                age, held = local.get((name, position.partition), (None, None))
                rows.append(
                    PartitionLag(
                        name,
                        position.partition,
                        group,
                        position.committed,
                        position.end,
                        position.lag,
                        age,
                        held,
                    )
                )
        return Lag(tuple(rows))

    def start_heartbeat(
        self,
        topic: str = "keybus.heartbeat",
        interval: float = 5.0,
        *,
        source: str | None = None,
    ) -> Background:
        """Publish a heartbeat (source, instance id, sequence, sent time) to ``topic`` now
        and every ``interval`` seconds, keyed by ``source`` (default: the bus's group),
        until ``stop()`` or ``close()``."""
        self._check_admin(topic)
        if not interval > 0:
            raise ValueError(f"interval must be > 0, got {interval!r}")
        name = source or self.group

        async def run(handle: Background) -> None:
            if self.create_topics:
                await self.ensure_topic(topic)
            handle.started()
            await publish_heartbeats(self._send_plain, topic, name, interval)

        return self._start(f"keybus-heartbeat:{topic}", run)

    def watch_heartbeats(
        self,
        topic: str = "keybus.heartbeat",
        interval: float = 5.0,
        *,
        on_alert: Callable[[HeartbeatAlert], Awaitable[None] | None],
    ) -> Background:
        """Call ``on_alert`` when a heartbeat source of ``topic`` misses 3 / 5 / 10
        intervals (warning / error / critical) and when it is back (recovered). The
        watch sees every heartbeat (a group of its own); it ends with ``stop()`` or
        ``close()``."""
        self._check_admin(topic)
        watch = HeartbeatWatch(interval)

        async def on_beat(message: Message) -> None:
            alert = watch.beat(message.value, time.monotonic())
            if alert is not None:
                await call_hook(on_alert, alert)

        async def run(handle: Background) -> None:
            sub = await self._subscribe(
                topic, on_beat, {"max_concurrency": 1}, envelopes=False, group=anonymous_group()
            )
            handle.on_stop(sub.unsubscribe)
            handle.started()
            await watch_heartbeats(watch, on_alert)

        return self._start(f"keybus-heartbeat-watch:{topic}", run, watch)

    def watch_lag(
        self,
        threshold: int | None = 10_000,
        max_age: float | None = 60.0,
        interval: float = 5.0,
        *,
        on_change: Callable[[LagAlert], Awaitable[None] | None],
        topic: str | None = None,
        group: str | None = None,
    ) -> Background:
        """Every ``interval`` seconds, read :meth:`lag` (``topic``, ``group``: as there)
        and call ``on_change`` when a partition's count lag reaches ``threshold`` or its
        oldest unfinished record ``max_age`` seconds (either may be None), and again when
        it is back under both. Ends with ``stop()`` or ``close()``."""
        if not interval > 0:
            raise ValueError(f"interval must be > 0, got {interval!r}")
        watch = LagWatch(threshold, max_age)

        async def run(handle: Background) -> None:
            handle.started()
            while True:
                try:
                    lag = await self.lag(topic, group, timeout=interval)
                except KeybusError as exc:
                    log.warning("keybus: lag not read: %s", str(exc))  # see _read_lag
                else:
                    for alert in watch.update(lag):
                        await call_hook(on_change, alert)
                await asyncio.sleep(interval)

        return self._start("keybus-lag-watch", run, watch)

    def _start(
        self,
        name: str,
        body: Callable[[Background], Coroutine[Any, Any, None]],
        watch: object = None,
    ) -> Background:
        handle = Background(name, body, watch, on_stopped=self._forget_background)
        self._background.add(handle)
        return handle

    def _forget_background(self, handle: Background) -> None:
        # (the set held now: close() swaps it for an empty one while it stops the rest)
        self._background.discard(handle)

    async def _send_plain(self, topic: str, value: bytes, key: str) -> None:
        await self._transport.send(topic, value, key, {})

    # -- closing ---------------------------------------------------------------------

    async def close(self, timeout: float = 5.0) -> None:
        """Stop fetching, let in-flight handlers finish until ``timeout``, cancel those
        still running, commit what completed, flush publishes and disconnect. Publishing
        (a draining handler's follow-up events, say) works until the handlers are done;
        afterwards it raises :class:`BusClosedError`.

        Returns within ``timeout`` plus a small constant even if a handler never returns
        (Kafka with its broker unreachable: up to the consumer's session or request
        timeout more, the time librdkafka holds a consumer's close; see docs/kafka.md).
        Idempotent, and safe to call from inside a handler; afterwards the bus owns no
        task, thread, socket or fd."""
        if self._close_task is not None:
            # Already closing: this call is bounded by its own timeout too.
            deadline = time.monotonic() + max(0.0, timeout)
            for engine in self._engines:
                engine.hasten(deadline)
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
        background, self._background = self._background, set()
        for handle in background:
            await handle.stop()
        engines = list(self._engines)
        if engines:
            results = await asyncio.gather(
                *(e.shutdown(deadline) for e in engines), return_exceptions=True
            )
            for sub, result in zip(engines, results, strict=True):
                if isinstance(result, BaseException):
                    # Keep closing the rest: a failed subscription must not leak the
                    # transport.
                    log.error("keybus: closing %s failed: %r", sub.topic, result)
        self._publish_closed = True
        budget = self._transport.close_budget
        try:
            # The transport sizes its steps from the deadline; the wait is the backstop.
            await asyncio.wait_for(self._transport.close(Deadline.after(budget)), budget)
        except TimeoutError:
            log.error("keybus: transport %s did not close in time", self.url)
        finally:
            if self._telemetry is not None:
                self._telemetry.close()  # its subscriptions leave the gauges

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


def _record(
    item: Envelope | bytes | tuple[Any, ...],
) -> tuple[bytes, str | None, dict[str, bytes]]:
    """One ``publish_many`` item as ``(value, key, headers)``, checked; ``headers`` a
    fresh dict (telemetry may add to it)."""
    if isinstance(item, Envelope):
        return item.to_bytes(), item.aggregate_id, envelope_headers(item)
    if isinstance(item, bytes | bytearray | memoryview):
        return bytes(item), None, {}
    if not isinstance(item, tuple) or not 1 <= len(item) <= 3:
        raise TypeError(
            "publish_many items are Envelopes, bytes or (value, key, headers) tuples, "
            f"got {type(item).__name__}"
        )
    value, key, headers = (*item, None, None)[:3]
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"value must be bytes, got {type(value).__name__}")
    if key is not None and type(key) is not str:
        raise TypeError(f"key must be a str or None, got {type(key).__name__}")
    return bytes(value), key, _header_bytes(headers)


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
