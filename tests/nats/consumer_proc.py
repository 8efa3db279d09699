"""A consumer process for the crash tests: ``python -m tests.nats.consumer_proc URL TOPIC
GROUP [BLOCK_AT]``. Prints ``ready`` once subscribed, then ``<aggregate> <version>`` per
handled envelope (flushed at once, so the parent sees exactly what finished before it
SIGKILLs us). ``BLOCK_AT`` = ``agg:version`` makes that envelope's handler hang forever,
so it stays unacknowledged."""

from __future__ import annotations

import asyncio
import sys

import keybus

# Short leases so the survivor takes over quickly; a long ack_wait so that JetStream's own
# redelivery cannot be what saves the day (the take-over must do it).
OPTIONS = {"lease_ttl": 1.5, "heartbeat": 0.3, "ack_wait": 60.0}


async def main(url: str, topic: str, group: str, block_at: str | None) -> None:
    async with keybus.connect(url, group=group, **OPTIONS) as bus:

        async def handler(envelope: keybus.Envelope) -> None:
            if f"{envelope.aggregate_id}:{envelope.event_version}" == block_at:
                await asyncio.Event().wait()
            await asyncio.sleep(0.001)
            sys.stdout.write(f"{envelope.aggregate_id} {envelope.event_version}\n")
            sys.stdout.flush()

        await bus.subscribe_envelope(topic, handler, max_concurrency=64)
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    args = sys.argv[1:]
    asyncio.run(main(args[0], args[1], args[2], args[3] if len(args) > 3 else None))
