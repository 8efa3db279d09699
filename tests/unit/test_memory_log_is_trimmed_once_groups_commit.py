"""The memory backend's log is trimmed once every group has committed it; the private
groups of closed anonymous buses do not pin it."""

from __future__ import annotations

import keybus
from keybus.testing import LeakChecker
from keybus.transports.memory import MemoryBroker
from tests.helpers import eventually


async def test_groups_of_closed_anonymous_buses_do_not_pin_the_log(
    no_leaks: LeakChecker,
) -> None:
    async with (
        keybus.connect("memory://anon") as pub,
        keybus.connect("memory://anon", group="live") as live,
    ):
        await pub.ensure_topic("t", keybus.TopicConfig(partitions=1))
        for _ in range(5):
            async with keybus.connect("memory://anon") as passer_by:
                await passer_by.subscribe("t", lambda m: None)
        handled = 0

        def count(m: keybus.Message) -> None:
            nonlocal handled
            handled += 1

        await live.subscribe("t", count)
        for i in range(12_000):
            await pub.publish("t", b"x", key=str(i))
        await eventually(lambda: handled == 12_000, what="12000 handled")
        topic = MemoryBroker.named("anon").topics["t"]
        await eventually(lambda: len(topic.logs[0].records) < 8192, what="the log trimmed")
        assert set(topic.groups) == {"live"}
