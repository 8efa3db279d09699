"""One result row per level x backend x client (x repeat), their summary over repeats
(medians with min-max, the overhead against the raw client paired run by run), and
``results.json``."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keybus.bench.resources import KINDS
from keybus.bench.stats import spread

__all__ = ["Row", "summarize", "write_json"]

PERCENTILES = ("p50", "p95", "p99", "max")


def _empty_latency() -> dict[str, float | None]:
    return dict.fromkeys(PERCENTILES)


@dataclass
class Row:
    backend: str  # memory, kafka, nats
    client: str  # keybus, or raw (confluent-kafka / nats-py without a bus)
    level: str
    repeat: int
    messages: int
    aggregates: int
    topics: int
    partitions: int
    payload_bytes: int
    handler_ms: float
    delivered: int = 0
    lost: int = 0
    duplicates: int = 0
    order_violations: int = 0
    publish_rate: float = 0.0  # messages / (last ack - first publish)
    throughput: float = 0.0  # messages / (last handled - first publish)
    publish_seconds: float = 0.0
    end_to_end_seconds: float = 0.0
    latency_ms: dict[str, float | None] = field(default_factory=_empty_latency)
    envelope_latency_ms: dict[str, float | None] = field(default_factory=_empty_latency)
    cpu_s_per_1k: float = 0.0
    broker_cpu_s_per_1k: float | None = None
    rss_mb: dict[str, float] = field(default_factory=dict)
    resources: dict[str, dict[str, int]] = field(default_factory=dict)
    leftovers: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    leftover_report: str = ""
    load_average: dict[str, list[float] | None] = field(default_factory=dict)
    error: str | None = None
    cleanup_error: str | None = None

    @property
    def ok(self) -> bool:
        """Everything delivered, in order, and nothing left behind after close."""
        return (
            self.error is None
            and self.lost == 0
            and self.delivered == self.messages
            and self.order_violations == 0
            and not any(self.leftovers.values())
            and not self.leftover_report
        )

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.level, self.backend, self.client)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ok": self.ok}


def _overhead(keybus_rows: Sequence[Row], raw_rows: Sequence[Row]) -> dict[str, float | None]:
    """keybus throughput / raw throughput, paired by repeat (the same round)."""
    raw = {r.repeat: r.throughput for r in raw_rows if r.throughput}
    return spread(r.throughput / raw[r.repeat] for r in keybus_rows if r.repeat in raw)


def summarize(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """One entry per level x backend x client, in the order they first ran."""
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault(row.key, []).append(row)
    out = []
    for (level, backend, client), runs in groups.items():
        first = runs[0]
        raw = groups.get((level, backend, "raw"), []) if client == "keybus" else []
        out.append(
            {
                "level": level,
                "backend": backend,
                "client": client,
                "runs": len(runs),
                "ok_runs": sum(r.ok for r in runs),
                "ok": all(r.ok for r in runs),
                "messages": first.messages,
                "aggregates": first.aggregates,
                "topics": first.topics,
                "partitions": first.partitions,
                "lost": sum(r.lost for r in runs),
                "duplicates": sum(r.duplicates for r in runs),
                "order_violations": sum(r.order_violations for r in runs),
                "publish_rate": spread(r.publish_rate for r in runs),
                "throughput": spread(r.throughput for r in runs),
                "latency_ms": {p: spread(r.latency_ms[p] for r in runs) for p in PERCENTILES},
                "envelope_latency_ms": {
                    p: spread(r.envelope_latency_ms[p] for r in runs) for p in PERCENTILES
                },
                "cpu_s_per_1k": spread(r.cpu_s_per_1k for r in runs),
                "broker_cpu_s_per_1k": spread(r.broker_cpu_s_per_1k for r in runs),
                "rss_mb": {
                    when: spread(r.rss_mb.get(when) for r in runs)
                    for when in ("before", "peak", "after")
                },
                "resources": {
                    kind: {
                        when: spread(r.resources.get(kind, {}).get(when) for r in runs)["median"]
                        for when in ("before", "peak", "after")
                    }
                    for kind in KINDS
                },
                "leftovers": {kind: max(r.leftovers.get(kind, 0) for r in runs) for kind in KINDS},
                "overhead_vs_raw": _overhead(runs, raw) if raw else None,
                "errors": [r.error for r in runs if r.error],
            }
        )
    return out


def write_json(
    path: Path, rows: Sequence[Row], environment: dict[str, Any], meta: dict[str, Any]
) -> dict[str, Any]:
    document = {
        **meta,
        "environment": environment,
        "rows": [row.to_json() for row in rows],
        "summary": summarize(rows),
    }
    path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    return document
