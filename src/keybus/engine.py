"""The engine behind one subscription: intake with backpressure, keyed dispatch, retries
in place, dead letters, done-tracking and a bounded stop. Written once for every backend.

It is the :class:`~keybus.transports.base.Sink` its consumer drives (``assign``,
``deliver``, ``revoke``); users hold a :class:`~keybus.subscription.Subscription`, the
handle that only shows what is theirs to use.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from inspect import isawaitable
from types import CoroutineType
from typing import TYPE_CHECKING, Any

from keybus._aio import being_cancelled, cancel_and_wait, log_failure, wait_event
from keybus.deadline import (
    ABANDON_GRACE,
    CANCEL_GRACE,
    CONSUMER_CLOSE_BUDGET,
    FLUSH_BUDGET,
    STOP_MARGIN,
    Deadline,
)
from keybus.delivery import CURRENT
from keybus.dispatch import KeyedDispatcher
from keybus.envelope import Envelope
from keybus.errors import BusClosedError, KeybusError, PublishError
from keybus.message import Message
from keybus.middleware import CallNext, Delivery, chain
from keybus.observer import AttemptObserver
from keybus.options import SubscribeOptions
from keybus.parker import KeyParked, Parking, ReadTopic, VersionGap
from keybus.parking import GROUP, ParkedKey
from keybus.partitioning import Partition
from keybus.positions import DoneTracker
from keybus.stats import HeldPartition, SubscriptionSnapshot, SubscriptionStats, WaitingKey
from keybus.versions import VersionGuard, VersionStore
from keybus.work import DONE, DROPPED, RUNNING, Work, lane_key

if TYPE_CHECKING:
    from keybus.transports.base import Consumer

__all__ = ["Handler", "Publish", "SubscriptionEngine"]

log = logging.getLogger("keybus")

Handler = Callable[[Any], Awaitable[None] | None]
Publish = Callable[[str, bytes, str | None, Mapping[str, bytes]], Awaitable[None]]

_MAX_ERROR_TEXT = 2000  # header values stay small: brokers cap record size
_REDUCED_ERROR_TEXT = 500  # the reduced form of a dead letter that could not be written


class SubscriptionEngine:
    """One subscription's core, driven by its consumer (the ``Sink`` it feeds)."""

    def __init__(
        self,
        topic: str,
        group: str,
        handler: Handler,
        options: SubscribeOptions,
        *,
        envelopes: bool,
        publish: Publish,
        on_closed: Callable[[SubscriptionEngine], None],
        read_topic: ReadTopic | None = None,
        store_versions: bool = False,
        observer: AttemptObserver[Any] | None = None,
        publish_internal: Publish | None = None,
    ) -> None:
        self.topic = topic
        self.group = group
        self.options = options
        self.dead_letter_topic = options.dead_letter_topic or f"{topic}.dlq"
        self.stats = SubscriptionStats()
        self._handler = handler
        # With middleware, each attempt runs through the chain built once here; without,
        # the handler is called directly (the hot path stays as it was).
        self._chain: CallNext | None = (
            chain(handler, options.middleware) if options.middleware else None
        )
        # Metrics and tracing of each attempt (keybus.observer), around the chain.
        self._observer = observer
        self._envelopes = envelopes
        self._publish = publish
        # The stores' writes (parked keys, requests, versions) are no dead letters: with
        # telemetry, ``publish`` counts and traces each call as one.
        self._publish_internal = publish_internal or publish
        self._on_closed = on_closed
        self._consumer: Consumer | None = None
        # Parking and the version guard run in a process step of their own, so the
        # default path does not pay for them (keybus.parker).
        self._parking: Parking | None = None
        self._guard: VersionGuard | None = None
        self._requests: asyncio.Task[None] | None = None
        # The guard's versions in the broker (keybus.versions), and its flush loop.
        self._versions: VersionStore | None = None
        self._flusher: asyncio.Task[None] | None = None
        process = self._process
        if options.on_dead_letter == "park" or (options.versions and envelopes):
            if options.on_dead_letter == "park":
                self._parking = Parking(self, read_topic)
            if options.versions and envelopes:
                stored = store_versions and read_topic is not None
                self._guard = VersionGuard(options.version_window, persistent=stored)
                if stored and read_topic is not None:
                    self._versions = VersionStore(self, self._guard, read_topic)
            process = self._process_guarded
        self._dispatcher = KeyedDispatcher(process, options.max_concurrency, topic)
        self._tracker = DoneTracker(self._commit)
        # Owned partitions -> the generation they were (last) assigned in. A deliver()
        # that began before a partition's latest assignment carries records fetched
        # under an older ownership: those are dropped, the new owner refetches them.
        self._assigned: dict[Partition, int] = {}
        # Owned partitions whose ownership may lapse -> until when (time.monotonic()) it is
        # known to hold. No work of such a partition starts after that moment: a member
        # that stalled longer than its lease drops its queued work on resume instead of
        # running it beside the partition's new owner.
        self._owned_until: dict[Partition, float] = {}
        self._generation = 0
        # When records last came in and a commit point was last reported
        # (time.monotonic(); None: not yet): bus.health() shows both.
        self.last_fetch: float | None = None
        self.last_commit: float | None = None
        self._in_flight = 0
        self._limit = options.in_flight_limit()
        self._resume_at = self._limit - max(1, self._limit // 4)
        self._uncommitted_limit = options.uncommitted_limit()
        self._uncommitted_resume = self._uncommitted_limit - max(1, self._uncommitted_limit // 4)
        self._space = asyncio.Event()
        self._space.set()
        self._progress = asyncio.Event()  # pulsed whenever work finishes
        self._closing = False
        self._closed = asyncio.Event()
        self._started = asyncio.Event()
        self._shutdown_task: asyncio.Task[None] | None = None
        # When the stop gives up waiting for handlers; a later unsubscribe() or close()
        # with an earlier deadline brings it forward (each is bounded by its own timeout).
        self._deadline = math.inf

    def partition_state(self) -> dict[int, tuple[float | None, int]]:
        """Per partition this subscription owns: the age of its oldest unfinished message
        (seconds since the broker stored it; ``None``: nothing unfinished, or no
        timestamp) and how many done messages wait behind that one (``bus.lag()``)."""
        wall = time.time()
        state: dict[int, tuple[float | None, int]] = {
            p: (None, 0) for (t, p) in self._assigned if t == self.topic
        }
        for work, done, _ in self._tracker.heads():
            stamp = work.message.timestamp
            state[work.partition[1]] = (wall - stamp if stamp is not None else None, done)
        return state

    def snapshot(self, top: int = 10) -> SubscriptionSnapshot:
        """The counters and the live state now (see :class:`SubscriptionSnapshot`)."""
        now, wall = time.monotonic(), time.time()
        running = [w for w in self._tracker.open_work() if w.state == RUNNING]
        running_by_key = {w.key: w for w in running}

        def run_for(work: Work | None) -> float | None:
            return now - work.started if work is not None and work.state == RUNNING else None

        waiting = []
        for key, count, first in self._dispatcher.waiting(top):
            current = running_by_key.get(str(key))
            waiting.append(
                WaitingKey(
                    str(key),
                    first.partition[1],
                    count,
                    run_for(current),
                    current.attempts if current is not None else 0,
                )
            )
        heads = sorted(self._tracker.heads(), key=lambda h: (-h[1], -h[2]))[:top]
        held = tuple(
            HeldPartition(
                work.partition[0],
                work.partition[1],
                work.key,
                work.message.offset,
                work.attempts,
                run_for(work),
                done,
                unfinished,
                wall - work.message.timestamp if work.message.timestamp is not None else None,
            )
            for work, done, unfinished in heads
        )
        stats = self.stats
        return SubscriptionSnapshot(
            topic=self.topic,
            group=self.group,
            delivered=stats.delivered,
            handled=stats.handled,
            retries=stats.retries,
            dead_lettered=stats.dead_lettered,
            dropped=stats.dropped,
            committed=stats.committed,
            errors=tuple(stats.errors),
            in_flight=self._in_flight,
            uncommitted=self._tracker.size,
            running=self._dispatcher.running,
            oldest_running_age=max((now - w.started for w in running), default=None),
            waiting_keys=tuple(waiting),
            held_partitions=held,
            parked=stats.parked,
            version_duplicates=stats.version_duplicates,
            version_gaps=stats.version_gaps,
        )

    @property
    def peak_concurrency(self) -> int:
        """The most handlers that ran at once so far."""
        return self._dispatcher.peak_concurrency

    @property
    def in_flight(self) -> int:
        """Messages taken from the broker and not yet done."""
        return self._in_flight

    @property
    def running(self) -> int:
        return self._dispatcher.running

    @property
    def uncommitted(self) -> int:
        """Messages taken in and not yet committed (read by the metrics' gauges)."""
        return self._tracker.size

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def revoke_timeout(self) -> float:
        return self.options.revoke_timeout

    # -- lifecycle (called by the bus) -----------------------------------------------

    async def start(self, consumer: Consumer) -> None:
        if self._closing:
            raise BusClosedError("the subscription was closed while it started")
        self._consumer = consumer
        try:
            await consumer.start()
            parking = self._parking
            if parking is not None and parking.persistent:
                # Replay / discard requests of processes without the handler (the CLI).
                self._requests = asyncio.get_running_loop().create_task(
                    parking.serve_requests(), name=f"keybus-parked-requests:{self.topic}"
                )
                self._requests.add_done_callback(log_failure)
            if self._versions is not None:
                self._flusher = asyncio.get_running_loop().create_task(
                    self._versions.run(), name=f"keybus-versions:{self.topic}"
                )
                self._flusher.add_done_callback(log_failure)
        finally:
            self._started.set()
            self._progress.set()  # a stop waiting for the start sees it now

    async def shutdown(self, deadline: float) -> None:
        """Stop: handlers may run until ``deadline`` (monotonic); bounded, idempotent."""
        self.hasten(deadline)
        if self._shutdown_task is None:
            self._closing = True
            # The stop runs in a task of its own and is shielded: when a handler closes
            # its own subscription (or bus), the stop cancels that handler's worker —
            # which must not cancel the stop itself half-way.
            self._shutdown_task = asyncio.get_running_loop().create_task(
                self._run_shutdown(), name=f"keybus-unsubscribe:{self.topic}"
            )
            self._shutdown_task.add_done_callback(log_failure)
        await asyncio.shield(self._shutdown_task)

    def hasten(self, deadline: float) -> None:
        """Stop waiting for handlers at ``deadline`` at the latest."""
        if deadline < self._deadline:
            self._deadline = deadline
            self._progress.set()  # the waits below recompute their time left

    async def _run_shutdown(self) -> None:
        try:
            await self._stop()
        finally:
            self._closed.set()
            self._on_closed(self)

    async def _stop(self) -> None:
        # Every step's deadline comes from keybus.deadline's close-time budget.
        consumer = self._consumer
        if consumer is not None:
            # Closed while subscribe() was starting it: wait for the start.
            if not await self._wait_progress(self._started.is_set, self._stop_deadline):
                log.error("keybus: consumer start did not finish in time")
            if self._requests is not None:  # no replay starts from here on
                await cancel_and_wait(self._requests)
            stop_by = Deadline(self._deadline).later(STOP_MARGIN)
            await _bounded(consumer.stop, stop_by, "consumer stop")
        # Drain what was already fetched until the deadline.
        await self._wait_progress(lambda: not self._in_flight, self._stop_deadline)
        stuck = await self._dispatcher.cancel(grace=CANCEL_GRACE)
        self._progress.set()  # a revoke waiting for handlers sees the stop now
        for task in stuck:
            log.error("keybus: handler of %s ignored cancellation: %r", self.topic, task)
        left = self._tracker.forget(list(self._assigned))
        self.stats.dropped += len(left)
        self._assigned.clear()
        if self._flusher is not None and self._versions is not None:
            # The last versions stored, then the commits they held back reported.
            await cancel_and_wait(self._flusher)
            await _bounded(self._flush_versions, Deadline.after(FLUSH_BUDGET), "versions flush")
        if consumer is not None:
            await _bounded(consumer.flush, Deadline.after(FLUSH_BUDGET), "commit flush")
            await _bounded(consumer.close, Deadline.after(CONSUMER_CLOSE_BUDGET), "consumer close")

    def _stop_deadline(self) -> float:
        return self._deadline

    async def _wait_progress(
        self, condition: Callable[[], bool], deadline: Callable[[], float]
    ) -> bool:
        """Wait until ``condition`` holds (re-checked whenever progress is pulsed) or
        ``deadline()`` — which may be brought forward meanwhile — passes."""
        while not condition():
            remaining = deadline() - time.monotonic()
            if remaining <= 0:
                return False
            self._progress.clear()
            await wait_event(self._progress, remaining)
        return True

    # -- Sink: called by the consumer ------------------------------------------------

    def assign(self, partitions: Collection[Partition], *, valid_until: float = math.inf) -> None:
        if not self._closing:
            self._generation += 1
            for partition in partitions:
                self._assigned[partition] = self._generation
                if valid_until < math.inf:
                    self._owned_until[partition] = valid_until
                else:
                    self._owned_until.pop(partition, None)
            if self._parking is not None and self._parking.persistent:
                self._parking.assigned()  # a partition taken over brings its keys
            if self._versions is not None:
                self._versions.assigned()  # ... and its aggregates' versions

    def renew(self, partitions: Collection[Partition], valid_until: float) -> None:
        owned_until = self._owned_until
        for partition in partitions:
            if partition in owned_until and partition in self._assigned:
                owned_until[partition] = valid_until

    def _lapsed(self, work: Work) -> bool:
        """Whether ``work``'s partition may no longer be ours; if so, it is given up at
        once, as a lost partition: queued work dropped, running handlers cancelled,
        nothing more committed, and the consumer told (it re-establishes ownership or
        gives the partition up)."""
        partition = work.partition
        until = self._owned_until.get(partition)
        if until is None or time.monotonic() < until:
            return False
        log.warning(
            "keybus: ownership of %s lapsed (not renewed in time); dropping its work",
            partition,
            extra={"topic": partition[0], "partition": partition[1], "group": self.group},
        )
        self._owned_until.pop(partition, None)
        self._assigned.pop(partition, None)
        self._forget_partitions([partition])
        work.state = DROPPED  # this one is not started; the rest of its partition below
        dropped = self._dispatcher.drop(lambda w: w.partition == partition)
        running = [
            w
            for w in self._tracker.open_work()
            if w.state == RUNNING and w.partition == partition and w is not work
        ]
        self._dispatcher.abandon(running)
        released = 1 + len(dropped) + len(running)
        self.stats.dropped += released
        self._tracker.forget([partition])
        self._release(released)
        if self._consumer is not None:
            self._consumer.lapsed([partition])
        return True

    async def deliver(self, messages: Sequence[Message]) -> None:
        self.last_fetch = time.monotonic()
        assigned = self._assigned
        tracker = self._tracker
        submit = self._dispatcher.submit
        envelopes = self._envelopes
        stats = self.stats
        begun = self._generation
        limit, uncommitted_limit = self._limit, self._uncommitted_limit
        for message in messages:
            while self._in_flight >= limit or tracker.size >= uncommitted_limit:
                self._space.clear()
                await self._space.wait()
            # Checked after any wait: the partition may have been revoked (and even
            # re-assigned) meanwhile.
            where = (message.topic, message.partition)
            generation = assigned.get(where)
            if generation is None or generation > begun or self._closing:
                continue
            stats.delivered += 1
            if envelopes:
                try:
                    envelope = Envelope.from_bytes(message.value)
                except Exception as exc:  # EnvelopeError, or anything a bug lets through
                    # Dead-lettered in its key's lane: the key's dead letters keep order.
                    key = lane_key(message, None)
                    work = Work(message, None, exc, where, key)
                else:
                    key = lane_key(message, envelope)
                    work = Work(message, envelope, None, where, key)
            else:
                key = lane_key(message, None)
                work = Work(message, message, None, where, key)
            self._in_flight += 1
            tracker.add(work)
            submit(work, key)

    async def revoke(self, partitions: Collection[Partition], deadline: Deadline) -> None:
        revoked = set(partitions)
        for partition in revoked:
            self._assigned.pop(partition, None)
            self._owned_until.pop(partition, None)
        dropped = self._dispatcher.drop(lambda w: w.partition in revoked)
        self.stats.dropped += len(dropped)
        self._release(len(dropped))
        running = [
            w for w in self._tracker.open_work() if w.state == RUNNING and w.partition in revoked
        ]

        def settled() -> bool:
            nonlocal running
            running = [w for w in running if w.state == RUNNING]
            # Once the stop cancelled the workers, nothing these handlers do is kept (a
            # cancelled work stays undone, RUNNING, for good): waiting on would hold the
            # consumer's rebalance callback, and the bounded close behind it, until
            # revoke_timeout.
            return not running or self._dispatcher.closed

        # A lost partition comes with a passed deadline: no waiting for handlers then.
        await self._wait_progress(settled, lambda: deadline.at)
        if running:
            await self._abandon(running, revoked)
        if self._versions is not None and not deadline.expired:
            # The commits held for the versions are made before the partition goes.
            await _bounded(self._flush_versions, deadline, "versions flush")
        self._forget_partitions(revoked)
        self._tracker.forget(revoked)
        self._release(0)  # intake may have waited for the uncommitted window

    def _forget_partitions(self, partitions: Collection[Partition]) -> None:
        """Partitions gone: their parked keys, versions and held commits are the next
        owner's (read from the stores again if they come back)."""
        mine = {p for (t, p) in partitions if t == self.topic}
        if self._parking is not None:
            self._parking.forget(mine)
        if self._guard is not None:
            self._guard.forget(mine)
        if self._versions is not None:
            self._versions.forget(partitions)

    async def _flush_versions(self, deadline: Deadline) -> None:
        assert self._versions is not None
        await self._versions.flush()

    async def _abandon(self, running: list[Work], revoked: set[Partition]) -> None:
        """The wait for a revoked partition's handlers ran out: cancel them, so the next
        owner never runs an aggregate while this member still does. Their messages stay
        uncommitted (the next owner redoes them)."""
        log.warning(
            "keybus: revoke of %s: cancelling %d running handler(s)",
            sorted(revoked),
            len(running),
        )
        self._dispatcher.abandon(running)
        self.stats.dropped += len(running)
        self._release(len(running))
        # Cancellation lands on each handler's next step; give them a moment to unwind.
        settled = self._dispatcher.abandoned_settled
        unwound_by = Deadline.after(ABANDON_GRACE)
        while any(w.task is not None for w in running) and not unwound_by.expired:
            settled.clear()
            await wait_event(settled, unwound_by)
        for work in running:
            if work.task is not None:
                log.error("keybus: a handler of %s ignored cancellation", self.topic)

    # -- processing ------------------------------------------------------------------

    async def _process(self, work: Work) -> None:
        if self._owned_until and self._lapsed(work):
            return
        CURRENT.set(work)  # keybus.current_delivery(), for the handler and its tasks
        if work.error is not None:
            await self._dead_letter(work, work.error)
        else:
            # The first attempt is inlined (as :meth:`_attempt` does it): it is almost
            # always the only one.
            work.attempts = 1
            observer = self._observer
            token = None if observer is None else observer.begin(work)
            try:
                if self._chain is None:
                    result = self._handler(work.payload)
                    if result is not None and (
                        type(result) is CoroutineType or isawaitable(result)
                    ):
                        await result
                else:
                    await self._chain(Delivery(work.message, work.payload, 1))
            except Exception as exc:
                if observer is not None:
                    observer.end(work, token, exc)
                if self._still_ours(work):
                    await self._retry(work, exc)
            except asyncio.CancelledError as exc:
                if observer is not None:
                    observer.end(work, token, exc)
                if being_cancelled():
                    raise
                # The handler *raised* CancelledError (e.g. it awaited a future someone
                # else cancelled) while nobody cancelled us: that is a failure like any.
                if self._still_ours(work):
                    await self._retry(work, exc)
            except BaseException as exc:
                if observer is not None:
                    observer.end(work, token, exc)
                raise
            else:
                if observer is not None:
                    observer.end(work, token, None)
                self.stats.handled += 1
        if work.state == RUNNING:  # not abandoned by a revoke meanwhile
            self._tracker.done(work)
            self._release(1)

    async def _process_guarded(self, work: Work) -> None:
        """:meth:`_process` with parking and/or the version guard in front of it."""
        parking = self._parking
        if parking is not None:
            if parking.reload_due:
                await parking.refresh()
            key = work.key
            state = parking.parked.get(key) if key is not None else None
            if state is not None and key is not None:
                if not (self._owned_until and self._lapsed(work)):
                    await parking.park(work, key, state)
                    self._finish(work)
                return
        guard = self._guard
        envelope = work.payload
        if guard is not None and work.error is None:
            if self._versions is not None and self._versions.reload_due:
                await self._versions.refresh()
            verdict = guard.check(envelope)
            if verdict < 0:
                self.stats.version_duplicates += 1
                self._finish(work)
                return
            if verdict > 0:
                self.stats.version_gaps += 1
                if parking is not None:
                    if not (self._owned_until and self._lapsed(work)):
                        await self._dead_letter(
                            work, VersionGap(f"event_version {envelope.event_version} skips ahead")
                        )
                        self._finish(work)
                    return
        await self._process(work)
        if guard is not None and work.state == DONE and work.error is None:
            # No await since the work was done: a flush of the versions cannot run
            # between its commit being held and its version being noted.
            guard.handled(envelope, work.message.partition)

    def _finish(self, work: Work) -> None:
        if work.state == RUNNING:  # not abandoned by a revoke meanwhile
            self._tracker.done(work)
            self._release(1)

    # -- parking: what keybus.parker uses, and the bus's calls ------------------------

    @property
    def envelopes(self) -> bool:
        return self._envelopes

    def owns(self, partition: int) -> bool:
        return (self.topic, partition) in self._assigned

    async def publish_internal(
        self, topic: str, value: bytes, key: str | None, headers: Mapping[str, bytes]
    ) -> None:
        await self._publish_internal(topic, value, key, headers)

    async def dead_letter(
        self, work: Work, error: BaseException, extra: Mapping[str, bytes]
    ) -> None:
        await self._dead_letter(work, error, extra)

    async def attempt(self, work: Work) -> None:
        await self._attempt(work)

    def handled_by_replay(self, payload: Any, partition: int) -> None:
        self.stats.handled += 1
        if self._guard is not None and isinstance(payload, Envelope):
            self._guard.handled(payload, partition)

    def owned_partitions(self) -> set[int]:
        return {p for (t, p) in self._assigned if t == self.topic}

    def _parker(self) -> Parking:
        if self._parking is None:
            raise ValueError(
                f"the subscription of {self.topic!r} ({self.group}) does not park: "
                'subscribe with on_dead_letter="park"'
            )
        return self._parking

    async def parked(self) -> list[ParkedKey]:
        return await self._parker().list()

    async def replay_parked(self, key: str) -> int:
        return await self._parker().replay(key)

    async def discard_parked(self, key: str) -> int:
        return await self._parker().discard(key)

    async def _attempt(self, work: Work) -> None:
        """One more attempt (the first is inlined in :meth:`_process`)."""
        observer = self._observer
        token = None if observer is None else observer.begin(work)
        try:
            if self._chain is not None:
                await self._chain(Delivery(work.message, work.payload, work.attempts))
            else:
                result = self._handler(work.payload)
                if isawaitable(result):
                    await result
        except BaseException as exc:
            if observer is not None:
                observer.end(work, token, exc)
            raise
        if observer is not None:
            observer.end(work, token, None)

    async def _retry(self, work: Work, error: BaseException) -> None:
        """Retry in place — this key's lane stays busy, so order survives — with
        exponential backoff, then dead-letter."""
        options = self.options
        while work.attempts < options.max_attempts:
            self.stats.retries += 1
            delay = options.backoff(work.attempts)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "keybus: handler failed (%s, attempt %d of %d); retrying in %.3g s",
                    type(error).__name__,
                    work.attempts,
                    options.max_attempts,
                    delay,
                    extra=self._where(work),
                )
            await asyncio.sleep(delay)
            if not self._still_ours(work):
                return
            work.attempts += 1
            try:
                await self._attempt(work)
            except Exception as exc:
                error = exc
            except asyncio.CancelledError as exc:
                if being_cancelled():
                    raise
                error = exc
            else:
                self.stats.handled += 1
                return
        if self._still_ours(work):
            await self._dead_letter(work, error)

    def _still_ours(self, work: Work) -> bool:
        """Whether a failed work may be retried or dead-lettered. Not once a revoke
        abandoned it or its partition's ownership lapsed (the partition's next owner
        redoes it; returning leaves it undone),
        nor once the subscription stopped — a handler that outlived the stop's
        cancellation must not retry, dead-letter into a closed transport or commit:
        BusClosedError leaves the work undone, to be redelivered."""
        if self._dispatcher.closed:
            raise BusClosedError("the subscription stopped; the message is redelivered")
        # A retry or a dead letter is work started anew: not past the ownership deadline.
        return work.state == RUNNING and not (self._owned_until and self._lapsed(work))

    def _release(self, count: int) -> None:
        """``count`` works finished or were given up (0: tracked work was forgotten).
        Intake resumes once both windows have room again, and one of them a quarter of
        it: waking the fetcher per finished message costs a task switch each."""
        self._in_flight -= count
        # Event.set() is cheap when already set; the checks keep it off the common path.
        if not self._space.is_set():
            in_flight, tracked = self._in_flight, self._tracker.size
            if (in_flight <= self._resume_at and tracked < self._uncommitted_limit) or (
                tracked <= self._uncommitted_resume and in_flight < self._limit
            ):
                self._space.set()
        if count and not self._progress.is_set():
            self._progress.set()

    def _commit(self, message: Message) -> None:
        if self._versions is not None:
            self._versions.hold(message)  # committed once the versions before it are stored
        else:
            self.commit_now(message)

    def commit_now(self, message: Message) -> None:
        self.stats.committed += 1
        self.last_commit = time.monotonic()
        if self._consumer is not None:
            self._consumer.commit(message)

    async def _dead_letter(
        self, work: Work, error: BaseException, extra: Mapping[str, bytes] | None = None
    ) -> None:
        message = work.message
        reason = f"{type(error).__name__}: {error}"[:_MAX_ERROR_TEXT]
        headers = dict(message.headers)
        headers.update(_origin(message, reason, work.attempts))
        parking = self._parking
        if parking is not None:
            headers[GROUP] = self.group.encode()  # a replay reads back its group's only
            if extra:
                headers.update(extra)
        value = message.value
        attempt = 0
        reduced = False
        while True:
            # Nothing is dropped: until the dead letter is acknowledged the message stays
            # undone (uncommitted), so a close or crash redelivers it instead of losing it.
            try:
                await self._publish(self.dead_letter_topic, value, message.key, headers)
            except BusClosedError:
                raise
            except KeybusError as exc:
                if not self._still_ours(work):
                    return  # abandoned: undone, the partition's next owner redoes it
                if isinstance(exc, PublishError) and exc.permanent and not reduced:
                    # As it is, it can never be written (too large, say: its headers grow
                    # it past the broker's limit): write what identifies it instead, so
                    # the key is not wedged behind a retry without end.
                    log.warning(
                        "keybus: dead letter of %s@%d refused for good (%s); writing it reduced",
                        message.topic,
                        message.offset,
                        exc.reason,
                    )
                    value, headers = b"", _reduced(message, reason, work.attempts, exc)
                    # A flag, not `value is message.value`: an empty value is the b""
                    # singleton, and a refused reduced form would loop without backoff.
                    reduced = True
                    continue
                attempt += 1
                log.warning("keybus: dead-lettering to %s failed: %s", self.dead_letter_topic, exc)
                await asyncio.sleep(self.options.backoff(attempt))
            else:
                break
        self.stats.dead_lettered += 1
        self.stats.note_error(reason)
        work.error = error  # tells the process steps after it that it was not handled
        if parking is not None and not isinstance(error, KeyParked):
            await parking.dead_lettered(work, reason, work.key)
        # The type only: an exception's text may quote the payload (it is in the dead
        # letter's X-Error header, where the payload is anyway).
        log.warning(
            "keybus: %s@%d of %s dead-lettered to %s after %d attempt(s): %s",
            message.partition,
            message.offset,
            message.topic,
            self.dead_letter_topic,
            work.attempts,
            type(error).__name__,
            extra=self._where(work),
        )

    def _where(self, work: Work) -> dict[str, Any]:
        """A log record's structured fields for ``work`` (``extra=``): where the message
        is and which attempt — never its payload."""
        message = work.message
        return {
            "topic": message.topic,
            "partition": message.partition,
            "offset": message.offset,
            "group": self.group,
            "key": work.key,
            "attempt": work.attempts,
        }


def _origin(message: Message, reason: str, attempts: int) -> dict[str, bytes]:
    """The headers that say where a dead letter came from and why."""
    return {
        "X-Error": reason.encode(),
        "X-Original-Topic": message.topic.encode(),
        "X-Original-Partition": str(message.partition).encode(),
        "X-Original-Offset": str(message.offset).encode(),
        "X-Attempts": str(attempts).encode(),
    }


def _reduced(
    message: Message, reason: str, attempts: int, refused: PublishError
) -> dict[str, bytes]:
    """A dead letter's reduced form: no value and none of the original headers, but
    what identifies the original (where it was, its size and SHA-256) and why."""
    headers = _origin(message, reason[:_REDUCED_ERROR_TEXT], attempts)
    headers["X-Truncated"] = refused.reason[:_REDUCED_ERROR_TEXT].encode()
    headers["X-Original-Size"] = str(len(message.value)).encode()
    headers["X-Original-SHA256"] = hashlib.sha256(message.value).hexdigest().encode()
    headers["X-Original-Headers"] = str(len(message.headers)).encode()
    return headers


async def _bounded(
    step: Callable[[Deadline], Awaitable[object]], deadline: Deadline, what: str
) -> None:
    """One step of a stop, given its deadline and cut off at it; never fatal to the steps
    after it (a failed commit flush must not skip leaving the group and releasing the
    consumer)."""
    try:
        await asyncio.wait_for(step(deadline), deadline.remaining())
    except TimeoutError:
        log.error("keybus: %s did not finish in time", what)
    except Exception:
        log.exception("keybus: %s failed", what)
