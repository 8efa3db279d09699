"""The threads the transport starts (the group consumers', the producer's destroy), and
the bounded wait for their end from the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable

from keybus.deadline import Deadline

__all__ = ["OwnedThread", "set_done"]


def set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class OwnedThread:
    """A daemon thread the transport starts and joins. Its last step tells the loop it
    is done, so the loop awaits that — bounded by a deadline — instead of blocking in
    ``join()``; the ``join()`` after it is then immediate. A thread still running at
    the deadline is reported by :meth:`join` returning False (and left to finish)."""

    def __init__(
        self, target: Callable[[], None], name: str, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._target = target
        self._loop = loop
        self._done: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def finished(self) -> bool:
        """Its target has returned (as far as the loop has heard)."""
        return self._done.done()

    def _run(self) -> None:
        try:
            self._target()
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is gone
                self._loop.call_soon_threadsafe(set_done, self._done)

    async def join(self, deadline: Deadline) -> bool:
        """Wait until the thread is done or ``deadline``; True if it is done (joined)."""
        if not self._done.done():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline.remaining()):
                    # Shielded: a wait that gives up leaves the future for the next one.
                    await asyncio.shield(self._done)
        if not self._done.done():
            return False
        self._thread.join(0.2)  # it signalled done as its last step: this is immediate
        return True
