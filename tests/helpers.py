"""Shared test helpers: the conformance kit's, ``keybus.testing.conformance.helpers``
(polling with a deadline, collecting handlers, keys on given partitions, order checks)."""

from keybus.testing.conformance import Backend
from keybus.testing.conformance.helpers import *  # noqa: F403


def system_label(backend: Backend) -> str:
    """The backend label keybus reports for a conformance backend: its transport's name
    (nats-subject and nats-secured are NATS, kafka-secured is Kafka)."""
    return backend.name.split("-")[0]
