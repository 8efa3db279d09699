"""A consumer process for the Kafka fault-injection tests.

``python -m tests.kafka._worker URL TOPIC GROUP NAME LOG [HANDLER_DELAY]`` subscribes to
TOPIC's envelopes in GROUP, prints ``ready`` once subscribed, and appends one line per
handled envelope to LOG: ``NAME AGGREGATE VERSION START END`` (wall-clock seconds, so
spans of several processes compare). SIGTERM closes the bus (a graceful leave); SIGKILL
is the crash.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import keybus


async def main(url: str, topic: str, group: str, name: str, path: str, delay: float) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    async def handler(envelope: keybus.Envelope) -> None:
        started = time.time()
        await asyncio.sleep(delay)
        aggregate, version = envelope.aggregate_id, envelope.event_version
        line = f"{name} {aggregate} {version} {started:.6f} {time.time():.6f}\n"
        os.write(fd, line.encode())  # one O_APPEND write per line: no interleaving

    async with keybus.connect(url, group=group) as bus:
        await bus.subscribe_envelope(topic, handler, max_concurrency=64)
        print("ready", flush=True)
        await stop.wait()
    os.close(fd)
    print("closed", flush=True)


if __name__ == "__main__":
    url, topic, group, name, path = sys.argv[1:6]
    delay = float(sys.argv[6]) if len(sys.argv) > 6 else 0.002
    asyncio.run(main(url, topic, group, name, path, delay))
