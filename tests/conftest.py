"""Fixtures shared by every test. The conformance suite brings its own (the kit's
classes); these serve the backend-specific tests (``tests/kafka``, ``tests/nats``), which
override ``backend`` with theirs, and anything else that wants every enabled backend."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from hypothesis import settings

from keybus.testing import LeakChecker
from keybus.testing.conformance import Backend, BusFactory, bus_factory, unique
from tests.conformance.backends import ALL_BACKENDS, descriptor, enabled_backends

__all__ = [
    "ALL_BACKENDS",
    "Backend",
    "BusFactory",
    "backend_fixture",
    "enabled_backends",
    "unique",
]

# Property tests check what the codec does, not how fast: Hypothesis's default 200 ms
# deadline per example would turn a GC pause or a busy CI core into a failure.
settings.register_profile("keybus", deadline=None, print_blob=True)
settings.load_profile("keybus")


async def backend_fixture(name: str) -> AsyncIterator[Backend]:
    """The body of every ``backend`` fixture: topics made with ``backend.topic()`` are
    deleted at teardown, whether the test passed or not."""
    backend = descriptor(name)
    yield backend
    await backend.drop_topics()


@pytest_asyncio.fixture(params=enabled_backends())
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    async for value in backend_fixture(request.param):
        yield value


@pytest_asyncio.fixture
async def open_bus(no_leaks: LeakChecker, backend: Backend) -> AsyncIterator[BusFactory]:
    """``await open_bus(group=..., **options)``: a connected bus, closed after the test
    (before the leak check runs; ``backend`` then deletes the test's topics)."""
    async with bus_factory(backend.url) as factory:
        yield factory
