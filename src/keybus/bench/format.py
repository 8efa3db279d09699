"""How figures are written, the same in the terminal table and in the HTML report."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "LEFTOVER_LABELS",
    "leftovers",
    "long_series",
    "number",
    "series",
    "spread_text",
    "verdict",
]

LEFTOVER_LABELS = {"tasks": "tasks", "threads": "threads", "native_threads": "native", "fds": "fds"}
RAW_NAMES = {"kafka": "raw confluent-kafka", "nats": "raw nats-py"}


def series(backend: str, client: str) -> str:
    """``kafka`` for keybus on Kafka, ``kafka raw`` for its baseline."""
    return backend if client == "keybus" else f"{backend} raw"


def long_series(backend: str, client: str) -> str:
    return f"keybus on {backend}" if client == "keybus" else RAW_NAMES.get(backend, client)


def number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def spread_text(
    spread: Mapping[str, float | None] | None, digits: int = 0, *, newline: bool = False
) -> str:
    """``median (min-max)``, just the median when every run gave the same figure;
    ``newline``: the range on a line of its own."""
    if not spread or spread.get("median") is None:
        return "-"
    median = number(spread["median"], digits)
    low, high = number(spread["min"], digits), number(spread["max"], digits)
    if low == high:
        return median
    return f"{median}\n{low}-{high}" if newline else f"{median} ({low}-{high})"


def leftovers(counts: Mapping[str, int]) -> str:
    """``0`` when nothing was left after close, else what was, by kind."""
    left = {k: v for k, v in counts.items() if v}
    return (
        "0" if not left else ", ".join(f"{v} {LEFTOVER_LABELS.get(k, k)}" for k, v in left.items())
    )


def verdict(entry: Mapping[str, Any]) -> str:
    """``ok`` or ``FAILED`` with how many runs were ok."""
    runs, good = entry["runs"], entry["ok_runs"]
    word = "ok" if entry["ok"] else "FAILED"
    return word if runs == 1 else f"{word} {good}/{runs}"
