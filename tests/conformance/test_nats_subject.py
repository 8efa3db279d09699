"""The conformance kit on NATS JetStream with every topic in the Go SDK's subject layout
(the subject is the topic, one partition, a group's members stand by for one active
member): runs wherever ``nats`` does (``tests/conformance/backends.py``)."""

from __future__ import annotations

from keybus.testing.conformance import Backend, Conformance
from tests.conformance.backends import descriptor, skip_unless_enabled

skip_unless_enabled("nats-subject")


class TestNatsSubject(Conformance):
    def describe_backend(self) -> Backend:
        return descriptor("nats-subject")
