"""A service for the ``keybus run`` tests, configured by environment variables:
``KEYBUS_TEST_URL``, ``KEYBUS_TEST_GROUP``, ``KEYBUS_TEST_TOPIC``, ``KEYBUS_TEST_LOG`` (a
file: ``ready <pid>`` once running, then ``<pid> <aggregate> <version>`` per handled
envelope, one O_APPEND write each) and ``KEYBUS_TEST_DELAY`` (seconds per handler)."""

from __future__ import annotations

import asyncio
import os

import keybus

_ENV = os.environ
app = keybus.App(
    _ENV.get("KEYBUS_TEST_URL", "memory://sample"),
    group=_ENV.get("KEYBUS_TEST_GROUP", "sample"),
    close_timeout=5.0,
)
_DELAY = float(_ENV.get("KEYBUS_TEST_DELAY", "0.002"))
_LOG = _ENV.get("KEYBUS_TEST_LOG", os.devnull)


def _write(line: str) -> None:
    fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@app.subscribe_envelope(_ENV.get("KEYBUS_TEST_TOPIC", "orders"), max_concurrency=64)
async def on_order(envelope: keybus.Envelope) -> None:
    await asyncio.sleep(_DELAY)
    _write(f"{os.getpid()} {envelope.aggregate_id} {envelope.event_version}\n")


@app.on_startup
def ready() -> None:
    _write(f"ready {os.getpid()}\n")
