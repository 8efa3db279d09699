"""A group member process of the fault-injection test::

    python -m tests.faults.member URL TOPIC GROUP NAME LOG SEED

Subscribes to TOPIC's envelopes in GROUP, prints ``ready`` once subscribed, and handles
each envelope in a random 0-20 ms (``random.Random(SEED)``). It appends one JSON line per
event to LOG, each written with one ``O_APPEND`` write as it happens (so a SIGKILL loses
at most the line being written), times from ``time.monotonic()`` (``CLOCK_MONOTONIC``,
one clock for every process on the machine):

- ``start``: a handler began: ``seq`` and the fields of ``tests.faults.history.Run`` up
  to ``start`` (the fence and position from ``keybus.current_delivery()``);
- ``end``: it finished: ``seq``, ``end`` and ``outcome`` (``ok``, or ``cancelled`` when
  the core cancelled it: a revoke that ran out of time, or a lapsed ownership);
- ``lapse``: the core logged that this member's ownership of a partition lapsed;
- ``assign``: the core was assigned a partition (one line per partition).

SIGTERM closes the bus (a graceful leave) and prints ``closed``; SIGKILL is the crash.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import random
import signal
import sys
import time
from typing import Any

import keybus
from keybus.engine import SubscriptionEngine

MAX_DELAY = 0.020


class Log:
    """The member's event log: one line per ``write``, never buffered."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, **record: Any) -> None:
        os.write(self.fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())

    def close(self) -> None:
        os.close(self.fd)


class LapseWatch(logging.Handler):
    """Turns the warnings that say an ownership ended into records: the core's
    "ownership of (topic, partition) lapsed" and the NATS member's "topic/group: lease
    not renewed" (every partition of the topic) — the only moments a member itself knows
    its ownership ended."""

    def __init__(self, log: Log, member: str) -> None:
        super().__init__(logging.WARNING)
        self.log = log
        self.member = member

    def emit(self, record: logging.LogRecord) -> None:
        at = time.monotonic()
        text, args = str(record.msg), record.args
        if not isinstance(args, tuple) or not args:
            return
        if "lapsed" in text and isinstance(args[0], tuple):
            topic, partition = args[0]
        elif "lease not renewed" in text:
            topic, partition = args[0], None
        else:
            return
        self.log.write(ev="lapse", member=self.member, topic=topic, partition=partition, at=at)


def watch_assignments(log: Log, member: str) -> None:
    """Log every partition the core is assigned (white-box: the core's ``Sink.assign``
    is the one moment every transport reports, in this process)."""
    original = SubscriptionEngine.assign

    def assign(engine: SubscriptionEngine, partitions: Any, **options: Any) -> None:
        at = time.monotonic()
        for topic, partition in partitions:
            log.write(ev="assign", member=member, topic=topic, partition=partition, at=at)
        original(engine, partitions, **options)

    SubscriptionEngine.assign = assign  # type: ignore[method-assign]


async def main(url: str, topic: str, group: str, name: str, path: str, seed: int) -> None:
    log = Log(path)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    logging.getLogger("keybus").addHandler(LapseWatch(log, name))
    watch_assignments(log, name)
    delays = random.Random(seed)
    sequence = itertools.count()
    pid = os.getpid()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    async def handler(envelope: keybus.Envelope) -> None:
        delivery = keybus.current_delivery()
        seq = next(sequence)
        log.write(
            ev="start",
            seq=seq,
            member=name,
            pid=pid,
            topic=delivery.topic,
            partition=delivery.partition,
            offset=delivery.offset,
            attempt=delivery.attempt,
            aggregate=envelope.aggregate_id,
            version=envelope.event_version,
            fence=delivery.fence,
            start=time.monotonic(),
        )
        outcome = "cancelled"
        try:
            await asyncio.sleep(delays.uniform(0, MAX_DELAY))
            outcome = "ok"
        finally:
            log.write(ev="end", seq=seq, end=time.monotonic(), outcome=outcome)

    async with keybus.connect(url, group=group) as bus:
        await bus.subscribe_envelope(topic, handler)
        print("ready", flush=True)
        await stop.wait()
    log.close()
    print("closed", flush=True)


if __name__ == "__main__":
    url, topic, group, name, path, seed = sys.argv[1:7]
    asyncio.run(main(url, topic, group, name, path, int(seed)))
