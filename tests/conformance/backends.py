"""The backends this repository runs the conformance kit on, each with its features, and
which of them are enabled (``KEYBUS_BACKENDS``: memory only by default; ``make test``
sets ``memory,kafka,nats``; ``KEYBUS_KAFKA_URL`` / ``KEYBUS_NATS_URL`` move the brokers)."""

from __future__ import annotations

import os

import pytest

from keybus.bench.scenario import backend_url
from keybus.testing.conformance import Backend, Features
from keybus.testing.conformance.helpers import unused_port

ALL_BACKENDS = ("memory", "kafka", "nats")

FEATURES = {
    # A partitioned log in the process, shaped like Kafka: groups, rebalances, committed
    # offsets that outlive a member while the broker (any bus of that name) is open. A
    # crashed intake is reported; the subscription stalls until reopened.
    "memory": Features(max_message_bytes=1_048_576),
    # librdkafka places keys with fnv1a_random (the transport's setting), as keybus and
    # the Go SDK's sarama do; if the transport changes it, partition_for changes here.
    # The fence is the group generation in which the partition was assigned.
    "kafka": Features(),
    # Leases per partition; a crashed pull task makes the member re-take its partition.
    # The fence is the revision of the group-state write that claimed the partition; the
    # limit is nats-server's default max_payload (payload plus header block).
    "nats": Features(retakes_crashed_partition=True, max_message_bytes=1_048_576),
}


def enabled_backends() -> list[str]:
    """Backends the suite runs on: ``KEYBUS_BACKENDS`` (comma separated), default memory
    only; ``make test`` enables the brokers it starts."""
    names = [b.strip() for b in os.environ.get("KEYBUS_BACKENDS", "memory").split(",")]
    unknown = set(names) - set(ALL_BACKENDS)
    if unknown:
        raise pytest.UsageError(f"unknown backends in KEYBUS_BACKENDS: {sorted(unknown)}")
    return [b for b in names if b]


def skip_unless_enabled(name: str) -> None:
    """Skip the calling test module unless ``name`` is in ``KEYBUS_BACKENDS``."""
    if name not in enabled_backends():
        pytest.skip(f"{name} is not in KEYBUS_BACKENDS", allow_module_level=True)


def descriptor(name: str) -> Backend:
    """The backend ``name`` under test: its URL (a fresh broker name for memory), its
    features and, for a broker, a URL of its scheme on a port nothing listens on."""
    url = backend_url(name)
    unreachable = None if name == "memory" else f"{name}://127.0.0.1:{unused_port()}"
    return Backend(name, url, FEATURES[name], unreachable)
