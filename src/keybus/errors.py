"""The keybus error tree. Every error keybus raises derives from :class:`KeybusError`,
and the same event raises the same type on every backend (each transport translates
its client library's errors at its boundary, in ``transports/<backend>/errors.py``)::

    KeybusError
    ├── ConnectError      connecting failed (unknown scheme, unreachable broker,
    │                     refused credentials), or the connection is gone for good
    ├── BusClosedError    the bus or subscription is closed (or closing) and no longer
    │                     does what was asked
    ├── EnvelopeError     an envelope is invalid or cannot be decoded (also a ValueError)
    ├── PublishError      the broker refused a record or did not acknowledge it in time
    │   └── PublishBatchError  some records of a publish_many batch were not published
    ├── TopicError        creating, describing, deleting or listing topics failed
    ├── SubscribeError    a subscription could not join its group or get its partitions
    └── ConfigError       a configuration (file, mapping, environment) is invalid: names
                          the key, the value (secrets masked) and what was expected
                          (also a ValueError)

Where a client library's exception was the cause, it is chained (``__cause__``). Bad
arguments (a non-bytes value, an unknown option) are Python's own ``TypeError`` /
``ValueError``: programming errors, not events.
"""

from __future__ import annotations

from typing import Literal

from keybus.security import redact_url

__all__ = [
    "Action",
    "BusClosedError",
    "ConfigError",
    "ConnectError",
    "EnvelopeError",
    "KeybusError",
    "PublishBatchError",
    "PublishError",
    "ReplayError",
    "SubscribeError",
    "TopicError",
    "error_for",
]

Action = Literal["connect", "publish", "subscribe", "create", "describe", "delete", "list"]
"""What a transport was doing when it failed: decides the error's type."""


class KeybusError(Exception):
    """Base class of every keybus error."""


class ConnectError(KeybusError):
    """The URL's scheme is unknown, its broker could not be reached in time, or the
    connection to it is gone."""

    def __init__(self, url: str, reason: str) -> None:
        url = redact_url(url)  # whoever raises it, no credentials in the text
        super().__init__(f"cannot connect to {url!r}: {reason}")
        self.url = url
        self.reason = reason


class BusClosedError(KeybusError):
    """The bus (or subscription) was closed; it no longer publishes or subscribes."""


class EnvelopeError(KeybusError, ValueError):
    """An envelope is invalid or its bytes cannot be decoded; names the field at fault."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class PublishError(KeybusError):
    """The broker refused a message or did not acknowledge it in time (cause chained).
    ``permanent``: sending the same record again cannot succeed (too large, refused for
    good), as opposed to a broker that is away or slow."""

    def __init__(self, topic: str, reason: str, *, permanent: bool = False) -> None:
        super().__init__(f"publish to {topic!r} failed: {reason}")
        self.topic = topic
        self.reason = reason
        self.permanent = permanent


class PublishBatchError(PublishError):
    """``publish_many``: some records of a batch were not published. ``errors`` is
    index-aligned with the items (``None`` where the record was acknowledged, else its
    :class:`PublishError`); ``failed`` counts the failures."""

    def __init__(self, topic: str, errors: list[PublishError | None]) -> None:
        failed = [e for e in errors if e is not None]
        first = failed[0].reason if failed else "none"
        super().__init__(
            topic,
            f"{len(failed)} of {len(errors)} records not published (first: {first})",
            permanent=all(e.permanent for e in failed),
        )
        self.errors = errors
        self.failed = len(failed)


class TopicError(KeybusError):
    """Creating, describing, deleting or listing topics failed (cause chained).
    ``action`` is ``"create"``, ``"describe"``, ``"delete"`` or ``"list"`` (``topic``
    then empty)."""

    def __init__(self, topic: str, action: str, reason: str) -> None:
        what = f"topic {topic!r}" if topic else "topics"
        super().__init__(f"cannot {action} {what}: {reason}")
        self.topic = topic
        self.action = action
        self.reason = reason


class ConfigError(KeybusError, ValueError):
    """A configuration is invalid. ``key`` is the dotted key (``topic_config.partitions``;
    empty when the whole source is at fault), ``value`` the value as shown (a secret's
    masked), ``reason`` what was expected."""

    def __init__(self, key: str, value: str, reason: str) -> None:
        where = f"configuration key {key!r}" if key else "configuration"
        shown = f" = {value}" if value else ""
        super().__init__(f"{where}{shown}: {reason}")
        self.key = key
        self.value = value
        self.reason = reason


class SubscribeError(KeybusError):
    """A subscription could not join its consumer group or get its partitions in time
    (cause chained)."""

    def __init__(self, topic: str, group: str, reason: str) -> None:
        super().__init__(f"cannot subscribe to {topic!r} in group {group!r}: {reason}")
        self.topic = topic
        self.group = group
        self.reason = reason


class ReplayError(KeybusError):
    """A replay of a parked key stopped at a message that failed again: the key stays
    parked from that message on (``handled`` messages before it were handed)."""

    def __init__(self, key: str, handled: int, reason: str) -> None:
        super().__init__(f"replay of key {key!r} failed after {handled} message(s): {reason}")
        self.key = key
        self.handled = handled
        self.reason = reason


def error_for(action: Action, subject: str, reason: str, *, group: str = "") -> KeybusError:
    """The error a transport raises when ``action`` on ``subject`` (the URL for
    ``connect``, else the topic; ``group`` for ``subscribe``) failed for ``reason``: one
    mapping, so every backend raises the same type for the same event. The transport
    chains its client's exception."""
    if action == "publish":
        return PublishError(subject, reason)
    if action == "connect":
        return ConnectError(subject, reason)
    if action == "subscribe":
        return SubscribeError(subject, group, reason)
    return TopicError(subject, action, reason)
