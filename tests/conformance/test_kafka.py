"""The conformance kit on Kafka (when ``kafka`` is in ``KEYBUS_BACKENDS``)."""

from __future__ import annotations

from keybus.testing.conformance import Backend, Conformance
from tests.conformance.backends import descriptor, skip_unless_enabled

skip_unless_enabled("kafka")


class TestKafka(Conformance):
    def describe_backend(self) -> Backend:
        return descriptor("kafka")
