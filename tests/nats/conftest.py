"""NATS-only tests: they run when ``nats`` is in ``KEYBUS_BACKENDS`` (a server on
``KEYBUS_NATS_URL``, default ``nats://127.0.0.1:4222``; ``tools/nats/nats.sh up``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from keybus.testing import LeakChecker
from tests.conftest import Backend, backend_fixture, enabled_backends
from tests.nats.proxy import NatsProxy

NATS_ENABLED = "nats" in enabled_backends()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if NATS_ENABLED:
        return
    skip = pytest.mark.skip(reason="NATS tests need nats in KEYBUS_BACKENDS")
    for item in items:
        if "tests/nats/" in str(item.path):
            item.add_marker(skip)


@pytest_asyncio.fixture
async def backend() -> AsyncIterator[Backend]:
    """Only NATS here: overrides the suite-wide backend parametrisation."""
    async for value in backend_fixture("nats"):
        yield value


@pytest_asyncio.fixture
async def nats_proxy(no_leaks: LeakChecker, backend: Backend) -> AsyncIterator[NatsProxy]:
    """A TCP proxy in front of the server (``tests/nats/proxy.py``). Request it before
    ``open_bus``, so buses are closed before the proxy and the leak check after both."""
    async with NatsProxy(backend.url) as proxy:
        yield proxy
