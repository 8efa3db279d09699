"""NATS: every failure is the keybus error the same event raises on every backend, with
the server's words in the reason and nats-py's exception chained as the cause."""

from __future__ import annotations

import time

import pytest
from nats.js import api

import keybus
from keybus.deadline import Deadline
from keybus.testing import LeakChecker
from keybus.topics import TopicConfig
from keybus.transports.nats import NatsTransport
from keybus.transports.nats.names import stream_name, subject_base
from tests.conftest import Backend, BusFactory
from tests.helpers import unused_port
from tests.nats.proxy import NatsProxy
from tests.nats.server import jetstream


async def _ignore(message: keybus.Message) -> None:
    pass


async def test_unreachable_server_raises_connect_error_naming_the_url_quickly(
    no_leaks: LeakChecker,
) -> None:
    url = f"nats://127.0.0.1:{unused_port()}"
    started = time.monotonic()
    with pytest.raises(keybus.ConnectError, match=url):
        await keybus.connect(url)
    assert time.monotonic() - started < 5.0


async def test_calls_before_connect_are_connect_errors_and_after_close_bus_closed(
    no_leaks: LeakChecker, backend: Backend
) -> None:
    """The transport itself (the bus refuses most calls after close on its own): never
    connected is a ConnectError, closed is a BusClosedError — for every call."""
    topic = backend.topic("closed")
    transport = NatsTransport(backend.url)
    with pytest.raises(keybus.ConnectError):
        await transport.publish(topic, b"x", None, {})
    await transport.connect(Deadline.after(5))
    await transport.ensure_topic(topic, TopicConfig())
    await transport.close(Deadline.after(5))
    calls = [
        lambda: transport.publish(topic, b"x", None, {}),
        lambda: transport.ensure_topic(topic, TopicConfig()),
        lambda: transport.describe_topic(topic),
        lambda: transport.delete_topic(topic),
    ]
    for call in calls:
        with pytest.raises(keybus.BusClosedError, match="is closed"):
            await call()
    with pytest.raises(keybus.BusClosedError, match="is closed"):
        transport.consumer(topic, "g", None)


@pytest.mark.slow
async def test_admin_calls_and_subscribe_to_a_silent_server_raise_topic_and_subscribe_errors(
    nats_proxy: NatsProxy, backend: Backend
) -> None:
    topic = backend.topic("admin")
    bus = await keybus.connect(nats_proxy.url, api_timeout=0.5)
    try:
        await bus.ensure_topic(topic)
        await bus.ensure_topic(f"{topic}.dlq")  # so that subscribe only has to join
        nats_proxy.blackhole = True
        new, gone = backend.topic("admin-new"), backend.topic("admin-gone")
        with pytest.raises(keybus.TopicError) as created:
            await bus.ensure_topic(new)
        assert (created.value.topic, created.value.action) == (new, "create")
        with pytest.raises(keybus.TopicError) as deleted:
            await bus.delete_topic(gone)
        assert (deleted.value.topic, deleted.value.action) == (gone, "delete")
        with pytest.raises(keybus.SubscribeError) as joined:
            await bus.subscribe(topic, _ignore)
        assert (joined.value.topic, joined.value.group) == (topic, bus.group)
        for raised in (created, deleted, joined):
            assert "did not answer in time" in str(raised.value)
            assert isinstance(raised.value.__cause__, TimeoutError)
    finally:
        await bus.close(timeout=0.5)
        nats_proxy.blackhole = False


async def test_a_refused_topic_config_is_a_topic_error_with_the_servers_reason(
    open_bus: BusFactory, backend: Backend
) -> None:
    bus = await open_bus()
    topic = backend.topic("r3")
    with pytest.raises(keybus.TopicError, match="replicas") as raised:
        await bus.ensure_topic(topic, keybus.TopicConfig(replication_factor=3))
    assert (raised.value.topic, raised.value.action) == (topic, "create")
    assert raised.value.__cause__ is not None


async def test_a_publish_the_server_refuses_is_a_publish_error_with_its_code(
    open_bus: BusFactory, backend: Backend
) -> None:
    """A stream that takes one record and refuses the next (made by someone else with
    ``discard: new``): the refusal's description and JetStream error code are in the
    reason, not a repr."""
    topic = backend.topic("full")
    async with jetstream(backend.url) as (_, js):
        await js.add_stream(
            name=stream_name(topic),
            subjects=[f"{subject_base(topic)}.*"],
            max_msgs=1,
            discard=api.DiscardPolicy.NEW,
            metadata={"keybus.partitions": "1"},
        )
    bus = await open_bus()
    await bus.publish(topic, b"first")
    with pytest.raises(keybus.PublishError) as raised:
        await bus.publish(topic, b"second")
    assert raised.value.topic == topic
    assert "maximum messages exceeded" in raised.value.reason
    assert "JetStream error 10077" in raised.value.reason
    assert raised.value.__cause__ is not None
