"""The fixtures every suite class uses: ``backend`` (a fresh :class:`Backend` per test,
its topics deleted afterwards) and ``open_bus`` (connects buses to it, closes them before
the leak check), plus ``no_leaks`` from keybus's pytest plugin."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, ClassVar, Protocol

import pytest
import pytest_asyncio

import keybus
from keybus.testing.conformance.backend import Backend
from keybus.testing.conformance.features import Features
from keybus.testing.leaks import LeakChecker

__all__ = ["BackendFixtures", "BusFactory", "bus_factory"]


class BusFactory(Protocol):
    """``await open_bus(group=None, **options)``: a bus connected to the backend under
    test (the options are :func:`keybus.connect`'s)."""

    async def __call__(self, group: str | None = None, **options: Any) -> keybus.EventBus: ...


@contextlib.asynccontextmanager
async def bus_factory(url: str, *, close_timeout: float = 2.0) -> AsyncIterator[BusFactory]:
    """A :class:`BusFactory` for ``url``; every bus it opened is closed on exit."""
    buses: list[keybus.EventBus] = []

    async def factory(group: str | None = None, **options: Any) -> keybus.EventBus:
        bus = await keybus.connect(url, group=group, **options)
        buses.append(bus)
        return bus

    try:
        yield factory
    finally:
        for bus in buses:
            await bus.close(timeout=close_timeout)


@pytest.mark.asyncio
class BackendFixtures:
    """Base of every suite class: a subclass names the backend under test, either with
    class attributes (``url``, ``features``, ``unreachable_url``) or, for a URL that must
    be fresh per test, by overriding :meth:`describe_backend`."""

    url: ClassVar[str | None] = None
    features: ClassVar[Features] = Features()
    unreachable_url: ClassVar[str | None] = None

    def describe_backend(self) -> Backend:
        """The backend under test, made anew for each test."""
        if self.url is None:
            raise TypeError(f"{type(self).__name__}: set `url` or override describe_backend()")
        return Backend.at(self.url, self.features, self.unreachable_url)

    @pytest_asyncio.fixture
    async def backend(self) -> AsyncIterator[Backend]:
        """The backend descriptor; the topics a test made on it are deleted afterwards."""
        backend = self.describe_backend()
        yield backend
        await backend.drop_topics()

    @pytest_asyncio.fixture
    async def open_bus(self, no_leaks: LeakChecker, backend: Backend) -> AsyncIterator[BusFactory]:
        """Buses on the backend, closed when the test ends; then ``backend`` deletes the
        test's topics, and ``no_leaks`` (set up first, torn down last) checks for leaks."""
        async with bus_factory(backend.url) as factory:
            yield factory
