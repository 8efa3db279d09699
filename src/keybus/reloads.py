"""When a store in the broker (parked keys, the version guard's versions) is read again:
before the first message, and after every assignment — a partition taken over brings
its state along.

Assignments are counted, and a read covers those made before it began, so one made
during a read makes another one due; while a read runs, :attr:`Reloads.due` stays true,
so every worker waits for it (through :meth:`Reloads.run`) instead of judging a message
without what it will bring.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

__all__ = ["Reloads"]


class Reloads:
    """The reads of one store a subscription has made and owes."""

    __slots__ = ("_assignments", "_covered", "_lock")

    def __init__(self, first: bool = True) -> None:
        self._assignments = 1 if first else 0
        self._covered = 0
        self._lock = asyncio.Lock()

    @property
    def due(self) -> bool:
        """A read is due, or running (then :meth:`run` waits for it)."""
        return self._assignments != self._covered or self._lock.locked()

    def assigned(self) -> None:
        self._assignments += 1

    async def run(self, read: Callable[[], Awaitable[bool]]) -> None:
        """``read()`` if a read is due (one reader; the rest wait for it). It returns
        whether it read: if not (the store could not be read), the read stays due."""
        async with self._lock:
            if self._assignments == self._covered:
                return
            covers = self._assignments
            if await read():
                self._covered = covers
