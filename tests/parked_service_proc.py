"""A service with a parking subscription, in a process of its own, for the ``keybus dlq``
tests::

    python -m tests.parked_service_proc URL TOPIC GROUP BROKEN_FILE

Its envelope handler fails for good on the ``aggregate version`` pairs listed in
``BROKEN_FILE`` (one per line, read at every call: the test "fixes the handler" by
emptying it). Prints ``ready`` once subscribed and ``handled <aggregate> <version>`` for
every envelope handled, flushed at once. SIGTERM closes the bus and ends it.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path


async def main(url: str, topic: str, group: str, broken_file: Path) -> None:
    import keybus

    async with keybus.connect(url, group=group) as bus:

        async def handler(envelope: keybus.Envelope) -> None:
            pair = f"{envelope.aggregate_id} {envelope.event_version}"
            if pair in broken_file.read_text().splitlines():  # noqa: ASYNC240 (tiny)
                raise RuntimeError(f"cannot apply {pair}")
            sys.stdout.write(f"handled {pair}\n")
            sys.stdout.flush()

        await bus.subscribe_envelope(
            topic, handler, on_dead_letter="park", max_attempts=2, retry_backoff=0.01
        )
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await stop.wait()  # SIGTERM: the bus closes, leaving the group at once


if __name__ == "__main__":
    url, topic, group, broken = sys.argv[1:5]
    asyncio.run(main(url, topic, group, Path(broken)))
