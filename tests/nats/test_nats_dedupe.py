"""NATS: one duplicate rule, as on every backend — nothing acknowledged is dropped.
Publish-side de-duplication by event id is opt-in (``dedupe_window``); when it is on, a
publish the server treated as a duplicate is reported to its caller, never swallowed, and
a dead letter re-published to its topic is never taken for a duplicate."""

from __future__ import annotations

import pytest

import keybus
from keybus.transports.nats.names import stream_name
from tests.conftest import Backend, BusFactory
from tests.helpers import Collected, eventually, watch_dead_letters
from tests.nats.server import jetstream

EVENT_ID = "0190a6f1-8f2c-7cc0-9a43-5d1c2f6b7e01"


def twins() -> tuple[keybus.Envelope, keybus.Envelope]:
    """Two envelopes with one event id and different content."""
    first = keybus.Envelope(
        event_id=EVENT_ID, aggregate_id="agg", event_type="T", event_version=1, payload={"n": 1}
    )
    second = keybus.Envelope(
        event_id=EVENT_ID, aggregate_id="agg", event_type="T", event_version=2, payload={"n": 2}
    )
    return first, second


async def test_without_dedupe_two_envelopes_with_one_event_id_are_both_delivered(
    open_bus: BusFactory, backend: Backend
) -> None:
    """The default, as on memory and Kafka: both publishes are acknowledged and both are
    delivered (JetStream dropped the second silently while every publish carried its
    event id as ``Nats-Msg-Id``)."""
    bus = await open_bus()
    topic = backend.topic("dupoff")
    got = Collected()
    await bus.subscribe_envelope(topic, got)
    first, second = twins()
    await bus.publish_envelope(topic, first)
    await bus.publish_envelope(topic, second)
    await eventually(lambda: [e.payload for e in got] == [{"n": 1}, {"n": 2}], what="both")


async def test_with_dedupe_the_second_envelope_of_an_event_id_raises_and_is_not_delivered(
    open_bus: BusFactory, backend: Backend
) -> None:
    bus = await open_bus(dedupe_window=60.0)
    topic = backend.topic("dupon")
    got = Collected()
    await bus.subscribe_envelope(topic, got)
    first, second = twins()
    await bus.publish_envelope(topic, first)
    with pytest.raises(keybus.PublishError) as raised:
        await bus.publish_envelope(topic, second)
    assert raised.value.permanent
    assert "duplicate" in raised.value.reason
    marker = keybus.Envelope(aggregate_id="agg", event_type="T", event_version=3, payload={})
    await bus.publish_envelope(topic, marker)  # the key's next event: after the twins
    await eventually(lambda: len(got) == 2, what="the first and the marker")
    assert [e.payload for e in got] == [{"n": 1}, {}], "the duplicate was not delivered"
    async with jetstream(backend.url) as (_, js):
        info = await js.stream_info(stream_name(topic))
    assert info.config.duplicate_window == 60.0


@pytest.mark.parametrize("window", [None, 60.0], ids=["dedupe-off", "dedupe-on"])
async def test_a_dead_letter_republished_to_its_topic_is_delivered(
    open_bus: BusFactory, backend: Backend, window: float | None
) -> None:
    """A dead letter carries its event's ``X-Event-ID``; re-published as it is to the
    topic (to be handled again once the bug is fixed) within the window, it must not be
    taken for a duplicate of the event it came from — with de-duplication off or on."""
    bus = await open_bus(dedupe_window=window) if window else await open_bus()
    topic = backend.topic("dupdlq")
    letters = await watch_dead_letters(open_bus, topic)
    seen: list[int] = []
    fixed = False

    async def handler(event: keybus.Envelope) -> None:
        if not fixed:
            raise RuntimeError("a bug")
        seen.append(event.event_version)

    await bus.subscribe_envelope(topic, handler, max_attempts=1)
    first, _ = twins()
    await bus.publish_envelope(topic, first)
    await eventually(lambda: len(letters) == 1, what="the dead letter")
    fixed = True
    letter = letters[0]
    assert letter.headers["X-Event-ID"] == EVENT_ID.encode()
    await bus.publish(topic, letter.value, key=letter.key, headers=dict(letter.headers))
    await eventually(lambda: seen == [1], what="the re-published dead letter handled")
