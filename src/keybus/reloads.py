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
import logging
from collections.abc import Awaitable, Callable

from keybus.errors import BusClosedError, KeybusError
from keybus.message import Message

__all__ = ["Reloads"]

log = logging.getLogger("keybus")


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

    async def run(
        self,
        read: Callable[[], Awaitable[list[Message]]],
        apply: Callable[[list[Message]], None],
        what: str,
    ) -> None:
        """If a read is due: ``apply(await read())`` (one reader; the rest wait for it).
        A store that cannot be read now is logged and stays due: the next message tries
        again rather than be judged without it."""
        async with self._lock:
            if self._assignments == self._covered:
                return
            covers = self._assignments
            try:
                records = await read()
            except BusClosedError:
                raise
            except KeybusError as exc:
                log.warning("keybus: reading %s failed: %s", what, exc)
                return
            apply(records)
            self._covered = covers
