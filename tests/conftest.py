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
        name = unique(label)
        self.topics.append(name)
        self.topics.append(f"{name}.dlq")
        return name


@pytest.fixture(params=enabled_backends())
def backend(request: pytest.FixtureRequest) -> Backend:
    return Backend(request.param, backend_url(request.param))


BusFactory = Callable[..., Any]


@pytest_asyncio.fixture
async def open_bus(no_leaks: LeakChecker, backend: Backend) -> AsyncIterator[BusFactory]:
    """``await open_bus(group=..., **options)``: a connected bus, closed after the test
    (before the leak check runs), with the test's topics deleted."""
    buses: list[keybus.EventBus] = []

    async def factory(group: str | None = None, **options: Any) -> keybus.EventBus:
        bus = await keybus.connect(backend.url, group=group, **options)
        buses.append(bus)
        return bus

    yield factory
    for bus in buses:
        await bus.close(timeout=2.0)
    if backend.topics:
        async with keybus.connect(backend.url) as admin:
            for topic in backend.topics:
                await admin.delete_topic(topic)
