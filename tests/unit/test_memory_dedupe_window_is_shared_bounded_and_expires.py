"""The in-memory backend's ``dedupe_window``: the window belongs to the named broker's
topic (a second de-duplicating bus of the same NAME sees the first one's event ids, as
buses share a JetStream stream), a bus without it is never refused, an id may be
published again once its window is over, and the ids kept are only those of the last
window (bounded)."""

from __future__ import annotations

import pytest

import keybus
from keybus.testing import LeakChecker
from keybus.transports.memory import MemoryBroker
from tests.conftest import unique
from tests.helpers import eventually

WINDOW = 0.2


def ids(n: int) -> dict[str, str]:
    return {"X-Event-ID": f"event-{n}"}


async def test_the_window_is_the_topics_and_ends(no_leaks: LeakChecker) -> None:
    url = f"memory://{unique('dedupe')}"
    topic = unique("t")
    async with (
        keybus.connect(url, dedupe_window=WINDOW) as first,
        keybus.connect(url, dedupe_window=WINDOW) as second,
        keybus.connect(url) as plain,
    ):
        await first.publish(topic, b"a", headers=ids(1))
        with pytest.raises(keybus.PublishError, match="duplicate"):
            await second.publish(topic, b"b", headers=ids(1))
        await plain.publish(topic, b"c", headers=ids(1))  # off on this bus: stored
        await first.publish(unique("other"), b"d", headers=ids(1))  # per topic
        recent = MemoryBroker.named(url.split("://")[1]).topics[topic].recent
        assert recent is not None
        # Once the window is over the id is new again, and the old ids are gone.

        async def taken_again() -> bool:
            try:
                await second.publish(topic, b"e", headers=ids(1))
            except keybus.PublishError:
                return False
            return True

        await eventually(taken_again, timeout=5.0, what="the window to end")
        await first.publish(topic, b"f", headers=ids(2))
        assert len(recent._until) <= 2, "only the last window's ids are kept"
        log = MemoryBroker.named(url.split("://")[1]).topics[topic].logs
        stored = sorted(value for part in log for value, *_ in part.records)
        assert b"b" not in stored
        assert {b"a", b"c", b"e", b"f"} <= set(stored)
