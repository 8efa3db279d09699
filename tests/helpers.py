"""Shared test helpers: the conformance kit's, ``keybus.testing.conformance.helpers``
(polling with a deadline, collecting handlers, keys on given partitions, order checks)."""

from keybus.testing.conformance.helpers import *  # noqa: F403
