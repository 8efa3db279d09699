"""Names on the NATS side: streams, subjects, durable consumers, group-state keys.

Topics match ``[A-Za-z0-9._-]{1,249}`` but stream and consumer names may not contain
``.`` and a subject token may not either, so names are *escaped*: ``A-Za-z0-9-`` stay,
every other byte becomes ``_`` + two hex digits. The mapping is injective (every ``_``
in the output starts an escape), so ``a.b`` (``a_2eb``) and ``a_2eb`` cannot collide: the latter
escapes to ``a_5f2eb``. Very long results are shortened with a hash; shortened names are
longer than any unshortened one, so the two kinds never collide either.
"""

from __future__ import annotations

import hashlib
import re

__all__ = [
    "GROUPS_BUCKET",
    "GROUPS_STREAM",
    "consumer_name",
    "escape",
    "group_key",
    "group_keys_subject",
    "is_group_durable",
    "ping_subject",
    "stream_name",
    "subject_base",
    "token",
]

GROUPS_BUCKET = "KEYBUS_GROUPS"
"""The JetStream key-value bucket holding each (topic, group)'s members and leases."""
GROUPS_STREAM = f"KV_{GROUPS_BUCKET}"
"""The stream behind :data:`GROUPS_BUCKET` (JetStream's naming of key-value buckets)."""

_KEEP = re.compile(r"[A-Za-z0-9-]")
_MAX_PLAIN = 80  # escaped names up to this length are used as is
_HASHED_PREFIX = 47  # hashed: 47 chars of the escape + "_" + 33 hex digits = 81 chars


def escape(text: str) -> str:
    """Injective escape into ``[A-Za-z0-9_-]``."""
    out: list[str] = []
    for char in text:
        if _KEEP.fullmatch(char):
            out.append(char)
        else:
            out.extend(f"_{byte:02x}" for byte in char.encode())
    return "".join(out)


def token(text: str) -> str:
    """``escape(text)``, shortened with a hash when long (stream names end up in file
    paths, so they stay short). Shortened tokens are exactly ``_MAX_PLAIN + 1`` long, plain
    ones at most ``_MAX_PLAIN``: the two kinds cannot collide."""
    escaped = escape(text)
    if len(escaped) <= _MAX_PLAIN:
        return escaped
    digest = hashlib.sha256(text.encode()).hexdigest()[: _MAX_PLAIN - _HASHED_PREFIX]
    return f"{escaped[:_HASHED_PREFIX]}_{digest}"


def stream_name(topic: str) -> str:
    return f"KB_{token(topic)}"


def subject_base(topic: str) -> str:
    """Records of partition ``p`` go to ``f"{subject_base(topic)}.{p}"``."""
    return f"kb.{token(topic)}"


def consumer_name(group: str, partition: int) -> str:
    # "_p" cannot come out of escape() ("_" is always followed by two hex digits), so the
    # suffix is unambiguous.
    return f"{token(group)}_p{partition}"


_GROUP_DURABLE = re.compile(r"[A-Za-z0-9_-]+_p[0-9]+_[0-9a-f]{8}")


def is_group_durable(name: str) -> bool:
    """Whether ``name`` is one of a group's durables: ``consumer_name(...)`` plus an
    epoch of 8 hex digits (``GroupMember`` makes one per take-over)."""
    return _GROUP_DURABLE.fullmatch(name) is not None


def group_key(topic: str, group: str) -> str:
    """The key of one (topic, group)'s state in :data:`GROUPS_BUCKET`."""
    return f"{token(topic)}.{token(group)}"


def group_keys_subject(topic: str) -> str:
    """The subject of every group's state of ``topic`` in :data:`GROUPS_STREAM` (to purge
    them when the topic is deleted)."""
    return f"$KV.{GROUPS_BUCKET}.{token(topic)}.>"


def ping_subject(topic: str, group: str) -> str:
    """Core-NATS subject on which members of a group nudge each other to rebalance now."""
    return f"kb-coord.{token(topic)}.{token(group)}"
