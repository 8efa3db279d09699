"""Prometheus metrics of buses: counted in plain Python on the hot path, exposed by one
collector per registry at scrape time.

Why not prometheus-client's own ``Counter``/``Histogram`` objects: each ``inc``/``observe``
takes a lock and, with labels, a look-up — about a microsecond per call, several calls per
message, on an in-memory path that costs a few microseconds in all. Here a message costs a
few integer additions; the collector turns them into metric families when scraped.

Why one collector per registry, shared by every bus that reports to it: two collectors
yielding the same metric name would make a scrape with duplicate families (and
``CollectorRegistry.register`` refuses the second one anyway). Counters and histograms
live per label set (backend, topic, group) for the registry's life, like a
prometheus-client counter's labelled child: two buses of one group add to the same
series, and a closed bus's counts stay (a counter must never go down). The gauges (in
flight, uncommitted, running handlers) are read at scrape time from the subscriptions of
the buses still open: a bus leaves the collector when it closes, so nothing of it is kept.

Updates happen on the event loop's thread; a scrape may run on another
(``prometheus_client.start_http_server``): the collector copies the containers it walks
under a lock, and reads the numbers as they are (a scrape racing a message may see a
histogram's count one ahead of a bucket — Prometheus tolerates it).
"""

from __future__ import annotations

import threading
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Protocol

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from keybus.telemetry.hooks import OUTCOMES

if TYPE_CHECKING:
    from keybus.engine import SubscriptionEngine

__all__ = ["BUCKETS", "Histogram", "Metrics", "PublishMeter", "SubscriptionMeter", "metrics_for"]

# Seconds; from an in-memory handler's fraction of a millisecond to a backlog's minutes.
BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip


_PUBLISH_LABELS = ("backend", "topic")
_LABELS = ("backend", "topic", "group")


class Histogram:
    """Counts per bucket (not cumulative: one addition per observation) and the sum.
    The hot paths (keybus.telemetry.hooks) add to ``counts`` and ``sum`` inline, with
    the bucket ``bisect_left(bounds, seconds)``, as :meth:`observe` does."""

    __slots__ = ("counts", "sum")

    bounds = BUCKETS

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*BUCKETS, float("inf")), list(self.counts), strict=True):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out


class PublishMeter:
    """Publishes of one (backend, topic)."""

    __slots__ = ("duration", "failed", "ok")

    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self.duration = Histogram()


class SubscriptionMeter:
    """Handling of one (backend, topic, group): attempts by outcome (in the order of
    ``hooks.OUTCOMES``), dead letters written, durations."""

    __slots__ = ("dead_letters", "duration", "end_to_end", "outcomes")

    def __init__(self) -> None:
        self.outcomes = [0, 0, 0, 0]
        self.dead_letters = 0
        self.duration = Histogram()
        self.end_to_end = Histogram()


class GaugeSource(Protocol):
    """What a bus shows the collector: its labels, its live subscriptions and its lag
    as last read ((topic, group) -> (records behind, oldest unfinished age))."""

    backend: str

    def engines(self) -> Iterable[SubscriptionEngine]: ...

    def lag(self) -> Mapping[tuple[str, str], tuple[int, float]]: ...


class Metrics:
    """The meters of one registry, and its collector (registered once)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._publish: dict[tuple[str, ...], PublishMeter] = {}
        self._consume: dict[tuple[str, ...], SubscriptionMeter] = {}
        self._sources: set[GaugeSource] = set()

    def publish_meter(self, backend: str, topic: str) -> PublishMeter:
        key = (backend, topic)
        meter = self._publish.get(key)
        if meter is None:
            with self._lock:
                meter = self._publish.setdefault(key, PublishMeter())
        return meter

    def subscription_meter(self, backend: str, topic: str, group: str) -> SubscriptionMeter:
        key = (backend, topic, group)
        meter = self._consume.get(key)
        if meter is None:
            with self._lock:
                meter = self._consume.setdefault(key, SubscriptionMeter())
        return meter

    def add_source(self, source: GaugeSource) -> None:
        with self._lock:
            self._sources.add(source)

    def remove_source(self, source: GaugeSource) -> None:
        with self._lock:
            self._sources.discard(source)

    # -- the prometheus-client Collector protocol ---------------------------------------

    def describe(self) -> Iterator[Metric]:
        """The names this collector yields, so a registry refuses a clashing collector."""
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            publish = list(self._publish.items())
            consume = list(self._consume.items())
            sources = list(self._sources)
        yield from self._families(publish, consume, sources)

    def _families(
        self,
        publish: list[tuple[tuple[str, ...], PublishMeter]] | None = None,
        consume: list[tuple[tuple[str, ...], SubscriptionMeter]] | None = None,
        sources: list[GaugeSource] | None = None,
    ) -> Iterator[Metric]:
        publish, consume = publish or [], consume or []
        published = CounterMetricFamily(
            "keybus_published",
            "Messages published (acknowledged by the broker, or failed).",
            labels=(*_PUBLISH_LABELS, "outcome"),
        )
        publish_duration = HistogramMetricFamily(
            "keybus_publish_duration_seconds",
            "From publish() to the broker's acknowledgement (or the failure).",
            labels=_PUBLISH_LABELS,
        )
        for labels, pm in publish:
            published.add_metric((*labels, "ok"), pm.ok)
            published.add_metric((*labels, "failed"), pm.failed)
            publish_duration.add_metric(labels, pm.duration.cumulative(), pm.duration.sum)
        handled = CounterMetricFamily(
            "keybus_handled",
            "Handling attempts by outcome: ok, retried (failed, tried again), dead_lettered "
            "(failed its last attempt), abandoned (cancelled by a revoke or a close).",
            labels=(*_LABELS, "outcome"),
        )
        dead_letters = CounterMetricFamily(
            "keybus_dead_letters",
            "Dead letters written by the subscription (undecodable envelopes included).",
            labels=_LABELS,
        )
        duration = HistogramMetricFamily(
            "keybus_handler_duration_seconds",
            "One handling attempt (the handler and its middleware).",
            labels=_LABELS,
        )
        end_to_end = HistogramMetricFamily(
            "keybus_end_to_end_latency_seconds",
            "From the envelope's timestamp (a raw message: its record timestamp) to the "
            "start of its handling.",
            labels=_LABELS,
        )
        for labels, sm in consume:
            for outcome, count in zip(OUTCOMES, list(sm.outcomes), strict=True):
                handled.add_metric((*labels, outcome), count)
            dead_letters.add_metric(labels, sm.dead_letters)
            duration.add_metric(labels, sm.duration.cumulative(), sm.duration.sum)
            end_to_end.add_metric(labels, sm.end_to_end.cumulative(), sm.end_to_end.sum)
        yield from (published, publish_duration, handled, dead_letters, duration, end_to_end)
        yield from _gauges(sources or [])


_GAUGES: tuple[tuple[str, str, Callable[[SubscriptionEngine], int]], ...] = (
    (
        "keybus_in_flight_messages",
        "Messages taken from the broker and not yet done (handled or dead-lettered).",
        lambda engine: engine.in_flight,
    ),
    (
        "keybus_uncommitted_messages",
        "Messages taken in and not yet committed (done ones held behind an unfinished one).",
        lambda engine: engine.uncommitted,
    ),
    (
        "keybus_running_handlers",
        "Handlers running right now.",
        lambda engine: engine.running,
    ),
)


_LAG_GAUGES = (
    (
        "keybus_lag_messages",
        "Records the group has not committed (the broker's end minus the group's "
        "committed position), summed over the topic's partitions; read every "
        "lag_interval seconds.",
    ),
    (
        "keybus_lag_age_seconds",
        "Age of the oldest record this process has taken in and not finished (since the "
        "broker stored it; 0: none), the oldest over the topic's partitions; read every "
        "lag_interval seconds.",
    ),
)


def _gauges(sources: list[GaugeSource]) -> Iterator[Metric]:
    """The gauges of the open buses' live subscriptions, summed per label set (two buses
    of one group in one process are one series, as their counters are); the lag of each
    as last read (a group's count lag is the broker's: the same from each of its buses,
    so it is taken once; the age is the oldest of any)."""
    totals: dict[tuple[str, ...], list[int]] = {}
    lag: dict[tuple[str, ...], tuple[int, float]] = {}
    for source in sources:
        live: set[tuple[str, str]] = set()
        for engine in list(source.engines()):
            labels: tuple[str, ...] = (source.backend, engine.topic, engine.group)
            live.add((engine.topic, engine.group))
            row = totals.setdefault(labels, [0, 0, 0])
            for i, (_, _, read) in enumerate(_GAUGES):
                row[i] += read(engine)
        for (topic, group), (count, age) in source.lag().items():
            if (topic, group) in live:  # not one unsubscribed since the last read
                labels = (source.backend, topic, group)
                seen = lag.get(labels, (0, 0.0))
                lag[labels] = (max(seen[0], count), max(seen[1], age))
    for i, (name, doc, _) in enumerate(_GAUGES):
        family = GaugeMetricFamily(name, doc, labels=_LABELS)
        for labels, row in totals.items():
            family.add_metric(labels, row[i])
        yield family
    for i, (name, doc) in enumerate(_LAG_GAUGES):
        family = GaugeMetricFamily(name, doc, labels=_LABELS)
        for labels, values in lag.items():
            family.add_metric(labels, values[i])
        yield family


_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, Metrics] = weakref.WeakKeyDictionary()
_by_registry_lock = threading.Lock()


def metrics_for(registry: CollectorRegistry | None) -> Metrics:
    """The one :class:`Metrics` of ``registry`` (None: prometheus-client's default
    registry), registered with it on first use."""
    registry = REGISTRY if registry is None else registry
    with _by_registry_lock:
        metrics = _by_registry.get(registry)
        if metrics is None:
            metrics = Metrics()
            registry.register(metrics)
            _by_registry[registry] = metrics
    return metrics
