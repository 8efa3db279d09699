"""NATS: the Go SDK's layout (the ``subject_topics`` option) against streams and
consumers set up exactly the way the Go SDK's services set them up (jxt-core
``sdk/pkg/eventbus``, nats.go; ``tests/golden/go_sdk/README.md``), made here with nats-py:

* at start-up a Go service creates its configured stream (``JetStream.Stream.Name`` on
  ``Subjects``; defaults ``BUSINESS_STREAM`` on ``business.>``) if missing;
* subscribing to a topic that stream does not store, it creates ``<Name>_<topic with .
  as _>`` on the subject ``<topic>`` if missing;
* its subscriber is ``js.PullSubscribe(topic, "<Durable>-unified_<topic with . as _>")``:
  a durable with explicit acks, bound to whichever stream stores the subject;
* it publishes an envelope with ``js.Publish(topic, envelope JSON)``: no NATS headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import nats.js.errors
import pytest
import pytest_asyncio
from nats.js import JetStreamContext, api

import keybus
from keybus.transports.nats import SubjectLayout
from keybus.transports.nats.layout import GO_DEFAULT_STREAM, GO_DEFAULT_SUBJECTS, subject_matches
from keybus.transports.nats.names import stream_name, subject_base
from tests.conftest import Backend, BusFactory
from tests.helpers import Collected, eventually
from tests.nats.server import jetstream

GO_DURABLE = "business-consumer"  # the Go SDK's default JetStream.Consumer.DurableName
GOLDEN = Path(__file__).parents[1] / "golden" / "go_sdk" / "go-encoded.jsonl"


def go_suffix(topic: str) -> str:
    return topic.replace(".", "_")


class GoService:
    """What a Go service with ``JetStream.Stream`` config (``name``, ``subjects``) makes
    on the server; every stream made here is deleted when the test ends."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.made: list[str] = []

    async def make_stream(self, name: str, subjects: list[str]) -> None:
        try:
            await self.js.stream_info(name)
        except nats.js.errors.NotFoundError:
            await self.js.add_stream(
                api.StreamConfig(
                    name=name,
                    subjects=subjects,
                    retention=api.RetentionPolicy.LIMITS,
                    storage=api.StorageType.FILE,
                    discard=api.DiscardPolicy.OLD,
                )
            )
            self.made.append(name)

    async def start(
        self,
        topic: str,
        name: str = GO_DEFAULT_STREAM,
        subjects: tuple[str, ...] = GO_DEFAULT_SUBJECTS,
    ) -> str:
        """Start-up and subscribe's stream steps; the stream that stores ``topic``."""
        await self.make_stream(name, list(subjects))
        info = await self.js.stream_info(name)
        if any(subject_matches(s, topic) for s in info.config.subjects or []):
            return name
        own = f"{name}_{go_suffix(topic)}"
        await self.make_stream(own, [topic])
        return own

    async def durable(self, topic: str) -> JetStreamContext.PullSubscription:
        """Go's ``js.PullSubscribe(topic, "<Durable>-unified_<suffix>")``."""
        return await self.js.pull_subscribe(
            topic,
            durable=f"{GO_DURABLE}-unified_{go_suffix(topic)}",
            config=api.ConsumerConfig(
                ack_policy=api.AckPolicy.EXPLICIT, deliver_policy=api.DeliverPolicy.ALL
            ),
        )

    async def publish(self, topic: str, envelope: keybus.Envelope | bytes) -> None:
        """Go's ``js.Publish(topic, envelope.ToBytes())``: no headers."""
        body = envelope if isinstance(envelope, bytes) else envelope.to_bytes()
        await self.js.publish(topic, body)


@pytest_asyncio.fixture
async def go(backend: Backend) -> AsyncIterator[GoService]:
    async with jetstream(backend.url) as (_, js):
        service = GoService(js)
        try:
            yield service
        finally:
            for name in service.made:
                with contextlib.suppress(nats.js.errors.NotFoundError):  # deleted by the test
                    await js.delete_stream(name)


async def stream_names(js: JetStreamContext) -> set[str]:
    return {info.config.name or "" for info in await js.streams_info()}


def event(aggregate: str, version: int) -> keybus.Envelope:
    return keybus.Envelope(
        aggregate_id=aggregate, event_type="E", event_version=version, payload={"v": version}
    )


async def test_go_publishes_are_handled_per_aggregate_in_order_by_one_member_concurrently(
    open_bus: BusFactory, backend: Backend, go: GoService
) -> None:
    """Go started first with its defaults; keybus finds its stream, keys each envelope by
    its aggregate id (Go sends no key header), runs aggregates concurrently inside the
    one partition, and a second member of the group stands by until the first leaves."""
    topic = backend.topic("go")
    stream = await go.start(topic)
    assert stream == f"{GO_DEFAULT_STREAM}_{topic}"
    before = await stream_names(go.js)
    group = f"g-{topic}"
    handled: dict[str, list[int]] = defaultdict(list)
    members: dict[str, set[str]] = defaultdict(set)
    keys: set[tuple[str | None, str]] = set()
    partitions: set[int] = set()
    running = peak = 0
    jitter = random.Random(13)

    def member(name: str) -> Callable[[keybus.Envelope], Awaitable[None]]:
        async def handler(envelope: keybus.Envelope) -> None:
            nonlocal running, peak
            delivery = keybus.current_delivery()
            keys.add((delivery.key, envelope.aggregate_id))
            partitions.add(delivery.partition)  # (an assert here would only retry)
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(jitter.uniform(0, 0.005))  # (unordered handling would show)
            running -= 1
            handled[envelope.aggregate_id].append(envelope.event_version)
            members[name].add(envelope.aggregate_id)

        return handler

    # Published before keybus subscribes, so they arrive together: handled unordered,
    # they would finish out of order.
    aggregates = [f"order-{i}" for i in range(20)]
    for version in range(1, 11):
        for aggregate in aggregates:
            await go.publish(topic, event(aggregate, version))
    a = await open_bus(group=group, subject_topics=[topic])
    await a.subscribe_envelope(topic, member("a"), max_concurrency=32)
    b = await open_bus(group=group, subject_topics=[topic])
    await b.subscribe_envelope(topic, member("b"), max_concurrency=32)
    await eventually(
        lambda: sum(map(len, handled.values())) == 200, what="every Go envelope handled"
    )
    assert {agg: handled[agg] for agg in aggregates} == {
        agg: list(range(1, 11)) for agg in aggregates
    }
    assert keys == {(agg, agg) for agg in aggregates}, "the key is the aggregate id"
    assert partitions == {0}, "one subject, one partition"
    assert len(members) == 1, f"one active member of the group, not {sorted(members)}"
    assert peak > 1, "aggregates run concurrently inside the one partition"
    # keybus used Go's stream; it made one only for its dead letters (keybus's layout:
    # the dead-letter topic is not in subject_topics).
    assert await stream_names(go.js) - before == {stream_name(f"{topic}.dlq")}
    assert (await go.js.stream_info(stream)).state.messages == 200

    # The active member leaves: the standby takes over where it stopped.
    (active, standby) = (a, "b") if "a" in members else (b, "a")
    await active.close()
    for aggregate in aggregates:
        await go.publish(topic, event(aggregate, 11))
    await eventually(
        lambda: all(handled[agg] == list(range(1, 12)) for agg in aggregates),
        what="the standby to handle what came after the hand-over, in order",
    )
    assert members[standby] == set(aggregates)


async def test_the_go_sdks_own_wires_decode_and_a_raw_subscriber_sees_them_unchanged(
    open_bus: BusFactory, backend: Backend, go: GoService
) -> None:
    """Go's encoded envelopes (golden data), published Go-style: an envelope subscription
    reads Go's values; a raw subscription gets the bytes as sent, with no key (Go sends
    none: keying raw bytes by their JSON is not the transport's business)."""
    cases = [json.loads(line) for line in GOLDEN.read_text().splitlines() if line.strip()]
    wires = [case for case in cases if case["go_accepts"]]
    topic = backend.topic("go-wire")
    await go.start(topic)
    bus = await open_bus(subject_topics=[topic])
    envelopes, raw = Collected(), Collected()
    await bus.subscribe_envelope(topic, envelopes)
    other = await open_bus(subject_topics=[topic])
    await other.subscribe(topic, raw)
    for case in wires:
        await go.publish(topic, case["wire"].encode())
    await eventually(lambda: len(envelopes) == len(raw) == len(wires), what="every wire twice")
    by_id = {envelope.event_id: envelope for envelope in envelopes}
    for case in wires:
        decoded = by_id[case["go_decoded"]["event_id"]]
        assert decoded.aggregate_id == case["go_decoded"]["aggregate_id"]
        assert decoded.event_version == case["go_decoded"]["event_version"]
    assert sorted(m.value for m in raw) == sorted(c["wire"].encode() for c in wires)
    assert all(m.key is None and m.partition == 0 and not m.headers for m in raw)


async def test_keybus_first_then_a_go_durable_reads_its_envelopes_byte_for_byte(
    open_bus: BusFactory, backend: Backend, go: GoService
) -> None:
    """keybus publishes before any Go service ran: it creates the stream a Go service
    with default settings looks for, and Go's durable reads the envelope JSON unchanged on
    the subject named like the topic (keybus's X-* headers are extras Go never reads)."""
    topic = backend.topic("to-go")
    bus = await open_bus(subject_topics=[topic])
    sent = [event(f"agg-{i % 3}", i // 3 + 1) for i in range(9)]
    for envelope in sent[:5]:
        await bus.publish_envelope(topic, envelope)
    mine = f"{GO_DEFAULT_STREAM}_{topic}"
    go.made.append(mine)  # (deleted at the end even if the test fails)
    assert await go.js.find_stream_name_by_subject(topic) == mine
    assert await go.start(topic) == mine, "the Go service finds keybus's stream"
    durable = await go.durable(topic)
    for envelope in sent[5:]:
        await bus.publish_envelope(topic, envelope)
    got: list[nats.aio.msg.Msg] = []
    for _ in range(20):
        if len(got) >= len(sent):
            break
        try:
            got.extend(await durable.fetch(len(sent) - len(got), timeout=1))
        except nats.errors.TimeoutError:
            continue
    assert [msg.data for msg in got] == [envelope.to_bytes() for envelope in sent]
    assert {msg.subject for msg in got} == {topic}
    assert [keybus.Envelope.from_bytes(msg.data) for msg in got] == sent
    for msg in got:
        await msg.ack_sync()  # explicit acks, as Go's subscriber sends them
    await durable.unsubscribe()
    with pytest.raises(nats.js.errors.NotFoundError):
        await go.js.stream_info(stream_name(topic))  # no keybus-layout stream


async def test_keybus_attaches_to_a_go_services_configured_stream_and_deletes_only_its_subject(
    open_bus: BusFactory, backend: Backend, go: GoService
) -> None:
    """A Go service configured with its own stream (name and subject pattern): keybus
    given the same config uses that stream for every topic under the pattern, both ways;
    deleting a topic there purges its subject and leaves the Go service's others."""
    tag = uuid.uuid4().hex[:8]
    name, subjects = f"GO_{tag}", (f"svc{tag}.>",)
    topic, neighbour = f"svc{tag}.orders", f"svc{tag}.payments"
    assert await go.start(topic, name, subjects) == name
    await go.publish(neighbour, event("p-1", 1))
    before = await stream_names(go.js)
    layout = SubjectLayout(stream=name, subjects=subjects)
    bus = await open_bus(group="billing", subject_topics={f"svc{tag}.>": layout})
    got = Collected()
    await bus.subscribe_envelope(topic, got)
    await go.publish(topic, event("o-1", 1))
    await bus.publish_envelope(topic, event("o-1", 2))
    await eventually(lambda: len(got) == 2, what="Go's and keybus's envelope")
    assert [(e.aggregate_id, e.event_version) for e in got] == [("o-1", 1), ("o-1", 2)]
    assert await bus.describe_topic(topic) == keybus.TopicInfo(topic, 1)
    for sub in list(bus.subscriptions):
        await sub.unsubscribe()
    # The topic's DLQ is not under the pattern: keybus's own layout, as configured.
    assert await stream_names(go.js) - before <= {stream_name(f"{topic}.dlq")}
    go_durable = await go.durable(neighbour)  # another topic's consumer: it stays
    durables = [(c.name, c.config.filter_subject) for c in await go.js.consumers_info(name)]
    assert any(n.startswith("billing_p0_") and f == topic for n, f in durables), durables
    await bus.delete_topic(f"{topic}.dlq")
    await bus.delete_topic(topic)
    assert [c.name for c in await go.js.consumers_info(name)] == [
        f"{GO_DURABLE}-unified_{go_suffix(neighbour)}"
    ], "keybus's durables went with the topic, Go's stayed"
    await go_durable.unsubscribe()
    await go.js.delete_consumer(name, f"{GO_DURABLE}-unified_{go_suffix(neighbour)}")
    info = await go.js.stream_info(name)
    assert info.state.messages == 1, "the neighbouring topic's record is still there"
    assert info.config.subjects == list(subjects)


async def test_a_stream_of_another_name_storing_the_subject_is_the_servers_error(
    open_bus: BusFactory, backend: Backend, go: GoService
) -> None:
    """Not ``NotFoundError()``: the server's own error (10065, subjects overlap) and the
    stream that holds the subject — in either layout; configured to, keybus uses it."""
    topic = backend.topic("taken")
    other = f"OTHER_{uuid.uuid4().hex[:8]}"
    await go.make_stream(other, [topic])
    bus = await open_bus(subject_topics=[topic])
    with pytest.raises(keybus.PublishError) as publishing:
        await bus.publish_envelope(topic, event("a", 1))
    for text in ("subjects overlap", "10065", f"stream {other} already stores subject {topic}"):
        assert text in str(publishing.value)

    async def ignore(envelope: keybus.Envelope) -> None:
        return None

    with pytest.raises(keybus.TopicError, match="10065"):  # (creating it, to subscribe)
        await bus.subscribe_envelope(topic, ignore)

    # keybus's own layout: a foreign stream on one of the topic's partition subjects.
    plain = backend.topic("taken-kb")
    squatter = f"OTHER_{uuid.uuid4().hex[:8]}"
    await go.make_stream(squatter, [f"{subject_base(plain)}.0"])
    with pytest.raises(keybus.PublishError) as plain_publish:
        await bus.publish(plain, b"x", key="k")
    assert "10065" in str(plain_publish.value)
    assert squatter in str(plain_publish.value)

    # Named in the layout, the stream that stores the subject is used.
    attached = await open_bus(
        subject_topics={topic: SubjectLayout(stream=other, subjects=(topic,))}
    )
    await attached.publish_envelope(topic, event("a", 1))
    assert (await go.js.stream_info(other)).state.messages == 1
