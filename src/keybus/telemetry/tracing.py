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
from collections.abc import Callable, Mapping, MutableMapping
from contextvars import ContextVar
from typing import Any

import msgspec
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from keybus.delivery import CURRENT
from keybus.envelope import Envelope
from keybus.message import Message
from keybus.work import Work

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
        # Read by the hot paths of keybus.telemetry.hooks too, to tell in a few C calls
        # that a message needs nothing of tracing: whether an SDK records (``sdk``, looked
        # at again after ``look_again`` by :meth:`look`), the field names the global
        # propagator reads, and the current OpenTelemetry context (:func:`_context_getter`).
        self.sdk = False
        self.look_again = -math.inf
        self.fields: frozenset[str] = frozenset()
        self.context: Callable[[], Context] = _context_getter()

    def bind(self, system: str) -> None:
        self.system = system
        self._kafka = system == "kafka"

    def recording(self) -> bool:
        """Whether an SDK records spans. The global provider may be set after connect():
        until it is, it is looked at again once a second (``get_tracer_provider`` reads
        the environment, too slow to call per message); once set it stays. The hot paths
        spell this test out (a call less per message)."""
        return self.sdk or (time.monotonic() >= self.look_again and self.look())

    def look(self) -> bool:
        """Whether an SDK records now; also the field names the global propagator reads
        (looked up with the provider: computing them per message costs more than the
        rest of an untraced message's check)."""
        self.look_again = time.monotonic() + 1.0
        provider = self._provider if self._provider is not None else trace.get_tracer_provider()
        self.sdk = not isinstance(provider, _NO_SDK)
        self.fields = frozenset(propagate.get_global_textmap().fields)
        return self.sdk

    # -- publishing --------------------------------------------------------------------

    def start_send(
        self, topic: str, envelope: Envelope | None, headers: Mapping[str, bytes]
    ) -> tuple[Span | None, Context] | None:
        """:meth:`start_publish` for a publish of ``envelope`` or of a raw record with
        ``headers`` (its message id is looked up only when a span records)."""
        if not (self.sdk or (time.monotonic() >= self.look_again and self.look())):
            context = self.context()
            return None if not context else _in_hand(context)  # usually empty: no trace
        return self.start_publish(
            topic, envelope.event_id if envelope is not None else _event_id(headers)
        )

    def start_publish(
        self,
        topic: str,
        message_id: str | None,
        links: list[Link] | None = None,
        parent: Context | None = None,
    ) -> tuple[Span | None, Context] | None:
        """A publish's span (None without an SDK) and the context it sends along; None
        when there is neither a trace in hand nor an SDK to start one."""
        if not self.recording():
            return _in_hand(parent)
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

    @staticmethod
    def unsent(span: Span) -> None:
        """A publish span whose record was never sent (its batch was refused)."""
        span.set_status(Status(StatusCode.ERROR, "not sent"))
        span.end()

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
        return self.start_publish(
            topic, _event_id(headers), links, propagate.extract(headers, getter=_GETTER)
        )

    # -- handling ----------------------------------------------------------------------

    def start_process(self, work: Work, group: str) -> tuple[Span | None, object] | None:
        """An attempt's span (None without an SDK), made current with the received trace
        as its parent, and the token to :meth:`end_process` it with; None: nothing to do."""
        message = work.message
        headers = message.headers
        if not (self.sdk or (time.monotonic() >= self.look_again and self.look())):
            # Without an SDK only a received trace is made current: none in most records,
            # told by the propagator's field names (a set operation in C).
            if not headers or self.fields.isdisjoint(headers):
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
            "keybus.attempt": work.attempts,
        }
        if self._kafka:
            attributes["messaging.kafka.offset"] = message.offset
        payload = work.payload
        if isinstance(payload, Envelope):
            attributes["messaging.message.id"] = payload.event_id
        elif headers and (event_id := _event_id(headers)) is not None:
            attributes["messaging.message.id"] = event_id
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
    def attempt_failed(span: Span, work: Work, error: BaseException, outcome: str) -> None:
        span.set_attribute("keybus.outcome", outcome)
        if outcome == "abandoned":
            return  # cancelled by a revoke or a close: not the handler's error
        Tracing.failed(span, error)
        failed = _FAILED.get()
        if failed is None or failed[0] is not work.message:
            failed = (work.message, [])
            _FAILED.set(failed)
        failed[1].append(Link(span.get_span_context(), {"keybus.attempt": work.attempts}))

    @staticmethod
    def attempt_ok(work: Work) -> None:
        failed = _FAILED.get()
        if failed is not None and failed[0] is work.message:
            _FAILED.set(None)  # retried and succeeded: nothing to link to

    @staticmethod
    def end_process(scope: tuple[Span | None, object]) -> None:
        span, token = scope
        otel_context.detach(token)  # type: ignore[arg-type]
        if span is not None:
            span.end()


def _context_getter() -> Callable[[], Context]:
    """The current context's getter: the API's context variable's own ``get`` (C, one
    call) when the runtime context is the API's default one, else ``get_current`` (two
    Python calls). The first reaches into the API's internals, hence the checks."""
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    variable = getattr(runtime, "_current_context", None)
    if type(runtime).__name__ == "ContextVarsRuntimeContext" and isinstance(variable, ContextVar):
        return variable.get
    return otel_context.get_current


def _in_hand(parent: Context | None) -> tuple[None, Context] | None:
    """The trace in hand (``parent``, else the current context's) to send along without
    a span of ours; None when there is none. An empty context (no span, no baggage: the
    usual case of an untraced caller) is told in one look."""
    context = parent if parent is not None else otel_context.get_current()
    if not context or not trace.get_current_span(context).get_span_context().is_valid:
        return None
    return None, context


def _event_id(headers: Mapping[str, bytes]) -> str | None:
    """A raw record's message id: its ``X-Event-ID`` header, if any."""
    event_id = headers.get("X-Event-ID")
    return event_id.decode("utf-8", "replace") if event_id is not None else None
