"""The conformance kit on NATS JetStream (when ``nats`` is in ``KEYBUS_BACKENDS``)."""

from __future__ import annotations

from keybus.testing.conformance import Backend, Conformance
from tests.conformance.backends import descriptor, skip_unless_enabled

skip_unless_enabled("nats")


class TestNats(Conformance):
    def describe_backend(self) -> Backend:
        return descriptor("nats")
