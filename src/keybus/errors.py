"""The keybus error hierarchy: every error the library raises derives from KeybusError."""

from __future__ import annotations


class KeybusError(Exception):
    """Base class of every keybus error."""


class ConnectError(KeybusError):
    """The URL's scheme is unknown or its broker could not be reached in time."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot connect to {url!r}: {reason}")
        self.url = url
        self.reason = reason


class EnvelopeError(KeybusError, ValueError):
    """An envelope is invalid or its bytes cannot be decoded; names the field at fault."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class BusClosedError(KeybusError):
    """The bus (or subscription) was closed; it no longer publishes or subscribes."""


class PublishError(KeybusError):
    """The broker refused a message or did not acknowledge it in time (cause chained)."""

    def __init__(self, topic: str, reason: str) -> None:
        super().__init__(f"publish to {topic!r} failed: {reason}")
        self.topic = topic
        self.reason = reason
