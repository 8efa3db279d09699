"""What a run saw, counted honestly: percentiles, and delivered / lost / duplicates /
order violations each on its own; the clock is real timestamps, never a sleep."""

from __future__ import annotations

import asyncio
import statistics
import time
from array import array
from collections.abc import Iterable, Sequence

__all__ = ["Deliveries", "Tracker", "latency_summary", "percentile", "spread"]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of already sorted values (NaN when empty)."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def latency_summary(values_s: Iterable[float]) -> dict[str, float | None]:
    """p50, p95, p99 and max in milliseconds of latencies given in seconds."""
    ordered = sorted(values_s)
    if not ordered:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    return {
        "p50": percentile(ordered, 0.50) * 1000,
        "p95": percentile(ordered, 0.95) * 1000,
        "p99": percentile(ordered, 0.99) * 1000,
        "max": ordered[-1] * 1000,
    }


class Deliveries:
    """What a benchmark's handler saw, per aggregate: distinct envelopes, duplicates and
    order violations (a first delivery of a version lower than one already handled),
    each counted on its own; what never came is ``expected - delivered``."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, int]] = set()
        self.last: dict[str, int] = {}
        self.duplicates = 0
        self.order_violations = 0

    @property
    def delivered(self) -> int:
        return len(self.seen)

    def record(self, aggregate: str, version: int) -> bool:
        """Note one handler call; True if this (aggregate, version) is new."""
        key = (aggregate, version)
        if key in self.seen:
            self.duplicates += 1
            return False
        self.seen.add(key)
        if version < self.last.get(aggregate, 0):
            self.order_violations += 1
        self.last[aggregate] = version
        return True


class Tracker:
    """One run's clock and counts, for ``counts[i]`` versions of aggregate ``i``.

    Publishers call :meth:`published` just before each publish call and :meth:`acked`
    when it returned (the broker's ack); handlers call :meth:`started` on entry and
    :meth:`finished` on return. Compact per-aggregate arrays, so a million messages cost
    a few bytes each. Times are ``perf_counter`` (publish call -> handler start) and wall
    clock nanoseconds (envelope timestamp -> handler start), both in this process.
    """

    def __init__(self, counts: Sequence[int]) -> None:
        self.expected = sum(counts)
        self._sent = [array("d", bytes(8 * (n + 1))) for n in counts]
        self._stamps = [array("q", bytes(8 * (n + 1))) for n in counts]
        self._seen = [bytearray(n + 1) for n in counts]
        self._last = [0] * len(counts)
        self.published_count = 0
        self.delivered = 0  # distinct (aggregate, version) whose handler started
        self.completed = 0  # distinct ones whose handler returned
        self.duplicates = 0
        self.order_violations = 0
        self.first_publish = 0.0
        self.last_ack = 0.0
        self.last_handled = 0.0
        self.cpu_start = 0.0
        self.cpu_end = 0.0
        self.latencies = array("d")  # publish call -> handler start, s
        self.stamp_latencies = array("d")  # envelope timestamp -> handler start, s
        self.done = asyncio.Event()

    def begin(self) -> None:
        """The clock starts: the first publish call comes next."""
        self.cpu_start = time.process_time()
        self.first_publish = time.perf_counter()

    def published(self, aggregate: int, version: int, stamp_ns: int) -> None:
        self._sent[aggregate][version] = time.perf_counter()
        self._stamps[aggregate][version] = stamp_ns
        self.published_count += 1

    def acked(self) -> None:
        self.last_ack = time.perf_counter()

    def started(self, aggregate: int, version: int) -> bool:
        """A handler call begins; True if this (aggregate, version) is new."""
        now = time.perf_counter()
        wall = time.time_ns()
        sent = self._sent[aggregate][version]
        if sent:
            self.latencies.append(now - sent)
            self.stamp_latencies.append((wall - self._stamps[aggregate][version]) / 1e9)
        seen = self._seen[aggregate]
        if seen[version]:
            self.duplicates += 1
            return False
        seen[version] = 1
        if version < self._last[aggregate]:
            self.order_violations += 1
        self._last[aggregate] = max(version, self._last[aggregate])
        self.delivered += 1
        return True

    def finished(self, new: bool) -> None:
        """The handler call :meth:`started` returned ``new`` for has returned."""
        if not new:
            return
        self.last_handled = time.perf_counter()
        self.completed += 1
        if self.completed == self.expected:
            self.stop_clock()
            self.done.set()

    def stop_clock(self) -> None:
        if not self.cpu_end:
            self.cpu_end = time.process_time()

    async def wait(self, timeout: float) -> bool:
        """Until every expected message was handled (True) or ``timeout`` s (False)."""
        try:
            await asyncio.wait_for(self.done.wait(), timeout)
        except TimeoutError:
            self.stop_clock()
            return False
        return True

    @property
    def lost(self) -> int:
        return self.expected - self.delivered

    @property
    def publish_rate(self) -> float:
        """messages / (last ack - first publish)."""
        span = self.last_ack - self.first_publish
        return self.published_count / span if self.published_count and span > 0 else 0.0

    @property
    def throughput(self) -> float:
        """messages / (last handled - first publish)."""
        span = self.last_handled - self.first_publish
        return self.completed / span if self.completed and span > 0 else 0.0

    @property
    def cpu_s_per_1k(self) -> float:
        return (self.cpu_end - self.cpu_start) * 1000 / self.expected


def spread(values: Iterable[float | None]) -> dict[str, float | None]:
    """``{"median", "min", "max"}`` of one figure over repeats (None where none ran)."""
    present = [v for v in values if v is not None]
    if not present:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(present), "min": min(present), "max": max(present)}
