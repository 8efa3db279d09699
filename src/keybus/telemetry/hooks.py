"""What a bus with ``metrics=`` or ``tracing=`` calls: around each publish, around each
handling attempt (a middleware, the outermost), around each dead letter.

A bus without either holds no :class:`Telemetry` and never calls here: its paths are
the same as before telemetry existed. This module imports neither prometheus-client nor
OpenTelemetry; :func:`build` does, when asked for them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from keybus._aio import being_cancelled
from keybus.delivery import Delivery
from keybus.envelope import Envelope, envelope_headers
from keybus.middleware import CallNext, Middleware
from keybus.options import SubscribeOptions

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span

    from keybus.engine import SubscriptionEngine
    from keybus.telemetry.metrics import Metrics, PublishMeter, SubscriptionMeter
    from keybus.telemetry.tracing import Tracing
    from keybus.transports.base import Transport

__all__ = ["OUTCOMES", "Telemetry", "backend_name", "build"]

_T = TypeVar("_T")

Send = Callable[[str, bytes, str | None, Mapping[str, bytes]], Awaitable[None]]

# The outcomes of an attempt, indexes into SubscriptionMeter.outcomes (metrics.py).
OUTCOMES = ("ok", "retried", "dead_lettered", "abandoned")
_OK, _RETRIED, _DEAD_LETTERED, _ABANDONED = range(len(OUTCOMES))


def build(metrics: object = None, tracing: object = None) -> Telemetry | None:
    """The telemetry ``connect(metrics=..., tracing=...)`` asked for, or None for none.

    ``metrics``: True (prometheus-client's default registry) or a ``CollectorRegistry``;
    ``tracing``: True (the global tracer provider) or a ``TracerProvider``. Checked before
    the bus connects: a missing extra raises ImportError naming it."""
    meters = _option(metrics, "metrics", "prometheus-client", "prometheus", _metrics_kit)
    tracer = _option(tracing, "tracing", "opentelemetry-api", "otel", _tracing_kit)
    if meters is None and tracer is None:
        return None
    return Telemetry(meters, tracer)


def _metrics_kit() -> tuple[type, Callable[[Any], Metrics]]:
    from prometheus_client import CollectorRegistry

    from keybus.telemetry.metrics import metrics_for

    return CollectorRegistry, metrics_for


def _tracing_kit() -> tuple[type, Callable[[Any], Tracing]]:
    from opentelemetry.trace import TracerProvider

    from keybus.telemetry.tracing import Tracing

    return TracerProvider, Tracing


def _option(
    value: object,
    option: str,
    package: str,
    extra: str,
    kit: Callable[[], tuple[type, Callable[[Any], _T]]],
) -> _T | None:
    """What one option asks for: None (off), made with None (``True``: the global one)
    or with ``value`` (an instance of the kit's type)."""
    if value is None or value is False:
        return None
    try:
        kind, make = kit()  # imported only now: `import keybus` stays light
    except ImportError as exc:
        raise ImportError(f"{option}= needs {package}: pip install 'keybus[{extra}]'") from exc
    if value is True:
        return make(None)
    if isinstance(value, kind):
        return make(value)
    raise TypeError(
        f"{option} must be True or an instance of {kind.__module__}.{kind.__qualname__}"
    )


def backend_name(transport: Transport) -> str:
    """The backend label and messaging.system: kafka, nats or memory for keybus's own
    transports (whatever the URL's scheme), else the URL's scheme."""
    module = type(transport).__module__.split(".")
    if module[:2] == ["keybus", "transports"] and len(module) > 2:
        return module[2]
    return transport.url.partition("://")[0].lower() or "unknown"


class Telemetry:
    """One bus's metrics and/or tracing."""

    def __init__(self, metrics: Metrics | None, tracing: Tracing | None) -> None:
        self._metrics = metrics
        self._tracing = tracing
        self.backend = "unknown"
        self._engines: Callable[[], Iterable[SubscriptionEngine]] = list
        self._publish_meters: dict[str, PublishMeter] = {}

    def bind(
        self, transport: Transport, engines: Callable[[], Iterable[SubscriptionEngine]]
    ) -> None:
        """Start reporting for a bus: its backend and its live subscriptions (read by the
        gauges at scrape time)."""
        self.backend = backend = backend_name(transport)
        self._engines = engines
        if self._tracing is not None:
            self._tracing.bind(backend)
        if self._metrics is not None:
            self._metrics.add_source(self)

    def engines(self) -> Iterable[SubscriptionEngine]:
        return self._engines()

    def close(self) -> None:
        """The bus closed: its subscriptions leave the gauges (its counts stay)."""
        if self._metrics is not None:
            self._metrics.remove_source(self)
        self._engines = list

    # -- publishing --------------------------------------------------------------------

    def _meter(self, topic: str) -> PublishMeter | None:
        metrics = self._metrics
        if metrics is None:
            return None
        meter = self._publish_meters.get(topic)
        if meter is None:
            meter = self._publish_meters[topic] = metrics.publish_meter(self.backend, topic)
        return meter

    async def publish(
        self,
        send: Send,
        topic: str,
        value: bytes,
        key: str | None,
        headers: dict[str, bytes],
        envelope: Envelope | None = None,
    ) -> None:
        """A publish: raw (``headers``: a fresh dict of the bus's, may be written to) or
        of ``envelope`` (then ``value``, ``key`` and ``headers`` are ignored: the envelope
        is encoded here, once its trace id is filled). One coroutine for every case: a
        helper coroutine more per message shows in the in-memory benchmark."""
        tracing = self._tracing
        if tracing is not None:
            if envelope is not None:
                message_id: str | None = envelope.event_id
            else:
                event_id = headers.get("X-Event-ID")
                message_id = event_id.decode("utf-8", "replace") if event_id is not None else None
            scope = tracing.start_publish(topic, message_id)
            if scope is not None:
                if envelope is not None:
                    envelope = tracing.stamp(envelope, scope[1])
                    value, key = envelope.to_bytes(), envelope.aggregate_id
                    headers = envelope_headers(envelope)
                await self._traced(send, topic, value, key, headers, scope)
                return
        if envelope is not None:
            value, key = envelope.to_bytes(), envelope.aggregate_id
            headers = envelope_headers(envelope)
        meter = self._publish_meters.get(topic)
        if meter is None:
            meter = self._meter(topic)
            if meter is None:
                await send(topic, value, key, headers)
                return
        started = time.perf_counter()
        try:
            await send(topic, value, key, headers)
        except BaseException:
            meter.failed += 1
            raise
        else:
            meter.ok += 1
        finally:
            meter.duration.observe(time.perf_counter() - started)

    async def _traced(
        self,
        send: Send,
        topic: str,
        value: bytes,
        key: str | None,
        headers: dict[str, bytes],
        scope: tuple[Span | None, Context],
    ) -> None:
        tracing = self._tracing
        assert tracing is not None
        span, context = scope
        meter = self._meter(topic)
        started = time.perf_counter()
        try:
            tracing.inject(headers, context)
            await send(topic, value, key, headers)
        except BaseException as exc:
            if meter is not None:
                meter.failed += 1
            if span is not None:
                tracing.failed(span, exc)
            raise
        else:
            if meter is not None:
                meter.ok += 1
        finally:
            if meter is not None:
                meter.duration.observe(time.perf_counter() - started)
            if span is not None:
                span.end()

    # -- subscribing -------------------------------------------------------------------

    def observe(self, topic: str, group: str, options: SubscribeOptions) -> SubscribeOptions:
        """``options`` with this telemetry's middleware outermost (around every other)."""
        meter = (
            None
            if self._metrics is None
            else self._metrics.subscription_meter(self.backend, topic, group)
        )
        middleware = _attempt_observer(meter, self._tracing, group, options.max_attempts)
        return dataclasses.replace(options, middleware=(middleware, *options.middleware))

    def dead_letters(self, publish: Send, topic: str, group: str) -> Send:
        """``publish`` (the dead-letter path of the subscription of ``topic``), counted
        and traced."""
        meter = (
            None
            if self._metrics is None
            else self._metrics.subscription_meter(self.backend, topic, group)
        )
        tracing = self._tracing

        async def dead_letter(
            dlq: str, value: bytes, key: str | None, headers: Mapping[str, bytes]
        ) -> None:
            if tracing is None or (scope := tracing.start_dead_letter(dlq, headers)) is None:
                await publish(dlq, value, key, headers)
            else:
                span, context = scope
                try:
                    carrier = dict(headers)  # the engine's, kept for its own retries
                    tracing.inject(carrier, context)
                    await publish(dlq, value, key, carrier)
                except BaseException as exc:
                    if span is not None:
                        tracing.failed(span, exc)
                    raise
                finally:
                    if span is not None:
                        span.end()
            if meter is not None:
                meter.dead_letters += 1

        return dead_letter


def _attempt_observer(
    meter: SubscriptionMeter | None, tracing: Tracing | None, group: str, max_attempts: int
) -> Middleware:
    """The middleware that measures and traces each attempt of one subscription."""

    def failure(attempt: int, error: BaseException) -> int:
        if not isinstance(error, Exception) and (
            not isinstance(error, asyncio.CancelledError) or being_cancelled()
        ):
            return _ABANDONED  # a revoke or a close cancelled it: redelivered later
        return _RETRIED if attempt < max_attempts else _DEAD_LETTERED

    async def observe_attempt(call_next: CallNext, delivery: Delivery) -> None:
        if meter is not None and delivery.attempt == 1:
            # From when it was sent (the envelope's timestamp, else the record's) to now.
            payload = delivery.payload
            if type(payload) is Envelope:
                meter.end_to_end.observe(max(0.0, time.time() - payload.timestamp.timestamp()))
            elif (stamp := delivery.message.timestamp) is not None:
                meter.end_to_end.observe(max(0.0, time.time() - stamp))
        scope = None if tracing is None else tracing.start_process(delivery, group)
        started = time.perf_counter()
        try:
            await call_next(delivery)
        except BaseException as exc:
            outcome = failure(delivery.attempt, exc)
            if meter is not None:
                meter.outcomes[outcome] += 1
            if scope is not None and scope[0] is not None:
                tracing.attempt_failed(scope[0], delivery, exc, OUTCOMES[outcome])  # type: ignore[union-attr]
            raise
        else:
            if meter is not None:
                meter.outcomes[_OK] += 1
            if scope is not None and scope[0] is not None:
                tracing.attempt_ok(delivery)  # type: ignore[union-attr]
        finally:
            if meter is not None:
                meter.duration.observe(time.perf_counter() - started)
            if scope is not None:
                tracing.end_process(scope)  # type: ignore[union-attr]

    return observe_attempt
