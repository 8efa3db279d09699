"""What a bus with ``metrics=`` or ``tracing=`` calls: around each publish, around each
handling attempt (a middleware, the outermost), around each dead letter.

A bus without either holds no :class:`Telemetry` and never calls here: its paths are
the same as before telemetry existed. This module imports neither prometheus-client nor
OpenTelemetry; :func:`build` does, when asked for them.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from keybus._aio import being_cancelled
from keybus.envelope import Envelope, envelope_headers
from keybus.observer import AttemptObserver
from keybus.work import Work

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from keybus.engine import SubscriptionEngine
    from keybus.lag import Lag
    from keybus.telemetry.metrics import Metrics, PublishMeter, SubscriptionMeter
    from keybus.telemetry.tracing import Tracing
    from keybus.transports.base import Transport

__all__ = ["OUTCOMES", "Telemetry", "backend_name", "build"]

_T = TypeVar("_T")

# What Telemetry.outgoing hands to Telemetry.sent: when the publish started
# (time.perf_counter()), with its span when one records.
Sending: TypeAlias = "float | tuple[float, Span]"
# An attempt's span (None without an SDK) and the token of the context made current
# for it (Tracing.start_process); None: nothing was started.
_SpanScope: TypeAlias = "tuple[Span | None, object]"
_Scope: TypeAlias = "_SpanScope | None"

Send = Callable[[str, bytes, str | None, Mapping[str, bytes]], Awaitable[None]]

# The outcomes of an attempt, indexes into SubscriptionMeter.outcomes (metrics.py).
OUTCOMES = ("ok", "retried", "dead_lettered", "abandoned")
_OK, _RETRIED, _DEAD_LETTERED, _ABANDONED = range(len(OUTCOMES))


def build(metrics: object, tracing: object, lag_interval: float) -> Telemetry | None:
    """The telemetry ``connect(metrics=..., tracing=...)`` asked for, or None for none.

    ``metrics``: True (prometheus-client's default registry) or a ``CollectorRegistry``;
    ``tracing``: True (the global tracer provider) or a ``TracerProvider``. Checked before
    the bus connects: a missing extra raises ImportError naming it. ``lag_interval``:
    seconds between two reads of the lag gauges (with metrics)."""
    meters = _option(metrics, "metrics", "prometheus-client", "prometheus", _metrics_kit)
    tracer = _option(tracing, "tracing", "opentelemetry-api", "otel", _tracing_kit)
    if meters is None and tracer is None:
        return None
    return Telemetry(meters, tracer, lag_interval)


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

    def __init__(
        self, metrics: Metrics | None, tracing: Tracing | None, lag_interval: float
    ) -> None:
        self._metrics = metrics
        self._tracing = tracing
        self.backend = "unknown"
        self._engines: Callable[[], Iterable[SubscriptionEngine]] = list
        self._publish_meters: dict[str, PublishMeter] = {}
        # With metrics, the bus reads its lag every lag_interval seconds while it has
        # subscriptions (a broker round trip: not at scrape time, which may be on another
        # thread) and leaves it here: (topic, group) -> (records behind, oldest age).
        self.lag_interval = lag_interval if metrics is not None else None
        self._lag: dict[tuple[str, str], tuple[int, float]] = {}

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

    def lag(self) -> Mapping[tuple[str, str], tuple[int, float]]:
        """The lag last read: (topic, group) -> (records not committed, seconds since the
        oldest unfinished record was stored — 0 with none)."""
        return self._lag

    def update_lag(self, lag: Iterable[Lag]) -> None:
        """A new reading (one :class:`~keybus.Lag` per group), summed over partitions:
        the labels are backend, topic and group only (API.md)."""
        rows: dict[tuple[str, str], tuple[int, float]] = {}
        for reading in lag:
            for p in reading.partitions:
                count, age = rows.get((p.topic, p.group), (0, 0.0))
                rows[(p.topic, p.group)] = (
                    count + p.lag,
                    max(age, p.oldest_unfinished_age or 0.0),
                )
        self._lag = rows  # replaced whole: a scrape on another thread reads one or the other

    def close(self) -> None:
        """The bus closed: its subscriptions leave the gauges (its counts stay)."""
        if self._metrics is not None:
            self._metrics.remove_source(self)
        self._engines = list
        self._lag = {}

    # -- publishing --------------------------------------------------------------------

    def _meter(self, topic: str) -> PublishMeter | None:
        metrics = self._metrics
        if metrics is None:
            return None
        meter = self._publish_meters.get(topic)
        if meter is None:
            meter = self._publish_meters[topic] = metrics.publish_meter(self.backend, topic)
        return meter

    def outgoing(
        self,
        topic: str,
        value: bytes,
        key: str | None,
        headers: dict[str, bytes],
        envelope: Envelope | None = None,
    ) -> tuple[bytes, str | None, dict[str, bytes], Sending]:
        """A publish begins: its record as it is to be sent, and the token to hand to
        :meth:`sent` (or :meth:`unsent`). A raw record (``headers``: a fresh dict, may be
        written to) or ``envelope`` (then ``value``, ``key`` and ``headers`` are ignored:
        it is encoded here, once, after its trace id was filled). Synchronous, so that
        the bus awaits the transport's send itself: a coroutine layer per publish shows
        in the in-memory benchmark."""
        tracing = self._tracing
        scope = None
        if tracing is not None and (
            # Spelled out (not Tracing.start_send's own test): calls cost per message.
            tracing.sdk
            or (time.monotonic() >= tracing.look_again and tracing.look())
            or tracing.context()  # an empty context: no trace in hand
        ):
            scope = tracing.start_send(topic, envelope, headers)
            if scope is not None and envelope is not None:
                envelope = tracing.stamp(envelope, scope[1])
        if envelope is not None:
            try:
                value, key = envelope.to_bytes(), envelope.aggregate_id
            except BaseException:
                if scope is not None and scope[0] is not None:
                    tracing.unsent(scope[0])  # type: ignore[union-attr]
                raise
            headers = envelope_headers(envelope)
        if scope is None:
            return value, key, headers, time.perf_counter()
        span, context = scope
        tracing.inject(headers, context)  # type: ignore[union-attr]
        started = time.perf_counter()
        return value, key, headers, started if span is None else (started, span)

    def sent(self, topic: str, token: Sending, error: BaseException | None) -> None:
        """The publish that :meth:`outgoing` began was acknowledged (``error`` None) or
        failed."""
        if type(token) is float:
            started, span = token, None
        else:
            started, span = token  # type: ignore[misc]
        if self._metrics is not None:
            meter = self._publish_meters.get(topic) or self._meter(topic)
            assert meter is not None
            seconds = time.perf_counter() - started
            if error is None:
                meter.ok += 1
            else:
                meter.failed += 1
            duration = meter.duration
            duration.counts[bisect_left(duration.bounds, seconds)] += 1
            duration.sum += seconds
        if span is not None:
            if error is not None:
                self._tracing.failed(span, error)  # type: ignore[union-attr]
            span.end()

    def unsent(self, token: Sending) -> None:
        """A publish :meth:`outgoing` began was never sent (another record of its batch
        was invalid, and a batch sends nothing then): its span ends, nothing counts."""
        if type(token) is tuple:
            self._tracing.unsent(token[1])  # type: ignore[union-attr]

    # -- subscribing -------------------------------------------------------------------

    def attempts(self, topic: str, group: str, max_attempts: int) -> AttemptObserver[Any]:
        """What measures and traces each handling attempt of the subscription of
        ``topic`` by ``group`` (called by its engine around the handler and its
        middleware)."""
        meter = (
            None
            if self._metrics is None
            else self._metrics.subscription_meter(self.backend, topic, group)
        )
        if meter is None:
            assert self._tracing is not None
            return _TracedAttempts(self._tracing, group, max_attempts)
        return _MeteredAttempts(meter, self._tracing, group, max_attempts)

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


def _outcome(attempt: int, max_attempts: int, error: BaseException) -> int:
    """What a failed attempt was: retried, dead-lettered, or abandoned (cancelled by a
    revoke or a close: redelivered later)."""
    if not isinstance(error, Exception) and (
        not isinstance(error, asyncio.CancelledError) or being_cancelled()
    ):
        return _ABANDONED
    return _RETRIED if attempt < max_attempts else _DEAD_LETTERED


class _MeteredAttempts:
    """Attempts counted and timed, and traced if ``tracing``. The token is the start
    (time.perf_counter()), or the start and the span's scope when one was begun (an SDK
    records, or a trace was received): no tuple per message in the usual case. Spelled
    out in full (no helper calls, histograms added to inline): on the in-memory path a
    Python call costs about as much as an observation."""

    __slots__ = (
        "_bounds",
        "_duration",
        "_end_to_end",
        "_group",
        "_max_attempts",
        "_outcomes",
        "_tracing",
    )

    def __init__(
        self, meter: SubscriptionMeter, tracing: Tracing | None, group: str, max_attempts: int
    ) -> None:
        self._tracing = tracing
        self._group = group
        self._max_attempts = max_attempts
        self._outcomes = meter.outcomes
        self._duration = meter.duration
        self._end_to_end = meter.end_to_end
        self._bounds = meter.duration.bounds  # the buckets (metrics.BUCKETS)

    def begin(self, work: Work) -> float | tuple[float, _SpanScope]:
        if work.attempts == 1:
            # From when it was sent (the envelope's timestamp, else the record's) to now.
            payload = work.payload
            if type(payload) is Envelope:
                sent: float | None = payload.timestamp.timestamp()
            else:
                sent = work.message.timestamp
            if sent is not None:
                seconds = time.time() - sent
                if seconds < 0.0:  # another host's clock ahead (cheaper than max())
                    seconds = 0.0
                histogram = self._end_to_end
                histogram.counts[bisect_left(self._bounds, seconds)] += 1
                histogram.sum += seconds
        started = time.perf_counter()
        tracing = self._tracing
        if tracing is None:
            return started
        if not (tracing.sdk or (time.monotonic() >= tracing.look_again and tracing.look())):
            # No SDK: only a received trace is made current (Tracing.start_process's own
            # test, spelled out: a call less per message).
            headers = work.message.headers
            if not headers or tracing.fields.isdisjoint(headers):
                return started
        scope = tracing.start_process(work, self._group)
        return started if scope is None else (started, scope)

    def end(
        self, work: Work, token: float | tuple[float, _SpanScope], error: BaseException | None
    ) -> None:
        if type(token) is float:
            seconds = time.perf_counter() - token
            scope = None
        else:
            started, scope = token  # type: ignore[misc]
            seconds = time.perf_counter() - started
        histogram = self._duration
        histogram.counts[bisect_left(self._bounds, seconds)] += 1
        histogram.sum += seconds
        if error is None:
            self._outcomes[_OK] += 1
        else:
            self._outcomes[_outcome(work.attempts, self._max_attempts, error)] += 1
        if scope is not None:
            _end_span(self._tracing, work, scope, error, self._max_attempts)  # type: ignore[arg-type]


class _TracedAttempts:
    """Attempts traced (tracing without metrics): the token is the span's scope (None:
    nothing to end — no SDK and no trace received)."""

    __slots__ = ("_group", "_max_attempts", "_tracing")

    def __init__(self, tracing: Tracing, group: str, max_attempts: int) -> None:
        self._tracing = tracing
        self._group = group
        self._max_attempts = max_attempts

    def begin(self, work: Work) -> _Scope:
        return self._tracing.start_process(work, self._group)

    def end(self, work: Work, token: _Scope, error: BaseException | None) -> None:
        if token is not None:
            _end_span(self._tracing, work, token, error, self._max_attempts)


def _end_span(
    tracing: Tracing, work: Work, scope: _SpanScope, error: BaseException | None, max_attempts: int
) -> None:
    """An attempt's span (if one records) gets its outcome and ends; the received
    trace, made current for the attempt, no longer is."""
    span = scope[0]
    if span is not None:
        if error is None:
            tracing.attempt_ok(work)
        else:
            outcome = OUTCOMES[_outcome(work.attempts, max_attempts, error)]
            tracing.attempt_failed(span, work, error, outcome)
    tracing.end_process(scope)
