"""NATS: a record too large for the server is refused before it is sent — payload plus
header block, as the server counts them against its ``max_payload`` — as a permanent
``PublishError`` naming both sizes and the limit, with the connection untouched (so a
poison record near the limit is dead-lettered reduced on the consumer's own connection);
and a refusal by JetStream that no retry can overcome is permanent too."""

from __future__ import annotations

import pytest
from nats.js import api

import keybus
from keybus.transports.nats.names import stream_name, subject_base
from tests.conftest import Backend, BusFactory
from tests.helpers import Collected, envelope, eventually, watch_dead_letters
from tests.nats.server import jetstream

# The header block keybus sends for key="k" and no headers: "NATS/1.0\r\n",
# "Keybus-Key: k\r\n", "\r\n".
KEY_ONLY_BLOCK = len(b"NATS/1.0\r\nKeybus-Key: k\r\n\r\n")


async def test_a_publish_over_max_payload_with_its_headers_is_refused_and_the_connection_lives(
    open_bus: BusFactory, backend: Backend
) -> None:
    """nats-py checks the payload alone, the server payload plus headers: a record whose
    payload fits but whose headers take it over must be refused by keybus, before
    sending. Sent, the server would answer -ERR and nats-py close the connection for
    good (publishes then fail, consumption stops). A record exactly at the limit is
    taken: the count is exact."""
    bus = await open_bus(group="sizes", publish_timeout=3.0)
    topic = backend.topic("sizes")
    await bus.ensure_topic(topic, keybus.TopicConfig(partitions=1))
    got = Collected()
    await bus.subscribe(topic, got)
    client = bus._transport._conn._nc  # type: ignore[attr-defined]
    limit = client.max_payload
    assert limit == 1_048_576, "nats-server's default max_payload"
    over = b"x" * (limit - KEY_ONLY_BLOCK + 1)
    with pytest.raises(keybus.PublishError) as raised:
        await bus.publish(topic, over, key="k")
    error = raised.value
    assert error.permanent
    assert f"payload {len(over)} bytes" in error.reason
    assert f"header block {KEY_ONLY_BLOCK} bytes" in error.reason
    assert f"max_payload of {limit} bytes" in error.reason
    at_limit = b"y" * (limit - KEY_ONLY_BLOCK)
    await bus.publish(topic, at_limit, key="k")
    await bus.publish(topic, b"after", key="k")
    await eventually(lambda: got.values() == [at_limit, b"after"], what="the two that fit")
    assert bus._transport._conn._nc is client, "the same connection"  # type: ignore[attr-defined]
    assert not client.is_closed
    assert bus._transport.replacements == 0  # type: ignore[attr-defined]


async def test_a_header_block_over_jetstreams_64_kib_is_refused_for_good(
    open_bus: BusFactory, backend: Backend
) -> None:
    """JetStream refuses a header block over 64 KiB whatever the payload (error 10097):
    permanent, so a dead letter carrying such headers is written reduced, not retried
    without end."""
    bus = await open_bus()
    topic = backend.topic("bighead")
    with pytest.raises(keybus.PublishError) as raised:
        await bus.publish(topic, b"small", headers={"X-Big": "h" * 70_000})
    assert raised.value.permanent
    assert "header block" in raised.value.reason
    assert "65535" in raised.value.reason
    await bus.publish(topic, b"fine")  # the connection lives


async def test_a_stream_refusing_a_record_for_its_size_is_a_permanent_publish_error(
    open_bus: BusFactory, backend: Backend
) -> None:
    """A stream made by someone else with a small ``max_msg_size``: JetStream refuses the
    record (error 10054), and sending it again cannot succeed."""
    topic = backend.topic("maxmsg")
    async with jetstream(backend.url) as (_, js):
        await js.add_stream(
            api.StreamConfig(
                name=stream_name(topic),
                subjects=[f"{subject_base(topic)}.*"],
                max_msg_size=100,
                metadata={"keybus.partitions": "1"},
            )
        )
    bus = await open_bus()
    await bus.publish(topic, b"small")
    with pytest.raises(keybus.PublishError) as raised:
        await bus.publish(topic, b"z" * 200)
    assert raised.value.permanent
    assert "message size exceeds maximum allowed" in raised.value.reason
    assert "JetStream error 10054" in raised.value.reason
    async with jetstream(backend.url) as (_, js):  # full: may succeed later, not permanent
        await js.update_stream(
            api.StreamConfig(
                name=stream_name(topic),
                subjects=[f"{subject_base(topic)}.*"],
                max_msg_size=100,
                max_msgs=1,
                discard=api.DiscardPolicy.NEW,
                metadata={"keybus.partitions": "1"},
            )
        )
    with pytest.raises(keybus.PublishError) as full:
        await bus.publish(topic, b"second")
    assert not full.value.permanent, full.value.reason


async def test_a_poison_record_near_the_limit_is_dead_lettered_reduced_on_the_same_connection(
    open_bus: BusFactory, backend: Backend
) -> None:
    """A record a few bytes under max_payload that is no envelope: its dead letter (its
    headers plus X-Error and the X-Original-* ones) is over the limit. keybus refuses it
    before sending (permanent), the core writes it reduced, and the consumer's own
    connection is the one it started with — no -ERR, no dead client, no replacement."""
    bus = await open_bus()
    topic = backend.topic("nearlimit")
    letters = await watch_dead_letters(open_bus, topic)
    handled: list[int] = []

    async def handler(event: keybus.Envelope) -> None:
        handled.append(event.event_version)

    await bus.subscribe_envelope(topic, handler)
    client = bus._transport._conn._nc  # type: ignore[attr-defined]
    poison = b"\xff" * (client.max_payload - KEY_ONLY_BLOCK - 3)
    await bus.publish(topic, poison, key="k")
    await bus.publish_envelope(topic, envelope("k", 1))
    await eventually(lambda: handled == [1] and len(letters) == 1, what="the key moving on")
    assert letters[0].value == b""
    assert letters[0].headers["X-Original-Size"] == str(len(poison)).encode()
    assert b"max_payload" in letters[0].headers["X-Truncated"]
    assert bus._transport._conn._nc is client  # type: ignore[attr-defined]
    assert bus._transport.replacements == 0  # type: ignore[attr-defined]
