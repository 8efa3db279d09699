"""Reading the workers' shared log: ``NAME AGGREGATE VERSION START END`` per line."""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Handled:
    name: str
    aggregate: str
    version: int
    start: float
    end: float


def read(path: Path) -> list[Handled]:
    if not path.exists():
        return []
    out: list[Handled] = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 5:  # a line cut by SIGKILL mid-write is not a handled envelope
            out.append(Handled(parts[0], parts[1], int(parts[2]), float(parts[3]), float(parts[4])))
    return out


def by_aggregate(entries: list[Handled]) -> dict[str, list[Handled]]:
    grouped: dict[str, list[Handled]] = defaultdict(list)
    for entry in entries:
        grouped[entry.aggregate].append(entry)
    return grouped


def overlaps(entries: list[Handled]) -> list[str]:
    """Places where one aggregate was handled by two members at the same time."""
    found: list[str] = []
    for aggregate, spans in by_aggregate(entries).items():
        spans = sorted(spans, key=lambda h: h.start)
        for a, b in itertools.pairwise(spans):
            if b.start < a.end:
                found.append(f"{aggregate}: {a.name} v{a.version} and {b.name} v{b.version}")
    return found
