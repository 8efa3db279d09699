"""``await bus.health()``: is the bus fit to serve — for a readiness probe.

Named checks, each with ``ok``, a line a person reads and the figures behind it: the
broker (a round trip, bounded by the call's timeout: an unreachable broker is reported,
never raised), each subscription (running or stopping, when records last came in and a
commit point was last reported) and the publisher (records handed to the client and not
yet acknowledged).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Check", "Health"]


@dataclass(frozen=True, slots=True)
class Check:
    """One named check."""

    name: str
    ok: bool
    detail: str
    values: Mapping[str, float | int | str | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Health:
    """``ok`` only when every check is."""

    backend: str
    checks: Mapping[str, Check]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks.values())
