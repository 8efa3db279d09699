"""Fixtures shared by every test: backends, bus factories, unique topics."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import settings

import keybus
from keybus.bench.scenario import backend_url
from keybus.testing import LeakChecker

ALL_BACKENDS = ("memory", "kafka", "nats")

# Property tests check what the codec does, not how fast: Hypothesis's default 200 ms
# deadline per example would turn a GC pause or a busy CI core into a failure.
settings.register_profile("keybus", deadline=None, print_blob=True)
settings.load_profile("keybus")


def enabled_backends() -> list[str]:
    """Backends the conformance suite runs on: ``KEYBUS_BACKENDS`` (comma separated),
    default memory only; ``make test`` enables the brokers it starts."""
    names = [b.strip() for b in os.environ.get("KEYBUS_BACKENDS", "memory").split(",")]
    unknown = set(names) - set(ALL_BACKENDS)
    if unknown:
        raise pytest.UsageError(f"unknown backends in KEYBUS_BACKENDS: {sorted(unknown)}")
    return [b for b in names if b]


def unique(label: str) -> str:
    """A fresh topic/group name, so tests never see each other's data."""
    return f"kb-{label}-{uuid.uuid4().hex[:10]}"


@dataclass
class Backend:
    """One backend under test; ``url`` is shared by every bus of one test."""

    name: str
    url: str
    topics: list[str] = field(default_factory=list)

    def topic(self, label: str = "t") -> str:
        """A fresh topic name, deleted with its dead-letter topic when the test ends."""
        name = unique(label)
        self.topics.append(name)
        self.topics.append(f"{name}.dlq")
        return name

    async def drop_topics(self) -> None:
        if not self.topics:
            return
        # A subscription to a dead-letter topic made its own: "<topic>.dlq.dlq".
        doomed = dict.fromkeys(t for name in self.topics for t in (name, f"{name}.dlq"))
        async with keybus.connect(self.url) as admin:
            for topic in doomed:
                await admin.delete_topic(topic)


async def backend_fixture(name: str) -> AsyncIterator[Backend]:
    """The body of every ``backend`` fixture: topics made with ``backend.topic()`` are
    deleted at teardown, whether the test passed or not."""
    backend = Backend(name, backend_url(name))
    yield backend
    await backend.drop_topics()


@pytest_asyncio.fixture(params=enabled_backends())
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    async for value in backend_fixture(request.param):
        yield value


BusFactory = Callable[..., Any]


@pytest_asyncio.fixture
async def open_bus(no_leaks: LeakChecker, backend: Backend) -> AsyncIterator[BusFactory]:
    """``await open_bus(group=..., **options)``: a connected bus, closed after the test
    (before the leak check runs; ``backend`` then deletes the test's topics)."""
    buses: list[keybus.EventBus] = []

    async def factory(group: str | None = None, **options: Any) -> keybus.EventBus:
        bus = await keybus.connect(backend.url, group=group, **options)
        buses.append(bus)
        return bus

    yield factory
    for bus in buses:
        await bus.close(timeout=2.0)
