"""Keyed lanes: one-at-a-time per key, concurrent across keys, no head-of-line blocking.

The Go SDK hashed aggregate ids onto 256 fixed workers, so one stuck aggregate stalled
every other aggregate that hashed to its worker. Here each key with pending work has its
own lane; a bounded set of worker tasks takes *ready lanes* round-robin, one message per
turn. A lane is in the ready queue or being worked on, never both, which is what keeps a
key's messages in order; a slow lane occupies one worker while the others keep moving.

Workers are started on demand (up to ``max_concurrency``). A worker that finds no ready
lane parks on a future instead of exiting, because waking a parked task costs a fraction
of creating one and bursts of deliveries would otherwise create a task every few
messages. ``cancel()`` ends parked and busy workers alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable

from keybus.errors import BusClosedError
from keybus.work import DROPPED, QUEUED, RUNNING, Work

log = logging.getLogger("keybus")


class _Lane:
    __slots__ = ("active", "items", "key")

    def __init__(self, key: Hashable | None) -> None:
        self.key = key
        self.items: deque[Work] = deque()
        self.active = False  # in the ready queue or held by a worker


class KeyedDispatcher:
    """Runs ``process(work)`` for submitted work: in submission order per key, up to
    ``max_concurrency`` keys at once. Work with key ``None`` is unordered."""

    def __init__(
        self, process: Callable[[Work], Awaitable[None]], max_concurrency: int, name: str
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self._process = process
        self._max = max_concurrency
        self._name = name
        self._lanes: dict[Hashable, _Lane] = {}
        # Retired lanes for reuse: with many keys each lane often lives for one message.
        self._spare: list[_Lane] = []
        self._ready: deque[_Lane] = deque()
        self._workers: set[asyncio.Task[None]] = set()
        self._parked: deque[asyncio.Future[None]] = deque()
        self._running = 0  # work items inside process() right now
        # Workers woken (or created) that have not looked at the ready queue yet. One on
        # its way is enough: a worker that takes a lane wakes the next one only if lanes
        # are still waiting, so a burst of ready lanes whose handlers finish without
        # suspending is drained by one worker instead of waking (and re-parking) a
        # worker per lane; handlers that do suspend ramp the workers up one by one.
        self._waking = 0
        self._peak = 0
        self._closed = False
        self.abandoned_settled = asyncio.Event()  # set when an abandoned work unwound

    @property
    def closed(self) -> bool:
        """True once :meth:`cancel` was called: no work is taken any more."""
        return self._closed

    @property
    def running(self) -> int:
        return self._running

    @property
    def peak_concurrency(self) -> int:
        """The most work items that ran at once (proves concurrency in tests)."""
        return self._peak

    def submit(self, work: Work, key: Hashable | None) -> None:
        if self._closed:
            return  # stopped: the work stays undone, so it is redelivered later
        if key is None:
            lane = self._lane(None)
        else:
            lane = self._lanes.get(key)  # type: ignore[assignment]
            if lane is None:
                lane = self._lanes[key] = self._lane(key)
        lane.items.append(work)
        if not lane.active:
            lane.active = True
            self._ready.append(lane)
            if not self._waking:
                self._wake_one()

    def _lane(self, key: Hashable | None) -> _Lane:
        spare = self._spare
        if spare:
            lane = spare.pop()
            lane.key = key
            return lane
        return _Lane(key)

    def _wake_one(self) -> None:
        """Get one more worker onto the ready queue: a parked one, else a new one."""
        parked = self._parked
        while parked:
            waiter = parked.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._waking += 1
                return
        if len(self._workers) < self._max:
            task = asyncio.get_running_loop().create_task(
                self._work(), name=f"keybus-worker:{self._name}"
            )
            self._workers.add(task)
            self._waking += 1

    def waiting(self, top: int) -> list[tuple[Hashable, int, Work]]:
        """The ``top`` keys with the most queued (not running) work: ``(key, count, first
        queued work)``, most first. Walks every lane: for an operator's look, not for a
        hot path."""
        lanes = heapq.nlargest(
            top,
            (lane for lane in self._lanes.values() if lane.items),
            key=lambda lane: len(lane.items),
        )
        return [(lane.key, len(lane.items), lane.items[0]) for lane in lanes]

    def drop(self, predicate: Callable[[Work], bool]) -> list[Work]:
        """Remove queued (not yet running) work matching ``predicate``; returns it."""
        dropped: list[Work] = []
        for lane in list(self._ready) + list(self._lanes.values()):
            kept: deque[Work] = deque()
            for work in lane.items:
                if work.state == QUEUED and predicate(work):
                    work.state = DROPPED
                    dropped.append(work)
                else:
                    kept.append(work)
            lane.items = kept
        return dropped

    async def _work(self) -> None:
        ready = self._ready
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        monotonic = time.monotonic
        try:
            self._waking -= 1
            while not self._closed:
                if not ready:
                    waiter: asyncio.Future[None] = loop.create_future()
                    self._parked.append(waiter)
                    await waiter
                    self._waking -= 1
                    continue
                lane = ready.popleft()
                if ready and not self._waking:
                    self._wake_one()
                if lane.items:
                    work = lane.items.popleft()
                    work.state = RUNNING
                    work.task = me
                    work.started = monotonic()
                    self._running += 1
                    if self._running > self._peak:
                        self._peak = self._running
                    try:
                        await self._process(work)
                    except asyncio.CancelledError:
                        if work.state != DROPPED or self._closed or me is None:
                            raise
                        # A revoke abandoned this one work (see abandon()); the worker
                        # itself goes on with other lanes.
                        me.uncancel()
                    except BusClosedError:
                        # Stopped mid-retry: the work stays undone (redelivered). Before
                        # the stop it would be a bug, like any exception below.
                        if not self._closed:
                            log.exception("keybus: processing failed in %s", self._name)
                    except Exception:
                        # process() handles handler errors itself; reaching here is a bug
                        # or a closed bus. Keep the worker alive; the work stays undone
                        # (uncommitted), so it is redelivered rather than lost.
                        log.exception("keybus: processing failed in %s", self._name)
                    finally:
                        self._running -= 1
                        work.task = None
                        if work.state == DROPPED:
                            # abandon()'s cancel request is taken back even when the
                            # handler swallowed it: a pending request would turn a
                            # later handler's own CancelledError into this worker's end.
                            if me is not None and not self._closed and me.cancelling():
                                me.uncancel()
                            self.abandoned_settled.set()
                if lane.items:
                    ready.append(lane)  # back of the queue: fair across keys
                else:
                    lane.active = False
                    key = lane.key
                    if key is None:
                        self._retire(lane)
                    elif self._lanes.get(key) is lane:
                        del self._lanes[key]
                        self._retire(lane)
        finally:
            self._workers.discard(asyncio.current_task())

    def _retire(self, lane: _Lane) -> None:
        if len(self._spare) < 1024:
            lane.key = None
            self._spare.append(lane)

    @staticmethod
    def abandon(works: list[Work]) -> None:
        """Cancel the handlers running these works (their partition was revoked and the
        wait for them ran out); their workers carry on with other lanes."""
        for work in works:
            work.state = DROPPED
            if work.task is not None:
                work.task.cancel()

    async def cancel(self, grace: float) -> list[asyncio.Task[None]]:
        """Stop: cancel every worker and wait up to ``grace`` seconds for them to end.

        Queued work is forgotten (it stays uncommitted). Returns the workers that did not
        end — a handler that swallows cancellation; such a worker still stops taking work
        once its handler returns, since the dispatcher is closed."""
        self._closed = True
        self._ready.clear()
        self._lanes.clear()
        for waiter in self._parked:
            waiter.cancel()
        self._parked.clear()
        workers = list(self._workers)
        for task in workers:
            task.cancel()
        if workers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait(workers, timeout=grace)
        return [t for t in workers if not t.done()]
