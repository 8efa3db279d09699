"""OpenTelemetry tracing (``connect(tracing=...)``), on every enabled backend: a trace
begun before ``publish`` goes on in the handler — in this process and, on Kafka and
NATS, in another — and a dead letter's span links to the failed attempts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry

import keybus
import keybus.envelope
from keybus.testing.conformance import Backend, BusFactory, unique
from tests.helpers import Collected, envelope, eventually, system_label

ROOT = Path(__file__).resolve().parent.parent


class Traces:
    """An SDK tracer provider of the test's own, its finished spans kept in memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("test")

    def spans(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.name == name]


@pytest.fixture
def traces() -> Iterator[Traces]:
    found = Traces()
    yield found
    found.provider.shutdown()


def _hex(number: int, digits: int) -> str:
    return format(number, f"0{digits}x")


async def test_a_trace_begun_before_publish_goes_on_in_the_handler(
    open_bus: BusFactory, backend: Backend, traces: Traces
) -> None:
    group = unique("g")
    bus = await open_bus(group=group, tracing=traces.provider)
    topic = backend.topic()
    seen: list[tuple[int, int, str | None]] = []  # (trace id, span id, envelope trace id)

    async def handler(env: keybus.Envelope) -> None:
        context = trace.get_current_span().get_span_context()
        seen.append((context.trace_id, context.span_id, env.trace_id))

    await bus.subscribe_envelope(topic, handler)
    with traces.tracer.start_as_current_span("request") as request:
        sent = envelope("agg-1", 1)
        await bus.publish_envelope(topic, sent)
    await eventually(lambda: seen and traces.spans(f"{topic} process"), what="handled")
    trace_id = request.get_span_context().trace_id
    [publish] = traces.spans(f"{topic} publish")
    [process] = traces.spans(f"{topic} process")
    assert publish.kind is SpanKind.PRODUCER
    assert process.kind is SpanKind.CONSUMER
    assert publish.parent is not None
    assert publish.parent.span_id == request.context.span_id
    assert process.parent is not None
    assert process.parent.span_id == publish.context.span_id
    assert seen == [(trace_id, process.context.span_id, _hex(trace_id, 32))]
    assert publish.attributes is not None
    assert process.attributes is not None
    assert dict(publish.attributes) == {
        "messaging.system": system_label(backend),
        "messaging.operation.type": "publish",
        "messaging.operation.name": "publish",
        "messaging.destination.name": topic,
        "messaging.message.id": sent.event_id,
    }
    attributes = dict(process.attributes)
    assert attributes["messaging.system"] == system_label(backend)
    assert attributes["messaging.operation.type"] == "process"
    assert attributes["messaging.destination.name"] == topic
    assert attributes["messaging.consumer.group.name"] == group
    assert attributes["messaging.message.id"] == sent.event_id
    assert attributes["keybus.attempt"] == 1
    assert isinstance(attributes["keybus.offset"], int)
    assert attributes["messaging.destination.partition.id"].isdigit()  # type: ignore[union-attr]
    if backend.name == "kafka":
        assert attributes["messaging.kafka.offset"] == attributes["keybus.offset"]


async def test_an_envelope_keeps_its_own_trace_id_and_raw_headers_carry_traceparent(
    open_bus: BusFactory, backend: Backend, traces: Traces
) -> None:
    bus = await open_bus(tracing=traces.provider)
    topic = backend.topic()
    got = Collected()
    await bus.subscribe(topic, got)
    own = keybus.Envelope(
        aggregate_id="a", event_type="E", event_version=1, payload={}, trace_id="from-caller"
    )
    await bus.publish_envelope(topic, own)
    await bus.publish(topic, b"raw", key="k", headers={"X-Mine": "1"})
    await eventually(lambda: len(got) == 2, what="both delivered")
    # By key: on a backend with partitions the two keys' records may arrive either way.
    by_key = {message.key: message for message in got}
    first, raw = by_key["a"], by_key["k"]
    assert keybus.Envelope.from_bytes(first.value).trace_id == "from-caller"
    assert raw.headers["X-Mine"] == b"1"
    publish = traces.spans(f"{topic} publish")[1]
    _version, trace_id, span_id, _flags = raw.headers["traceparent"].decode().split("-")
    assert (trace_id, span_id) == (
        _hex(publish.context.trace_id, 32),
        _hex(publish.context.span_id, 16),
    )


async def test_publish_many_encodes_each_envelope_once_with_its_trace(
    open_bus: BusFactory, backend: Backend, traces: Traces, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch with metrics and tracing on: every envelope is encoded once (after its
    trace id was filled), each record carries its own publish span's traceparent, and
    the batch's spans are children of the caller's."""
    bus = await open_bus(tracing=traces.provider, metrics=CollectorRegistry())
    topic = backend.topic()
    got = Collected()
    await bus.subscribe(topic, got)
    encoded: list[str] = []
    encode = keybus.envelope._encode

    def counting(item: keybus.Envelope) -> bytes:
        encoded.append(item.event_id)
        return encode(item)

    monkeypatch.setattr(keybus.envelope, "_encode", counting)
    items = [envelope(f"agg-{i}", 1) for i in range(5)]
    with traces.tracer.start_as_current_span("batch") as batch:
        assert await bus.publish_many(topic, items) == [None] * 5
    monkeypatch.undo()
    assert sorted(encoded) == sorted(item.event_id for item in items)  # once each
    await eventually(lambda: len(got) == 5, what="the batch delivered")
    trace_id = _hex(batch.get_span_context().trace_id, 32)
    spans = {_hex(s.context.span_id, 16): s for s in traces.spans(f"{topic} publish")}
    assert len(spans) == 5
    for message in got:
        assert keybus.Envelope.from_bytes(message.value).trace_id == trace_id
        _version, carried, span_id, _flags = message.headers["traceparent"].decode().split("-")
        assert carried == trace_id
        span = spans.pop(span_id)  # each record its own span
        assert span.parent is not None
        assert span.parent.span_id == batch.get_span_context().span_id
    assert not spans


async def test_publish_many_with_an_unencodable_envelope_sends_and_counts_nothing(
    open_bus: BusFactory, backend: Backend, traces: Traces
) -> None:
    """An envelope that cannot be encoded (found only as the batch is encoded, after the
    spans began): nothing is sent or counted, and the spans begun end as not sent."""
    registry = CollectorRegistry()
    bus = await open_bus(tracing=traces.provider, metrics=registry)
    topic = backend.topic()
    bad = keybus.Envelope(aggregate_id="b", event_type="E", event_version=1, payload=object())
    with pytest.raises(keybus.EnvelopeError):
        await bus.publish_many(topic, [envelope("a", 1), (b"raw", "k"), bad])
    spans = traces.spans(f"{topic} publish")
    assert len(spans) == 3
    assert [s.status.description for s in spans] == ["not sent"] * 3
    labels = {"backend": system_label(backend), "topic": topic}
    assert registry.get_sample_value("keybus_published_total", {**labels, "outcome": "ok"}) is None
    assert await bus.publish_many(topic, [envelope("a", 1)]) == [None]
    assert registry.get_sample_value("keybus_published_total", {**labels, "outcome": "ok"}) == 1


async def test_a_dead_letter_span_links_to_every_failed_attempt(
    open_bus: BusFactory, backend: Backend, traces: Traces
) -> None:
    bus = await open_bus(tracing=traces.provider)
    topic = backend.topic()

    async def handler(env: keybus.Envelope) -> None:
        if env.event_version == 1:
            raise RuntimeError("doomed")

    await bus.subscribe_envelope(topic, handler, max_attempts=3, retry_backoff=0.01)
    await bus.publish_envelope(topic, envelope("agg", 1))
    await bus.publish_envelope(topic, envelope("agg", 2))
    dlq = f"{topic}.dlq"
    await eventually(
        lambda: traces.spans(f"{dlq} publish") and len(traces.spans(f"{topic} process")) == 4,
        what="three failed attempts, a dead letter, the next envelope",
    )
    [publish, _] = traces.spans(f"{topic} publish")
    attempts = [
        s for s in traces.spans(f"{topic} process") if s.parent.span_id == publish.context.span_id
    ]
    assert [s.attributes["keybus.attempt"] for s in attempts] == [1, 2, 3]
    assert [s.attributes["keybus.outcome"] for s in attempts] == [
        "retried",
        "retried",
        "dead_lettered",
    ]
    assert all(s.status.status_code is trace.StatusCode.ERROR for s in attempts)
    [letter] = traces.spans(f"{dlq} publish")
    # In the original message's trace, a child of its publish, linked to each attempt.
    assert letter.parent is not None
    assert letter.parent.span_id == publish.context.span_id
    assert [link.context.span_id for link in letter.links] == [s.context.span_id for s in attempts]
    assert [link.attributes["keybus.attempt"] for link in letter.links] == [1, 2, 3]
    # The envelope after it succeeded at once: no outcome noted but success.
    [ok] = [s for s in traces.spans(f"{topic} process") if s not in attempts]
    assert "keybus.outcome" not in ok.attributes


async def test_a_trace_goes_on_in_a_handler_of_another_process(
    open_bus: BusFactory, backend: Backend, traces: Traces
) -> None:
    if backend.name not in ("kafka", "nats"):
        pytest.skip("needs a broker another process reaches (Kafka, NATS)")
    bus = await open_bus(tracing=traces.provider)
    topic = backend.topic()
    await bus.ensure_topic(topic)
    async with _trace_process(backend.url, topic, unique("g")) as lines:
        assert await asyncio.wait_for(lines.get(), 60) == "ready"
        with traces.tracer.start_as_current_span("request") as request:
            await bus.publish_envelope(topic, envelope("agg-1", 1))
        report = json.loads(await asyncio.wait_for(lines.get(), 60))
    [publish] = traces.spans(f"{topic} publish")
    trace_id = _hex(request.get_span_context().trace_id, 32)
    assert report["trace_id"] == trace_id
    assert report["envelope_trace_id"] == trace_id
    assert report["parent_span_id"] == _hex(publish.context.span_id, 16)
    assert report["parent_remote"] is True
    assert report["attributes"]["messaging.system"] == backend.name


@contextlib.asynccontextmanager
async def _trace_process(url: str, topic: str, group: str) -> AsyncIterator[asyncio.Queue[str]]:
    """``tests.trace_proc`` running; its stdout lines in a queue. On exit it is given a
    moment to close its bus (it exits after its report), then killed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.trace_proc",
        url,
        topic,
        group,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    lines: asyncio.Queue[str] = asyncio.Queue()

    async def read() -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            await lines.put(line.decode().strip())

    reader = asyncio.create_task(read())
    try:
        yield lines
    finally:
        try:
            await asyncio.wait_for(process.wait(), 15)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await asyncio.wait_for(process.wait(), 10)
        await asyncio.wait_for(reader, 10)


async def test_without_an_sdk_no_span_is_made_but_a_trace_in_hand_travels(
    open_bus: BusFactory, backend: Backend, traces: Traces
) -> None:
    """A bus whose provider records nothing (the API's no-op, as with ``tracing=True``
    and no SDK installed) still carries the caller's trace to the handler — and adds no
    header when there is no trace."""
    bus = await open_bus(tracing=trace.NoOpTracerProvider())
    topic = backend.topic()
    seen: list[int] = []
    got = Collected()

    async def handler(message: keybus.Message) -> None:
        seen.append(trace.get_current_span().get_span_context().trace_id)
        await got(message)

    await bus.subscribe(topic, handler)
    await bus.publish(topic, b"untraced", key="k")
    with traces.tracer.start_as_current_span("request") as request:
        await bus.publish_envelope(topic, envelope("k", 1))
    await eventually(lambda: len(got) == 2, what="both delivered")
    untraced, traced = got
    assert "traceparent" not in untraced.headers
    parent = request.get_span_context()
    assert traced.headers["traceparent"].decode().split("-")[1:3] == [
        _hex(parent.trace_id, 32),
        _hex(parent.span_id, 16),  # no publish span of keybus's in between
    ]
    assert seen == [0, parent.trace_id]
    assert keybus.Envelope.from_bytes(traced.value).trace_id == _hex(parent.trace_id, 32)
    assert [s.name for s in traces.exporter.get_finished_spans()] == ["request"]
