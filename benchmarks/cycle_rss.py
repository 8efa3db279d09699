"""Memory across open/subscribe/publish/close cycles: does anything grow for good?

    .venv/bin/python benchmarks/cycle_rss.py --backend kafka [--cycles 300] [--topics same]
        [--warmup 20] [--envelopes 5] [--max-slope KB] [--trim] [--tracemalloc] [--csv FILE]

One process, one backend (URLs from KEYBUS_KAFKA_URL / KEYBUS_NATS_URL, as the other
benchmarks). Each cycle: ``connect``, ``subscribe_envelope`` to a topic, publish
``--envelopes`` envelopes, poll (with a deadline) until the handler saw them all,
``close()``. ``--backend kafka-raw`` runs the same cycle on bare confluent-kafka with
keybus's librdkafka settings and no keybus code: the baseline that tells keybus's growth
from the client library's.

After each close (and a ``gc.collect()``) it records RSS and its anonymous part
(/proc/self/status); glibc malloc's bytes in use and bytes free but kept in its arenas
(``mallinfo2``: native code's heap, librdkafka's included; in use flat while RSS grows is
fragmentation or allocator caching, in use growing is memory never freed); the objects
the garbage collector tracks; fds; threads; with ``--tracemalloc`` the traced Python heap
too (costly, off by default) and the top growing allocation sites after the warm-up.

``--topics same`` reuses one topic (and one group) for every cycle; ``fresh`` makes a new
topic per cycle, deleting the previous one (its dead-letter topic too), which also makes
the client learn new topic metadata each cycle. An admin bus stays open for the whole run
(it creates and deletes the topics, and keeps a ``memory://`` broker alive between
cycles); it is the same for every cycle, so it adds no slope.

``--trim`` calls glibc's ``malloc_trim(0)`` after each cycle and ``MALLOC_ARENA_MAX=2``
in the environment caps glibc's arenas: diagnostics that tell memory the allocator keeps
from memory never freed.

Growth is the least-squares slope over the cycles after ``--warmup``, per cycle;
``--max-slope`` (kB/cycle) makes the run exit non-zero when the RSS slope exceeds it.
Results and their reading: docs/kafka.md, "Memory across open/close cycles".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import os
import threading
import time
import tracemalloc
import uuid
from array import array

import keybus
from keybus.bench.run import backend_url

_HANDLED_TIMEOUT = 30.0  # s a cycle's envelopes may take to be handled
COLUMNS = ("rss_kb", "anon_kb", "used_kb", "free_kb", "objects", "fds", "threads", "traced_kb")
_MALLINFO2_FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"


class _MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2: ten size_t fields
    _fields_ = [(name, ctypes.c_size_t) for name in _MALLINFO2_FIELDS.split(" ")]


_LIBC = ctypes.CDLL("libc.so.6")  # glibc >= 2.33 (mallinfo2)
_LIBC.mallinfo2.restype = _MallInfo2


def _malloc_kb() -> tuple[int, int]:
    """glibc malloc over all arenas (native code's heap; Python objects live in pymalloc's
    own mmaps): bytes in use, and bytes free but kept in the arenas, in kB. In-use flat
    while RSS grows is fragmentation/caching; in-use growing is memory never freed."""
    info = _LIBC.mallinfo2()
    return (info.uordblks + info.hblkhd) // 1024, info.fordblks // 1024


def _status_kb(*names: str) -> list[int]:
    """Fields of /proc/self/status in kB, in the order asked."""
    found: dict[str, int] = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in names:
                found[name] = int(value.split()[0])
    return [found[name] for name in names]


class Samples:
    """One preallocated column per measure: recording a cycle allocates nothing that
    outlives it, so the harness adds no growth of its own to what it measures."""

    def __init__(self, cycles: int) -> None:
        self.columns = {name: array("q", bytes(8 * cycles)) for name in COLUMNS}
        self.count = 0

    def take(self) -> None:
        rss, anon, threads = _status_kb("VmRSS", "RssAnon", "Threads")
        traced = tracemalloc.get_traced_memory()[0] // 1024 if tracemalloc.is_tracing() else 0
        used, free = _malloc_kb()
        objects, fds = len(gc.get_objects()), len(os.listdir("/proc/self/fd"))
        values = (rss, anon, used, free, objects, fds, threads)
        for name, value in zip(COLUMNS, (*values, traced), strict=True):
            self.columns[name][self.count] = value
        self.count += 1

    def __getitem__(self, name: str) -> list[int]:
        return self.columns[name][: self.count].tolist()


def slope(values: list[int]) -> float:
    """Least-squares slope of ``values`` over their index (units per cycle)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    num = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values))
    return num / sum((x - mean_x) ** 2 for x in range(n))


async def _until(event: asyncio.Event, what: str) -> None:
    try:
        async with asyncio.timeout(_HANDLED_TIMEOUT):
            await event.wait()
    except TimeoutError:
        raise SystemExit(f"{what} not handled within {_HANDLED_TIMEOUT:g} s") from None


async def cycle(url: str, topic: str, group: str, envelopes: int) -> None:
    """connect, subscribe, publish, wait until handled, close."""
    # The same aggregates every cycle, as a service sees: a fresh id per cycle would
    # measure the growth of keybus's bounded per-key caches (key -> partition) instead.
    batch = [
        keybus.Envelope(aggregate_id=f"agg-{n}", event_type="Cycled", event_version=1, payload={})
        for n in range(envelopes)
    ]
    pending = {envelope.event_id for envelope in batch}  # not an earlier cycle's redelivery
    done = asyncio.Event()

    async def handler(envelope: keybus.Envelope) -> None:
        pending.discard(envelope.event_id)
        if not pending:
            done.set()

    async with keybus.connect(url, group=group) as bus:
        await bus.subscribe_envelope(topic, handler)
        for envelope in batch:
            await bus.publish_envelope(topic, envelope)
        await _until(done, f"{envelopes} envelopes of one cycle")


def raw_kafka_cycle(url: str, topic: str, group: str, envelopes: int) -> None:
    """The same cycle on bare confluent-kafka with keybus's librdkafka settings, no keybus
    code: an AdminClient (connect probe, topic create/describe as ``subscribe`` does), a
    Consumer (subscribe, wait for the assignment), a Producer (produce, flush), consume
    until every record was seen, commit, close, drop every handle."""
    # Imported here: the other backends' runs should not load librdkafka at all.
    from confluent_kafka import Consumer, Producer, TopicCollection
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    from keybus.transports.kafka.config import KafkaSettings

    settings = KafkaSettings(url=url)
    admin = AdminClient(settings.admin)
    admin.list_topics(timeout=10)
    names = [topic, f"{topic}.dlq"]
    for future in admin.create_topics([NewTopic(name, 1) for name in names]).values():
        with contextlib.suppress(Exception):  # it exists already
            future.result()
    for future in admin.describe_topics(TopicCollection(names)).values():
        future.result()
    consumer = Consumer({**settings.consumer, "group.id": group})
    assigned = threading.Event()
    consumer.subscribe([topic], on_assign=lambda _consumer, _partitions: assigned.set())
    deadline = time.monotonic() + _HANDLED_TIMEOUT
    while not assigned.is_set() and time.monotonic() < deadline:
        consumer.poll(0.05)
    producer = Producer(settings.producer)
    pending = {uuid.uuid4().bytes for _ in range(envelopes)}
    for n, value in enumerate(pending):
        producer.produce(topic, value, f"agg-{n}")
    producer.flush(_HANDLED_TIMEOUT)
    while pending and time.monotonic() < deadline:
        for record in consumer.consume(500, 0.05):
            pending.discard(record.value())
            consumer.store_offsets(record)  # keybus's config stores offsets explicitly
    if pending:
        raise SystemExit(f"{len(pending)} records not consumed within {_HANDLED_TIMEOUT:g} s")
    consumer.commit(asynchronous=False)
    consumer.close()
    del producer, consumer, admin


async def _drop(admin: keybus.EventBus, topic: str) -> None:
    for name in (topic, f"{topic}.dlq"):
        with contextlib.suppress(keybus.TopicError):
            await admin.delete_topic(name)


async def measure(args: argparse.Namespace) -> Samples:
    url = backend_url(args.backend.removesuffix("-raw"))
    if args.backend == "memory":
        url = "memory://cycle-rss"  # one broker for the run, kept alive by the admin bus
    prefix = f"kb-cycle-rss-{uuid.uuid4().hex[:6]}"
    group = f"{prefix}-group"
    samples = Samples(args.cycles)
    start_snapshot: tracemalloc.Snapshot | None = None
    async with keybus.connect(url) as admin:
        topic = prefix
        try:
            for index in range(args.cycles):
                if args.topics == "fresh" and index:
                    await _drop(admin, topic)
                    topic = f"{prefix}-{index}"
                if args.topics == "fresh" or not index:  # visible before the cycle starts
                    await admin.ensure_topic(topic)
                if args.backend == "kafka-raw":
                    raw_kafka_cycle(url, topic, group, args.envelopes)
                else:
                    await cycle(url, topic, group, args.envelopes)
                gc.collect()
                if args.trim:
                    _LIBC.malloc_trim(0)
                samples.take()
                if args.tracemalloc and index + 1 == args.warmup:
                    start_snapshot = tracemalloc.take_snapshot()
                if args.verbose:
                    print(index, {name: samples[name][-1] for name in COLUMNS}, flush=True)
        finally:
            await _drop(admin, topic)
    if start_snapshot is not None:
        top = tracemalloc.take_snapshot().compare_to(start_snapshot, "lineno")[:10]
        print("tracemalloc, growth since the warm-up:\n" + "\n".join(f"  {s}" for s in top))
    return samples


def report(args: argparse.Namespace, samples: Samples) -> float:
    """Print the table; return the RSS slope (kB/cycle)."""
    arenas = os.environ.get("MALLOC_ARENA_MAX")
    print(
        f"{args.backend}, {samples.count} cycles, topics {args.topics}, {args.envelopes} envelopes"
        f"/cycle{', malloc_trim' if args.trim else ''}"
        f"{f', MALLOC_ARENA_MAX={arenas}' if arenas else ''}"
        f"; slope over cycles {args.warmup + 1}..{samples.count}"
    )
    print(f"  {'':<10} {'first':>10} {'at warm-up':>10} {'last':>10} {'slope/cycle':>12}")
    slopes = {}
    for column in COLUMNS:
        if column == "traced_kb" and not args.tracemalloc:
            continue
        values = samples[column]
        slopes[column] = slope(values[args.warmup :])
        unit = "kB" if column.endswith("_kb") else ""
        print(
            f"  {column:<10} {values[0]:>10,} {values[args.warmup]:>10,} {values[-1]:>10,}"
            f" {slopes[column]:>+9.2f} {unit}"
        )
    return slopes["rss_kb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--backend", choices=("memory", "kafka", "nats", "kafka-raw"), default="memory"
    )
    parser.add_argument("--cycles", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--envelopes", type=int, default=5)
    parser.add_argument("--topics", choices=("same", "fresh"), default="same")
    parser.add_argument("--max-slope", type=float, help="kB/cycle of RSS: above it, exit 1")
    parser.add_argument("--trim", action="store_true", help="malloc_trim(0) after each cycle")
    parser.add_argument("--tracemalloc", action="store_true", help="trace the Python heap")
    parser.add_argument("--csv", help="also write every cycle's sample to this file")
    parser.add_argument("--verbose", action="store_true", help="print every cycle's sample")
    args = parser.parse_args()
    if args.cycles <= args.warmup + 1:
        parser.error("--cycles must exceed --warmup by at least 2")
    if args.tracemalloc:
        tracemalloc.start()
    started = time.monotonic()
    samples = asyncio.run(measure(args))
    rss_slope = report(args, samples)
    if args.csv:
        with open(args.csv, "w") as out:
            out.write("cycle," + ",".join(COLUMNS) + "\n")
            rows = zip(*(samples[name] for name in COLUMNS), strict=True)
            out.writelines(
                f"{i}," + ",".join(map(str, row)) + "\n" for i, row in enumerate(rows, 1)
            )
    print(f"  ({time.monotonic() - started:.0f} s, {threading.active_count()} Python threads)")
    if args.max_slope is not None and rss_slope > args.max_slope:
        raise SystemExit(f"RSS grew {rss_slope:+.2f} kB/cycle > --max-slope {args.max_slope:g}")


if __name__ == "__main__":
    main()
