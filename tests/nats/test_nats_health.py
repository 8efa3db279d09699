"""NATS: ``bus.health()`` reports a server that stopped answering as not ok within its
timeout (never raising), and ok again once the connection is back."""

from __future__ import annotations

import time

import keybus
from tests.conftest import Backend, BusFactory
from tests.helpers import eventually
from tests.nats.proxy import NatsProxy


async def test_health_reports_the_server_away_within_its_timeout_and_back_after(
    nats_proxy: NatsProxy, open_bus: BusFactory, backend: Backend
) -> None:
    bus = await keybus.connect(nats_proxy.url)
    try:
        assert (await bus.health(timeout=5.0)).ok
        nats_proxy.refuse = True  # no reconnect gets through
        nats_proxy.cut()
        began = time.monotonic()
        health = await bus.health(timeout=1.0)
        assert time.monotonic() - began < 1.5
        assert not health.ok
        assert not health.checks["broker"].ok
        nats_proxy.refuse = False

        async def healthy() -> bool:
            return (await bus.health(timeout=1.0)).ok

        await eventually(healthy, timeout=30, what="health ok after the reconnect")
    finally:
        await bus.close(timeout=0.5)
