"""The conformance kit: the behavioural suite every keybus backend passes, shipped so a
third-party transport can run it too (in the spirit of Watermill's universal Pub/Sub
tests). What a backend cannot do it declares in :class:`Features`; the tests that need
it are skipped, naming the flag — the suite never decides by a backend's name.

A transport registered with :func:`keybus.register_transport` runs the suite with one
test module (pytest and pytest-asyncio installed, e.g. ``pip install 'keybus[test]'``)::

    # tests/test_keybus_conformance.py
    import keybus
    from keybus.testing.conformance import Conformance, Features

    from my_transport import RedisTransport, redis_partition

    keybus.register_transport("redis", RedisTransport)

    class TestRedis(Conformance):
        url = "redis://127.0.0.1:6379"
        unreachable_url = "redis://127.0.0.1:1"  # nothing listens there; None skips
        features = Features(rebalance=False, partition_for=redis_partition)

then ``pytest tests/test_keybus_conformance.py``. The class brings its fixtures:
``backend`` (a :class:`Backend` descriptor made per test by ``describe_backend()``; the
topics a test makes with ``backend.topic()`` are deleted afterwards), ``open_bus``
(``await open_bus(group=..., **options)``; every bus is closed when the test ends) and
keybus's ``no_leaks`` (every test that opens a bus fails if a task, thread or fd
outlives it). Override ``describe_backend()`` when the URL must be fresh per test. One
part of the suite is enough too: subclass :class:`PubSubSuite`, :class:`FailuresSuite`,
:class:`LifecycleSuite`, :class:`RobustnessSuite`, :class:`ErrorsSuite`,
:class:`MiddlewareSuite`, :class:`LimitsSuite`, :class:`DedupeSuite`,
:class:`ObserveSuite`, :class:`BatchSuite` or :class:`ParkingSuite` instead of
:class:`Conformance`.

The helpers the suite uses (``eventually``, ``Collected``, ``key_on``, ...) are in
:mod:`keybus.testing.conformance.helpers`. ``import keybus`` imports none of this.
"""

import pytest

# The suite's modules are not test modules: have pytest rewrite their asserts anyway, so
# a failure shows the values compared. (Before they are imported, below.)
pytest.register_assert_rewrite(
    *(
        f"{__name__}.{module}"
        for module in (
            "suite_batches",
            "suite_dedupe",
            "suite_delivery",
            "suite_errors",
            "suite_failures",
            "suite_lifecycle",
            "suite_limits",
            "suite_middleware",
            "suite_observe",
            "suite_parking",
            "suite_pubsub",
            "suite_robustness",
        )
    )
)

from keybus.testing.conformance.backend import Backend, unique  # noqa: E402
from keybus.testing.conformance.features import Features  # noqa: E402
from keybus.testing.conformance.fixtures import (  # noqa: E402
    BackendFixtures,
    BusFactory,
    bus_factory,
)
from keybus.testing.conformance.suite import Conformance  # noqa: E402
from keybus.testing.conformance.suite_batches import BatchSuite  # noqa: E402
from keybus.testing.conformance.suite_dedupe import DedupeSuite  # noqa: E402
from keybus.testing.conformance.suite_delivery import DeliverySuite  # noqa: E402
from keybus.testing.conformance.suite_errors import ErrorsSuite  # noqa: E402
from keybus.testing.conformance.suite_failures import FailuresSuite  # noqa: E402
from keybus.testing.conformance.suite_lifecycle import LifecycleSuite  # noqa: E402
from keybus.testing.conformance.suite_limits import LimitsSuite  # noqa: E402
from keybus.testing.conformance.suite_middleware import MiddlewareSuite  # noqa: E402
from keybus.testing.conformance.suite_observe import ObserveSuite  # noqa: E402
from keybus.testing.conformance.suite_parking import ParkingSuite  # noqa: E402
from keybus.testing.conformance.suite_pubsub import PubSubSuite  # noqa: E402
from keybus.testing.conformance.suite_robustness import RobustnessSuite  # noqa: E402

__all__ = [
    "Backend",
    "BackendFixtures",
    "BatchSuite",
    "BusFactory",
    "Conformance",
    "DedupeSuite",
    "DeliverySuite",
    "ErrorsSuite",
    "FailuresSuite",
    "Features",
    "LifecycleSuite",
    "LimitsSuite",
    "MiddlewareSuite",
    "ObserveSuite",
    "ParkingSuite",
    "PubSubSuite",
    "RobustnessSuite",
    "bus_factory",
    "unique",
]
