"""A group member process for the fault tests::

    python -m tests.member_proc URL TOPIC GROUP OPTIONS_JSON

``OPTIONS_JSON``: ``shift`` (seconds added to ``time.time()`` for the whole process,
from its start: a wall clock that is wrong), ``delay`` (seconds each handler takes,
awaited), and any ``keybus.connect`` options (``lease_ttl``, ``heartbeat``, ...).

Prints ``ready`` once subscribed, ``tick <time.monotonic()>`` every 0.1 s while its event
loop runs (so the parent knows when a resumed process ran again), and for every handler
run two lines, flushed at once::

    start <partition> <offset> <fence> <aggregate> <version> <time.monotonic()>
    end   <partition> <offset> <fence> <aggregate> <version> <time.monotonic()>

``time.monotonic()`` is the machine's ``CLOCK_MONOTONIC`` (never shifted), so the parent
can compare these moments with its own and with other members'.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any


def shift_wall_clock(seconds: float) -> None:
    """Make ``time.time()`` wrong by ``seconds`` for everything in this process."""
    real = time.time

    def shifted() -> float:
        return real() + seconds

    time.time = shifted


async def main(url: str, topic: str, group: str, options: dict[str, Any]) -> None:
    import keybus  # after the clock was shifted, so nothing holds the real one

    delay = float(options.pop("delay", 0.001))
    options.pop("shift", None)

    def say(what: str, delivery: keybus.Delivery, envelope: keybus.Envelope) -> None:
        sys.stdout.write(
            f"{what} {delivery.partition} {delivery.offset} {delivery.fence} "
            f"{envelope.aggregate_id} {envelope.event_version} {time.monotonic():.6f}\n"
        )
        sys.stdout.flush()

    async with keybus.connect(url, group=group, **options) as bus:

        async def handler(envelope: keybus.Envelope) -> None:
            delivery = keybus.current_delivery()
            say("start", delivery, envelope)
            await asyncio.sleep(delay)
            say("end", delivery, envelope)

        await bus.subscribe_envelope(topic, handler, max_concurrency=64)
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        while True:  # until killed
            await asyncio.sleep(0.1)
            sys.stdout.write(f"tick {time.monotonic():.6f}\n")
            sys.stdout.flush()


if __name__ == "__main__":
    url, topic, group, raw = sys.argv[1:5]
    parsed = json.loads(raw)
    if parsed.get("shift"):
        shift_wall_clock(float(parsed["shift"]))
    asyncio.run(main(url, topic, group, parsed))
