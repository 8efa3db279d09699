"""Consumer groups: the names buses get when they are given none."""

from __future__ import annotations

import uuid

__all__ = ["ANONYMOUS_GROUP_PREFIX", "anonymous_group", "is_anonymous"]

ANONYMOUS_GROUP_PREFIX = "keybus-anon-"
"""Groups of buses made without ``group=``: private to one bus, so a transport may drop
their state (offsets, durables) once their last member leaves."""


def anonymous_group() -> str:
    """A fresh private group: a bus without ``group=`` sees every message (fan-out)."""
    return f"{ANONYMOUS_GROUP_PREFIX}{uuid.uuid4().hex[:12]}"


def is_anonymous(group: str) -> bool:
    return group.startswith(ANONYMOUS_GROUP_PREFIX)
