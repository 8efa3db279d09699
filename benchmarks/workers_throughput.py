"""Consume throughput beyond one process: ``keybus run --workers 1`` next to
``--workers 2`` on a pre-filled topic, in one run.

    make brokers
    .venv/bin/python benchmarks/workers_throughput.py --backend kafka [--envelopes 100000]
                                                      [--partitions 6] [--runs 2]

Each run pre-fills a fresh topic (``publish_many``, 1000 aggregates), starts ``keybus run
benchmarks.consume_app:app --workers N`` with a fresh group, and polls the group's lag
(``bus.lag``, read from the broker) until it is 0: throughput = envelopes / (lag 0 -
process start), so it includes the workers' start and group join (reported apart: the
time until the first commit). The sides alternate from run to run; medians are shown
side by side. On this machine the broker shares the two cores with the workers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import time
import uuid
from pathlib import Path

import keybus
from keybus.bench.scenario import backend_url

ROOT = Path(__file__).resolve().parents[1]


async def one_run(url: str, envelopes: int, partitions: int, workers: int) -> tuple[float, float]:
    """(envelopes/s from process start to lag 0, seconds until the first commit)."""
    topic = f"kb-workers-{uuid.uuid4().hex[:8]}"
    group = f"{topic}-g"
    async with keybus.connect(url) as bus:
        await bus.ensure_topic(topic, keybus.TopicConfig(partitions=partitions))
        items = [
            keybus.Envelope(
                aggregate_id=f"agg-{i % 1000}",
                event_type="E",
                event_version=i // 1000 + 1,
                payload={},
            )
            for i in range(envelopes)
        ]
        for at in range(0, envelopes, 5000):
            await bus.publish_many(topic, items[at : at + 5000])
        env = {
            **os.environ,
            "KEYBUS_BENCH_URL": url,
            "KEYBUS_BENCH_TOPIC": topic,
            "KEYBUS_BENCH_GROUP": group,
        }
        command = [sys.executable, "-m", "keybus", "run", "benchmarks.consume_app:app"]
        command += ["--workers", str(workers), "--log-level", "WARNING"]
        started = time.perf_counter()
        process = await asyncio.create_subprocess_exec(*command, cwd=ROOT, env=env)
        first_commit = None
        try:
            while True:
                lag = await bus.lag(topic, group=group)
                if first_commit is None and lag.total < envelopes:
                    first_commit = time.perf_counter() - started
                if lag.total == 0:
                    break
                if time.perf_counter() - started > 600:
                    raise SystemExit("the workers did not catch up within 600 s")
                await asyncio.sleep(0.05)
            took = time.perf_counter() - started
        finally:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 60)
        await bus.delete_topic(topic)
        await bus.delete_topic(f"{topic}.dlq")
    return envelopes / took, first_commit or took


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="kafka", help="kafka or nats")
    parser.add_argument("--envelopes", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    url = backend_url(args.backend)
    rows: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    for run in range(args.runs):
        for workers in (1, 2) if run % 2 == 0 else (2, 1):
            rate, first = await one_run(url, args.envelopes, args.partitions, workers)
            rows[workers].append((rate, first))
            print(
                f"run {run + 1}, {workers} worker(s): {rate:,.0f} envelopes/s "
                f"(first commit after {first:.1f} s)",
                flush=True,
            )
    one = statistics.median(r for r, _ in rows[1])
    two = statistics.median(r for r, _ in rows[2])
    print(
        f"\n{args.backend}, {args.envelopes:,} envelopes, {args.partitions} partitions, "
        f"median of {args.runs}: 1 worker {one:,.0f}/s, 2 workers {two:,.0f}/s, "
        f"ratio {two / one:.2f} (load average {os.getloadavg()[0]:.1f})"
    )


if __name__ == "__main__":
    asyncio.run(main())
