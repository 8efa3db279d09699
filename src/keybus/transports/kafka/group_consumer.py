"""The shared librdkafka consumer of one group, and the thread that serves it.

librdkafka's ``consume`` blocks, and its callbacks (rebalances, commit results) run
inside it on the calling thread. So each group consumer gets exactly one owned Python
thread, joined at close: it applies subscription changes, consumes in batches, runs the
rebalance callbacks and commits. All topics a bus subscribes to in one group share it:
every change made between two turns of the thread goes out as one ``subscribe`` call, so
a burst of subscribes costs one rebalance, and with cooperative-sticky assignment that
rebalance is incremental (partitions of the other topics keep being consumed).

The thread never waits for the core. It hands each fetched batch to the topic's facade
(:class:`~keybus.transports.kafka.topic_feed.KafkaConsumer`), whose feeder task awaits
``sink.deliver``. When every subscription is backlogged the thread holds (stops fetching,
wakes when the backlog drained); when only some are, or the backlog does not drain within
half a second, their partitions are paused (and resumed once drained), so a slow
subscription holds neither the other topics nor the group's poll loop.

Rebalances. ``on_revoke`` runs on the thread inside ``consume``. It runs the facade's
revoke on the event loop (``sink.revoke``: drop queued records, wait until the revoke's
deadline for running handlers, report the done prefix) and blocks the callback until that
finished, then commits those partitions synchronously, then releases them. Releasing
before the commit would let the next owner start behind the done prefix (duplicates) or,
worse, let a record of ours run after the partition moved. The callbacks take and release
partitions incrementally with a cooperative assignor (our default), and whole assignments
(``assign``/``unassign``) with an eager one (``range``, how a member joins a group of the
Go services' sarama consumers; ``KafkaSettings.eager``): there every rebalance revokes
all of the member's partitions and hands back its complete new assignment.

Refused joins. A coordinator refuses a member whose assignors the group's members do not
share (``INCONSISTENT_GROUP_PROTOCOL``: keybus's cooperative-sticky next to sarama's eager
range); librdkafka hands that to ``consume`` as an error event and retries the join every
2-3 s. The thread passes each one to the loop (:meth:`GroupConsumer.on_join_refused`),
which fails the subscriptions still starting (``SubscribeError`` with the remedy) and logs
an ERROR, once per burst, for those already running: they get no records meanwhile.

Ownership and fences. A member frozen (SIGSTOP, a VM pause) longer than its session has
lost its partitions to another member by the time it resumes, but librdkafka tells us
only later, inside a ``consume`` — meanwhile the loop would start the work it had
queued, beside the new owner. So every partition goes to the core with an ownership
deadline on this member's monotonic clock (``Sink.assign(valid_until=...)``), renewed
while the consumer thread keeps running: a member seen running at ``T`` is still in the
group until at least ``T + ownership_window`` (the session timeout less a heartbeat
interval and a margin: librdkafka's own thread heartbeats meanwhile; a coordinator that
stops answering is librdkafka's to notice, by its local session timeout and ``on_lost``).
After a gap longer than that the thread renews nothing until it has proof of membership:
a synchronous commit the coordinator accepts for the current generation. The core
starts no message past the deadline; it gives such partitions up (``Consumer.lapsed``)
and the thread re-takes them after that proof, seeking back to their done prefix, or
librdkafka's rebalance callbacks take them away. Every record carries the group
generation in which its partition was assigned to this member as ``Message.fence``: a
partition's next owner was assigned it in a later generation, so its fence is larger.

Commits. The core's commit only records ``offset + 1`` for the partition (the end of its
contiguous done prefix). The thread commits what changed asynchronously every
``commit_interval`` seconds, synchronously on revoke, on ``flush`` and before leaving the
group. Auto-commit is off: only the core decides.

Two classes, one per side, so that what runs where is plain:

- :class:`GroupConsumer` is the loop side: what facades and the transport call
  (attach, detach, record_commit, flush, shutdown) and the notices the thread queues for
  the loop (``on_assigned``, ``on_released``, ``forget_detached``). It holds the state
  both sides touch, each attribute saying who writes it.
- :class:`_ConsumerThread` is the thread side: every method runs on the consumer thread,
  and the state only it touches lives there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import struct
import threading
import time
from collections.abc import Callable, Collection, Coroutine, Iterable
from typing import Any, Protocol

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka import Consumer as _RdConsumer

from keybus._aio import wait_event
from keybus.deadline import ABANDON_GRACE, Deadline
from keybus.errors import KeybusError
from keybus.message import Message
from keybus.transports.kafka.config import STEP_MARGIN, KafkaSettings, guard, guarded
from keybus.transports.kafka.errors import (
    error_code,
    is_fatal,
    protocol_conflict,
    reason,
    translate,
)
from keybus.transports.kafka.headers import RecordHeaders
from keybus.transports.kafka.threads import OwnedThread

__all__ = ["BACKLOG_DRAINED", "Feed", "GroupConsumer"]

log = logging.getLogger("keybus.kafka")

_GATHER = 0.005  # how long a turn waits for more records while records flow
_POLL_TIMEOUT = 0.05  # how long the thread may sit in librdkafka before it sees a stop/request
_BACKLOG_HIGH = 4096  # a facade's undelivered records above which fetching stops
BACKLOG_DRAINED = 2048  # ... and at or below which a holding consumer thread fetches again
_BACKLOG_LOW = 1024  # a paused facade's partitions resume below this
# When every subscription of the group is backlogged the thread holds (does not fetch)
# instead of pausing: pausing makes librdkafka drop the records it prefetched for those
# partitions and fetch them again after resume, which cost 2/3 of the consume throughput.
# Holding also delays rebalance callbacks, so a backlog that does not drain within this
# long (a stuck handler) is paused after all.
_HOLD_BEFORE_PAUSE = 0.5
# librdkafka holds a synchronous commit - and a close behind one - until the session
# times out when the coordinator is away, so a commit at close or flush is only made
# after a metadata request showed the broker answers. A healthy broker answers within
# _PROBE_TIMEOUT; the probe gets at most a third of the step's time left (the commit and
# the close come after it), but never less than _PROBE_FLOOR: a step that is late still
# asks, briefly, since the revoke callbacks of the close go by its answer. The answer is
# trusted for _PROBE_FRESH: a flush and the close right after it share one probe, and a
# broker back from an outage is seen soon.
_PROBE_TIMEOUT = 0.5
_PROBE_FLOOR = 0.1
_PROBE_FRESH = 2.0
# A rebalance callback waits for the core's revoke until the revoke's deadline, plus
# ABANDON_GRACE (the core's unwinding of handlers it cancelled at the deadline), plus
# this: the loop still has to run the revoke's last steps, and a loaded loop may take a
# while to get to them. Past it the callback goes on without the core.
_LOOP_MARGIN = 1.0
# librdkafka retries a refused join every 2-3 s while the refusal lasts: one without a
# refusal for this long before it starts a new burst (so is logged again).
_REFUSAL_QUIET = 30.0
# How often the thread passes a renewed ownership deadline to the loop (seconds); the
# deadline itself is ``ownership_window`` ahead of the turn that computed it.
_RENEW_EVERY = 0.5
# How often a member whose ownership lapsed tries to prove it still belongs to the group.
_RETAKE_EVERY = 0.5
# librdkafka's serialised consumer group metadata (rd_kafka_consumer_group_metadata_write):
# this magic, then the generation id as a native int32. confluent-kafka hands it out as
# bytes and offers no accessor for the generation, which is the fence.
_CGMD_MAGIC = b"CGMDv2:"
_GENERATION = struct.Struct("=i")

_ROUTINE_COMMIT_ERRORS = frozenset(
    {
        KafkaError._NO_OFFSET,
        KafkaError.ILLEGAL_GENERATION,
        KafkaError.REBALANCE_IN_PROGRESS,
        KafkaError.UNKNOWN_MEMBER_ID,
    }
)


class Feed(Protocol):
    """What a group consumer needs of one topic's facade (``topic_feed.KafkaConsumer``).
    Methods are called on the loop; ``pushed`` is written by the consumer thread only."""

    topic: str
    revoke_timeout: float
    owned: set[int]  # partitions the core was told about (loop side)
    stopped: bool
    pushed: int
    seq: int  # the subscription change that added the facade
    rebalanced: asyncio.Event  # a rebalance including the facade's change completed,
    # or the group refused the join (then ``join_refused`` is set first)
    released: asyncio.Event  # the facade owns no partition any more
    join_refused: KeybusError | None  # why the subscription could not start (loop side)

    @property
    def backlog(self) -> int:
        """Records handed over by the thread, not yet accepted by the core."""

    def assign(self, partitions: list[int], valid_until: float) -> None: ...

    def renew(self, valid_until: float) -> None: ...

    def retake(self, partitions: list[int], valid_until: float) -> None: ...

    def push(self, messages: list[Message]) -> None: ...

    async def revoke(self, partitions: list[int], deadline: Deadline) -> None: ...


FlushRequest = tuple[concurrent.futures.Future[None], Deadline]


def generation_of(metadata: bytes | None) -> int:
    """The group generation in librdkafka's serialised consumer group metadata (0 if it
    cannot be read: an unknown layout, no generation yet)."""
    if metadata and metadata.startswith(_CGMD_MAGIC) and len(metadata) >= 11:
        generation: int = _GENERATION.unpack_from(metadata, len(_CGMD_MAGIC))[0]
        return max(0, generation)
    return 0


class GroupConsumer:
    """One librdkafka consumer of one group for all topics a bus subscribes to: the loop
    side. The thread (:class:`_ConsumerThread`) starts with the first :meth:`attach`."""

    def __init__(
        self,
        settings: KafkaSettings,
        group: str,
        on_closing: Callable[[GroupConsumer], None] | None = None,
    ) -> None:
        self.settings = settings
        self.group = group
        self.loop = asyncio.get_running_loop()
        self._on_closing = on_closing
        self._thread: OwnedThread | None = None
        self.closing = False  # loop side
        # -- shared with the thread: guarded by ``lock`` where both sides write ----------
        self.lock = threading.Lock()
        self.facades: dict[str, Feed] = {}  # subscribed topics (loop writes, under lock)
        # Facades taken out of the subscription whose partitions may still be revoked.
        self.detached: dict[str, Feed] = {}
        self.subscription_dirty = False  # loop sets, thread clears (under lock)
        self.sub_seq = 0  # bumped by every subscription change (loop, under lock)
        self.flush_requests: list[FlushRequest] = []  # loop appends, thread takes (lock)
        # Next offset to commit, per partition: the loop writes without the lock (see
        # record_commit), the thread copies it and pops revoked partitions.
        self.wanted: dict[tuple[str, int], int] = {}
        # Partitions the core gave up when their ownership lapsed (loop adds, under lock;
        # the thread takes them and re-takes them, or a rebalance takes them away).
        self.lapsed: set[tuple[str, int]] = set()
        self.stop = threading.Event()  # set by shutdown
        self.stop_by = Deadline(math.inf)  # the stop's deadline, set before ``stop``
        # Set by the loop when a backlog drained (or anything else needs the thread) while
        # the thread holds; ``holding`` (thread writes) tells the loop it should bother.
        self.drained = threading.Event()
        self.holding = False
        # Refused joins (loop side): when the last came, and whether its burst was logged.
        self._refused_at = -math.inf
        self._refusal_logged = False

    # -- called by facades and the transport ------------------------------------------

    def attach(self, facade: Feed) -> int:
        """Add the facade's topic to the subscription (starting the thread on first use);
        returns the change's sequence number. Failure: ``SubscribeError``."""
        with self.lock:
            self.facades[facade.topic] = facade
            self.sub_seq += 1
            self.subscription_dirty = True
            seq = self.sub_seq
        self.drained.set()
        if self._thread is None:
            worker = _ConsumerThread(self)
            config = {
                **guarded(self.settings.consumer),
                "group.id": self.group,
                "on_commit": guard(worker.on_commit),
            }
            try:
                rd = _RdConsumer(config)
            except (KafkaException, TypeError, ValueError) as exc:  # e.g. a bad setting
                with self.lock:
                    del self.facades[facade.topic]
                raise translate(
                    exc,
                    "subscribe",
                    facade.topic,
                    group=self.group,
                    context="cannot create the Kafka consumer",
                ) from exc
            self._thread = OwnedThread(
                lambda: worker.run(rd), f"keybus-kafka-consumer:{self.group}", self.loop
            )
            self._thread.start()
        return seq

    async def detach(self, facade: Feed, deadline: Deadline) -> None:
        """Take the topic out of the subscription; returns once its partitions are
        released (or, for the last topic, once the consumer left the group), or shortly
        before ``deadline``."""
        with self.lock:
            if self.facades.get(facade.topic) is facade:
                del self.facades[facade.topic]
                self.detached[facade.topic] = facade
                self.sub_seq += 1
                self.subscription_dirty = True
            last = not self.facades
        self.drained.set()
        if last:
            await self.shutdown(deadline)
        elif facade.owned and not await wait_event(facade.released, deadline.before(STEP_MARGIN)):
            log.warning(
                "keybus: partitions of %s in group %s not released by the close's deadline "
                "(a revoke holds the consumer thread); they are released after it",
                facade.topic,
                self.group,
            )

    def detaching(self, topic: str) -> bool:
        """A detached subscription to ``topic`` may still own partitions here."""
        return topic in self.detached

    def record_commit(self, topic: str, partition: int, offset: int) -> None:
        # Loop side, once per done message: no lock. The thread only copies the dict
        # (one C call, atomic under the GIL) and pops revoked partitions, which happens
        # after the facade stopped committing them (``owned`` was updated on the loop).
        tp = (topic, partition)
        wanted = self.wanted
        if offset > wanted.get(tp, -1):
            wanted[tp] = offset

    def note_lapsed(self, topic: str, partitions: Collection[int]) -> None:
        """The core gave these partitions of ``topic`` up (their ownership lapsed): the
        thread proves it still owns them and re-takes them, or they go in a rebalance."""
        with self.lock:
            self.lapsed.update((topic, p) for p in partitions)
        self.drained.set()

    async def flush(self, deadline: Deadline) -> None:
        """Have the thread commit what was recorded, synchronously; wait for it until
        shortly before ``deadline``."""
        if self._thread is None or self.stop.is_set():
            return
        request: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self.lock:
            self.flush_requests.append((request, deadline))
        self.drained.set()
        try:
            async with asyncio.timeout(deadline.before(STEP_MARGIN).remaining()):
                await asyncio.wrap_future(request)  # given up: the request is cancelled
        except TimeoutError:
            log.warning(
                "keybus: commits of group %s not confirmed by the flush's deadline (the "
                "consumer thread is busy, e.g. in a revoke); the close commits them",
                self.group,
            )

    @property
    def finished(self) -> bool:
        return self._thread is None or self._thread.finished

    async def shutdown(self, deadline: Deadline) -> None:
        """Stop the thread (final commit, leave the group); wait for it until shortly
        before ``deadline`` (the first call's deadline also bounds the thread's probe)."""
        if not self.closing:
            self.closing = True
            if self._on_closing is not None:
                self._on_closing(self)
            self.stop_by = deadline
            self.stop.set()
            self.drained.set()
        thread = self._thread
        if thread is not None and not await thread.join(deadline.before(STEP_MARGIN)):
            log.error("keybus: Kafka consumer of group %s did not stop in time", self.group)

    # -- notices from the thread, run on the loop (queued in order) --------------------

    def on_assigned(self, by_topic: dict[str, list[int]], seq: int, valid_until: float) -> None:
        self._refusal_logged = False  # joined: a later refusal is a new occurrence
        for facade in list(self.facades.values()):
            parts = by_topic.get(facade.topic)
            if parts:
                facade.assign(parts, valid_until)
            if facade.seq <= seq:
                facade.rebalanced.set()

    def on_renewed(self, valid_until: float) -> None:
        for facade in list(self.facades.values()):
            facade.renew(valid_until)

    def on_retaken(self, by_topic: dict[str, list[int]], valid_until: float) -> None:
        for topic, parts in by_topic.items():
            facade = self.facades.get(topic)
            if facade is not None:
                facade.retake(parts, valid_until)

    def on_join_refused(self, error: KafkaError, seq: int) -> None:
        """The coordinator refused this member's join (``error``: the consume error
        event, INCONSISTENT_GROUP_PROTOCOL); ``seq``: the last subscription change the
        thread had applied. Subscriptions still starting fail now with the remedy (their
        subscribe() raises it) instead of at ``assign_timeout``; those already running
        get nothing while it lasts, which is logged once per burst of refusals."""
        hint = protocol_conflict(self.settings.eager)
        running: list[str] = []
        for facade in list(self.facades.values()):
            if not facade.rebalanced.is_set():
                if facade.seq <= seq:  # a later change is refused by its own join
                    facade.join_refused = translate(
                        error, "subscribe", facade.topic, group=self.group, hint=hint
                    )
                    facade.rebalanced.set()
            elif facade.join_refused is None and not facade.stopped:
                running.append(facade.topic)
        now = time.monotonic()
        if now - self._refused_at > _REFUSAL_QUIET:
            self._refusal_logged = False
        self._refused_at = now
        if running and not self._refusal_logged:
            self._refusal_logged = True
            log.error(
                "keybus: Kafka group %s refused this consumer's join (%s): %s. Its "
                "subscriptions to %s get no records until that changes (librdkafka "
                "keeps retrying the join)",
                self.group,
                reason(error),
                hint,
                ", ".join(sorted(running)),
            )
        else:
            log.debug("keybus: Kafka group %s refused the join: %s", self.group, reason(error))

    def on_released(self, topics: set[str]) -> None:
        for topic in topics:
            facade = self.facade_of(topic)
            if facade is not None and not facade.owned:
                facade.released.set()
                if self.detached.get(topic) is facade:
                    del self.detached[topic]

    def forget_detached(self, facades: list[Feed]) -> None:
        # Queued by the thread after the change was applied, behind any release of theirs.
        for facade in facades:
            if self.detached.get(facade.topic) is facade and not facade.owned:
                with self.lock:
                    del self.detached[facade.topic]
                facade.released.set()

    def facade_of(self, topic: str) -> Feed | None:
        """Either side."""
        with self.lock:
            return self.facades.get(topic) or self.detached.get(topic)


class _ConsumerThread:
    """The consumer thread's side of a :class:`GroupConsumer`. Every method runs on that
    thread (the librdkafka callbacks inside ``consume``/``commit``/``close`` on it), and
    every librdkafka call on the consumer is made here."""

    def __init__(self, group: GroupConsumer) -> None:
        self._group = group
        self._applied_seq = 0  # last subscription change handed to librdkafka
        self._assigned: dict[str, set[int]] = {}
        self._paused: set[str] = set()  # topics whose partitions are paused
        self._committed: dict[tuple[str, int], int] = {}  # confirmed by the broker
        self._reachable: bool | None = None  # see _probe
        self._probed_at = 0.0
        self._async_pending = False  # an asynchronous commit awaits its result
        self._eager = group.settings.eager  # whole-assignment rebalance callbacks
        # Ownership (see the module's docstring): the group generation each partition was
        # assigned in (its fence), until when (time.monotonic()) this member is known to
        # be in the group, when the loop was last told, and the partitions the core gave
        # up that wait to be re-taken.
        self._fences: dict[tuple[str, int], int] = {}
        self._window = group.settings.ownership_window
        self._valid_until = -math.inf
        self._renewed_at = -math.inf
        self._lapsed: set[tuple[str, int]] = set()
        # The first offset fetched of each partition since it was assigned: where a
        # partition the group never committed resumes after a lapse (its reset policy
        # put the fetch there; the records from it on may have been dropped by the core).
        self._started: dict[tuple[str, int], int] = {}
        self._retake_at = -math.inf
        self._retake_refused = False  # the last re-take was refused (logged once)

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)`` on the loop (in order with every other notice)."""
        with contextlib.suppress(RuntimeError):
            self._group.loop.call_soon_threadsafe(fn, *args)

    def _run_on_loop(self, coro: Coroutine[Any, Any, None], until: Deadline) -> None:
        """Run ``coro`` on the event loop and wait for it on this thread until ``until``."""
        group = self._group
        try:
            future = asyncio.run_coroutine_threadsafe(coro, group.loop)
        except RuntimeError:
            coro.close()
            return
        try:
            while True:
                # In slices: the thread still runs while it waits, so the member's
                # ownership is still renewed (a revoke may wait for handlers a while).
                self._keep_alive(time.monotonic())
                try:
                    future.result(min(_RENEW_EVERY, until.remaining()))
                    break
                except concurrent.futures.TimeoutError:
                    if until.expired:
                        raise
        except concurrent.futures.TimeoutError:
            future.cancel()
            log.error("keybus: rebalance step of group %s did not finish in time", group.group)
        except Exception:
            log.exception("keybus: rebalance step of group %s failed", group.group)

    # -- ownership ------------------------------------------------------------------

    def _keep_alive(self, now: float) -> None:
        """The thread runs at ``now``: while it has run without a gap longer than the
        ownership window, the member is still in the group, and its deadline moves on
        (the loop is told every ``_RENEW_EVERY``). After such a gap it may not be: the
        deadline stays where it was until :meth:`_retake` proves membership again."""
        if now >= self._valid_until:
            return
        self._valid_until = now + self._window
        if now - self._renewed_at >= _RENEW_EVERY:
            self._renewed_at = now
            self._call(self._group.on_renewed, self._valid_until)

    def _generation(self, consumer: _RdConsumer) -> int:
        """The group's current generation: the fence of what this rebalance assigns."""
        try:
            return generation_of(consumer.consumer_group_metadata())
        except Exception as exc:  # never keep an assignment from the core over a fence
            log.warning("keybus: group %s: no generation for the fence: %s", self._group.group, exc)
            return 0

    def _retake(self, consumer: _RdConsumer) -> None:
        """Re-take the partitions the core gave up when their ownership lapsed, if this
        member still owns them: a synchronous commit of their done prefix that the
        coordinator accepts proves membership of the current generation (a partition
        that moved on would have been revoked first, or the commit refused). Then each is
        sought back to its done prefix — records after it were dropped by the core — and
        handed to the core again. Refused: the rebalance callbacks decide."""
        group = self._group
        with group.lock:
            self._lapsed |= group.lapsed
            group.lapsed.clear()
        self._lapsed = {tp for tp in self._lapsed if tp[1] in self._assigned.get(tp[0], ())}
        if not self._lapsed:
            return
        sent = time.monotonic()
        # A commit to a coordinator that does not answer blocks until the session times
        # out: ask (briefly) whether the broker answers first.
        if not self._probe(consumer, Deadline.after(1.0)):
            return
        try:
            targets = self._done_prefix(consumer, self._lapsed)
            offsets = [TopicPartition(t, p, o) for (t, p), o in targets.items()]
            result = consumer.commit(offsets=offsets, asynchronous=False)
            refused = [tp for tp in result or () if tp.error is not None]
            if refused:
                raise KafkaException(refused[0].error)
            for tp in offsets:
                consumer.seek(tp)
        except Exception as exc:
            # The rebalance that follows (on_lost, a new assignment) decides; say so once.
            log.log(
                logging.DEBUG if self._retake_refused else logging.INFO,
                "keybus: group %s: partitions whose ownership lapsed not re-taken (yet): %s",
                group.group,
                reason(exc),
            )
            self._retake_refused = True
            return
        self._retake_refused = False
        self._note_committed(offsets)
        by_topic: dict[str, list[int]] = {}
        for topic, partition in self._lapsed:
            by_topic.setdefault(topic, []).append(partition)
        self._lapsed.clear()
        self._valid_until = sent + self._window
        log.warning(
            "keybus: group %s: re-took %s after their ownership lapsed (the member "
            "stalled); resuming at their done prefix",
            group.group,
            {t: sorted(p) for t, p in by_topic.items()},
        )
        self._call(group.on_retaken, by_topic, self._valid_until)
        self._renewed_at = sent
        self._call(group.on_renewed, self._valid_until)

    def _done_prefix(
        self, consumer: _RdConsumer, partitions: Collection[tuple[str, int]]
    ) -> dict[tuple[str, int], int]:
        """Where each partition resumes: the end of its done prefix as the core reported
        it, else its committed offset, else (never committed) where this assignment
        started fetching it, else (nothing fetched yet) where its reset policy starts
        it. One request to the broker for each step that needs one, all partitions in it."""
        wanted = self._group.wanted
        targets: dict[tuple[str, int], int] = {}
        unknown: list[TopicPartition] = []
        for tp in partitions:
            offset = max(wanted.get(tp, -1), self._committed.get(tp, -1))
            if offset >= 0:
                targets[tp] = offset
            else:
                unknown.append(TopicPartition(*tp))
        if not unknown:
            return targets
        unstarted: list[TopicPartition] = []
        for found in consumer.committed(unknown, timeout=_PROBE_TIMEOUT * 2):
            tp = (found.topic, found.partition)
            offset = found.offset if found.offset >= 0 else self._started.get(tp, -1)
            if offset >= 0:
                targets[tp] = offset
            else:
                unstarted.append(found)
        if unstarted:
            # (offsets_for_times takes the logical offsets too: ListOffsets' "timestamps")
            logical = OFFSET_END if self._group.settings.reset_to_end else OFFSET_BEGINNING
            asked = [TopicPartition(t.topic, t.partition, logical) for t in unstarted]
            for found in consumer.offsets_for_times(asked, timeout=_PROBE_TIMEOUT * 2):
                if found.error is not None or found.offset < 0:
                    raise KafkaException(found.error or KafkaError(KafkaError._NO_OFFSET))
                targets[(found.topic, found.partition)] = found.offset
        return targets

    def run(self, consumer: _RdConsumer) -> None:
        group = self._group
        batch = group.settings.fetch_batch
        interval = group.settings.commit_interval
        next_commit = time.monotonic() + interval
        held_since: float | None = None
        failures = 0
        quiet = True
        try:
            while not group.stop.is_set():
                try:
                    self._apply_subscription(consumer)
                    self._serve_flushes(consumer)
                    now = time.monotonic()
                    self._keep_alive(now)
                    if (group.lapsed or self._lapsed) and now >= self._retake_at:
                        self._retake_at = now + _RETAKE_EVERY
                        self._retake(consumer)
                    if now >= next_commit:
                        next_commit = now + interval
                        self._commit(consumer, None, asynchronous=True)
                    if self._all_backlogged():
                        if held_since is None:
                            held_since = now
                        if now - held_since < _HOLD_BEFORE_PAUSE:
                            self._hold()
                            continue
                    else:
                        held_since = None
                    self._apply_backpressure(consumer)
                    records = self._fetch(consumer, batch, quiet)
                    quiet = not records
                    if records:
                        self._dispatch(records)
                    failures = 0
                except Exception as exc:
                    # A KafkaError from consume, a callback that raised inside it (ours or
                    # a user's error_cb/stats_cb), a failed pause/resume: one bad turn
                    # must not end the thread — every subscription of the group would
                    # stall with nobody noticing. Log, back off, go on.
                    failures += 1
                    log.error(
                        "keybus: Kafka consumer of group %s: %s (retrying)",
                        group.group,
                        reason(exc),
                        exc_info=failures == 1 or failures % 100 == 0,
                    )
                    if is_fatal(exc):
                        raise
                    group.stop.wait(min(0.05 * failures, 1.0))
            self._serve_flushes(consumer)
            if self._probe(consumer, group.stop_by):
                with contextlib.suppress(KafkaException):  # logged; the broker keeps the last
                    self._commit(consumer, None, asynchronous=False)
            # Leaving the group runs on_revoke for what we still own (commit, release).
            consumer.close()
        except Exception:  # pragma: no cover - never leave the loop waiting on a dead thread
            log.exception("keybus: Kafka consumer thread of group %s failed", group.group)
            with contextlib.suppress(Exception):
                consumer.close()
        finally:
            del consumer
            with group.lock:
                requests, group.flush_requests = group.flush_requests, []
            for request, _ in requests:
                if request.set_running_or_notify_cancel():
                    request.set_result(None)

    @staticmethod
    def _fetch(consumer: _RdConsumer, batch: int, quiet: bool) -> list[Any]:
        """The next records to dispatch. ``consume(n, t)`` returns once it has n records
        or t ran out, so below n/t records/s every record waited up to t in librdkafka
        (p50 37 ms at 8k/s with n=500, t=50 ms). So: after a quiet spell, wake on the
        first record; while records flow, take what is queued at once, else gather for
        at most _GATHER (one record per dispatch made the loop's share per record grow
        until it fell behind: p99 100-270 ms). At saturation the batches stay full.
        Every call's records are dispatched before the next call: a rebalance callback
        runs inside consume(), and a record held across it could belong to a partition
        revoked (or re-assigned from its committed offset) meanwhile."""
        if quiet:
            return consumer.consume(1, _POLL_TIMEOUT)
        return consumer.consume(batch, 0) or consumer.consume(batch, _GATHER)

    def _apply_subscription(self, consumer: _RdConsumer) -> None:
        group = self._group
        if not group.subscription_dirty:
            return
        with group.lock:
            topics = sorted(group.facades)
            seq = group.sub_seq
            group.subscription_dirty = False
            # Detached topics this member holds no partition of: no revoke will come for
            # them, so nothing else would take them out of ``detached``.
            idle = [
                f
                for t, f in group.detached.items()
                if t not in self._assigned and t not in group.facades
            ]
        if topics:
            consumer.subscribe(
                topics,
                on_assign=guard(self._on_assign),
                on_revoke=guard(self._on_revoke),
                on_lost=guard(self._on_lost),
            )
        else:
            consumer.unsubscribe()
        self._applied_seq = seq
        if idle:
            self._call(group.forget_detached, idle)

    # -- backpressure ---------------------------------------------------------------

    def _all_backlogged(self) -> bool:
        """True if every facade with partitions to fetch from is over its backlog limit:
        fetching more helps nobody, and the thread can just wait for the core."""
        facades = self._group.facades
        backlogged = False
        for topic in self._assigned:
            if topic in self._paused:
                continue
            facade = facades.get(topic)
            if facade is None or facade.stopped:
                continue
            if facade.backlog <= _BACKLOG_HIGH:
                return False
            backlogged = True
        return backlogged

    def _hold(self) -> None:
        group = self._group
        group.drained.clear()
        group.holding = True
        try:
            if self._all_backlogged() and not group.flush_requests:
                group.drained.wait(_POLL_TIMEOUT)
        finally:
            group.holding = False

    def _apply_backpressure(self, consumer: _RdConsumer) -> None:
        facades = self._group.facades
        for topic, partitions in self._assigned.items():
            facade = facades.get(topic)
            should_pause = facade is None or facade.stopped or facade.backlog > _BACKLOG_HIGH
            if topic in self._paused:
                if facade is not None and not facade.stopped and facade.backlog < _BACKLOG_LOW:
                    consumer.resume([TopicPartition(topic, p) for p in partitions])
                    self._paused.discard(topic)
            elif should_pause and partitions:
                consumer.pause([TopicPartition(topic, p) for p in partitions])
                self._paused.add(topic)

    def _dispatch(self, records: list[Any]) -> None:
        # Per-record work here holds the GIL the event loop needs: keep it to the fields
        # the core uses, and leave the headers to whoever reads them (RecordHeaders).
        by_topic: dict[str, list[Message]] = {}
        last_topic: str | None = None
        chunk: list[Message] = []
        fences, started = self._fences, self._started
        # Records come in runs of one partition: its fence is looked up once a run.
        last_partition = -1
        fence = 0
        for record in records:
            if record.error() is not None:
                self._on_error_event(record.error())
                continue
            topic = record.topic()
            partition = record.partition()
            if topic != last_topic:
                last_topic = topic
                chunk = by_topic.setdefault(topic, [])
                last_partition = -1
            if partition != last_partition:
                last_partition = partition
                fence = fences.get((topic, partition), 0)
                started.setdefault((topic, partition), record.offset())
            raw_key = record.key()
            key: str | None
            if type(raw_key) is bytes:
                key = raw_key.decode("utf-8", "replace")
            elif raw_key is None:
                key = None
            else:
                key = str(raw_key)
            kind, stamp = record.timestamp()
            chunk.append(
                Message(
                    topic,
                    record.value() or b"",
                    key,
                    RecordHeaders(record),
                    partition,
                    record.offset(),
                    stamp / 1000.0 if kind else None,
                    record,
                    fence,
                )
            )
        facades = self._group.facades
        for topic, messages in by_topic.items():
            facade = facades.get(topic)
            if facade is not None and not facade.stopped:
                facade.pushed += len(messages)
                self._call(facade.push, messages)
            # else: nobody consumes the topic any more; nothing is committed for it, so
            # the next owner of its partitions gets these records again.

    def _on_error_event(self, error: KafkaError) -> None:
        code = error.code()
        if code == KafkaError.INCONSISTENT_GROUP_PROTOCOL:
            # Queued behind every assignment notice so far (FIFO): the loop decides
            # which subscriptions it concerns.
            self._call(self._group.on_join_refused, error, self._applied_seq)
        elif code != KafkaError._PARTITION_EOF:
            log.warning("keybus: Kafka consumer of %s: %s", self._group.group, reason(error))

    # -- commits --------------------------------------------------------------------

    def _probe(self, consumer: _RdConsumer, by: Deadline) -> bool:
        """Does the broker answer? A synchronous commit to an unreachable coordinator
        blocks (and a close behind it) until the session times out; a metadata request
        with a timeout tells sooner. ``by`` is the deadline of the step that asks. Never
        call it from a librdkafka callback (see ``_release``)."""
        now = time.monotonic()
        if self._reachable is None or now - self._probed_at > _PROBE_FRESH:
            self._probed_at = now
            timeout = max(_PROBE_FLOOR, min(_PROBE_TIMEOUT, by.remaining() / 3))
            try:
                consumer.list_topics(timeout=timeout)
                self._reachable = True
            except Exception as exc:
                log.warning(
                    "keybus: Kafka broker unreachable, group %s does not commit at close: %s",
                    self._group.group,
                    reason(exc),
                )
                self._reachable = False
        return self._reachable

    def _serve_flushes(self, consumer: _RdConsumer) -> None:
        group = self._group
        if not group.flush_requests:
            return
        with group.lock:
            requests, group.flush_requests = group.flush_requests, []
        error: BaseException | None = None
        try:
            # Unreachable: nothing can be committed; the records are redone (at-least-once).
            if self._probe(consumer, max((d for _, d in requests), key=lambda d: d.at)):
                self._commit(consumer, None, asynchronous=False)
        except KafkaException:  # logged by _commit; the broker keeps the last commit
            pass
        except Exception as exc:  # reported to the waiter
            error = exc
        for request, _ in requests:
            if not request.set_running_or_notify_cancel():
                continue  # the waiter gave up (its own deadline)
            if error is None:
                request.set_result(None)
            else:
                request.set_exception(error)

    def _commit(
        self, consumer: _RdConsumer, only: Collection[tuple[str, int]] | None, *, asynchronous: bool
    ) -> None:
        wanted = self._group.wanted.copy()  # the loop adds to it without the lock
        committed = self._committed
        offsets = [
            TopicPartition(topic, partition, offset)
            for (topic, partition), offset in wanted.items()
            if (only is None or (topic, partition) in only)
            and committed.get((topic, partition), -1) < offset
        ]
        if not offsets:
            return
        try:
            if asynchronous:
                if self._async_pending:
                    return  # one at a time: a piled-up commit to an absent coordinator
                    # holds close() until the session times out
                self._async_pending = True
                try:
                    consumer.commit(offsets=offsets, asynchronous=True)
                except BaseException:
                    self._async_pending = False
                    raise
                return
            result = consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            if error_code(exc) == KafkaError._NO_OFFSET:
                return
            log.warning("keybus: commit for group %s failed: %s", self._group.group, reason(exc))
            if not asynchronous:
                raise
            return
        if result:
            self._note_committed(result)

    def _note_committed(self, partitions: Iterable[Any]) -> None:
        committed = self._committed
        for tp in partitions:
            if tp.error is None and tp.offset >= 0:
                key = (tp.topic, tp.partition)
                if tp.offset > committed.get(key, -1):
                    committed[key] = tp.offset

    def on_commit(self, err: Any, partitions: list[Any]) -> None:
        """librdkafka's commit callback (``on_commit`` in the consumer's config)."""
        self._async_pending = False  # sync commits report here too: harmless
        if err is not None:
            # Offsets that did not make it stay wanted and go out with the next commit;
            # a rebalance in progress makes async commits fail routinely.
            group = self._group.group
            if err.code() in _ROUTINE_COMMIT_ERRORS:
                log.debug("keybus: async commit for group %s: %s", group, reason(err))
            else:
                log.warning("keybus: async commit for group %s failed: %s", group, reason(err))
            return
        self._note_committed(partitions)

    # -- rebalance callbacks ----------------------------------------------------------

    def _on_assign(self, consumer: _RdConsumer, partitions: list[Any]) -> None:
        # Eager: ``partitions`` is the whole new assignment (the revoke before the
        # rebalance released everything); cooperative: what this rebalance adds.
        if self._eager:
            consumer.assign(partitions)
        else:
            consumer.incremental_assign(partitions)
        fence = self._generation(consumer)
        by_topic: dict[str, list[int]] = {}
        for tp in partitions:
            by_topic.setdefault(tp.topic, []).append(tp.partition)
            self._assigned.setdefault(tp.topic, set()).add(tp.partition)
            self._fences[(tp.topic, tp.partition)] = fence
            self._lapsed.discard((tp.topic, tp.partition))  # assigned anew: fetched afresh
            self._started.pop((tp.topic, tp.partition), None)
        paused = [tp for tp in partitions if tp.topic in self._paused]
        if paused:
            consumer.pause(paused)
        # Being handed an assignment proves membership of the current generation.
        self._valid_until = time.monotonic() + self._window
        # Assignments reach the loop before any record of these partitions (FIFO).
        self._call(self._group.on_assigned, by_topic, self._applied_seq, self._valid_until)

    def _unassign(self, consumer: _RdConsumer, partitions: list[Any]) -> None:
        if self._eager:
            consumer.unassign()
        else:
            consumer.incremental_unassign(partitions)

    def _on_revoke(self, consumer: _RdConsumer, partitions: list[Any]) -> None:
        self._release(consumer, partitions, lost=False)

    def _on_lost(self, consumer: _RdConsumer, partitions: list[Any]) -> None:
        # Someone else may own these already: drop our records, commit nothing.
        self._release(consumer, partitions, lost=True)

    def _release(self, consumer: _RdConsumer, partitions: list[Any], *, lost: bool) -> None:
        group = self._group
        by_topic: dict[str, list[int]] = {}
        for tp in partitions:
            by_topic.setdefault(tp.topic, []).append(tp.partition)
        for topic, parts in by_topic.items():
            facade = group.facade_of(topic)
            if facade is not None:
                # Lost: another member may own the partitions already, so the core
                # cancels running handlers at once (a passed deadline).
                deadline = Deadline.passed() if lost else Deadline.after(facade.revoke_timeout)
                until = deadline.later(ABANDON_GRACE + _LOOP_MARGIN)
                self._run_on_loop(facade.revoke(parts, deadline), until)
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        # No _probe() here: we are inside a librdkafka callback, and list_topics() ends
        # the CallState of the consume()/close() that runs it, so that call's next
        # callback aborts the process (confluent-kafka's CallState_get assertion). A
        # closing thread probed before its consumer.close(); a stop that arrived during
        # this revoke goes by the last answer, and commits like any revoke without one.
        if not lost and (not group.stop.is_set() or self._reachable is not False):
            # Commit before release: the next owner starts exactly after our done prefix.
            try:
                self._commit(consumer, revoked, asynchronous=False)
            except Exception as exc:
                log.warning("keybus: commit on revoke for %s failed: %s", group.group, exc)
        with group.lock:
            for tp in revoked:
                group.wanted.pop(tp, None)
                group.lapsed.discard(tp)
                self._committed.pop(tp, None)
                self._fences.pop(tp, None)
                self._lapsed.discard(tp)
                self._started.pop(tp, None)
        for topic, parts in by_topic.items():
            owned = self._assigned.get(topic)
            if owned is not None:
                owned.difference_update(parts)
                if not owned:
                    del self._assigned[topic]
                    self._paused.discard(topic)
        # Eager: ``partitions`` is the whole assignment, released at once.
        if lost:
            with contextlib.suppress(KafkaException):
                self._unassign(consumer, partitions)
        else:
            self._unassign(consumer, partitions)
        self._call(group.on_released, set(by_topic))
