"""The conformance kit on the in-memory backend (when ``memory`` is in
``KEYBUS_BACKENDS``, as it is by default)."""

from __future__ import annotations

from keybus.testing.conformance import Backend, Conformance
from tests.conformance.backends import descriptor, skip_unless_enabled

skip_unless_enabled("memory")


class TestMemory(Conformance):
    def describe_backend(self) -> Backend:
        return descriptor("memory")
