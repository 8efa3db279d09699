"""NATS: deliveries lost on the wire, crashing tasks, malformed input, bounded close with
a server that does not answer, errors wrapped as keybus errors, header names."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from nats.aio.msg import Msg
from nats.js.api import ConsumerInfo

import keybus
import nats
from keybus.transports.nats_group import GroupMember
from keybus.transports.nats_names import GROUPS_BUCKET, group_key, stream_name, subject_base
from tests.conftest import Backend, BusFactory
from tests.helpers import eventually
from tests.nats.proxy import NatsProxy


async def consumers(url: str, topic: str) -> list[ConsumerInfo]:
    nc = await nats.connect(url)
    try:
        return list(await nc.jetstream().consumers_info(stream_name(topic)))
    finally:
        await nc.close()


async def until_server(
    url: str, topic: str, check: Callable[[list[ConsumerInfo]], bool], what: str
) -> None:
    """Poll the server's view of the topic's consumers until ``check`` holds."""
    deadline = time.monotonic() + 20
    while not check(await consumers(url, topic)):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def ack_floor(info: ConsumerInfo) -> int:
    return info.ack_floor.stream_seq if info.ack_floor else 0


def delivered(info: ConsumerInfo) -> int:
    return info.delivered.stream_seq if info.delivered else 0


def first_seen(values: list[int]) -> list[int]:
    return list(dict.fromkeys(values))


# -- B1: deliveries lost on the wire ---------------------------------------------------


async def test_a_lost_delivery_is_detected_and_redelivered_in_order_not_acked(
    open_bus: BusFactory, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client never sees v4 (as if lost on the wire: the server counts it delivered).
    v5 arrives with a consumer sequence that skips one: the member must not hand v5 to
    the core (its ack-all would acknowledge v4) but re-take the partition at its ack
    floor, so v4, v5, v6 follow in order — long before ack_wait (30 s) could redeliver."""
    dropped: list[bytes] = []
    original = GroupMember._on_message

    def lossy(self: GroupMember, part: Any) -> Callable[[Msg], Any]:
        deliver = original(self, part)

        async def on_message(msg: Msg) -> None:
            if msg.data == b"4" and not dropped:
                dropped.append(msg.data)
                return
            await deliver(msg)

        return on_message

    monkeypatch.setattr(GroupMember, "_on_message", lossy)
    topic = backend.topic("lost")
    bus = await open_bus(group="lost")
    await bus.ensure_topic(topic, keybus.TopicConfig(partitions=1))
    seen: list[int] = []

    async def handler(message: keybus.Message) -> None:
        seen.append(int(message.value))

    await bus.subscribe(topic, handler)
    for version in range(1, 4):
        await bus.publish(topic, str(version).encode(), key="k")
    await eventually(lambda: seen == [1, 2, 3], what="v1..v3")
    [before] = [c.name for c in await consumers(backend.url, topic)]
    for version in range(4, 7):
        await bus.publish(topic, str(version).encode(), key="k")
    await eventually(lambda: 6 in seen, what="v6", timeout=10)
    assert dropped == [b"4"]
    assert seen == [1, 2, 3, 4, 5, 6], "nothing skipped, nothing twice, in order"
    [after] = await consumers(backend.url, topic)
    assert after.name != before, "a fresh consumer (a new epoch) took over"
    await until_server(backend.url, topic, lambda cs: ack_floor(cs[0]) == 6, "the ack floor at v6")


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


# -- B5: bad input and crashing tasks never stall a partition -------------------------


async def test_records_with_undecodable_keybus_headers_are_delivered_and_the_partition_flows(
    open_bus: BusFactory, backend: Backend
) -> None:
    topic = backend.topic("badheaders")
    bus = await open_bus(group="badheaders")
    await bus.ensure_topic(topic, keybus.TopicConfig(partitions=1))
    got: list[keybus.Message] = []

    async def handler(message: keybus.Message) -> None:
        got.append(message)

    await bus.subscribe(topic, handler)
    nc = await nats.connect(backend.url)
    try:
        js = nc.jetstream()
        subject = f"{subject_base(topic)}.0"
        await js.publish(subject, b"f1", headers={"Keybus-B64": "not json", "h": "v"})
        await js.publish(
            subject, b"f2", headers={"Keybus-B64": '["h", "Keybus-Key"]', "h": "@@", "x": "1"}
        )
        await js.publish(subject, b"f3", headers={"Keybus-N-!!": "v", "Keybus-Key": "k"})
    finally:
        await nc.close()
    await bus.publish(topic, b"good-1", key="k")
    await bus.publish(topic, b"good-2", key="k")
    await eventually(lambda: len(got) == 5, what="all five records")
    assert [m.value for m in got] == [b"f1", b"f2", b"f3", b"good-1", b"good-2"]
    assert got[0].headers == {"h": b"v", "Keybus-B64": b"not json"}, "kept as they arrived"
    assert got[1].headers == {"h": b"@@", "x": b"1"}
    assert got[2].key == "k"
    assert got[2].headers == {"Keybus-N-!!": b"v"}


async def test_a_crashing_pull_task_re_takes_its_partition_and_loses_nothing(
    open_bus: BusFactory, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    crashed: list[bytes] = []
    original = GroupMember._convert

    def convert(self: GroupMember, msg: Msg, part: Any) -> keybus.Message | None:
        if msg.data == b"3" and not crashed:
            crashed.append(msg.data)
            raise RuntimeError("a bug in the pull loop")
        return original(self, msg, part)

    monkeypatch.setattr(GroupMember, "_convert", convert)
    topic = backend.topic("pullcrash")
    bus = await open_bus(group="pullcrash")
    await bus.ensure_topic(topic, keybus.TopicConfig(partitions=1))
    seen: list[int] = []

    async def handler(message: keybus.Message) -> None:
        seen.append(int(message.value))

    await bus.subscribe(topic, handler)
    for version in range(1, 6):
        await bus.publish(topic, str(version).encode(), key="k")
    await eventually(lambda: 5 in seen, what="v5 after the crash", timeout=10)
    assert crashed == [b"3"]
    assert seen == [1, 2, 3, 4, 5]


async def test_crashing_coordinator_rounds_and_acker_are_survived(
    open_bus: BusFactory, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round that raises something unexpected, and an acker that crashes: the member
    keeps renewing, delivering and acknowledging."""
    rounds = 0
    keep_alive_crashes = 0
    original_round = GroupMember._round
    original_keep_alive = GroupMember._keep_alive

    async def flaky_round(self: GroupMember, *, leaving: bool) -> Any:
        nonlocal rounds
        rounds += 1
        if rounds in (3, 4):
            raise RuntimeError("a bug in a round")
        return await original_round(self, leaving=leaving)

    async def flaky_keep_alive(self: GroupMember, nc: Any, interval: float) -> None:
        nonlocal keep_alive_crashes
        if keep_alive_crashes < 2:
            keep_alive_crashes += 1
            raise RuntimeError("a bug in the acker")
        await original_keep_alive(self, nc, interval)

    monkeypatch.setattr(GroupMember, "_round", flaky_round)
    monkeypatch.setattr(GroupMember, "_keep_alive", flaky_keep_alive)
    topic = backend.topic("flaky")
    bus = await open_bus(group="flaky", heartbeat=0.1, lease_ttl=1.0, ack_wait=0.6)
    await bus.ensure_topic(topic, keybus.TopicConfig(partitions=1))
    seen: list[int] = []

    async def handler(message: keybus.Message) -> None:
        seen.append(int(message.value))

    await bus.subscribe(topic, handler)
    await eventually(lambda: rounds > 8 and keep_alive_crashes == 2, what="crashes survived")
    for version in range(1, 4):
        await bus.publish(topic, str(version).encode(), key="k")
    await eventually(lambda: seen == [1, 2, 3], what="v1..v3")
    await until_server(backend.url, topic, lambda cs: ack_floor(cs[0]) == 3, "acks after crashes")


async def test_malformed_group_state_is_repaired_and_the_member_keeps_its_partitions(
    open_bus: BusFactory, backend: Backend
) -> None:
    topic = backend.topic("kvjunk")
    group = "kvjunk"
    bus = await open_bus(group=group, heartbeat=0.1, lease_ttl=1.0)
    await bus.ensure_topic(topic, keybus.TopicConfig(partitions=2))
    seen: list[bytes] = []

    async def handler(message: keybus.Message) -> None:
        seen.append(message.value)

    await bus.subscribe(topic, handler)
    nc = await nats.connect(backend.url)
    try:
        kv = await nc.jetstream().key_value(GROUPS_BUCKET)
        key = group_key(topic, group)
        for junk in (b"[1, 2]", b"not json", b'{"m": {"x": "y"}, "o": {"zz": 1, "0": [1]}}'):
            await kv.put(key, junk)

            async def repaired() -> bool:
                entry = await kv.get(key)
                try:
                    state = json.loads(entry.value or b"")
                except ValueError:
                    return False
                return isinstance(state, dict) and len(state.get("o", {})) == 2

            deadline = time.monotonic() + 10
            while not await repaired():
                assert time.monotonic() < deadline, f"state {junk!r} not repaired"
                await asyncio.sleep(0.05)
    finally:
        await nc.close()
    await bus.publish(topic, b"a", key="a")
    await bus.publish(topic, b"b", key="b")
    await eventually(lambda: sorted(seen) == [b"a", b"b"], what="both keys")


@pytest.mark.slow
async def test_a_member_that_cannot_renew_revokes_before_its_lease_expires(
    nats_proxy: NatsProxy, backend: Backend, no_leaks: Any
) -> None:
    topic = backend.topic("renew")
    ttl = 1.5
    async with keybus.connect(nats_proxy.url, group="renew", lease_ttl=ttl, heartbeat=0.3) as bus:
        await bus.ensure_topic(topic, keybus.TopicConfig(partitions=2))

        async def handler(message: keybus.Message) -> None:
            pass

        sub = await bus.subscribe(topic, handler)
        member = sub._consumer
        assert isinstance(member, GroupMember)
        assert len(member._parts) == 2
        nats_proxy.blackhole = True  # our last renewal happened before now
        await eventually(lambda: not member._parts, what="self-revoke", timeout=ttl)
        assert not sub._assigned, "revoked through the core"
        started = time.monotonic()
    assert time.monotonic() - started < 3.0, "close with a silent server is bounded"
    nats_proxy.blackhole = False


# -- B10: bounded, leak-free close with a server that does not answer ------------------


@pytest.mark.slow
async def test_close_with_unacknowledged_publishes_is_bounded_and_leaves_nothing(
    nats_proxy: NatsProxy, open_bus: BusFactory, backend: Backend
) -> None:
    topic = backend.topic("closepub")
    admin = await open_bus()
    await admin.ensure_topic(topic)
    bus = await keybus.connect(nats_proxy.url)
    try:
        await bus.publish(topic, b"warm-up")
        nats_proxy.blackhole = True
        publishes = [asyncio.create_task(bus.publish(topic, b"x")) for _ in range(3)]
        publisher = bus._transport._publisher  # type: ignore[attr-defined]
        await eventually(lambda: publisher.pending() == 3, what="3 publishes in flight")
    finally:
        started = time.monotonic()
        await bus.close(timeout=0.5)
        took = time.monotonic() - started
    assert took < 3.0, f"close took {took:.2f} s"
    results = await asyncio.gather(*publishes, return_exceptions=True)
    assert all(isinstance(r, keybus.PublishError) for r in results), results
    # no_leaks: the client's tasks and socket are gone


@pytest.mark.slow
async def test_close_of_a_group_member_with_a_silent_server_is_bounded_and_leaves_nothing(
    nats_proxy: NatsProxy, open_bus: BusFactory, backend: Backend
) -> None:
    topic = backend.topic("closegroup")
    bus = await keybus.connect(nats_proxy.url, group="closegroup")
    try:

        async def handler(message: keybus.Message) -> None:
            pass

        await bus.subscribe(topic, handler)
        await bus.publish(topic, b"one", key="k")
        nats_proxy.blackhole = True
    finally:
        started = time.monotonic()
        await bus.close(timeout=0.5)
        took = time.monotonic() - started
    assert took < 3.0, f"close took {took:.2f} s"
    # no_leaks: no keybus-nats-* task, no client task, no socket


# -- R5: errors are keybus errors -------------------------------------------------------


@pytest.mark.slow
async def test_admin_calls_to_a_silent_server_raise_keybus_errors_with_the_cause(
    nats_proxy: NatsProxy, open_bus: BusFactory, backend: Backend
) -> None:
    topic = backend.topic("admin")
    bus = await keybus.connect(nats_proxy.url, api_timeout=0.5)
    try:
        await bus.ensure_topic(topic)
        nats_proxy.blackhole = True

        async def handler(message: keybus.Message) -> None:
            pass

        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "ensure_topic": lambda: bus.ensure_topic(backend.topic("admin-new")),
            "delete_topic": lambda: bus.delete_topic(backend.topic("admin-gone")),
            "subscribe": lambda: bus.subscribe(topic, handler),
        }
        for name, call in calls.items():
            with pytest.raises(keybus.KeybusError) as raised:
                await call()
            assert raised.value.__cause__ is not None, name
            assert nats_proxy.url in str(raised.value), name
    finally:
        await bus.close(timeout=0.5)
        nats_proxy.blackhole = False


async def test_a_refused_topic_config_raises_a_keybus_error(
    open_bus: BusFactory, backend: Backend
) -> None:
    bus = await open_bus()
    with pytest.raises(keybus.KeybusError, match="replicas") as raised:
        await bus.ensure_topic(backend.topic("r3"), keybus.TopicConfig(replication_factor=3))
    assert raised.value.__cause__ is not None


# -- R6: any header name round-trips, also into a dead letter ---------------------------

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
    letters: list[keybus.Message] = []

    async def handler(message: keybus.Message) -> None:
        got.append(message)
        raise RuntimeError("to the dead letters")

    async def on_letter(message: keybus.Message) -> None:
        letters.append(message)

    await bus.subscribe(topic, handler, max_attempts=1)
    await bus.subscribe(f"{topic}.dlq", on_letter)
    await bus.publish(topic, b"v", key="k", headers=ODD_NAMES)
    await eventually(lambda: len(letters) == 1, what="the dead letter")
    assert got[0].key == "k"
    assert dict(got[0].headers) == ODD_NAMES
    letter = letters[0]
    assert letter.key == "k"
    assert {n: v for n, v in letter.headers.items() if not n.startswith("X-")} == ODD_NAMES
