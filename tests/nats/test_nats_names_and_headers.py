"""NATS: topic names never collide on the server, and any key, header name or header
value round-trips — also into a dead letter, and from records another service wrote."""

from __future__ import annotations

import keybus
from keybus.transports.nats.names import consumer_name, stream_name, subject_base, token
from tests.conftest import Backend, BusFactory
from tests.helpers import Collected, eventually, watch_dead_letters
from tests.nats.server import write_foreign


def test_topic_names_with_dots_do_not_collide() -> None:
    topics = ["a.b", "a_2eb", "a_b", "a-b", "a..b", "A.B", "x" * 249, "x" * 248 + "y"]
    streams = {stream_name(t) for t in topics}
    assert len(streams) == len(topics)
    assert len({subject_base(t) for t in topics}) == len(topics)
    for name in streams:
        assert len(name) <= 90
        assert all(c.isalnum() or c in "_-" for c in name)
    assert "." not in token("a.b.c")
    assert consumer_name("g.1", 2) != consumer_name("g_2e1", 2)


async def test_headers_and_keys_with_any_bytes_round_trip(
    open_bus: BusFactory, backend: Backend
) -> None:
    bus = await open_bus()
    topic = backend.topic()
    got = Collected()
    await bus.subscribe(topic, got)
    headers = {"plain": b"v", "spaces": b"  padded ", "crlf": b"a\r\nb", "empty": b""}
    await bus.publish(topic, b"x", key="k\u00e9y with spaces\n", headers=headers)
    await eventually(lambda: len(got) == 1, what="the message")
    assert got[0].key == "k\u00e9y with spaces\n"
    assert dict(got[0].headers) == headers


ODD_NAMES = {
    "a:b": b"1",
    "a b": b"2",
    "\u043a\u043b\u044e\u0447": b"3",
    "x\r\nNats-Msg-Id: 1": b"4",
    "": b"5",
    "Nats-Expected-Stream": b"elsewhere",  # would make the server refuse the publish
    "Keybus-Key": b"not the key",
    "plain": b"  padded ",
}


async def test_any_header_name_round_trips_and_survives_dead_lettering(
    open_bus: BusFactory, backend: Backend
) -> None:
    bus = await open_bus()
    topic = backend.topic("names")
    got: list[keybus.Message] = []

    async def handler(message: keybus.Message) -> None:
        got.append(message)
        raise RuntimeError("to the dead letters")

    await bus.subscribe(topic, handler, max_attempts=1)
    letters = await watch_dead_letters(open_bus, topic)
    await bus.publish(topic, b"v", key="k", headers=ODD_NAMES)
    await eventually(lambda: len(letters) == 1, what="the dead letter")
    assert got[0].key == "k"
    assert dict(got[0].headers) == ODD_NAMES
    letter = letters[0]
    assert letter.key == "k"
    assert {n: v for n, v in letter.headers.items() if not n.startswith("X-")} == ODD_NAMES


async def test_records_with_undecodable_keybus_headers_are_delivered_and_the_partition_flows(
    open_bus: BusFactory, backend: Backend
) -> None:
    topic = backend.topic("badheaders")
    bus = await open_bus(group="badheaders")
    await bus.ensure_topic(topic, keybus.TopicConfig(partitions=1))
    got = Collected()
    await bus.subscribe(topic, got)
    await write_foreign(
        backend.url,
        topic,
        (b"f1", {"Keybus-B64": "not json", "h": "v"}),
        (b"f2", {"Keybus-B64": '["h", "Keybus-Key"]', "h": "@@", "x": "1"}),
        (b"f3", {"Keybus-N-!!": "v", "Keybus-Key": "k"}),
    )
    await bus.publish(topic, b"good-1", key="k")
    await bus.publish(topic, b"good-2", key="k")
    await eventually(lambda: len(got) == 5, what="all five records")
    assert got.values() == [b"f1", b"f2", b"f3", b"good-1", b"good-2"]
    assert got[0].headers == {"h": b"v", "Keybus-B64": b"not json"}, "kept as they arrived"
    assert got[1].headers == {"h": b"@@", "x": b"1"}
    assert got[2].key == "k"
    assert got[2].headers == {"Keybus-N-!!": b"v"}


async def test_foreign_non_envelope_bytes_are_dead_lettered_and_the_consumer_continues(
    open_bus: BusFactory, backend: Backend
) -> None:
    topic = backend.topic("bad")
    bus = await open_bus(group="bad-input")
    await bus.ensure_topic(topic, keybus.TopicConfig(partitions=1))
    handled: list[int] = []

    async def handler(envelope: keybus.Envelope) -> None:
        handled.append(envelope.event_version)

    letters = await watch_dead_letters(open_bus, topic)
    await bus.subscribe_envelope(topic, handler)
    # Another service writes straight onto our subject: no key, no keybus headers.
    await write_foreign(
        backend.url,
        topic,
        (b"\x00\xffnot an envelope", None),
        (b'{"aggregate_id": 5}', {"h": "v"}),
    )
    await bus.publish_envelope(
        topic, keybus.Envelope(aggregate_id="a", event_type="E", event_version=1, payload={})
    )
    await eventually(lambda: handled == [1] and len(letters) == 2, what="2 dead letters, 1 ok")
    # Keyless messages run concurrently and their dead letters land on any partition of
    # the DLQ topic: no order between the two.
    by_value = {letter.value: letter for letter in letters}
    binary = by_value[b"\x00\xffnot an envelope"]
    assert binary.headers["X-Error"].startswith(b"EnvelopeError: ")
    assert binary.headers["X-Attempts"] == b"0"
    assert by_value[b'{"aggregate_id": 5}'].headers["h"] == b"v"
