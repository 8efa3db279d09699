"""The conformance kit's publish/subscribe and lifecycle parts on NATS over TLS (a
private CA) with decentralised auth (a ``.creds`` file): the secured server of
``tools/nats/secured.sh``, wherever ``nats`` runs (``tests/conformance/backends.py``)."""

from __future__ import annotations

from keybus.testing.conformance import Backend, LifecycleSuite, PubSubSuite
from tests.conformance.backends import descriptor, skip_unless_enabled

skip_unless_enabled("nats-secured")


class TestNatsSecured(PubSubSuite, LifecycleSuite):
    def describe_backend(self) -> Backend:
        return descriptor("nats-secured")
