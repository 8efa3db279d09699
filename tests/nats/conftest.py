"""NATS-only tests: they run when ``nats`` is in ``KEYBUS_BACKENDS`` (a server on
``KEYBUS_NATS_URL``, default ``nats://127.0.0.1:4222``; ``tools/nats/nats.sh up``)."""

from __future__ import annotations

import pytest

from tests.conftest import Backend, backend_url, enabled_backends

NATS_ENABLED = "nats" in enabled_backends()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if NATS_ENABLED:
        return
    skip = pytest.mark.skip(reason="NATS tests need nats in KEYBUS_BACKENDS")
    for item in items:
        if "tests/nats/" in str(item.path):
            item.add_marker(skip)


@pytest.fixture
def backend() -> Backend:
    """Only NATS here: overrides the suite-wide backend parametrisation."""
    return Backend("nats", backend_url("nats"))
