"""pytest plugin: the ``no_leaks`` fixture.

A test that requests ``no_leaks`` fails if, after it (and every fixture it uses that was
set up after ``no_leaks``) finished, the process still holds asyncio tasks, threads,
native threads or fds that it did not hold before. Request it *first* in fixtures that
open buses, so the buses are closed before the check runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from keybus.testing.leaks import LeakChecker

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the fixture needs pytest-asyncio
    pytest_asyncio = None  # type: ignore[assignment]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "keybus_leak_timeout", "seconds the leak check polls before failing", default="10"
    )


if pytest_asyncio is not None:

    @pytest_asyncio.fixture
    async def no_leaks(request: pytest.FixtureRequest) -> AsyncIterator[LeakChecker]:
        """A started :class:`LeakChecker`, checked when the test's fixtures are torn down."""
        checker = LeakChecker(timeout=float(request.config.getini("keybus_leak_timeout")))
        checker.start()
        yield checker
        await checker.check()
