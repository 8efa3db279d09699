"""What a bus runs beside its subscriptions — heartbeats, heartbeat and lag watches — as
tasks it owns: each ends with ``stop()`` or with the bus's ``close()``. A stopped one
tells its owner (``on_stopped``), which lets go of it: a long-lived bus that starts and
stops them over and over holds only those still running."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from keybus._aio import cancel_and_wait, log_failure

__all__ = ["Background"]


class Background:
    """A handle on one background activity of a bus."""

    def __init__(
        self,
        name: str,
        body: Callable[[Background], Coroutine[Any, Any, None]],
        watch: object = None,
        on_stopped: Callable[[Background], None] | None = None,
    ) -> None:
        self.name = name
        self._on_stopped = on_stopped
        # A watch's state, to look at (a HeartbeatWatch's sources, a LagWatch's behind).
        self.watch = watch
        self._ready = asyncio.Event()
        self._stopping: list[Callable[[], Coroutine[Any, Any, None]]] = []
        task = asyncio.get_running_loop().create_task(body(self), name=name)
        task.add_done_callback(log_failure)
        # None once stopped: see stop().
        self._task: asyncio.Task[None] | None = task

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def started(self) -> None:
        """Called by the activity once it runs (subscribed, topic made)."""
        self._ready.set()

    def on_stop(self, step: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Something to undo after the task ended (an unsubscribe)."""
        self._stopping.append(step)

    async def ready(self) -> None:
        """Wait until the activity runs (or ended: it failed, logged)."""
        task = self._task
        if task is None:
            return
        waiter = asyncio.ensure_future(self._ready.wait())
        try:
            await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(waiter)

    async def stop(self) -> None:
        """End it (idempotent)."""
        try:
            task = self._task
            if task is not None:
                await cancel_and_wait(task)
                # Let the ended task go: its exception's traceback holds the frames it was
                # cancelled in, and their locals — a Kafka admin client in the middle of a
                # lag read, say, which the bus's close must be the last to hold.
                self._task = None
                del task
            steps, self._stopping = self._stopping, []
            for step in steps:
                await step()
        finally:
            if self._on_stopped is not None:
                self._on_stopped(self)

    def __repr__(self) -> str:
        return f"<Background {self.name} {'running' if self.running else 'stopped'}>"
