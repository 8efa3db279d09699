"""Shared test helpers: polling with a deadline (never a guessed sleep)."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any

from keybus.partitioning import partition_for


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]],
    *,
    timeout: float = 20.0,
    what: str = "condition",
) -> None:
    """Poll ``predicate`` until it holds; fail with ``what`` at the deadline. It may
    return an awaitable (e.g. ``asyncio.to_thread`` of a blocking check)."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        held = predicate()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


def key_on(partition: int, partitions: int) -> str:
    """A key that every backend puts on ``partition`` of a topic with ``partitions``."""
    return next(
        key
        for key in (f"k{i}" for i in itertools.count())
        if partition_for(key, partitions, iter(())) == partition
    )


def order_violations(seen: dict[str, list[int]]) -> int:
    """Count places where a key's handled versions went backwards."""
    return sum(1 for versions in seen.values() for a, b in itertools.pairwise(versions) if b < a)


class Collected(list[Any]):
    """A list that is also an async handler: it appends every message or envelope it gets.

    ``got = Collected(); await bus.subscribe(topic, got)``, then poll ``got``."""

    async def __call__(self, item: Any) -> None:
        self.append(item)

    def values(self) -> list[bytes]:
        return [item.value for item in self]


async def watch_dead_letters(open_bus: Callable[..., Any], topic: str) -> Collected:
    """Collect what lands on ``topic``'s dead-letter topic, seen from a bus of its own."""
    letters = Collected()
    watcher = await open_bus()
    await watcher.subscribe(f"{topic}.dlq", letters)
    return letters


async def drop_topics(bus: Any, *topics: str) -> None:
    """Delete each topic and its dead-letter topic (tests clean up what they create)."""
    for topic in topics:
        await bus.delete_topic(topic)
        await bus.delete_topic(f"{topic}.dlq")
