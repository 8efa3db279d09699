"""The whole conformance suite as one base class."""

from __future__ import annotations

from keybus.testing.conformance.suite_batches import BatchSuite
from keybus.testing.conformance.suite_dedupe import DedupeSuite
from keybus.testing.conformance.suite_delivery import DeliverySuite
from keybus.testing.conformance.suite_errors import ErrorsSuite
from keybus.testing.conformance.suite_failures import FailuresSuite
from keybus.testing.conformance.suite_lifecycle import LifecycleSuite
from keybus.testing.conformance.suite_limits import LimitsSuite
from keybus.testing.conformance.suite_middleware import MiddlewareSuite
from keybus.testing.conformance.suite_observe import ObserveSuite
from keybus.testing.conformance.suite_parking import ParkingSuite
from keybus.testing.conformance.suite_pubsub import PubSubSuite
from keybus.testing.conformance.suite_robustness import RobustnessSuite

__all__ = ["Conformance"]


# pytest runs inherited tests base by base in reverse MRO: listed last, run first.
class Conformance(
    BatchSuite,
    ParkingSuite,
    ObserveSuite,
    DeliverySuite,
    MiddlewareSuite,
    ErrorsSuite,
    RobustnessSuite,
    LifecycleSuite,
    LimitsSuite,
    DedupeSuite,
    FailuresSuite,
    PubSubSuite,
):
    """Every conformance test. Subclass it as ``Test<Backend>`` and name the backend
    (see :mod:`keybus.testing.conformance`)."""
