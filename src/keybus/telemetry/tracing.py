"""OpenTelemetry spans of a bus, after the messaging semantic conventions.

- ``{topic} publish`` (PRODUCER) per publish; the trace context is injected into the
  record's headers with the globally configured propagator (W3C ``traceparent`` and
  ``tracestate`` by default), and an envelope without a ``trace_id`` gets the span's.
- ``{topic} process`` (CONSUMER) per handling attempt, a child of the context extracted
  from the record's headers: a trace begun before ``publish`` goes on in the handler, in
  whatever process handles it. The handler's own spans are children of the attempt's.
- ``{dead-letter topic} publish`` (PRODUCER) per dead letter, a child of the original
  record's trace, with a link to the span of each failed attempt of that message.

Spans are started by hand (``start_span``; an attempt's made current with
``context.attach``) rather than with ``start_as_current_span``: its generator-based
context manager costs a few microseconds more per message. A publish span is never made
current: nothing runs inside it but the transport's send.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, MutableMapping
from contextvars import ContextVar
from typing import Any

import msgspec
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from keybus.delivery import CURRENT, Delivery
from keybus.envelope import Envelope
from keybus.message import Message

__all__ = ["Tracing"]

_VERSION = "0.1.0"


class _HeaderGetter(Getter[Mapping[str, bytes]]):
    def get(self, carrier: Mapping[str, bytes], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            return None
        return [value.decode("latin-1")]

    def keys(self, carrier: Mapping[str, bytes]) -> list[str]:
        return list(carrier)


class _HeaderSetter(Setter[MutableMapping[str, bytes]]):
    def set(self, carrier: MutableMapping[str, bytes], key: str, value: str) -> None:
        carrier[key] = value.encode("latin-1")


_GETTER = _HeaderGetter()
_SETTER = _HeaderSetter()

# The failed attempts of the message in hand (in this worker's context): the message and
# a link to each failed attempt's span, for its dead letter's span. Reset when another
# message fails, cleared when the message succeeds or is dead-lettered.
_FAILED: ContextVar[tuple[Message, list[Link]] | None] = ContextVar(
    "keybus_failed_attempts", default=None
)


_NO_SDK = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)


class Tracing:
    """The spans of one bus (``system``: messaging.system, e.g. kafka, nats, memory).

    Without an SDK (the API's no-op provider, e.g. ``tracing=True`` and no provider set
    globally yet) no span is made, but a trace in hand still travels: the current one
    into a publish's headers, a received one made current around the handler — what the
    API's no-op tracer would do, without its cost per message.
    """

    def __init__(self, provider: trace.TracerProvider | None) -> None:
        # Without a provider, the global one — through a proxy, so one set after connect()
        # is used too.
        self._provider = provider
        self._tracer = trace.get_tracer("keybus", _VERSION, tracer_provider=provider)
        self.system = "keybus"
        self._kafka = False
        self._sdk = False
        self._look_again = -math.inf

    def bind(self, system: str) -> None:
        self.system = system
        self._kafka = system == "kafka"

    def recording(self) -> bool:
        """Whether an SDK records spans. The global provider may be set after connect():
        until it is, it is looked at again once a second (``get_tracer_provider`` reads
        the environment, too slow to call per message); once set it stays."""
        if self._sdk:
            return True
        now = time.monotonic()
        if now < self._look_again:
            return False
        self._look_again = now + 1.0
        provider = self._provider if self._provider is not None else trace.get_tracer_provider()
        self._sdk = not isinstance(provider, _NO_SDK)
        return self._sdk

    # -- publishing --------------------------------------------------------------------

    def start_publish(
        self,
        topic: str,
        message_id: str | None,
        links: list[Link] | None = None,
        parent: Context | None = None,
    ) -> tuple[Span | None, Context] | None:
        """A publish's span (None without an SDK) and the context it sends along; None
        when there is neither a trace in hand nor an SDK to start one."""
        if self.recording():
            attributes: dict[str, Any] = {
                "messaging.system": self.system,
                "messaging.operation.type": "publish",
                "messaging.operation.name": "publish",
                "messaging.destination.name": topic,
            }
            if message_id is not None:
                attributes["messaging.message.id"] = message_id
            span = self._tracer.start_span(
                f"{topic} publish",
                context=parent,
                kind=SpanKind.PRODUCER,
                attributes=attributes,
                links=links,
            )
            return span, trace.set_span_in_context(span, parent)
        if not trace.get_current_span(parent).get_span_context().is_valid:
            return None
        return None, parent if parent is not None else otel_context.get_current()

    @staticmethod
    def inject(headers: MutableMapping[str, bytes], context: Context) -> None:
        """``context`` (a publish's) into ``headers``, by the global propagator."""
        propagate.inject(headers, context=context, setter=_SETTER)

    @staticmethod
    def stamp(envelope: Envelope, context: Context) -> Envelope:
        """``envelope`` with the trace id of ``context`` when it has none."""
        if envelope.trace_id is not None:
            return envelope
        span_context = trace.get_current_span(context).get_span_context()
        if not span_context.is_valid:
            return envelope
        # Envelopes are immutable: a copy (a trace id is any non-blank text, so valid).
        return msgspec.structs.replace(envelope, trace_id=format(span_context.trace_id, "032x"))

    def start_dead_letter(
        self, topic: str, headers: Mapping[str, bytes]
    ) -> tuple[Span | None, Context] | None:
        """A dead letter's publish: in the original record's trace (its headers are the
        original's plus the reason), linked to the failed attempts of the message in
        hand."""
        failed = _FAILED.get()
        work = CURRENT.get()
        links: list[Link] = []
        if failed is not None:
            if work is not None and failed[0] is work.message:
                links = failed[1]
            _FAILED.set(None)
        message_id = headers.get("X-Event-ID")
        return self.start_publish(
            topic,
            message_id.decode("utf-8", "replace") if message_id is not None else None,
            links,
            propagate.extract(headers, getter=_GETTER),
        )

    # -- handling ----------------------------------------------------------------------

    def start_process(self, delivery: Delivery, group: str) -> tuple[Span | None, object] | None:
        """An attempt's span (None without an SDK), made current with the received trace
        as its parent, and the token to :meth:`end_process` it with; None: nothing to do."""
        message = delivery.message
        headers = message.headers
        if not self.recording():
            if not headers or not _carries_trace(headers):
                return None
            received = propagate.extract(headers, getter=_GETTER)
            if not trace.get_current_span(received).get_span_context().is_valid:
                return None
            return None, otel_context.attach(received)
        parent = propagate.extract(headers, getter=_GETTER) if headers else None
        attributes: dict[str, Any] = {
            "messaging.system": self.system,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": message.topic,
            "messaging.destination.partition.id": str(message.partition),
            "messaging.consumer.group.name": group,
            "keybus.offset": message.offset,
            "keybus.attempt": delivery.attempt,
        }
        if self._kafka:
            attributes["messaging.kafka.offset"] = message.offset
        payload = delivery.payload
        if isinstance(payload, Envelope):
            attributes["messaging.message.id"] = payload.event_id
        elif headers:
            event_id = headers.get("X-Event-ID")
            if event_id is not None:
                attributes["messaging.message.id"] = event_id.decode("utf-8", "replace")
        span = self._tracer.start_span(
            f"{message.topic} process",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        )
        return span, otel_context.attach(trace.set_span_in_context(span, parent))

    @staticmethod
    def failed(span: Span, error: BaseException) -> None:
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        span.set_attribute("error.type", type(error).__qualname__)

    @staticmethod
    def attempt_failed(span: Span, delivery: Delivery, error: BaseException, outcome: str) -> None:
        span.set_attribute("keybus.outcome", outcome)
        if outcome == "abandoned":
            return  # cancelled by a revoke or a close: not the handler's error
        Tracing.failed(span, error)
        failed = _FAILED.get()
        if failed is None or failed[0] is not delivery.message:
            failed = (delivery.message, [])
            _FAILED.set(failed)
        failed[1].append(Link(span.get_span_context(), {"keybus.attempt": delivery.attempt}))

    @staticmethod
    def attempt_ok(delivery: Delivery) -> None:
        failed = _FAILED.get()
        if failed is not None and failed[0] is delivery.message:
            _FAILED.set(None)  # retried and succeeded: nothing to link to

    @staticmethod
    def end_process(scope: tuple[Span | None, object]) -> None:
        span, token = scope
        otel_context.detach(token)  # type: ignore[arg-type]
        if span is not None:
            span.end()


_fields: tuple[object, frozenset[str]] = (None, frozenset())


def _carries_trace(headers: Mapping[str, bytes]) -> bool:
    """Whether ``headers`` hold any header the global propagator reads (its field names
    are remembered per propagator: computing them costs more than the look-up)."""
    global _fields
    textmap = propagate.get_global_textmap()
    if _fields[0] is not textmap:
        _fields = (textmap, frozenset(textmap.fields))
    return not _fields[1].isdisjoint(headers)  # in C: no generator per message
