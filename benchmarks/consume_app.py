"""The service ``benchmarks/workers_throughput.py`` runs with ``keybus run``: an ordered
envelope handler that does nothing, on ``KEYBUS_BENCH_URL`` / ``KEYBUS_BENCH_TOPIC`` /
``KEYBUS_BENCH_GROUP``."""

from __future__ import annotations

import os

import keybus

app = keybus.App(
    os.environ.get("KEYBUS_BENCH_URL", "memory://"),
    group=os.environ.get("KEYBUS_BENCH_GROUP", "bench"),
)


@app.subscribe_envelope(os.environ.get("KEYBUS_BENCH_TOPIC", "bench"), max_concurrency=1024)
async def handle(envelope: keybus.Envelope) -> None:
    pass
