"""The backends this repository runs the conformance kit on, each with its features, and
which of them are enabled (``KEYBUS_BACKENDS``: memory only by default; ``make test``
sets ``memory,kafka,nats``; ``KEYBUS_KAFKA_URL`` / ``KEYBUS_NATS_URL`` move the brokers).

``nats-subject`` is NATS with every topic in the Go SDK's subject layout (the
``subject_topics`` option): it runs on the same server wherever ``nats`` does, or alone
when ``KEYBUS_BACKENDS`` names it. ``nats-secured`` is NATS over TLS (a private CA) with
a ``.creds`` file, on the secured server of ``tools/nats/secured.sh`` (``make test``
starts it): it runs wherever ``nats`` does, and is skipped, saying why, when that server
is not running.

``kafka-secured`` is Kafka over the test broker's SASL_SSL listener (SCRAM-SHA-512 over
TLS from a throw-away CA, ``tools/kafka/secured.sh``): its pub/sub and lifecycle suites
run wherever ``kafka`` does (``test_kafka_secured.py``), or alone when
``KEYBUS_BACKENDS`` names it."""

from __future__ import annotations

import os
from typing import Any

import pytest

import keybus
from keybus.bench.scenario import backend_url
from keybus.testing.conformance import Backend, Features
from keybus.testing.conformance.helpers import unused_port
from tests.nats.secured import require_secured

ALL_BACKENDS = ("memory", "kafka", "nats", "nats-subject", "nats-secured", "kafka-secured")
# The URL scheme of "nats-subject": a NATS transport with every topic in the subject
# layout, registered by register_nats_subject() (suite tests connect by URL alone).
NATS_SUBJECT_SCHEME = "natssubject"
# The URL scheme of "nats-secured": tls:// with the CA and the .creds file baked in.
NATS_SECURED_SCHEME = "natssecured"
# The URL scheme of "kafka-secured": Kafka with the secured listener's TLS and SASL
# settings baked in, registered by register_kafka_secured().
KAFKA_SECURED_SCHEME = "kafkasecured"

FEATURES = {
    # A partitioned log in the process, shaped like Kafka: groups, rebalances, committed
    # offsets that outlive a member while the broker (any bus of that name) is open. A
    # crashed intake is reported; the subscription stalls until reopened.
    # Memory and NATS keep every record of a topic (nothing compacts by key): the version
    # guard's versions live in the subscription only.
    "memory": Features(dedupe=True, max_message_bytes=1_048_576, stored_versions=False),
    # librdkafka places keys with fnv1a_random (the transport's setting), as keybus and
    # the Go SDK's sarama do; if the transport changes it, partition_for changes here.
    # The fence is the group generation in which the partition was assigned. The limit
    # is librdkafka's producer message.max.bytes (1,000,000 by default), smaller than the
    # broker's message.max.bytes (1,048,588 by default; tools/kafka/kafka.sh keeps it).
    # librdkafka counts value, key, header names and values and up to 36 bytes of record
    # framing (plus two length bytes per header) against it. No de-duplication by
    # event id on Kafka: dedupe_window is refused at connect.
    "kafka": Features(max_message_bytes=1_000_000),
    # The same broker and client, over TLS with SCRAM-SHA-512.
    "kafka-secured": Features(max_message_bytes=1_000_000),
    # Leases per partition; a crashed pull task makes the member re-take its partition.
    # The fence is the revision of the group-state write that claimed the partition; the
    # limit is nats-server's default max_payload (payload plus header block). dedupe:
    # JetStream's duplicate window (Nats-Msg-Id).
    "nats": Features(
        retakes_crashed_partition=True,
        dedupe=True,
        max_message_bytes=1_048_576,
        stored_versions=False,
    ),
    # The same transport, every topic one subject (one partition): a group has one active
    # member, the others stand by; every key on partition 0.
    "nats-subject": Features(
        single_active_member=True,
        partition_for=lambda key, partitions: 0,
        retakes_crashed_partition=True,
        dedupe=True,
        max_message_bytes=1_048_576,
        stored_versions=False,
    ),
}
# The same transport and server software as "nats", over TLS with decentralised auth.
FEATURES["nats-secured"] = FEATURES["nats"]


def register_nats_subject() -> None:
    """Serve ``natssubject://host:port`` with a NATS transport (on that server) that
    lays out every topic (``>``) as the Go SDK does."""
    from keybus.transports.nats import NatsTransport, SubjectLayout

    def factory(url: str, **options: Any) -> NatsTransport:
        # (The transport connects to nats://host:port whatever the URL's scheme.)
        return NatsTransport(url, subject_topics={">": SubjectLayout()}, **options)

    keybus.register_transport(NATS_SUBJECT_SCHEME, factory)


def register_nats_secured(servers: dict[str, dict[str, Any]]) -> str:
    """Serve ``natssecured://host:port`` with a NATS transport over TLS (the servers'
    private CA) that logs in with the ``.creds`` file; returns the secured server's URL
    in that scheme."""
    from keybus.transports.nats import NatsTransport

    creds = servers["creds"]

    def factory(url: str, **options: Any) -> NatsTransport:
        address = url.split("://", 1)[1]
        return NatsTransport(
            f"tls://{address}",
            tls=keybus.TLS(ca_file=creds["ca_file"]),
            credentials=creds["credentials"],
            **options,
        )

    keybus.register_transport(NATS_SECURED_SCHEME, factory)
    return f"{NATS_SECURED_SCHEME}://" + creds["url"].split("://", 1)[1]


def register_kafka_secured() -> str:
    """Serve ``kafkasecured://host:port`` with a Kafka transport that connects with the
    test broker's CA and SCRAM user; returns the SASL_SSL listener's URL in that scheme.
    Skips the caller when the broker has no secured listeners."""
    from keybus.transports.kafka import KafkaTransport
    from tests.kafka.secured import secured_file, secured_kafka

    secured = secured_kafka()
    if secured is None:
        pytest.skip(f"the test broker has no secured listeners ({secured_file()} is missing)")

    def factory(url: str, **options: Any) -> KafkaTransport:
        return KafkaTransport(url, tls=secured.tls(), sasl=secured.scram, **options)

    keybus.register_transport(KAFKA_SECURED_SCHEME, factory)
    return f"{KAFKA_SECURED_SCHEME}://" + secured.sasl_ssl.split("://", 1)[1]


def enabled_backends() -> list[str]:
    """Backends the suite runs on: ``KEYBUS_BACKENDS`` (comma separated), default memory
    only; ``make test`` enables the brokers it starts."""
    names = [b.strip() for b in os.environ.get("KEYBUS_BACKENDS", "memory").split(",")]
    unknown = set(names) - set(ALL_BACKENDS)
    if unknown:
        raise pytest.UsageError(f"unknown backends in KEYBUS_BACKENDS: {sorted(unknown)}")
    if "nats" in names:
        for variant in ("nats-subject", "nats-secured"):  # the other layout; TLS + creds
            if variant not in names:
                names.append(variant)
    return [b for b in names if b]


def skip_unless_enabled(name: str) -> None:
    """Skip the calling test module unless ``name`` is in ``KEYBUS_BACKENDS``."""
    if name not in enabled_backends():
        pytest.skip(f"{name} is not in KEYBUS_BACKENDS", allow_module_level=True)


def descriptor(name: str) -> Backend:
    """The backend ``name`` under test: its URL (a fresh broker name for memory), its
    features and, for a broker, a URL of its scheme on a port nothing listens on."""
    if name == "kafka-secured":
        url = register_kafka_secured()
        unreachable = f"{KAFKA_SECURED_SCHEME}://127.0.0.1:{unused_port()}"
        return Backend(name, url, FEATURES[name], unreachable)
    if name == "nats-subject":
        register_nats_subject()
        url = f"{NATS_SUBJECT_SCHEME}://" + backend_url("nats").split("://", 1)[1]
        unreachable = f"{NATS_SUBJECT_SCHEME}://127.0.0.1:{unused_port()}"
        return Backend(name, url, FEATURES[name], unreachable)
    if name == "nats-secured":
        url = register_nats_secured(require_secured())
        unreachable = f"{NATS_SECURED_SCHEME}://127.0.0.1:{unused_port()}"
        return Backend(name, url, FEATURES[name], unreachable)
    url = backend_url(name)
    unreachable = None if name == "memory" else f"{name}://127.0.0.1:{unused_port()}"
    return Backend(name, url, FEATURES[name], unreachable)
