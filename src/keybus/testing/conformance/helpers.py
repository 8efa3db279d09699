"""Helpers of the conformance suite, usable by any keybus test: polling with a deadline
(never a guessed sleep), collecting handlers, keys on given partitions, order checks."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from keybus.envelope import Envelope
from keybus.partitioning import key_partition

if TYPE_CHECKING:
    from keybus.bus import EventBus
    from keybus.testing.conformance.fixtures import BusFactory

__all__ = [
    "Collected",
    "drop_topics",
    "envelope",
    "eventually",
    "key_on",
    "order_violations",
    "reordered_after_redelivery",
    "unused_port",
    "watch_dead_letters",
]


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


def key_on(
    partition: int,
    partitions: int,
    partition_for: Callable[[str, int], int] = key_partition,
) -> str:
    """A key that ``partition_for`` (a backend's :attr:`Features.partition_for`; keybus's
    own placement by default) puts on ``partition`` of a topic with ``partitions``."""
    if not 0 <= partition < partitions:
        raise ValueError(f"partition {partition} is not in 0..{partitions - 1}")
    return next(
        key
        for key in (f"k{i}" for i in itertools.count())
        if partition_for(key, partitions) == partition
    )


def order_violations(seen: Mapping[str, Sequence[int]]) -> int:
    """Count places where a key's handled versions went backwards."""
    return sum(1 for versions in seen.values() for a, b in itertools.pairwise(versions) if b < a)


def reordered_after_redelivery(seen: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """Keys whose versions went astray. A hand-over may redeliver (repeat) versions, never
    reorder them: once exact repeats are dropped, each key's first sightings must ascend."""
    bad: dict[str, list[int]] = {}
    for key, versions in seen.items():
        first_seen = list(dict.fromkeys(versions))
        if first_seen != sorted(first_seen):
            bad[key] = list(versions)
    return bad


def envelope(aggregate: str, version: int) -> Envelope:
    """A small envelope of ``aggregate`` at ``version``."""
    return Envelope(
        aggregate_id=aggregate, event_type="Changed", event_version=version, payload={"v": version}
    )


class Collected(list[Any]):
    """A list that is also an async handler: it appends every message or envelope it gets.

    ``got = Collected(); await bus.subscribe(topic, got)``, then poll ``got``."""

    async def __call__(self, item: Any) -> None:
        self.append(item)

    def values(self) -> list[bytes]:
        return [item.value for item in self]


async def watch_dead_letters(open_bus: BusFactory, topic: str) -> Collected:
    """Collect what lands on ``topic``'s dead-letter topic, seen from a bus of its own."""
    letters = Collected()
    watcher = await open_bus()
    await watcher.subscribe(f"{topic}.dlq", letters)
    return letters


async def drop_topics(bus: EventBus, *topics: str) -> None:
    """Delete each topic and its dead-letter topic (tests clean up what they create)."""
    for topic in topics:
        await bus.delete_topic(topic)
        await bus.delete_topic(f"{topic}.dlq")


def unused_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (just released by the OS), for a
    URL of a backend's scheme that cannot be reached."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port
