"""OpenTelemetry spans of a bus, after the messaging semantic conventions.

- ``{topic} publish`` (PRODUCER) per publish; the trace context is injected into the
  record's headers with the globally configured propagator (W3C ``traceparent`` and
  ``tracestate`` by default), and an envelope without a ``trace_id`` gets the span's.
- ``{topic} process`` (CONSUMER) per handling attempt, a child of the context extracted
  from the record's headers: a trace begun before ``publish`` goes on in the handler, in
  whatever process handles it. The handler's own spans are children of the attempt's.
- ``{dead-letter topic} publish`` (PRODUCER) per dead letter, a child of the original
  record's trace, with a link to the span of each failed attempt of that message.

Spans are started and made current by hand (``start_span`` + ``context.attach``) rather
than with ``start_as_current_span``: its generator-based context manager costs a few
microseconds more per message.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from contextvars import ContextVar
from typing import Any

import msgspec
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
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


class Tracing:
    """The spans of one bus (``system``: messaging.system, e.g. kafka, nats, memory)."""

    def __init__(self, provider: trace.TracerProvider | None) -> None:
        # Without a provider, the global one — through a proxy, so one set after connect()
        # is used too.
        self._tracer = trace.get_tracer("keybus", _VERSION, tracer_provider=provider)
        self.system = "keybus"
        self._kafka = False

    def bind(self, system: str) -> None:
        self.system = system
        self._kafka = system == "kafka"

    # -- publishing --------------------------------------------------------------------

    def start_publish(
        self,
        topic: str,
        message_id: str | None,
        links: list[Link] | None = None,
        parent: Any = None,
    ) -> tuple[Span, object]:
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
        return span, otel_context.attach(trace.set_span_in_context(span, parent))

    @staticmethod
    def inject(headers: MutableMapping[str, bytes]) -> None:
        """The current context (the publish span's) into ``headers``."""
        propagate.inject(headers, setter=_SETTER)

    @staticmethod
    def trace_id(span: Span) -> str | None:
        """The span's trace id as 32 hex digits (W3C), or None without a valid one."""
        context = span.get_span_context()
        return format(context.trace_id, "032x") if context.is_valid else None

    @staticmethod
    def stamp(envelope: Envelope, span: Span) -> Envelope:
        """``envelope`` with the span's trace id when it has none."""
        if envelope.trace_id is not None:
            return envelope
        trace_id = Tracing.trace_id(span)
        if trace_id is None:
            return envelope
        # Envelopes are immutable: a copy (a trace id is any non-blank text, so valid).
        return msgspec.structs.replace(envelope, trace_id=trace_id)

    def dead_letter_span(self, topic: str, headers: Mapping[str, bytes]) -> tuple[Span, object]:
        """The span of a dead letter's publish: in the original record's trace (its
        headers are the original's plus the reason), linked to the failed attempts of the
        message in hand."""
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

    def start_process(self, delivery: Delivery, group: str) -> tuple[Span, object]:
        message = delivery.message
        headers = message.headers
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
    def end(span: Span, token: object) -> None:
        otel_context.detach(token)  # type: ignore[arg-type]
        span.end()
