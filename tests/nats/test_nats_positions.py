"""NATS ``positions`` (``bus.lag``, ``transports/nats/positions.py``): the group's durable
is found past the first page of a stream's consumers (the server lists 256 at a time,
sorted by name), and only the topic's subjects are counted, not every subject of a
stream it shares."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from nats.js import api

import keybus
from keybus.transports.nats.client import Stream
from keybus.transports.nats.names import stream_name, subject_base
from keybus.transports.nats.positions import group_positions
from tests.conftest import Backend, BusFactory
from tests.helpers import Collected, eventually
from tests.nats.server import jetstream

OTHERS = 300  # consumers named to sort before the group's: more than one page


async def test_lag_finds_the_group_s_durable_past_the_first_page_of_consumers(
    open_bus: BusFactory, backend: Backend
) -> None:
    topic = backend.topic("positions")
    group = f"zz-{uuid.uuid4().hex[:8]}"  # ("zz": its durables sort after "a000"...)
    bus = await open_bus(group=group)
    await bus.ensure_topic(topic, keybus.TopicConfig(partitions=1))
    for n in range(3):
        await bus.publish(topic, b"%d" % n, key="k")
    got = Collected()
    await bus.subscribe(topic, got)

    async def caught_up() -> bool:
        return len(got) == 3 and (await bus.lag(topic)).total == 0

    await eventually(caught_up, what="the group to commit all three")
    async with jetstream(backend.url) as (_, js):
        for n in range(OTHERS):
            await js.add_consumer(
                stream_name(topic),
                api.ConsumerConfig(
                    durable_name=f"a{n:03d}",
                    ack_policy=api.AckPolicy.NONE,
                    filter_subject=f"{subject_base(topic)}.0",
                ),
            )
    (row,) = (await bus.lag(topic)).partitions
    assert row.committed == 4, "the group's durable was not found among the consumers"
    assert row.lag == 0


async def test_a_shared_stream_is_asked_only_about_the_topic_s_subjects(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"KB_POS_{uuid.uuid4().hex[:8].upper()}"
    topic = f"pos.{name.lower()}"
    async with jetstream(backend.url) as (_, js):
        await js.add_stream(
            api.StreamConfig(
                name=name, subjects=[topic, "pos.other.>"], storage=api.StorageType.MEMORY
            )
        )
        try:
            for n in range(5):
                await js.publish(f"pos.other.{n}", b"x")
            await js.publish(topic, b"t")
            asked: list[Any] = []
            stream_info = js.stream_info

            async def recorded(stream: str, subjects_filter: str | None = None) -> Any:
                asked.append(subjects_filter)
                return await stream_info(stream, subjects_filter)

            monkeypatch.setattr(js, "stream_info", recorded)
            (position,) = await group_positions(js, Stream(name, (topic,)), "nobody")
            assert asked == [topic], "the other subjects were read as well"
            assert (position.committed, position.end, position.lag) == (None, 7, 1)
        finally:
            await js.delete_stream(name)
