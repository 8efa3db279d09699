"""NATS: how the one duplicate rule (the conformance kit's ``DedupeSuite``) is carried out
by JetStream. Off by default, no record carries ``Nats-Msg-Id``, so the server stores
every record; with ``dedupe_window`` the streams the bus creates get that duplicate
window, envelope records carry their event id as ``Nats-Msg-Id``, and the server's
duplicate PubAck is what raises (the record is not in the stream)."""

from __future__ import annotations

import pytest

import keybus
from keybus.transports.nats.names import stream_name
from tests.conftest import Backend, BusFactory
from tests.nats.server import jetstream

EVENT_ID = "0190a6f1-8f2c-7cc0-9a43-5d1c2f6b7e01"


def twin(version: int) -> keybus.Envelope:
    return keybus.Envelope(
        event_id=EVENT_ID, aggregate_id="agg", event_type="T", event_version=version, payload={}
    )


@pytest.mark.parametrize("window", [None, 60.0], ids=["dedupe-off", "dedupe-on"])
async def test_the_stream_holds_what_the_rule_says_with_the_window_of_the_bus(
    open_bus: BusFactory, backend: Backend, window: float | None
) -> None:
    bus = await open_bus(dedupe_window=window)
    topic = backend.topic("dupstream")
    await bus.ensure_topic(topic, keybus.TopicConfig(partitions=1))
    await bus.publish_envelope(topic, twin(1))
    if window is None:
        await bus.publish_envelope(topic, twin(2))
    else:
        with pytest.raises(keybus.PublishError, match="duplicate"):
            await bus.publish_envelope(topic, twin(2))
    async with jetstream(backend.url) as (_, js):
        info = await js.stream_info(stream_name(topic))
        stored = await js.get_msg(stream_name(topic), seq=1)
    assert info.state.messages == (2 if window is None else 1)
    assert (stored.headers or {}).get("Nats-Msg-Id") == (None if window is None else EVENT_ID)
    if window is not None:
        assert info.config.duplicate_window == window
