"""Helpers for testing code that uses keybus: the leak checker and its pytest plugin.

``keybus.testing.pytest_plugin`` is registered as a pytest plugin on install; it provides
the ``no_leaks`` fixture (see :class:`LeakChecker`).
"""

from keybus.testing.leaks import LeakChecker, LeakError, Resources, snapshot

__all__ = ["LeakChecker", "LeakError", "Resources", "snapshot"]
