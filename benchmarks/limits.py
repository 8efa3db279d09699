"""The two limits the performance issue keeps: memory per million envelopes, and close
with stuck handlers. Exits 1 if either is outside its bound.

    .venv/bin/python benchmarks/limits.py [--backends memory,kafka,nats]
                                          [--envelopes 1000000] [--stuck 20] [--timeout 2]

- **Memory**: on the memory backend, one ordered envelope subscription handles
  ``--envelopes`` envelopes over 1000 aggregates, published in batches; the resident set
  (after a full collection) is read once 100k (at most half) have been handled and again
  at the end. The growth per million envelopes must stay within ``--max-growth`` MiB
  (default 1). (The memory backend trims a partition's committed prefix: what grows would
  be the bus.)
- **Close**: on every backend listed, ``--stuck`` aggregates whose handlers never return,
  then ``close(timeout=--timeout)``: it must return within timeout + 0.2 s, and the
  process must hold no task, thread or fd it did not hold before connecting
  (``keybus.testing.LeakChecker``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
import uuid

import keybus
from keybus.bench.resources import rss_mb
from keybus.bench.run import backend_url, broker_answers
from keybus.testing import LeakChecker

AGGREGATES = 1000
BATCH = 5000


def _rss_mb() -> float:
    gc.collect()
    return rss_mb()


async def memory_growth(envelopes: int) -> tuple[float, float, float]:
    """(RSS at the mark, RSS at the end, growth per million envelopes), in MiB."""
    url = backend_url("memory")
    topic = f"kb-limits-{uuid.uuid4().hex[:8]}"
    handled = 0
    mark = min(100_000, envelopes // 2)  # (the first ~50k are warm-up)
    reached = asyncio.Event()
    done = asyncio.Event()
    moved = asyncio.Event()  # set every 1000 handled

    async def handler(envelope: keybus.Envelope) -> None:
        nonlocal handled
        handled += 1
        if handled % 1000 == 0:
            moved.set()
        if handled == mark:
            reached.set()
        if handled == envelopes:
            done.set()

    async with keybus.connect(url, group="limits") as bus:
        await bus.subscribe_envelope(topic, handler)
        versions = [0] * AGGREGATES
        first = 0.0
        for start in range(0, envelopes, BATCH):
            items = []
            for n in range(start, min(envelopes, start + BATCH)):
                aggregate = n % AGGREGATES
                versions[aggregate] += 1
                items.append(
                    keybus.Envelope(
                        aggregate_id=f"agg-{aggregate}",
                        event_type="Tick",
                        event_version=versions[aggregate],
                        payload={"n": n},
                    )
                )
            await bus.publish_many(topic, items)
            if not first and reached.is_set():
                first = _rss_mb()
            # Keep the backlog bounded: what is measured is what the bus keeps, not a
            # queue of a million envelopes the publisher ran ahead with.
            while handled < start - 4 * BATCH:
                moved.clear()
                await asyncio.wait_for(moved.wait(), 60)
        await asyncio.wait_for(done.wait(), 600)
        last = _rss_mb()
        await bus.delete_topic(topic)
    return first, last, (last - first) / ((envelopes - mark) / 1e6)


async def close_with_stuck(url: str, stuck: int, timeout: float) -> tuple[float, str]:
    """Seconds ``close(timeout)`` took with ``stuck`` handlers that never return, and what
    was left behind ('' if nothing)."""
    topic = f"kb-limits-close-{uuid.uuid4().hex[:8]}"
    checker = LeakChecker(timeout=10.0)
    checker.start()
    running: set[str] = set()
    all_running = asyncio.Event()

    async def handler(envelope: keybus.Envelope) -> None:
        running.add(envelope.aggregate_id)
        if len(running) == stuck:
            all_running.set()
        await asyncio.Event().wait()  # stuck for good

    bus = await keybus.connect(url, group=topic)
    try:
        await bus.subscribe_envelope(topic, handler, max_concurrency=stuck)
        await bus.publish_many(
            topic,
            [
                keybus.Envelope(
                    aggregate_id=f"stuck-{i}", event_type="Tick", event_version=1, payload={}
                )
                for i in range(stuck)
            ],
        )
        await asyncio.wait_for(all_running.wait(), 60)
    finally:
        started = time.perf_counter()
        await bus.close(timeout=timeout)
        took = time.perf_counter() - started
    async with keybus.connect(url) as admin:
        await admin.delete_topic(topic)
    try:
        await checker.check()
    except Exception as exc:  # LeakError: report it as the result
        return took, str(exc)
    return took, ""


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="memory,kafka,nats")
    parser.add_argument("--envelopes", type=int, default=1_000_000)
    parser.add_argument("--max-growth", type=float, default=1.0, help="MiB per million")
    parser.add_argument("--stuck", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args()
    failed = False

    first, last, growth = await memory_growth(args.envelopes)
    mark = min(100_000, args.envelopes // 2)
    ok = growth <= args.max_growth
    failed |= not ok
    print(
        f"memory: RSS {first:.1f} MiB after {mark:,} envelopes, {last:.1f} MiB "
        f"after {args.envelopes:,}: {growth:+.2f} MiB per million "
        f"(bound {args.max_growth:g}) {'ok' if ok else 'FAILED'}",
        flush=True,
    )
    for backend in args.backends.split(","):
        url = backend_url(backend)
        if backend != "memory" and (why := await broker_answers(url)) is not None:
            print(f"close on {backend}: skipped ({why})", flush=True)
            continue
        took, left = await close_with_stuck(url, args.stuck, args.timeout)
        ok = took <= args.timeout + 0.2 and not left
        failed |= not ok
        print(
            f"close on {backend}: {args.stuck} stuck handlers, close(timeout={args.timeout:g}) "
            f"took {took:.2f} s (bound {args.timeout + 0.2:g}), "
            f"{'nothing left' if not left else 'LEFT: ' + left} {'ok' if ok else 'FAILED'}",
            flush=True,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
