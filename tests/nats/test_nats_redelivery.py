"""NATS: deliveries lost on the wire are redelivered at once and in order — never acked
unhandled, never overtaken by newer messages — and a long handler keeps its message
instead of JetStream redelivering it."""

from __future__ import annotations

import asyncio

import pytest

import keybus
from tests.conftest import Backend, BusFactory
from tests.helpers import eventually
from tests.nats.proxy import NatsProxy
from tests.nats.server import ack_floor, consumers, delivered, until_server


def first_seen(values: list[int]) -> list[int]:
    return list(dict.fromkeys(values))


async def test_a_lost_delivery_is_detected_and_redelivered_in_order_not_acked(
    nats_proxy: NatsProxy, backend: Backend
) -> None:
    """The proxy drops the delivery of v4 (the server counts it delivered). v5 arrives
    with a consumer sequence that skips one: the member must not hand v5 to the core (its
    ack-all would acknowledge v4) but re-take the partition at its ack floor, so v4, v5,
    v6 follow in order — long before ack_wait (30 s) could redeliver."""
    topic = backend.topic("lost")
    dropped: list[bytes] = []

    def lose_v4_once(payload: bytes) -> bool:
        if payload == b"4" and not dropped:
            dropped.append(payload)
            return True
        return False

    seen: list[int] = []

    async def handler(message: keybus.Message) -> None:
        seen.append(int(message.value))

    async with keybus.connect(nats_proxy.url, group="lost") as bus:
        await bus.ensure_topic(topic, keybus.TopicConfig(partitions=1))
        await bus.subscribe(topic, handler)
        for version in range(1, 4):
            await bus.publish(topic, str(version).encode(), key="k")
        await eventually(lambda: seen == [1, 2, 3], what="v1..v3")
        [before] = [c.name for c in await consumers(backend.url, topic)]
        nats_proxy.drop = lose_v4_once
        for version in range(4, 7):
            await bus.publish(topic, str(version).encode(), key="k")
        await eventually(lambda: 6 in seen, what="v6", timeout=10)
        assert dropped == [b"4"]
        assert seen == [1, 2, 3, 4, 5, 6], "nothing skipped, nothing twice, in order"
        [after] = await consumers(backend.url, topic)
        assert after.name != before, "a fresh consumer (a new epoch) took over"
        await until_server(backend.url, topic, lambda cs: ack_floor(cs[0]) == 6, "ack floor 6")


@pytest.mark.slow
async def test_deliveries_lost_in_a_disconnect_are_redelivered_at_once_and_in_order(
    nats_proxy: NatsProxy, open_bus: BusFactory, backend: Backend
) -> None:
    """The server writes v6..v10 to a connection whose replies are black-holed, then the
    connection breaks. JetStream counts them delivered (ack_wait 30 s). After the
    reconnect the member re-takes the partition at its ack floor: v6..v10 arrive without
    waiting for ack_wait and before anything newer, and no ack covers them unhandled."""
    topic = backend.topic("disconnect")
    publisher = await open_bus()
    await publisher.ensure_topic(topic, keybus.TopicConfig(partitions=1))
    seen: list[int] = []

    async def handler(message: keybus.Message) -> None:
        seen.append(int(message.value))

    async with keybus.connect(nats_proxy.url, group="disconnect") as bus:
        await bus.subscribe(topic, handler)
        for version in range(1, 6):
            await publisher.publish(topic, str(version).encode(), key="k")
        await eventually(lambda: seen == [1, 2, 3, 4, 5], what="v1..v5")
        nats_proxy.blackhole = True
        for version in range(6, 11):
            await publisher.publish(topic, str(version).encode(), key="k")
        await until_server(
            backend.url,
            topic,
            lambda cs: delivered(cs[0]) == 10,
            "the server to deliver v6..v10 into the black hole",
        )
        nats_proxy.cut()
        nats_proxy.blackhole = False
        await eventually(lambda: 10 in seen, what="v6..v10 after the reconnect", timeout=15)
        for version in range(11, 16):
            await publisher.publish(topic, str(version).encode(), key="k")
        await eventually(lambda: 15 in seen, what="v15")
        assert first_seen(seen) == list(range(1, 16)), f"out of order: {seen}"
        assert all(v <= 5 for v in seen[15:]), f"only unacked ones may repeat: {seen}"
        await until_server(backend.url, topic, lambda cs: ack_floor(cs[0]) == 15, "ack floor 15")


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
    await eventually(lambda: sub.stats().handled == 1, what="the slow handler", timeout=20)
    assert calls == 1
    # Every delivery, redeliveries too, takes a consumer sequence (num_redelivered only
    # counts redelivered messages still pending, and this one is acked by now).
    infos = await consumers(backend.url, topic)
    assert [c.delivered.consumer_seq if c.delivered else 0 for c in infos] == [1], (
        "in-progress acks kept it alive: delivered exactly once"
    )
