"""The conformance kit's pub/sub and lifecycle suites on Kafka over TLS with SCRAM-SHA-512
(the test broker's SASL_SSL listener): wherever ``kafka`` runs, or ``kafka-secured``
alone. The other suites exercise the same client and core: the security settings change
only how the connections are made."""

from __future__ import annotations

import pytest

from keybus.testing.conformance import Backend, LifecycleSuite, PubSubSuite
from tests.conformance.backends import descriptor, enabled_backends

if not {"kafka", "kafka-secured"} & set(enabled_backends()):
    pytest.skip("neither kafka nor kafka-secured is in KEYBUS_BACKENDS", allow_module_level=True)


class TestKafkaSecuredPubSub(PubSubSuite):
    def describe_backend(self) -> Backend:
        return descriptor("kafka-secured")


class TestKafkaSecuredLifecycle(LifecycleSuite):
    def describe_backend(self) -> Backend:
        return descriptor("kafka-secured")
