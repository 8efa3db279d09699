"""NATS transport: names, bad input, connect errors, in-progress acks, no accumulation."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

import keybus
import nats
from keybus.testing import LeakChecker
from keybus.transports.nats_names import consumer_name, stream_name, subject_base, token
from tests.conftest import Backend, BusFactory
from tests.helpers import eventually


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


async def test_unreachable_server_raises_connect_error_naming_the_url_quickly(
    no_leaks: LeakChecker,
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"nats://127.0.0.1:{port}"
    started = time.monotonic()
    with pytest.raises(keybus.ConnectError, match=url):
        await keybus.connect(url)
    assert time.monotonic() - started < 5.0


async def test_foreign_non_envelope_bytes_are_dead_lettered_and_the_consumer_continues(
    open_bus: BusFactory, backend: Backend
) -> None:
    topic = backend.topic("bad")
    bus = await open_bus(group="bad-input")
    await bus.ensure_topic(topic, keybus.TopicConfig(partitions=1))
    letters: list[keybus.Message] = []
    handled: list[int] = []

    async def on_letter(message: keybus.Message) -> None:
        letters.append(message)

    async def handler(envelope: keybus.Envelope) -> None:
        handled.append(envelope.event_version)

    watcher = await open_bus()
    await watcher.subscribe(f"{topic}.dlq", on_letter)
    await bus.subscribe_envelope(topic, handler)
    # Another service writes straight onto our subject: no key, no keybus headers.
    nc = await nats.connect(backend.url)
    try:
        js = nc.jetstream()
        await js.publish(f"{subject_base(topic)}.0", b"\x00\xffnot an envelope")
        await js.publish(f"{subject_base(topic)}.0", b'{"aggregate_id": 5}', headers={"h": "v"})
    finally:
        await nc.close()
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


async def test_headers_and_keys_with_any_bytes_round_trip(
    open_bus: BusFactory, backend: Backend
) -> None:
    bus = await open_bus()
    topic = backend.topic()
    got: list[keybus.Message] = []

    async def handler(message: keybus.Message) -> None:
        got.append(message)

    await bus.subscribe(topic, handler)
    headers = {"plain": b"v", "spaces": b"  padded ", "crlf": b"a\r\nb", "empty": b""}
    await bus.publish(topic, b"x", key="k\u00e9y with spaces\n", headers=headers)
    await eventually(lambda: len(got) == 1, what="the message")
    assert got[0].key == "k\u00e9y with spaces\n"
    assert dict(got[0].headers) == headers


async def test_long_handler_keeps_its_message_instead_of_redelivery(
    open_bus: BusFactory, backend: Backend
) -> None:
    # In-progress acks go out every ack_wait / 3 (1 s) from the ack task, independent of
    # group coordination; a message is reached at the latest 1.5 s after its previous
    # one. That leaves 1.5 s of scheduling slack on a loaded box before a redelivery,
    # while the handler runs more than two ack_waits, so without them it would happen.
    ack_wait = 3.0
    bus = await open_bus(group="slow", ack_wait=ack_wait)
    topic = backend.topic("slow")
    await bus.ensure_topic(topic, keybus.TopicConfig(partitions=1))
    calls = 0

    async def handler(message: keybus.Message) -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(2.2 * ack_wait)  # the time being handled, not a guess

    sub = await bus.subscribe(topic, handler)
    await bus.publish(topic, b"slow", key="k")
    await eventually(lambda: sub.stats.handled == 1, what="the slow handler", timeout=20)
    assert calls == 1
    nc = await nats.connect(backend.url)
    try:
        infos = await nc.jetstream().consumers_info(stream_name(topic))
    finally:
        await nc.close()
    # Every delivery, redeliveries too, takes a consumer sequence (num_redelivered only
    # counts redelivered messages still pending, and this one is acked by now).
    assert [c.delivered.consumer_seq if c.delivered else 0 for c in infos] == [1], (
        "in-progress acks kept it alive: delivered exactly once"
    )


async def test_open_close_cycles_leave_no_tasks_sockets_or_server_consumers(
    backend: Backend,
) -> None:
    topic = backend.topic("cycles")
    async with LeakChecker(timeout=10):
        async with keybus.connect(backend.url) as admin:
            await admin.ensure_topic(topic)
        for cycle in range(20):
            async with keybus.connect(backend.url) as bus:  # anonymous group each time
                got: list[bytes] = []

                async def handler(message: keybus.Message, got: list[bytes] = got) -> None:
                    got.append(message.value)

                await bus.subscribe(topic, handler)
                await bus.publish(topic, f"c{cycle}".encode())
                await eventually(lambda got=got, c=cycle: f"c{c}".encode() in got, what="it")
        nc = await nats.connect(backend.url)
        try:
            left = await nc.jetstream().consumers_info(stream_name(topic))
        finally:
            await nc.close()
        assert left == [], "anonymous groups remove their durables when they leave"
